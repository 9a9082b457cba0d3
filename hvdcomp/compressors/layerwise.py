"""Per-layer compression of a fused bucket: one compressor call per layer (tensor) of the bucket.

Deep Gradient Compression selects its top-k *per layer* — a threshold per tensor — and compresses
only tensors with more than one dimension (Lin et al., ICLR 2018; reference code
``dgc/compression.py`` registers ``param.dim() > 1`` tensors and sparsifies each by name).  hvdcomp
fuses tensors into buckets; :class:`PerLayer` restores the per-tensor view inside a bucket:

    bucket = [ layer 0 | layer 1 | ... ]   (the optimizer's order, ``segments``)
    payload = payload(layer 0) ‖ payload(layer 1) ‖ ...
    layer l compressed:  inner(x[layer l]) with seed mix_seeds(seed, l)   (its own k_l, threshold)
    layer l dense:       x[layer l] as it is (``none``: 32 bits per element for fp32)

Bytes: Σ_l inner.payload_nbytes(n_l) over compressed layers + Σ_l n_l·itemsize over dense ones;
for the ``dgc`` sparsifier with ratio r that is Σ_l ceil(r·n_l)·(4 + idx(n_l)), a little more than
the whole-bucket ceil(r·d)·(4 + idx(d)) (one ceiling per layer) or less (narrower indices).

The layout belongs to one bucket, so a :class:`PerLayer` serves one bucket of exactly
``sum(n_l)`` elements; it is not in the spec registry (no spec string carries a model's layout):
algorithms build one per bucket (:meth:`hvdcomp.algorithms.dgc.DGC.set_layout`).  It refuses a
vector of another size — a chunk of the two-phase pattern, for instance — with a clear error.
"""
from __future__ import annotations

from typing import Iterator, Sequence, Tuple

import torch

from ._wire import allocate, check_out_dtype, mix_seeds
from .base import CompressionError, Compressor
from .registry import from_spec

#: (number of elements, compressed?) of each layer of a bucket, in bucket order
Segments = Sequence[Tuple[int, bool]]


class PerLayer(Compressor):
    """``inner`` applied to each compressed layer of a bucket, dense layers sent as they are."""

    name = "perlayer"

    def __init__(self, inner: Compressor, segments: Segments):
        self.inner = inner
        self.segments = tuple((int(n), bool(compressed)) for n, compressed in segments)
        if any(n < 0 for n, _ in self.segments):
            raise ValueError(f"perlayer: layer sizes must be >= 0, got {self.segments}")
        self.numel = sum(n for n, _ in self.segments)
        self._dense = from_spec("none")

    def _parts(self, numel: int) -> Iterator[Tuple[int, int, int, Compressor]]:
        """(layer index, start, stop, compressor) of every non-empty layer."""
        if numel != self.numel:
            raise CompressionError(
                f"per-layer compression was set up for a bucket of {self.numel} elements and got "
                f"{numel}: it needs the whole bucket, i.e. the 'allgather' exchange pattern (the "
                "two-phase pattern hands it chunks); pass per_layer=False for whole-vector "
                "selection")
        start = 0
        for index, (n, compressed) in enumerate(self.segments):
            if n:
                yield index, start, start + n, self.inner if compressed else self._dense
            start += n

    def _sizes(self, numel: int, dtype: torch.dtype):
        return [(index, a, b, c, c.payload_nbytes(b - a, dtype))
                for index, a, b, c in self._parts(numel)]

    def payload_nbytes(self, numel: int, dtype: torch.dtype = torch.float32) -> int:
        return sum(size for *_, size in self._sizes(numel, dtype))

    def compress(self, x, seed=0):
        x = x.detach().reshape(-1)
        payloads = [c.compress(x[a:b].contiguous(), mix_seeds(seed, index))
                    for index, a, b, c in self._parts(x.numel())]
        return torch.cat(payloads) if payloads else torch.empty(0, dtype=torch.uint8,
                                                                 device=x.device)

    def decompress(self, payload, numel, dtype=torch.float32, seed=0):
        check_out_dtype(dtype, self.name)
        return self.decompress_into(payload, allocate(numel, dtype, payload.device), seed)

    def decompress_into(self, payload, out, seed=0):
        sizes = self._sizes(out.numel(), out.dtype)
        if payload.numel() != sum(size for *_, size in sizes):
            raise CompressionError(f"perlayer: payload of {payload.numel()} bytes, expected "
                                   f"{sum(size for *_, size in sizes)}")
        offset = 0
        for index, a, b, compressor, size in sizes:
            compressor.decompress_into(payload[offset:offset + size], out[a:b],
                                       mix_seeds(seed, index))
            offset += size
        return out

    def roundtrip_into(self, x, out, seed=0):
        x = x.detach().reshape(-1)
        payloads = [c.roundtrip_into(x[a:b].contiguous(), out[a:b], mix_seeds(seed, index))
                    for index, a, b, c in self._parts(x.numel())]
        return torch.cat(payloads) if payloads else torch.empty(0, dtype=torch.uint8,
                                                                 device=x.device)

    def roundtrip(self, x, seed=0):
        out = torch.empty_like(x.detach().reshape(-1))
        return self.roundtrip_into(x, out, seed), out

    def config(self):
        return {"name": self.name, "inner": self.inner.spec(),
                "layers": [list(s) for s in self.segments]}

    def spec(self) -> str:
        return f"perlayer({self.inner.spec()}, {len(self.segments)} layers)"
