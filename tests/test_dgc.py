"""Deep Gradient Compression: warm-up schedule, momentum correction and masking, local clipping,
payload size, DGCSGD, and whole rounds through the exchange on the in-process simulator.

Hand-computed values are worked out in the comments next to them from the paper's equations
(research notes §3.1); the simulator runs are compared with a plain re-implementation of those
equations that uses ``torch.topk`` directly.
"""
from __future__ import annotations

import logging

import pytest
import torch

from hvdcomp.algorithms import make_algorithm
from hvdcomp.algorithms.dgc import DGC, DGCSGD, clip_local_gradient, dgc_density
from hvdcomp.comm import simulate
from hvdcomp.compressors import from_spec
from hvdcomp.exchange import Exchange, chunk_bounds


# --- warm-up schedule -----------------------------------------------------------------------

def test_warmup_schedule_is_the_papers():
    # 75 % → 93.75 % → 98.4375 % → 99.6 % → 99.9 % sparsity over 4 warm-up epochs
    densities = [dgc_density(epoch) for epoch in range(7)]
    assert densities == [0.25, 0.0625, 0.015625, 0.00390625, 0.001, 0.001, 0.001]
    printed = [round(100 * (1 - d), 4) for d in densities[:5]]
    assert printed[:3] == [75.0, 93.75, 98.4375]
    assert round(printed[3], 1) == 99.6 and printed[4] == 99.9
    assert dgc_density(0, warmup_epochs=0) == 0.001
    # never below the final density: with final 1 %, epoch 3's 0.39 % is raised to 1 %
    assert [dgc_density(e, final=0.01) for e in range(5)] == [0.25, 0.0625, 0.015625, 0.01, 0.01]
    with pytest.raises(ValueError, match="epoch"):
        dgc_density(-1)


def test_the_round_follows_the_warmup_by_steps_per_epoch():
    algo = DGC(up="dgc:ratio=0.001", steps_per_epoch=2, momentum=0.0)
    ratios = []
    for _ in range(12):
        ratios.append(algo.up.ratio)
        algo.end_round()
    assert ratios == [0.25] * 2 + [0.0625] * 2 + [0.015625] * 2 + [0.00390625] * 2 + [0.001] * 4
    # the configuration ranks compare names the final compressor throughout
    assert "ratio=0.001" in algo.config()["up"]
    algo.set_epoch(1)
    assert algo.up.ratio == 0.0625 and algo.up.sample_ratio == algo.final_up.sample_ratio


def test_state_dict_carries_the_buffers_and_the_epoch():
    algo = DGC(up="topk:ratio=0.01", momentum=0.5, steps_per_epoch=1)
    for _ in range(2):
        one_worker_round(algo, G1)
        algo.end_round()
    resumed = DGC(up="topk:ratio=0.01", momentum=0.5, steps_per_epoch=1)
    resumed.load_state_dict(algo.state_dict())
    assert resumed.epoch == 2 and resumed.up.ratio == algo.up.ratio == 0.015625
    assert torch.equal(resumed.velocity["b"], algo.velocity["b"])
    assert torch.equal(resumed.momentum["b"], algo.momentum["b"])
    with pytest.raises(ValueError, match="resume with the same"):
        DGC(up="topk:ratio=0.5", momentum=0.5).load_state_dict(algo.state_dict())


def test_no_epoch_means_final_density_and_a_warning(caplog):
    algo = DGC(up="dgc:ratio=0.01", momentum=0.0)
    with caplog.at_level(logging.WARNING):
        algo.worker_message("b", torch.ones(10))
    assert algo.up.ratio == 0.01
    assert "warm-up is off" in caplog.text


# --- momentum correction and momentum factor masking, by hand -------------------------------

G1 = [1.0, -2.0, 0.5, 3.0, 0.0, -0.1, 0.2, 1.5]
G2 = [0.5, 0.5, -1.0, 0.0, 0.0, 0.0, 0.0, -4.0]


def one_worker_round(algo, grad):
    """The worker half of a round: message, C(message), worker_sent; returns C(message)."""
    message = algo.worker_message("b", torch.tensor(grad, dtype=torch.float64))
    sent = algo.up.roundtrip(message)[1]
    algo.worker_sent("b", message, sent)
    return sent


def as_list(t):
    return [round(float(x), 12) for x in t]


def test_momentum_correction_and_masking_by_hand():
    # ratio 0.25 of 8 elements: k = 2; with 8 ≤ ceil(2/0.25) the dgc sparsifier samples every
    # element, so it selects the exact top-2 here.
    algo = DGC(up="dgc:ratio=0.25", momentum=0.5, warmup_epochs=0)
    # round 1: u = g1, v = g1; top-2 of |v| are index 3 (3.0) and index 1 (−2.0)
    sent = one_worker_round(algo, G1)
    assert as_list(sent) == [0, -2.0, 0, 3.0, 0, 0, 0, 0]
    assert as_list(algo.velocity["b"]) == [1.0, 0, 0.5, 0, 0, -0.1, 0.2, 1.5]
    assert as_list(algo.momentum["b"]) == [1.0, 0, 0.5, 0, 0, -0.1, 0.2, 1.5]
    # round 2: u = 0.5·u + g2 = [1, .5, −.75, 0, 0, −.05, .1, −3.25]
    #          v = v + u       = [2, .5, −.25, 0, 0, −.15, .3, −1.75]; top-2: index 0, index 7
    sent = one_worker_round(algo, G2)
    assert as_list(sent) == [2.0, 0, 0, 0, 0, 0, 0, -1.75]
    assert as_list(algo.velocity["b"]) == [0, 0.5, -0.25, 0, 0, -0.15, 0.3, 0]
    assert as_list(algo.momentum["b"]) == [0, 0.5, -0.75, 0, 0, -0.05, 0.1, 0]


def test_without_momentum_masking_the_momentum_keeps_sent_coordinates():
    algo = DGC(up="dgc:ratio=0.25", momentum=0.5, momentum_masking=False, warmup_epochs=0)
    one_worker_round(algo, G1)
    assert as_list(algo.momentum["b"]) == G1                  # u is not masked
    # round 2: u = 0.5·g1 + g2 = [1, −.5, −.75, 1.5, 0, −.05, .1, −3.25]
    #          v = [1, 0, .5, 0, 0, −.1, .2, 1.5] + u = [2, −.5, −.25, 1.5, 0, −.15, .3, −1.75]
    sent = one_worker_round(algo, G2)
    assert as_list(sent) == [2.0, 0, 0, 0, 0, 0, 0, -1.75]
    assert as_list(algo.velocity["b"]) == [0, -0.5, -0.25, 1.5, 0, -0.15, 0.3, 0]
    assert as_list(algo.momentum["b"]) == [1.0, -0.5, -0.75, 1.5, 0, -0.05, 0.1, -3.25]


def test_nesterov_momentum_correction_by_hand():
    algo = DGC(up="dgc:ratio=0.25", momentum=0.5, nesterov=True, warmup_epochs=0)
    # u = m(u + g) = 0.5·g1; v = v + u + g = 1.5·g1 = [1.5, −3, .75, 4.5, 0, −.15, .3, 2.25]
    sent = one_worker_round(algo, G1)
    assert as_list(sent) == [0, -3.0, 0, 4.5, 0, 0, 0, 0]
    assert as_list(algo.velocity["b"]) == [1.5, 0, 0.75, 0, 0, -0.15, 0.3, 2.25]
    assert as_list(algo.momentum["b"]) == [0.5, 0, 0.25, 0, 0, -0.05, 0.1, 0.75]


# --- local gradient clipping ----------------------------------------------------------------

def test_local_clipping_scales_the_threshold_by_inverse_sqrt_n():
    g = torch.tensor([3.0, 4.0], dtype=torch.float64)        # ‖g‖ = 5
    # thr = 2, N = 4: limit 2/√4 = 1 → g·(1/5) = [0.6, 0.8]
    assert as_list(clip_local_gradient(g, 2.0, 4)) == [0.6, 0.8]
    # N = 1: limit 2 → [1.2, 1.6]
    assert as_list(clip_local_gradient(g, 2.0, 1)) == [1.2, 1.6]
    # below the limit: unchanged (thr = 20, N = 4: limit 10 > 5)
    assert as_list(clip_local_gradient(g, 20.0, 4)) == [3.0, 4.0]
    # inside the round, before the momentum: with m = 0, v = clipped g
    algo = DGC(up="topk:ratio=0.5", momentum=0.0, clip_norm=2.0, world_size=4, warmup_epochs=0)
    assert as_list(algo.worker_message("b", g)) == [0.6, 0.8]
    with pytest.raises(ValueError, match="world_size"):
        DGC(clip_norm=1.0)


def test_dgc_refuses_a_dense_uplink():
    # masking would zero the momentum at every coordinate each round
    for spec in ("none", "sign"):
        with pytest.raises(ValueError, match="sparsifying"):
            make_algorithm("dgc", up=spec)


# --- payload ---------------------------------------------------------------------------------

@pytest.mark.parametrize("numel", [65_536, 1_000_000, 25_000_000])
def test_payload_at_999_sparsity_is_over_250_times_smaller(numel):
    compressor = from_spec("dgc:ratio=0.001")
    dense = numel * 4
    assert dense / compressor.payload_nbytes(numel, torch.float32) >= 250


def test_payload_bytes_match_what_compress_returns():
    compressor = from_spec("dgc:ratio=0.001")
    x = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    payload = compressor.compress(x, seed=3)
    assert payload.numel() == compressor.payload_nbytes(x.numel())
    assert 400_000 / payload.numel() >= 250
    decoded = compressor.decompress(payload, x.numel(), torch.float32, seed=3)
    assert 0 < int((decoded != 0).sum()) <= 100


# --- DGCSGD ----------------------------------------------------------------------------------

def test_dgcsgd_puts_momentum_on_weight_decay_only():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    opt = DGCSGD([w], lr=0.5, momentum=0.9, weight_decay=0.1)
    # step 1: b = 0.1·w = [.1, −.2]; d = G + b = [.3, 0]; w = [1 − .15, −2] = [.85, −2]
    w.grad = torch.tensor([0.2, 0.2], dtype=torch.float64)
    opt.step()
    assert as_list(w.detach()) == [0.85, -2.0]
    # step 2, G = 0: λw = [.085, −.2]; b = .9·[.1, −.2] + λw = [.175, −.38]; w −= .5·b
    w.grad = torch.zeros(2, dtype=torch.float64)
    opt.step()
    assert as_list(w.detach()) == [0.7625, -1.81]
    # without weight decay it is plain SGD: the gradient's own momentum is DGC's business
    v = torch.nn.Parameter(torch.tensor([1.0], dtype=torch.float64))
    plain = DGCSGD([v], lr=0.5, momentum=0.9)
    for _ in range(2):
        v.grad = torch.tensor([1.0], dtype=torch.float64)
        plain.step()
    assert as_list(v.detach()) == [0.0]


# --- whole rounds through the exchange, on the simulator --------------------------------------

N, D, ROUNDS, M = 4, 300, 6, 0.9


def rank_gradient(rank, step):
    gen = torch.Generator().manual_seed(1000 * rank + step)
    return torch.randn(D, generator=gen) * (rank + 1)


def oracle_topk(v, k):
    out = torch.zeros_like(v)
    index = torch.topk(v.abs(), k).indices
    out[index] = v[index]
    return out


def dgc_oracle(pattern, ratio, down_ratio=None):
    """The paper's DGC with exact top-k per chunk (the whole bucket for the allgather pattern),
    plus, for a lossy downlink, top-k re-sparsification of each server chunk with server error."""
    import math
    bounds = [(0, D)] if pattern == "allgather" else chunk_bounds(D, N)
    u = [torch.zeros(D) for _ in range(N)]
    v = [torch.zeros(D) for _ in range(N)]
    server_error = torch.zeros(D)
    updates = []
    for step in range(ROUNDS):
        sent = []
        for r in range(N):
            u[r] = M * u[r] + rank_gradient(r, step)
            v[r] = v[r] + u[r]
            s = torch.cat([oracle_topk(v[r][a:b], math.ceil(ratio * (b - a))) if b > a
                           else v[r][a:b] for a, b in bounds])
            mask = s != 0
            v[r] = v[r].masked_fill(mask, 0.0)
            u[r] = u[r].masked_fill(mask, 0.0)
            sent.append(s)
        mean = sent[0].clone()
        for s in sent[1:]:
            mean += s
        mean /= N
        if down_ratio is not None:
            message = mean + server_error
            down = torch.cat([oracle_topk(message[a:b], math.ceil(down_ratio * (b - a)))
                              if b > a else message[a:b] for a, b in bounds])
            server_error = message - down
            mean = down
        updates.append(mean)
    return updates


def dgc_worker(comm, pattern, up, down, ratio_spec=None):
    algo = make_algorithm("dgc", up=up, down=down, momentum=M, warmup_epochs=0)
    exchange = Exchange(algo, comm, pattern=pattern)
    updates = []
    for step in range(ROUNDS):
        updates.append(exchange.exchange("bucket", rank_gradient(comm.rank, step)))
        exchange.end_round()
    return updates, exchange.bytes_up


@pytest.mark.parametrize("pattern", ["allgather", "two_phase"])
def test_dgc_rounds_match_the_paper_through_the_exchange(pattern):
    results = simulate(N, dgc_worker, pattern, "topk:ratio=0.05", "none")
    expected = dgc_oracle(pattern, 0.05)
    for rank, (updates, _) in enumerate(results):
        for step, (ours, theirs) in enumerate(zip(updates, expected)):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5,
                                       msg=f"rank {rank} round {step}")


def test_two_phase_resparsifies_at_the_server_with_its_error():
    results = simulate(N, dgc_worker, "two_phase", "topk:ratio=0.05", "topk:ratio=0.1")
    expected = dgc_oracle("two_phase", 0.05, down_ratio=0.1)
    for rank, (updates, _) in enumerate(results):
        for step, (ours, theirs) in enumerate(zip(updates, expected)):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5,
                                       msg=f"rank {rank} round {step}")
            assert int((ours != 0).sum()) <= sum(
                -(-(b - a) // 10) for a, b in chunk_bounds(D, N))


def test_dgc_compressor_through_the_allgather_sends_at_most_k_per_rank():
    results = simulate(N, dgc_worker, "allgather", "dgc:ratio=0.01", "none")
    k = 3  # ceil(0.01 · 300)
    for updates, bytes_up in results:
        for update in updates:
            assert int((update != 0).sum()) <= N * k
        # every round, each rank sends its payload to the N − 1 others
        assert bytes_up == ROUNDS * (N - 1) * from_spec("dgc:ratio=0.01").payload_nbytes(D)
    for updates, _ in results[1:]:
        for ours, rank0 in zip(updates, results[0][0]):
            assert torch.equal(ours, rank0)


# --- per-layer selection (the paper's: a threshold per tensor of dim > 1) ----------------------

#: a bucket of four "tensors": weight 10×20, bias 20, weight 5×10, bias 5 (sizes as numel, ndim)
LAYOUT = [(200, 2), (20, 1), (50, 2), (5, 1)]


def per_layer_oracle(ratio):
    """DGC per layer, written from the paper: momentum correction and masking on every tensor of
    dim > 1 with its own exact top-k (k_l = ceil(ratio·n_l)); tensors of dim ≤ 1 send their plain
    gradient (their momentum is the optimizer's); G = mean of what the ranks sent."""
    import math
    d = sum(n for n, _ in LAYOUT)
    u = [torch.zeros(d) for _ in range(N)]
    v = [torch.zeros(d) for _ in range(N)]
    updates = []
    for step in range(ROUNDS):
        sent = []
        for r in range(N):
            g = layered_gradient(r, step)
            u[r] = M * u[r] + g
            v[r] = v[r] + u[r]
            parts, start = [], 0
            for numel, dim in LAYOUT:
                a, b = start, start + numel
                if dim > 1:
                    parts.append(oracle_topk(v[r][a:b], math.ceil(ratio * numel)))
                else:
                    parts.append(g[a:b])
                    u[r][a:b] = 0.0
                    v[r][a:b] = 0.0
                start = b
            s = torch.cat(parts)
            v[r] = v[r].masked_fill(s != 0, 0.0)
            u[r] = u[r].masked_fill(s != 0, 0.0)
            sent.append(s)
        mean = sent[0].clone()
        for s in sent[1:]:
            mean += s
        updates.append(mean / N)
    return updates


def layered_gradient(rank, step):
    gen = torch.Generator().manual_seed(7000 + 100 * rank + step)
    g = torch.randn(sum(n for n, _ in LAYOUT), generator=gen)
    g[200:220] *= 50.0   # a loud bias: whole-bucket top-k would spend its budget there
    return g


def per_layer_worker(comm, up, pattern="allgather", per_layer=True):
    algo = make_algorithm("dgc", up=up, down="none", momentum=M, warmup_epochs=0,
                          per_layer=per_layer)
    algo.set_layout("bucket", LAYOUT)
    exchange = Exchange(algo, comm, pattern=pattern)
    updates = []
    for step in range(ROUNDS):
        updates.append(exchange.exchange("bucket", layered_gradient(comm.rank, step)))
        exchange.end_round()
    return updates, exchange.bytes_up


def test_per_layer_selection_matches_the_paper_through_the_allgather():
    results = simulate(N, per_layer_worker, "topk:ratio=0.05")
    expected = per_layer_oracle(0.05)
    for rank, (updates, _) in enumerate(results):
        for step, (ours, theirs) in enumerate(zip(updates, expected)):
            torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5,
                                       msg=f"rank {rank} round {step}")
    # every layer of dim > 1 sends its own k_l each round: 10 of the 200, 3 of the 50
    first = results[0][0][0]
    assert int((first[:200] != 0).sum()) <= N * 10 and int((first[220:270] != 0).sum()) <= N * 3
    assert int((first[220:270] != 0).sum()) > 0   # whole-bucket top-k could starve this layer


def test_per_layer_payload_is_the_sum_of_the_layers():
    from hvdcomp.compressors.layerwise import PerLayer
    inner = from_spec("dgc:ratio=0.01")
    layered = PerLayer(inner, [(n, dim > 1) for n, dim in LAYOUT])
    expected = inner.payload_nbytes(200) + 4 * 20 + inner.payload_nbytes(50) + 4 * 5
    assert layered.payload_nbytes(275) == expected
    x = torch.randn(275)
    payload, decoded = layered.roundtrip(x)
    assert payload.numel() == expected
    assert torch.equal(decoded[200:220], x[200:220]) and torch.equal(decoded[270:], x[270:])
    assert int((decoded[:200] != 0).sum()) == 2 and int((decoded[220:270] != 0).sum()) == 1
    results = simulate(2, per_layer_worker, "dgc:ratio=0.01")
    assert results[0][1] == ROUNDS * expected   # N − 1 = 1 copy per round


def test_per_layer_off_is_whole_bucket_selection():
    results = simulate(N, per_layer_worker, "topk:ratio=0.05", "allgather", False)
    first = results[0][0][0]
    # the loud bias wins the whole bucket's k = ceil(0.05·275) = 14 slots: the small layer gets none
    assert int((first[220:270] != 0).sum()) == 0


def test_per_layer_refuses_the_two_phase_chunks():
    from hvdcomp.compressors import CompressionError
    with pytest.raises(CompressionError, match="allgather"):
        simulate(2, per_layer_worker, "topk:ratio=0.05", "two_phase")


def test_the_optimizer_declares_each_buckets_layers():
    import hvdcomp

    def build(comm):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 4))
        opt = hvdcomp.DistributedOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
            compression=hvdcomp.Compression.algorithm("dgc", up="dgc:ratio=0.01"),
            comm=comm, pattern="allgather", small_tensor_bytes=64)
        return opt.algorithm._layouts
    layouts = simulate(1, build)[0]
    # reversed registration order; the 4-element bias (16 bytes) is under small_tensor_bytes
    assert list(layouts.values()) == [((128, 2), (32, 1), (2048, 2))]
