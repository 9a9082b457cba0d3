"""Default buckets (issue 16, item 2): DDP's 25 MiB with a 1 MiB first bucket, so that a
ResNet-18 (44.7 MB of gradients) is several buckets and the first uplink starts early in
backward; a given bucket_bytes sizes every bucket as before."""
from __future__ import annotations

import torch

from hvdcomp.optimizer_args import DEFAULT_BUCKET_BYTES, DEFAULT_FIRST_BUCKET_BYTES
from hvdcomp.optimizer_buckets import _fuse
from hvdcomp.train.models import PreActResNet


def _resnet18_params():
    model = PreActResNet((2, 2, 2, 2), 3, 10)
    return [(n, p) for n, p in model.named_parameters() if p.numel() * 4 >= 4096]


def _sizes(buckets):
    return [sum(p.numel() * p.element_size() for p in b.params) for b in buckets]


def test_resnet18_is_several_buckets_with_a_small_first_one():
    named = _resnet18_params()
    buckets = _fuse(named, DEFAULT_BUCKET_BYTES, "b", None, DEFAULT_FIRST_BUCKET_BYTES)
    sizes = _sizes(buckets)
    assert sum(sizes) > 40e6 and len(buckets) >= 3
    # the first bucket: the last layers (backward's first gradients), at most 1 MiB unless one
    # tensor alone is larger
    first = buckets[0].params
    assert first[0] is named[-1][1]
    assert sizes[0] <= DEFAULT_FIRST_BUCKET_BYTES or len(first) == 1
    assert all(s <= DEFAULT_BUCKET_BYTES or len(b.params) == 1
               for s, b in zip(sizes, buckets))
    # every parameter exactly once, in backward's order
    order = [p for b in buckets for p in b.params]
    assert [id(p) for p in order] == [id(p) for _, p in reversed(named)]


def test_a_given_bucket_size_sizes_every_bucket():
    named = [(f"w{i}", torch.zeros(1000)) for i in range(10)]
    buckets = _fuse(named, 8000, "b", None)            # two 4000-byte tensors per bucket
    assert _sizes(buckets) == [8000] * 5
    capped = _fuse(named, 8000, "b", None, first_bucket_bytes=4000)
    assert _sizes(capped) == [4000] + [8000] * 4 + [4000]
