"""Gradients as views into the bucket's buffer (issue 16, item 8; DDP's gradient_as_bucket_view):
after a step, each ``p.grad`` of a several-tensor bucket is its slice of the bucket's buffer, so a
rank keeps one model of gradients, not the autograd gradients plus a bucket copy of them, and the
update is decoded straight into ``p.grad``.  Every value must be the copying path's bit for bit,
with ``zero_grad`` to None or to zeros, gradient accumulation, a channels-last parameter (it keeps
its own gradient) and a parameter without a gradient."""
from __future__ import annotations

import pytest
import torch

import hvdcomp
from hvdcomp.comm import simulate

COMPRESSIONS = {
    "liec": lambda: hvdcomp.Compression.liec("sign", "sign", period=2),   # exact rounds too
    "cser": lambda: hvdcomp.Compression.cser("sign", period=2),   # r_i kept in the buffer
    "doublesqueeze": lambda: hvdcomp.Compression.doublesqueeze("sign", "sign"),
    "memsgd": lambda: hvdcomp.Compression.memsgd("topk:ratio=0.1"),
}
STEPS = 4


class Net(torch.nn.Module):
    """A conv whose weight is channels-last (not contiguous), two linears, and a linear that
    forward never uses (no gradient on any rank)."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.fc1 = torch.nn.Linear(8 * 6 * 6, 32)
        self.fc2 = torch.nn.Linear(32, 10)
        self.unused = torch.nn.Linear(10, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
        self.conv.weight.data = self.conv.weight.data.to(memory_format=torch.channels_last)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.conv(x).flatten(1))))


def _wrap(model, comm, name, momentum=0.0, **options):
    """SGD under hvdcomp.DistributedOptimizer with ``name``'s compression, every tensor in
    1 MiB buckets (the whole Net is one several-tensor bucket)."""
    return hvdcomp.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=momentum),
        model.named_parameters(), compression=COMPRESSIONS[name](), comm=comm,
        bucket_bytes=1 << 20, small_tensor_bytes=0, **options)


def _train(comm, name, as_views, set_to_none, passes=1):
    model = Net()
    optimizer = _wrap(model, comm, name, momentum=0.9, backward_passes_per_step=passes)
    optimizer._reducer.grads_as_bucket_views = as_views
    seen = []
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=set_to_none)
        for micro in range(passes):
            seed = 100 * comm.rank + 10 * step + micro
            x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
            model(x).square().mean().backward()
        optimizer.synchronize()
        grads = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        with optimizer.skip_synchronize():
            optimizer.step()
        seen.append((grads, [p.detach().clone() for p in model.parameters()]))
    return seen


def _same(a, b) -> bool:
    if a is None or b is None:
        return a is b
    return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a, b))


@pytest.mark.parametrize("set_to_none", [True, False])
@pytest.mark.parametrize("name", sorted(COMPRESSIONS))
def test_views_give_the_copying_paths_values_bit_for_bit(name, set_to_none):
    copied = simulate(2, lambda comm: _train(comm, name, False, set_to_none))
    viewed = simulate(2, lambda comm: _train(comm, name, True, set_to_none))
    for rank_copied, rank_viewed in zip(copied, viewed):
        for (grads_c, params_c), (grads_v, params_v) in zip(rank_copied, rank_viewed):
            assert all(bool(torch.isfinite(p).all()) for p in params_v)   # NaN != NaN
            assert all(_same(a, b) for a, b in zip(grads_c, grads_v))
            assert all(_same(a, b) for a, b in zip(params_c, params_v))


def test_views_with_gradient_accumulation_give_the_same_values():
    copied = simulate(2, lambda comm: _train(comm, "liec", False, False, passes=2))
    viewed = simulate(2, lambda comm: _train(comm, "liec", True, False, passes=2))
    for rank_copied, rank_viewed in zip(copied, viewed):
        for (_, params_c), (_, params_v) in zip(rank_copied, rank_viewed):
            assert all(_same(a, b) for a, b in zip(params_c, params_v))


def _storages(comm, set_to_none):
    """After two steps: the model's gradient bytes, the distinct bytes held by the gradients and
    the buckets' buffers together, whether each gradient is its bucket slot, and whether the
    second backward pass accumulated straight into the slots (no copy at the bucket's start)."""
    model = Net()
    optimizer = _wrap(model, comm, "liec")
    reducer = optimizer._reducer
    slot_of = {id(p): slot for b in reducer.buckets for p, slot in zip(b.params, b.slots or [])}
    in_place_after_backward = None
    for step in range(2):
        optimizer.zero_grad(set_to_none=set_to_none)
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        if step == 1:
            in_place_after_backward = {
                name: p.grad is not None and p.grad.data_ptr() == slot_of[id(p)].data_ptr()
                for name, p in model.named_parameters() if id(p) in slot_of}
        optimizer.step()
        slot_of = {id(p): slot for b in reducer.buckets for p, slot in zip(b.params, b.slots)}
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
                for t in [p.grad for p in model.parameters()]
                + [b.flat for b in reducer.buckets if b.flat is not None]}
    is_slot = {name: p.grad.data_ptr() == slot_of[id(p)].data_ptr()
               for name, p in model.named_parameters() if id(p) in slot_of}
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    return model_bytes, sum(storages.values()), is_slot, in_place_after_backward


@pytest.mark.parametrize("set_to_none", [True, False])
def test_a_rank_keeps_one_model_of_gradients(set_to_none):
    model_bytes, held, is_slot, in_place = simulate(2, lambda c: _storages(c, set_to_none))[0]
    assert len(is_slot) >= 4                        # a several-tensor bucket
    # every gradient is its slot, but the channels-last weight (its own, copied each round)
    assert is_slot == {name: name != "conv.weight" for name in is_slot}
    conv_weight = 8 * 3 * 3 * 3 * 4
    assert held == model_bytes + conv_weight        # the copying path holds 2 models here
    if not set_to_none:                             # zeroed in place: backward fills the slots
        assert in_place == {name: name != "conv.weight" for name in in_place}


def _slot_at_hook_time(comm):
    """For step 2 after zero_grad to None: whether each gradient was already its bucket slot
    when a hook registered after the optimizer's saw it (the optimizer's hook ran first)."""
    model = Net()
    optimizer = _wrap(model, comm, "doublesqueeze")
    reducer = optimizer._reducer
    seen = {}
    for name, p in model.named_parameters():
        p.register_post_accumulate_grad_hook(
            lambda p, name=name: seen.__setitem__(name, p.grad.data_ptr()))
    for step in range(2):
        seen.clear()
        optimizer.zero_grad()
        x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(step))
        model(x).square().mean().backward()
        optimizer.step()
    slot_of = {id(p): slot for b in reducer.buckets for p, slot in zip(b.params, b.slots)}
    return {name: seen[name] == slot_of[id(p)].data_ptr()
            for name, p in model.named_parameters() if id(p) in slot_of and name in seen}


def test_each_gradient_goes_into_its_slot_as_soon_as_it_is_ready():
    """Not when its bucket starts: autograd's fresh gradient is let go at once, so a rank holds
    at most one of them beside the buckets, not a bucket's worth."""
    at_hook = simulate(2, _slot_at_hook_time)[0]
    assert len(at_hook) >= 4
    assert at_hook == {name: name != "conv.weight" for name in at_hook}
