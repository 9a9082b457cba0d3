#!/usr/bin/env python
"""EF21-W's larger stepsize (Richtárik, Gasanov, Burlachenko, "Error Feedback Reloaded", ICLR 2024),
small: the EF21 paper's logistic regression with the non-convex regulariser λ Σ x_j²/(1 + x_j²)
(λ = 0.1), n = 10 workers whose smoothness constants L_i span a factor ~100, top-1 (k = 1 of d =
20), each method at its theoretical stepsize:

    EF21      γ = 1/(L + L_QM·ξ(α))      L_QM = √(mean L_i²)
    EF21-W    γ = 1/(L + L_AM·ξ(α))      L_AM = mean L_i  (≤ L_QM: a larger step)
    top-1 without error feedback, and MEM-SGD's error feedback (EF14), at EF21-W's γ

Prints, as a markdown table, the rounds each needs to reach ‖∇f(x)‖ < 10⁻³ (at most 6000) and the
final ‖∇f‖.  Runs the algorithms' five steps of hvdcomp.algorithms in one process (one server,
whole vectors; float64), with hvdcomp's top-k compressor.

    .venv/bin/python scripts/reproduce_ef21w.py
"""
from __future__ import annotations

import math

import torch

from hvdcomp.algorithms import make_algorithm
from hvdcomp.algorithms.stepsize import (ef21_stepsize, ef21w_stepsize, logistic_smoothness,
                                         topk_alpha)

LAMBDA, N, D, M, SPREAD, TOL, MAX_ROUNDS = 0.1, 10, 20, 50, 100.0, 1e-3, 6000
TOP1 = "topk:ratio=0.05"   # ceil(0.05 · 20) = 1


def problem(seed: int = 0):
    """Worker i's features scaled by √(SPREAD^{i/(N−1)}): L_i spanning a factor ≈ SPREAD."""
    gen = torch.Generator().manual_seed(seed)
    features = torch.randn(N, M, D, generator=gen, dtype=torch.float64)
    scales = torch.tensor([math.sqrt(SPREAD ** (i / (N - 1))) for i in range(N)],
                          dtype=torch.float64)
    features = features * scales[:, None, None]
    truth = torch.randn(N, D, generator=gen, dtype=torch.float64)
    noise = 0.5 * torch.randn(N, M, generator=gen, dtype=torch.float64)
    labels = torch.sign(torch.einsum("imd,id->im", features, truth) + noise)
    return features, labels


def gradients(features, labels, x):
    """∇f_i(x) of every worker: mean logistic loss + λ Σ x_j²/(1 + x_j²)."""
    margins = labels * torch.einsum("imd,d->im", features, x)
    weights = torch.sigmoid(-margins) * labels
    return -(features * weights.unsqueeze(2)).sum(1) / M + LAMBDA * 2 * x / (1 + x * x) ** 2


def run(workers, features, labels, gamma):
    """Rounds until ‖∇f‖ < TOL (or MAX_ROUNDS), and the final ‖∇f‖; one server, whole vectors."""
    x = torch.zeros(D, dtype=torch.float64)
    up = workers[0].up
    for k in range(MAX_ROUNDS + 1):
        grads = gradients(features, labels, x)
        norm = grads.mean(0).norm().item()
        if norm < TOL or k == MAX_ROUNDS:
            return k, norm
        sent = []
        for worker, grad in zip(workers, grads):
            message = worker.worker_message("x", grad)
            decoded = up.roundtrip(message)[1]
            worker.worker_sent("x", message, decoded)
            sent.append(decoded)
        mean = torch.stack(sent).mean(0)
        server = workers[0].server_message("x", mean)
        workers[0].server_sent("x", server, server)
        x = x - gamma * workers[0].worker_update("x", server)
        for worker in workers:
            worker.end_round()


def main() -> None:
    features, labels = problem()
    smooth = [logistic_smoothness(features[i], LAMBDA) for i in range(N)]
    big_l = logistic_smoothness(features.reshape(-1, D), LAMBDA)
    alpha = topk_alpha(1, D)
    gamma_ef21, gamma_ef21w = ef21_stepsize(big_l, smooth, alpha), ef21w_stepsize(big_l, smooth,
                                                                                  alpha)
    rows = [
        ("EF21 + top-1", gamma_ef21,
         [make_algorithm("ef21", up=TOP1) for _ in range(N)]),
        ("EF21-W + top-1", gamma_ef21w,
         [make_algorithm("ef21w", up=TOP1, smoothness=smooth, rank=i) for i in range(N)]),
        ("top-1, no error feedback", gamma_ef21w,
         [make_algorithm("psgd", up=TOP1, down="none") for _ in range(N)]),
        ("MEM-SGD (EF14) + top-1", gamma_ef21w,
         [make_algorithm("memsgd", up=TOP1) for _ in range(N)]),
    ]
    print(f"L_i from {min(smooth):.3g} to {max(smooth):.3g}; L = {big_l:.3g}; "
          f"L_QM = {math.sqrt(sum(s * s for s in smooth) / N):.3g}, L_AM = {sum(smooth) / N:.3g}")
    print("| method | stepsize γ | rounds to ‖∇f‖ < 1e-3 | final ‖∇f‖ |")
    print("|---|---|---|---|")
    for name, gamma, workers in rows:
        rounds, norm = run(workers, features, labels, gamma)
        shown = f"{rounds}" if norm < TOL else f"> {MAX_ROUNDS} (not reached)"
        print(f"| {name} | {gamma:.4g} | {shown} | {norm:.2e} |", flush=True)


if __name__ == "__main__":
    main()
