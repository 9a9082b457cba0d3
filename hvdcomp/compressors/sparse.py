"""Sparsifiers: ``topk``, ``randomk`` and ``dgc`` (sampled-threshold top-k).

All three send k = ceil(ratio·d) slots of a chunk of d elements and decode by scattering the sent
values into zeros.  A sparsifier that keeps the elements of a set S exactly has
    ‖C(x) − x‖² = ‖x‖² − ‖x_S‖²,
so its contraction constant is δ(x) = ‖x_S‖²/‖x‖² (Stich, Cordonnier, Jaggi, "Sparsified SGD with
Memory", NeurIPS 2018, Definition 2.1 and Lemma A.1: δ = k/d for top-k deterministically and for
random-k in expectation).

Indices travel in the narrowest type that holds 0..d−1: uint8 when d ≤ 256, int16 (stored minus
32768) when d ≤ 65536, int32 otherwise.  Write ``idx(d)`` for that size in bytes.
"""
from __future__ import annotations

import math
import random

import numpy as np
import torch

from ._wire import (Layout, LayoutCompressor, allocate, check_bool, check_int, check_out_dtype,
                    check_payload, check_ratio, compute_dtype, decode_indices, encode_indices,
                    flat_input, generator, index_dtype, mix_seeds, selected_count)
from . import _native
from .base import Compressor, check_finite
from .registry import register


def largest_magnitudes(x: torch.Tensor, k: int) -> "tuple[torch.Tensor, torch.Tensor]":
    """Indices (int64) of the k elements of largest |x|, in no particular order, and a 0-d
    tensor that is non-finite when x has a NaN/Inf (for :func:`check_finite`).

    CUDA: ``torch.topk`` (a radix select, no host synchronisation).  CPU: ``torch.topk`` runs a
    partial sort ~40x slower than a memcpy on the benchmark machine, so the CPU road is exact
    top-k through numpy in O(d): the threshold that about 1.25·k elements pass is estimated
    on every 64th element (``np.partition``), the elements passing it are gathered
    (``np.flatnonzero``) and the exact top-k is chosen among them (``np.argpartition``).  When
    fewer than k pass (unlucky sample), it falls back to ``np.argpartition`` over all of |x|, so
    the result is always the exact top-k; ties at the k-th magnitude may pick different elements
    than ``torch.topk`` would."""
    numel = x.numel()
    if x.device.type != "cpu":
        magnitudes = x.abs()
        chosen = torch.topk(magnitudes, k, sorted=False).indices
        return chosen, magnitudes[chosen]  # NaN ranks first in torch.topk, Inf is largest
    lib = _native.usable(x) if x.dtype == torch.float32 and _sampled(numel, k) else None
    if lib is not None:
        found = _candidates_native(lib, x, k)
        if found is not None:
            return found
    magnitudes = np.abs((x if x.dtype in (torch.float32, torch.float64) else x.float()).numpy())
    largest = magnitudes.max()            # NaN propagates through max: the finite witness
    # (non-finite input skips the sampling: np.argpartition below sorts NaN as the largest)
    if _sampled(numel, k) and np.isfinite(largest):
        threshold = _sample_threshold(magnitudes[::_STRIDE], numel, k)
        candidates = np.flatnonzero(magnitudes >= threshold)
        if candidates.size >= k:
            return _best_of(candidates, magnitudes[candidates], k), torch.tensor(float(largest))
    best = np.argpartition(magnitudes, numel - k)[numel - k:]
    return torch.from_numpy(best.astype(np.int64)), torch.tensor(float(largest))


_STRIDE = 64   # the CPU road's sample: every 64th |x|


def _sampled(numel: int, k: int) -> bool:
    """Whether the CPU road estimates a threshold on a sample (large chunks, k ≤ d/8)."""
    return numel >= 1 << 14 and 8 * k <= numel


def _sample_threshold(sample: np.ndarray, numel: int, k: int):
    """A magnitude that about 1.25·k elements of the chunk reach, from its strided sample."""
    expected = sample.size * k / numel
    keep = min(sample.size, math.ceil(1.25 * expected + 4 * math.sqrt(expected) + 8))
    return np.partition(sample, sample.size - keep)[sample.size - keep]


def _best_of(candidates: np.ndarray, magnitudes: np.ndarray, k: int) -> torch.Tensor:
    """The k candidates of largest magnitude (``magnitudes`` are the candidates' own)."""
    best = np.argpartition(magnitudes, candidates.size - k)[candidates.size - k:]
    return torch.from_numpy(candidates[best])


def _candidates_native(lib, x: torch.Tensor, k: int):
    """The sampled road in one C pass over float32 x (candidates and max|x| together): the same
    candidates, in the same order, as ``np.flatnonzero(np.abs(x) >= threshold)``, hence the same
    result as the numpy road.  None when that road would not finish on the sample (non-finite
    input, too few candidates): the caller then runs the numpy road."""
    values = x.numpy()
    threshold = _sample_threshold(np.abs(values[::_STRIDE]), x.numel(), k)
    capacity = 4 * k + 1024
    while True:
        candidates = np.empty(capacity, dtype=np.int64)
        largest = np.zeros(1, dtype=np.float32)
        count = lib.hv_candidates_f32(x.data_ptr(), x.numel(), float(threshold),
                                      candidates.ctypes.data, capacity, largest.ctypes.data)
        if count <= capacity:
            break
        capacity = count
    if not np.isfinite(largest[0]) or count < k:
        return None
    candidates = candidates[:count]
    return _best_of(candidates, np.abs(values[candidates]), k), torch.tensor(float(largest[0]))


def _scatter(numel: int, indices: torch.Tensor, values: torch.Tensor, dtype: torch.dtype,
             accumulate: bool = False) -> torch.Tensor:
    out = allocate(numel, dtype, values.device, zero=True)
    if indices.numel():
        out.index_put_((indices,), values.to(dtype), accumulate=accumulate)
    return out


def _slots(compressor, payload: torch.Tensor, numel: int):
    """``(indices, values)`` of a top-k/DGC payload for a chunk of ``numel`` elements."""
    layout = compressor._layout(numel)
    check_payload(payload, layout.nbytes, compressor.name, numel)
    return (decode_indices(layout.read(payload, "indices"), numel),
            layout.read(payload, "values"))


def _scatter_into(out: torch.Tensor, indices: torch.Tensor, values: torch.Tensor,
                  accumulate: bool = False) -> torch.Tensor:
    """``_scatter`` into the caller's ``out``: zero it, then write the k values (the same
    values as a fresh ``_scatter``, without a fresh d-element buffer)."""
    out.zero_()
    if indices.numel():
        out.index_put_((indices,), values.to(out.dtype), accumulate=accumulate)
    return out


@register("topk")
class TopK(LayoutCompressor):
    """The k = ceil(ratio·d) elements of largest magnitude, with their indices.

    Bytes: k·(4, or 2 with ``fp16_values``) + k·idx(d); 0 when d = 0.
    δ = k/d deterministically (Stich et al. 2018, Lemma A.1).  With ``fp16_values`` the sent
    values are rounded to fp16 as well: ‖C(x) − x‖² ≤ (1 − k/d)‖x‖² + 2⁻²²·‖x_S‖²; values beyond
    ±65504 are refused.  Ties at the k-th magnitude are broken by ``torch.topk``.

    Cost: the selection (:func:`largest_magnitudes`: a radix select on CUDA, an O(d) sampled
    selection through numpy on CPU), then a gather of k values; bound by the selection and the
    scattered gathers, not by memory bandwidth.  Not linear."""

    parameters = {"ratio": "a number in (0, 1]", "fp16_values": "true or false"}

    def __init__(self, ratio: float = 0.01, fp16_values: bool = False):
        self.ratio = check_ratio("topk", "ratio", ratio)
        self.fp16_values = check_bool("topk", "fp16_values", fp16_values)

    def _layout(self, numel: int) -> Layout:
        k = selected_count(self.ratio, numel)
        values = torch.float16 if self.fp16_values else torch.float32
        return Layout([("values", values, k), ("indices", index_dtype(max(numel, 1))[0], k)])


    def compress(self, x, seed=0):
        x = flat_input(x, self.name)
        numel = x.numel()
        layout = self._layout(numel)
        payload = layout.allocate(x.device)
        if not numel:
            return payload
        k = selected_count(self.ratio, numel)
        indices, witness = largest_magnitudes(x, k)
        check_finite(x, summary=witness)
        values = layout.view(payload, "values")
        values.copy_(x[indices])
        if self.fp16_values:
            check_finite(values, "top-k values cast to float16 (which overflows beyond ±65504)")
        encode_indices(indices, numel, layout.view(payload, "indices"))
        return payload

    def decompress(self, payload, numel, dtype=torch.float32, seed=0):
        check_out_dtype(dtype, self.name)
        return _scatter(numel, *_slots(self, payload, numel), dtype)

    def decompress_into(self, payload, out, seed=0):
        """Zero ``out`` and write the k values (no fresh d-element tensor)."""
        check_out_dtype(out.dtype, self.name)
        return _scatter_into(out, *_slots(self, payload, out.numel()))


@register("randomk")
class RandomK(Compressor):
    """k = ceil(ratio·d) elements at indices drawn from a seed every rank shares: only the values
    travel, and payloads of different ranks sum element-wise (linear, allreduce-able as fp32).

    The indices are k uniform draws *with* replacement from ``torch.randint`` seeded with
    ``mix_seeds(seed_param, seed_arg)`` (the compressor's ``seed`` and the per-step, per-chunk
    ``seed`` of compress); a drawn-twice index carries the same value twice.  Drawing with
    replacement costs O(k) where a random permutation would cost O(d).

    Bytes: 4·k; 0 when d = 0.
    δ = 1 − (1 − 1/d)^k in expectation over seeds (the probability that a given coordinate is
    drawn; ≥ k/d·(1 − k/(2d)), ≈ k/d for small ratios); deterministically only δ ≥ 0.
    Cost: O(k) gathers and scatters plus, when the finite check is on, one L1-norm pass over x.
    The generator runs on x's device: CPU and CUDA draw different indices for the same seed, so
    all ranks must use the same device type (they do in one job)."""
    linear = True

    parameters = {"ratio": "a number in (0, 1]", "seed": "an integer in [0, 2^63 - 1]"}

    def __init__(self, ratio: float = 0.01, seed: int = 0):
        self.ratio = check_ratio("randomk", "ratio", ratio)
        self.seed = check_int("randomk", "seed", seed, 0, (1 << 63) - 1)

    def payload_nbytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        return 4 * selected_count(self.ratio, numel)

    def wire_dtype(self, dtype: torch.dtype = torch.float32) -> torch.dtype:
        return torch.float32

    def indices(self, numel: int, seed: int, device: torch.device) -> torch.Tensor:
        """The indices both sender and receiver derive for this chunk and step."""
        k = selected_count(self.ratio, numel)
        gen = generator(mix_seeds(self.seed, seed), torch.device(device))
        return torch.randint(numel, (k,), generator=gen, device=device)

    def compress(self, x, seed=0):
        x = flat_input(x, self.name)
        numel = x.numel()
        if not numel:
            return torch.empty(0, dtype=torch.uint8, device=x.device)
        check_finite(x, summary=torch.linalg.vector_norm(x, 1, dtype=compute_dtype(x.dtype)))
        values = x[self.indices(numel, seed, x.device)].to(torch.float32)
        return values.view(torch.uint8)

    def decompress(self, payload, numel, dtype=torch.float32, seed=0):
        check_out_dtype(dtype, self.name)
        nbytes = self.payload_nbytes(numel)
        check_payload(payload, nbytes, self.name, numel)
        if not numel:
            return torch.empty(0, dtype=dtype, device=payload.device)
        layout = Layout([("values", torch.float32, nbytes // 4)])
        return _scatter(numel, self.indices(numel, seed, payload.device),
                        layout.read(payload, "values"), dtype)

    def decompress_into(self, payload, out, seed=0):
        """Zero ``out`` and write the k values at the shared indices."""
        numel = out.numel()
        check_out_dtype(out.dtype, self.name)
        nbytes = self.payload_nbytes(numel)
        check_payload(payload, nbytes, self.name, numel)
        if not numel:
            return out
        values = Layout([("values", torch.float32, nbytes // 4)]).read(payload, "values")
        return _scatter_into(out, self.indices(numel, seed, payload.device), values)


@register("dgc")
class DGC(LayoutCompressor):
    """Deep Gradient Compression's sparsifier (Lin et al., ICLR 2018; reference code
    ``dgc/compression.py::_sparsify``, research notes §3.2): top-k by a threshold estimated on a
    strided sample of |x|, then adapted.

    With k = ceil(ratio·d), the reference's sample (every ``stride``-th element from a random
    start; all elements when d ≤ ceil(2/ratio)) and k_s = ceil(n_samples·ratio):
      1. thr = smallest of the k_s largest sampled |x|; selected = {i : |x_i| ≥ thr};
      2. up to 10 rounds (only when sampling): more than 1.3·k selected -> keep the exact top-k
         of the selected and stop; fewer than 0.8·k -> thr ·= 0.8 and select again; else stop;
      3. keep the first k selected (by index).
    The sample start comes from ``random.Random(mix_seeds(seed))``, so it is reproducible.

    Fixed-size payload: k value slots and k index slots; when fewer than k are selected the rest
    hold value 0 at index 0, and decoding *adds* the slots into zeros (padding adds nothing).
    Bytes: 4·k + k·idx(d); 0 when d = 0.

    δ(x) = ‖x_S‖²/‖x‖²: exactly k/d-or-better when step 2 ends in the exact top-k; otherwise
    data-dependent (S holds elements ≥ the final threshold; all of them when at most k are
    selected, then the largest element is sent and δ ≥ 1/d).  There is no data-independent δ
    beyond δ > 0 for x ≠ 0; DGC relies on error feedback (momentum correction) for what it drops.

    Two code paths with the same result: on CPU, the reference's loop (reading counts back costs
    nothing there); on CUDA, a branch-free version that never reads a device value on the host
    (all 11 thresholds' counts, the first-k window by ``torch.nonzero_static`` and the exact top-k
    are computed and one is chosen on the device) — more arithmetic, no synchronisation.
    Not linear."""

    _ADAPT_ROUNDS = 10
    _UPPER, _LOWER = 1.3, 0.8

    parameters = {"ratio": "a number in (0, 1]", "sample_ratio": "a number in (0, 1]"}

    def __init__(self, ratio: float = 0.001, sample_ratio: float = 0.01):
        self.ratio = check_ratio("dgc", "ratio", ratio)
        self.sample_ratio = check_ratio("dgc", "sample_ratio", sample_ratio)
        self._branch_free = None  # None: by device; tests force True/False to compare the paths

    def _layout(self, numel: int) -> Layout:
        k = selected_count(self.ratio, numel)
        return Layout([("values", torch.float32, k), ("indices", index_dtype(max(numel, 1))[0], k)])


    def sampling(self, numel: int):
        """``(stride, n_samples, k_samples)`` as the reference's ``initialize`` computes them."""
        enough = max(math.ceil(numel * self.sample_ratio), math.ceil(2 / self.ratio))
        if self.sample_ratio >= 1.0 or numel <= math.ceil(2 / self.ratio):
            stride, n_samples = 1, numel
        else:
            stride = math.ceil(numel / enough / 32) * 32 + 1
            n_samples = numel // stride
            while n_samples < enough and stride > 8:  # the reference has no floor; 1 is ours
                stride -= 8
                n_samples = numel // stride
        return stride, n_samples, selected_count(self.ratio, n_samples)

    def sample_start(self, stride: int, seed: int) -> int:
        return random.Random(mix_seeds(seed)).randrange(stride) if stride > 1 else 0

    def _threshold(self, importance: torch.Tensor, seed: int):
        numel = importance.numel()
        stride, n_samples, k_samples = self.sampling(numel)
        samples = importance[self.sample_start(stride, seed)::stride] if stride > 1 else importance
        return torch.topk(samples, k_samples, sorted=False).values.min(), n_samples < numel

    def _select_reference(self, importance: torch.Tensor, threshold: torch.Tensor, adapt: bool,
                          k: int) -> torch.Tensor:
        """The reference loop, branching on counts (CPU: no device to synchronise with)."""
        indices = torch.nonzero(importance >= threshold).view(-1)
        if adapt:
            for _ in range(self._ADAPT_ROUNDS):
                count = indices.numel()
                if count > k:
                    if count > k * self._UPPER:
                        chosen = torch.topk(importance[indices], k, sorted=False).indices
                        indices = indices[chosen]
                    break
                if count >= self._LOWER * k:
                    break
                threshold = threshold * self._LOWER
                indices = torch.nonzero(importance >= threshold).view(-1)
        return indices[:k]

    def _select_branch_free(self, importance: torch.Tensor, threshold: torch.Tensor, adapt: bool,
                            k: int):
        """Same selection without reading any device value: returns (indices[k], valid[k])."""
        rounds = self._ADAPT_ROUNDS if adapt else 0
        thresholds = [threshold]
        for _ in range(rounds):
            thresholds.append(thresholds[-1] * self._LOWER)
        thresholds = torch.stack(thresholds)
        counts = torch.stack([torch.count_nonzero(importance >= t) for t in thresholds])
        # The reference stops lowering at the first threshold with count ≥ 0.8·k (or after the
        # last round); it never lowers once count ≥ 0.8·k.
        enough = counts >= self._LOWER * k
        first = torch.where(enough.any(), torch.argmax(enough.to(torch.int8)),
                            torch.full((), rounds, device=importance.device))
        # index_select, not thresholds[first]: a 0-d index tensor may be read on the host.
        final_threshold = thresholds.index_select(0, first.reshape(1)).squeeze(0)
        final_count = counts.index_select(0, first.reshape(1)).squeeze(0)
        window = torch.nonzero_static(importance >= final_threshold, size=k, fill_value=0).view(-1)
        slots = torch.arange(k, device=importance.device)
        if not adapt:
            return window, slots < final_count
        exact = torch.topk(importance, k, sorted=False).indices
        use_exact = final_count > k * self._UPPER
        indices = torch.where(use_exact, exact, window)
        return indices, use_exact | (slots < final_count)

    def compress(self, x, seed=0):
        x = flat_input(x, self.name)
        numel = x.numel()
        layout = self._layout(numel)
        payload = layout.allocate(x.device)
        if not numel:
            return payload
        k = selected_count(self.ratio, numel)
        importance = x.abs()
        threshold, adapt = self._threshold(importance, seed)
        values, stored = layout.view(payload, "values"), layout.view(payload, "indices")
        branch_free = self._branch_free if self._branch_free is not None else x.is_cuda
        if branch_free:
            indices, valid = self._select_branch_free(importance, threshold, adapt, k)
            indices = torch.where(valid, indices, 0)
            values.copy_(torch.where(valid, x[indices].to(torch.float32), 0.0))
            encode_indices(indices, numel, stored)
        else:
            indices = self._select_reference(importance, threshold, adapt, k)
            values.zero_()
            values[:indices.numel()] = x[indices]
            full = torch.zeros(k, dtype=torch.int64, device=x.device)
            full[:indices.numel()] = indices
            encode_indices(full, numel, stored)
        # NaN compares false with any threshold and could go unselected: check an L1 norm.
        check_finite(x, summary=torch.linalg.vector_norm(x, 1, dtype=compute_dtype(x.dtype)))
        return payload

    def decompress(self, payload, numel, dtype=torch.float32, seed=0):
        check_out_dtype(dtype, self.name)
        return _scatter(numel, *_slots(self, payload, numel), dtype, accumulate=True)

    def decompress_into(self, payload, out, seed=0):
        """Zero ``out`` and add the k slots (padding slots add 0 at index 0)."""
        check_out_dtype(out.dtype, self.name)
        return _scatter_into(out, *_slots(self, payload, out.numel()), accumulate=True)
