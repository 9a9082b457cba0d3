"""PowerSGD as a method (``powersgd_ef``): rank-r power iteration with warm start and error
feedback, its two factors all-reduced.

Vogels, Karimireddy, Jaggi, "PowerSGD: Practical Low-Rank Gradient Compression for Distributed
Optimization", NeurIPS 2019 (arXiv 1905.13727), Algorithm 1 (compression) inside Algorithm 2
(error feedback); start-up steps, the minimum compression rate and dense 1-D tensors as in the
authors' code (github.com/epfml/powersgd) and PyTorch's ``powerSGD_hook``. Worker i, round t,
for each matrix M (a tensor of shape (n, ...) viewed as n × m, m = numel/n)::

    M_i = G_i + E_i                                   (E_i: this worker's error, 0 at first)
    P   = mean_j M_j Q          one allreduce of every matrix's P   (Q: shared, see below)
    P̂   = orthogonalise(P)      Gram–Schmidt on the columns, on every rank
    Q'  = mean_j M_jᵀ P̂         one allreduce of every matrix's Q'
    U   = P̂ Q'ᵀ                 the update every rank applies (the same on all)
    E_i ← M_i − U ;  Q ← Q'     (error feedback; warm start: next round's Q)

r = min(rank, n, m). Q at the first compressed round is drawn from N(0, 1) with a generator
seeded ``crc32("<seed>:<bucket>:<matrix index>")`` (every rank draws the same), in the
gradient's dtype. Without ``warm_start`` Q is drawn anew each round (seeded with the round too).

Dense instead of compressed, in the same round (one extra allreduce of their concatenation, no
error kept): tensors of dim ≤ 1, and matrices where r·(n + m)·``min_compression_rate`` ≥ n·m
(low rank would save too little). The first ``start_iter`` rounds are plain dense allreduces of
the whole bucket (no error kept), as PyTorch's ``start_powerSGD_iter``.

How it differs from the ``powersgd`` *compressor* (:mod:`hvdcomp.compressors.lowrank`): the
compressor lays each chunk out as one near-square matrix, draws a fresh Q every round,
orthogonalises its own P locally and sends P̂ and Q' as a payload the exchange moves (under any
algorithm's error feedback, its downlink compressed again by the server); the method all-reduces
P and Q' (so the product is linear in the workers' matrices and the downlink is these factors
too), reuses Q across rounds and keeps one error per worker.

The method runs its own collectives (``round_kind = "owned"``): the exchange hands it an
allreduce that counts every call in its byte ledger as a ring allreduce (phases
``powersgd_startup``, ``powersgd_dense``, ``powersgd_p``, ``powersgd_q``), like every other
allreduce hvdcomp sends. Shapes come from the optimizer (:meth:`set_shapes`); a bucket without
shapes is one near-square matrix.
"""
from __future__ import annotations

import zlib
from typing import Any, Dict, List, NamedTuple, Sequence, Tuple

import torch

from ..compressors._wire import allocate
from ..compressors.lowrank import matrix_shape
from .base import Algorithm
from .registry import MethodInfo, Option, Paper

__all__ = ["PowerSGDMethod", "gram_schmidt"]

class Matrix(NamedTuple):
    """One compressed tensor of a bucket, and where its factors sit in the P and Q buffers."""

    start: int   # first element in the bucket
    rows: int    # n
    cols: int    # m
    rank: int    # r = min(rank, n, m)
    index: int   # among the bucket's compressed matrices (names its first Q)
    p_at: int    # first element of its P (n × r) in the bucket's P buffer
    q_at: int    # first element of its Q (m × r) in the bucket's Q buffer


def gram_schmidt(columns: torch.Tensor) -> torch.Tensor:
    """Orthonormalise the columns in place (modified Gram–Schmidt, as the paper's code); a
    column with no norm left stays 0 instead of becoming NaN."""
    for i in range(columns.shape[1]):
        col = columns[:, i]
        norm = torch.linalg.vector_norm(col)
        col.mul_(torch.where(norm > 0, 1.0 / torch.where(norm > 0, norm, 1.0), 0.0))
        if i + 1 < columns.shape[1]:
            rest = columns[:, i + 1:]
            rest.sub_(col.unsqueeze(1) * (col @ rest).unsqueeze(0))
    return columns


class PowerSGDMethod(Algorithm):
    """PowerSGD (Vogels et al. 2019) with warm start and error feedback; module docstring."""

    name = "powersgd_ef"
    info = MethodInfo(
        name="powersgd_ef", label="PowerSGD (method)", order=150, up="none", down="none",
        pattern="allreduce", sgd_momentum=0.9,
        compressors_refused="compresses with its own rank-r factors (--algorithm-option "
                            "rank=R), not a compressor",
        summary="rank-r power iteration, warm start, error feedback; P and Q all-reduced",
        legend="PowerSGD rank {rank}",
        travels="rank-{rank} factors P and Q all-reduced (both ways); tensors of dim <= 1 and "
                "matrices saving under {min_compression_rate}x dense",
        paper=Paper("PowerSGD: Practical Low-Rank Gradient Compression for Distributed "
                    "Optimization", "Vogels, Karimireddy, Jaggi", 2019,
                    "https://arxiv.org/abs/1905.13727", "NeurIPS"),
        options=(Option("rank", "int", 1, "an integer >= 1", "r of the approximation"),
                 Option("start_iter", "int", 0, "an integer >= 0",
                        "dense allreduce rounds before compressing (PyTorch's "
                        "start_powerSGD_iter)"),
                 Option("min_compression_rate", "float", 2.0, "a number >= 1",
                        "matrices saving less than this go dense"),
                 Option("warm_start", "bool", True, "true or false", "reuse Q across rounds"),
                 Option("seed", "int", 0, "an integer >= 0", "of the shared first Q")))
    round_kind = "owned"          # runs its own collectives (hvdcomp.exchange_rounds)
    compresses_downlink = False   # no downlink compressor: the factors are the downlink
    error_feedback = False        # its own error feedback; no compressor to check
    state_fields = ("error", "q_memory")

    def __init__(self, up="none", down=None, rank: int = 1, start_iter: int = 0,
                 min_compression_rate: float = 2.0, warm_start: bool = True, seed: int = 0):
        super().__init__(up, down)
        if self.up.spec() != "none":
            raise ValueError(f"powersgd_ef {self.info.compressors_refused}; got up="
                             f"{self.up.spec()!r}")
        for label, value, low in (("rank", rank, 1), ("start_iter", start_iter, 0),
                                  ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"powersgd_ef: {label} must be an integer >= {low}, "
                                 f"not {value!r}")
        if isinstance(min_compression_rate, bool) or not float(min_compression_rate) >= 1.0:
            raise ValueError(f"powersgd_ef: min_compression_rate must be a number >= 1, not "
                             f"{min_compression_rate!r}")
        if not isinstance(warm_start, bool):
            raise ValueError(f"powersgd_ef: warm_start must be true or false, not "
                             f"{warm_start!r}")
        self.rank, self.start_iter, self.seed = rank, start_iter, seed
        self.min_compression_rate = float(min_compression_rate)
        self.warm_start = warm_start
        self.error: Dict[str, torch.Tensor] = {}      # E_i, the compressed matrices of a bucket
        self.q_memory: Dict[str, torch.Tensor] = {}   # Q' of the last round, all matrices
        self._shapes: Dict[str, Tuple[Tuple[int, ...], ...]] = {}

    def hyperparameters(self) -> Dict[str, Any]:
        return {"rank": self.rank, "start_iter": self.start_iter,
                "min_compression_rate": self.min_compression_rate,
                "warm_start": self.warm_start, "seed": self.seed}

    @classmethod
    def train_options(cls, cfg, world_size, rank, steps_per_epoch):
        if cfg.pattern not in (None, "allreduce"):
            raise ValueError(f"powersgd_ef all-reduces its factors (pattern allreduce), not "
                             f"--pattern {cfg.pattern}")
        return dict(cfg.algorithm_options)

    # --- the layout of a bucket ----------------------------------------------------------------
    def set_shapes(self, key: str, shapes: Sequence[Sequence[int]]) -> None:
        """Declare bucket ``key``'s tensors, in bucket order, by shape (the optimizer calls it)."""
        self._shapes[str(key)] = tuple(tuple(int(d) for d in s) for s in shapes)

    def layout(self, key: str, numel: int) -> Tuple[List[Matrix], List[Tuple[int, int]]]:
        """The compressed matrices and the dense ranges ``(start, stop)`` of bucket ``key``."""
        shapes = self._shapes.get(key) or (matrix_shape(numel),)
        matrices: List[Matrix] = []
        dense: List[Tuple[int, int]] = []
        start = 0
        for shape in shapes:
            size = 1
            for d in shape:
                size *= d
            rows = shape[0] if len(shape) > 1 else 0
            cols = size // rows if rows else 0
            r = min(self.rank, rows, cols)
            if r and r * (rows + cols) * self.min_compression_rate < rows * cols:
                p_at = matrices[-1].p_at + matrices[-1].rows * matrices[-1].rank \
                    if matrices else 0
                q_at = matrices[-1].q_at + matrices[-1].cols * matrices[-1].rank \
                    if matrices else 0
                matrices.append(Matrix(start, rows, cols, r, len(matrices), p_at, q_at))
            elif size:
                dense.append((start, start + size))
            start += size
        if start != numel:
            raise ValueError(f"bucket {key!r}: shapes declared for {start} elements, the bucket "
                             f"holds {numel}")
        return matrices, dense

    def _first_q(self, key: str, matrices: List[Matrix], dtype, device) -> torch.Tensor:
        parts = []
        for m in matrices:
            text = f"{self.seed}:{key}:{m.index}" if self.warm_start else \
                f"{self.seed}:{key}:{m.index}:{self.step}"
            generator = torch.Generator().manual_seed(zlib.crc32(text.encode()))
            parts.append(torch.randn(m.cols, m.rank, generator=generator,
                                     dtype=dtype).reshape(-1))
        return torch.cat(parts).to(device)

    def message_nbytes(self, key: str, numel: int, dtype: torch.dtype) -> int:
        """Bytes of what one worker contributes to this round's allreduces for bucket ``key``
        (P, Q' and the dense tensors; the whole bucket in a start-up round)."""
        item = torch.empty((), dtype=dtype).element_size()
        if self.step < self.start_iter:
            return numel * item
        matrices, dense = self.layout(key, numel)
        factors = sum(m.rank * (m.rows + m.cols) for m in matrices)
        return (factors + sum(b - a for a, b in dense)) * item

    # --- the owned round: exchange_rounds.start_owned / finish_owned ----------------------------
    def start_round(self, key: str, flat: torch.Tensor, allreduce) -> Dict[str, Any]:
        """Start this bucket's round; ``allreduce(tensor, phase)`` returns a handle whose
        ``wait()`` gives the average over ranks (counted in the exchange's ledger)."""
        if self.step < self.start_iter:
            return {"dense_all": allreduce(flat.clone(), "powersgd_startup")}
        matrices, dense = self.layout(key, flat.numel())
        message = allocate(flat.numel(), flat.dtype, flat.device).copy_(flat)
        error = self.error.get(key)
        if error is not None:
            offset = 0
            for m in matrices:                                     # M_i = G_i + E_i
                size = m.rows * m.cols
                _matrix(message, m).add_(error[offset:offset + size].view(m.rows, m.cols))
                offset += size
        context: Dict[str, Any] = {"message": message, "matrices": matrices, "dense": dense}
        if dense:
            context["dense_mean"] = allreduce(torch.cat([message[a:b] for a, b in dense]),
                                              "powersgd_dense")
        if matrices:
            q = self.q_memory.get(key) if self.warm_start else None
            if q is None:
                q = self._first_q(key, matrices, flat.dtype, flat.device)
            p = torch.cat([(_matrix(message, m) @ _factor(q, m, "q")).reshape(-1)
                           for m in matrices])                   # P = M Q
            context["p_mean"] = allreduce(p, "powersgd_p")
        return context

    def finish_round(self, key: str, context: Dict[str, Any], allreduce) -> torch.Tensor:
        """Wait for P, orthogonalise, all-reduce Q', decompress; update E_i and Q."""
        if "dense_all" in context:
            return context["dense_all"].wait()
        # The update is written over the message, matrix by matrix once its error is taken
        # (M_i is not read again), and the error into its own buffer: a round allocates one
        # matrix at a time beyond the message, not buckets (the values are the formulas')
        message, matrices = context["message"], context["matrices"]
        if context["dense"]:
            mean = context["dense_mean"].wait()
            offset = 0
            for a, b in context["dense"]:
                message[a:b] = mean[offset:offset + b - a]
                offset += b - a
        if matrices:
            p = context["p_mean"].wait()
            p_hats = [gram_schmidt(_factor(p, m, "p").clone()) for m in matrices]
            q = torch.cat([(_matrix(message, m).T @ p_hat).reshape(-1)
                           for m, p_hat in zip(matrices, p_hats)])   # Q' = Mᵀ P̂
            q = allreduce(q, "powersgd_q").wait()
            error = self._error_buffer(key, matrices, message)
            offset = 0
            for m, p_hat in zip(matrices, p_hats):
                update = p_hat @ _factor(q, m, "q").T                # U = P̂ Q'ᵀ
                size = m.rows * m.cols
                torch.sub(_matrix(message, m), update,
                          out=error[offset:offset + size].view(m.rows, m.cols))  # E_i = M_i − U
                _matrix(message, m).copy_(update)
                offset += size
            if self.warm_start:
                self.q_memory[key] = q
        return message

    def _error_buffer(self, key: str, matrices: List[Matrix], like: torch.Tensor) -> torch.Tensor:
        """E_i's buffer for bucket ``key`` (the compressed matrices, concatenated): the one
        kept since the last round (M_i = G_i + E_i has read it), fresh in the first."""
        numel = sum(m.rows * m.cols for m in matrices)
        error = self.error.get(key)
        if error is None or error.numel() != numel or error.dtype != like.dtype \
                or error.device != like.device:
            error = self.error[key] = allocate(numel, like.dtype, like.device)
        return error


def _matrix(flat: torch.Tensor, m: Matrix) -> torch.Tensor:
    return flat[m.start:m.start + m.rows * m.cols].view(m.rows, m.cols)


def _factor(buffer: torch.Tensor, m: Matrix, which: str) -> torch.Tensor:
    """Matrix ``m``'s P (rows × r) or Q (cols × r) inside its bucket's concatenated buffer."""
    at, length = (m.p_at, m.rows) if which == "p" else (m.q_at, m.cols)
    return buffer[at:at + length * m.rank].view(length, m.rank)
