"""Parity with ``hvd.DistributedOptimizer`` on real ranks (MPI and Gloo, 2 and 3 ranks): with
``Compression.none``, every documented Horovod feature gives the same parameters and optimizer
state to the last bit, and the same errors and warnings.

The models are float64 with small-integer data, power-of-two batches and learning rates: on 2
ranks every gradient and every partial sum over ranks is exact. On 3 ranks the average (×1/3) is
not, and from the second step on the sums depend on the order in which the ranks are added; Gloo's
ring orders an element by its position in Horovod's fusion buffer, which depends on timing (Horovod
against itself differs in the last bit then). Fusion is therefore switched off
(HOROVOD_FUSION_THRESHOLD=0): each tensor is reduced alone, in a fixed order, and a difference is
a real difference. All features run in one launch per (controller, ranks): the CI machine has two
cores.
"""
import inspect
import itertools
import re
import warnings

import pytest
import torch

from multirank import run_ranks

LAUNCHES = [pytest.param(np, ctl, marks=getattr(pytest.mark, ctl), id=f"{ctl}-{np}")
            for ctl in ("mpi", "gloo") for np in (2, 3)]


class _Net(torch.nn.Module):
    def __init__(self, dtype=torch.float64):
        super().__init__()
        self.first = torch.nn.Linear(6, 4)
        self.second = torch.nn.Linear(4, 2)
        self.extra = torch.nn.Linear(2, 2)     # used on rank 0 only in the "unused" feature
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randint(-4, 5, p.shape, generator=gen).double() / 8)
        self.to(dtype)

    def forward(self, x, use_extra=False):
        out = self.second(self.first(x))
        return self.extra(out) if use_extra else out


def _batch(gen, dtype=torch.float64):
    return (torch.randint(-3, 4, (4, 6), generator=gen).to(dtype),
            torch.randint(-3, 4, (4, 2), generator=gen).to(dtype))


def _wrap(which, opt, model, **kwargs):
    import horovod.torch as hvd
    import hvdcomp
    if which == "horovod":
        return hvd.DistributedOptimizer(opt, named_parameters=model.named_parameters(), **kwargs)
    return hvdcomp.DistributedOptimizer(opt, named_parameters=model.named_parameters(),
                                        compression=hvdcomp.Compression.none, **kwargs)


def _loss(model, x, y, **kw):
    return ((model(x, **kw) - y) ** 2).sum().div(4)


def _feature_kwargs(feature, model, hvd):
    """The DistributedOptimizer keyword arguments that turn ``feature`` on (both wrappers take
    the same ones)."""
    options = {"passes2": lambda: {"backward_passes_per_step": 2},
               "sum": lambda: {"op": hvd.Sum},
               "predivide": lambda: {"gradient_predivide_factor": 2.0},
               "groups": lambda: {"groups": 2},
               "groups_list": lambda: {"groups": [[model.first.weight, model.second.weight]]},
               "process_set": lambda: {"process_set": _EVEN[0]}}  # set up by the test's ranks
    return options[feature]() if feature in options else {}


def _train_step(opt, model, data, feature, step, passes, rank):
    if feature == "frozen":  # GAN style: the second layer sits out every other step
        for p in model.second.parameters():
            p.requires_grad_(step % 2 == 0)
    opt.zero_grad()
    for _ in range(passes):
        x, y = _batch(data)
        _loss(model, x, y, use_extra=feature == "unused" and rank == 0).backward()
    if feature == "clip":
        opt.synchronize()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        with opt.skip_synchronize():
            opt.step()
    else:
        opt.step()


def _train(which, feature, steps=3):
    import horovod.torch as hvd
    rank, size = hvd.rank(), hvd.size()
    model = _Net()
    if feature == "frozen":
        model.first.bias.requires_grad_(False)
    kwargs = _feature_kwargs(feature, model, hvd)
    passes = kwargs.get("backward_passes_per_step", 1)
    opt = _wrap(which, torch.optim.SGD(model.parameters(), lr=2.0 ** -7, momentum=0.5), model,
                **kwargs)
    data = torch.Generator().manual_seed(rank)
    my_steps = steps - 1 if feature == "join" and rank == size - 1 else steps
    for step in range(my_steps):
        _train_step(opt, model, data, feature, step, passes, rank)
    if feature == "join":
        hvd.join()
    return [p.detach().clone() for p in model.parameters()]

_EVEN = []


def _broadcast_state(which):
    """Horovod's own habit: train, rank 0 saves, a fresh model and optimizer, rank 0 loads,
    broadcast parameters and optimizer state, train on; for every torch.optim optimizer. In
    float32, as Horovod's test: with float64 parameters some torch 2.13 optimizers keep state
    tensors whose dtype differs between a loaded and a fresh state, which Horovod's broadcast
    refuses (with its own optimizer too)."""
    import horovod.torch as hvd
    results = []
    classes = sorted((c for c in torch.optim.Optimizer.__subclasses__()
                      if c.__module__.startswith("torch.optim")
                      # as Horovod's test; and Muon takes matrices only
                      and c.__name__ not in ("LBFGS", "SparseAdam", "Muon")),
                     key=lambda c: c.__name__)
    options = [dict(lr=2.0 ** -5, momentum=0.5, weight_decay=2.0 ** -4, centered=True),
               dict(lr=2.0 ** -5)]
    for cls, opts in itertools.product(classes, options):
        def build():
            model = _Net(torch.float32)
            params = {k: v for k, v in opts.items()
                      if k in inspect.signature(cls.__init__).parameters}
            return model, _wrap(which, cls(model.parameters(), **params), model)
        model, opt = build()
        data = torch.Generator().manual_seed(hvd.rank())
        x, y = _batch(data, torch.float32)
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
        saved = {"model": model.state_dict(), "opt": opt.state_dict()} if hvd.rank() == 0 else None
        model, opt = build()
        if hvd.rank() == 0:
            model.load_state_dict(saved["model"])
            opt.load_state_dict(saved["opt"])
        hvd.broadcast_parameters(model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(opt, root_rank=0)
        x, y = _batch(data, torch.float32)
        opt.zero_grad()
        _loss(model, x, y).backward()
        opt.step()
        state = opt.state_dict()["state"]
        results.append((cls.__name__, [p.detach().clone() for p in model.parameters()],
                        [v.clone() if torch.is_tensor(v) else v
                         for s in state.values() for _, v in sorted(s.items())]))
    return results


def _messages(which):
    """Errors and warnings users filter on."""
    import horovod.torch as hvd
    out = []
    model = _Net()
    bad = [dict(named_parameters=list(model.named_parameters()) * 2),
           dict(named_parameters=list(model.named_parameters())[:1]),
           dict(named_parameters=[["first.weight", model.first.weight]]),
           dict(backward_passes_per_step=0), dict(op=hvd.Sum, gradient_predivide_factor=2.0),
           dict(groups=[[1]])]
    for kwargs in bad:
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        named = kwargs.pop("named_parameters", model.named_parameters())
        try:
            if which == "horovod":
                hvd.DistributedOptimizer(opt, named_parameters=named, **kwargs)
            else:
                import hvdcomp
                hvdcomp.DistributedOptimizer(opt, named_parameters=named, **kwargs)
            out.append("constructed")
        except Exception as exc:  # the type's base and the message must match Horovod's
            # object ids differ between the two models: masked
            out.append((isinstance(exc, ValueError), re.sub(r"\d{6,}", "<id>", str(exc))))
    opt = _wrap(which, torch.optim.SGD(model.parameters(), lr=0.1), model)
    _loss(model, *_batch(torch.Generator().manual_seed(0))).backward()
    opt.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step()
    out.append([str(w.message) for w in caught])
    try:
        _loss(model, *_batch(torch.Generator().manual_seed(0))).backward()
        _loss(model, *_batch(torch.Generator().manual_seed(1))).backward()
    except AssertionError as exc:
        out.append(str(exc))
    try:
        opt.zero_grad()
    except AssertionError as exc:
        out.append(str(exc))
    return out


FEATURES = ["plain", "passes2", "clip", "frozen", "sum", "predivide", "groups", "groups_list",
            "unused", "process_set", "join"]


def _parity_suite():
    import horovod.torch as hvd
    _EVEN.append(hvd.add_process_set([r for r in range(hvd.size()) if r % 2 == 0]))
    out = {}
    for feature in FEATURES:
        out[feature] = (_train("horovod", feature), _train("hvdcomp", feature))
    out["broadcast_state"] = (_broadcast_state("horovod"), _broadcast_state("hvdcomp"))
    out["messages"] = (_messages("horovod"), _messages("hvdcomp"))
    hvd.remove_process_set(_EVEN[0])
    return out


def _same(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("np,controller", LAUNCHES)
def test_compression_none_matches_horovod_to_the_last_bit(np, controller, monkeypatch):
    monkeypatch.setenv("HOROVOD_DYNAMIC_PROCESS_SETS", "1")
    monkeypatch.setenv("HOROVOD_FUSION_THRESHOLD", "0")   # see the module docstring
    results = run_ranks(_parity_suite, np=np, controller=controller, timeout=400)
    initial = [p.detach() for p in _Net().parameters()]
    for rank, result in enumerate(results):
        for feature, (horovod, ours) in result.items():
            assert len(horovod) == len(ours), (rank, feature, horovod, ours)
            for i, (a, b) in enumerate(zip(horovod, ours)):
                assert _same(a, b), (rank, feature, i, a, b)
        for feature in FEATURES:   # training moved the parameters: no vacuous comparison
            assert not torch.equal(result[feature][0][0], initial[0]), feature
    messages = results[0]["messages"][1]
    assert messages[-3] == [
        "optimizer.step() called without optimizer.skip_synchronize() context after "
        "optimizer.synchronize(). This can cause training slowdown. You may want to consider "
        "using optimizer.skip_synchronize() context if you use optimizer.synchronize() in your "
        "code."]
    assert "Found duplicates" in messages[0][1]
