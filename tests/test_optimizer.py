"""hvdcomp.DistributedOptimizer on the in-process simulator: semantics that need no real ranks."""
import pytest
import torch

import hvdcomp
from hvdcomp.comm import simulate
from hvdcomp.algorithms import make_algorithm
from hvdcomp.compression import is_stateful
from hvdcomp.exchange import Exchange



@pytest.fixture(autouse=True)
def float64_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def make_model():
    # The same initial parameters on every simulated worker (threads share torch's global RNG).
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 48), torch.nn.Tanh(), torch.nn.Linear(48, 3))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model


def batches(rank, steps, batch=8):
    gen = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(batch, 20, generator=gen), torch.randint(0, 3, (batch,), generator=gen))
            for _ in range(steps)]


def train(comm, compression, steps=6, state=None, start=0, **opt_kwargs):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    if is_stateful(compression):  # compress biases too; Horovod compressors apply to every tensor
        opt_kwargs.setdefault("small_tensor_bytes", 0)
    opt = hvdcomp.DistributedOptimizer(opt, model.named_parameters(), compression=compression,
                                       comm=comm, **opt_kwargs)
    if state is not None:
        model.load_state_dict(state[comm.rank]["model"])
        opt.load_state_dict(state[comm.rank]["opt"])
    for x, y in batches(comm.rank, steps)[start:]:
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return {"model": {k: v.clone() for k, v in model.state_dict().items()},
            "opt": opt.state_dict(), "bytes": (opt.stats.bytes_up, opt.stats.bytes_down)}


def plain_liec_reference(comm, steps=6, period=3):
    """The same training driven by hand: gradients flattened in the optimizer's bucket order,
    one Exchange round per step, parameters averaged before the update in exact rounds."""
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    exchange = Exchange(make_algorithm("liec", up="sign", period=period), comm)
    params = list(reversed(list(model.parameters())))  # the optimizer fills buckets backwards
    for x, y in batches(comm.rank, steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        sync = exchange.is_sync_step()
        update = exchange.exchange("b0", torch.cat([p.grad.reshape(-1) for p in params]))
        exchange.end_round()
        offset = 0
        for p in params:
            p.grad.copy_(update[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
        if sync:
            exchange.average_parameters(params)
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_liec_optimizer_equals_exchange_driven_by_hand():
    comp = hvdcomp.Compression.liec("sign", period=3)
    got = simulate(3, train, comp)
    want = simulate(3, plain_liec_reference)
    for rank in range(3):
        for key in want[rank]:
            assert torch.equal(got[rank]["model"][key], want[rank][key]), (rank, key)
    # Between exact rounds LIEC's local models differ (each worker adds its own error) ...
    assert not torch.equal(got[0]["model"]["0.weight"], got[1]["model"]["0.weight"])


def test_psgd_keeps_replicas_identical():
    got = simulate(3, train, hvdcomp.Compression.none)
    for rank in (1, 2):
        for key in got[0]["model"]:
            assert torch.equal(got[0]["model"][key], got[rank]["model"][key])


@pytest.mark.parametrize("algorithm,up", [("liec", "sign"), ("doublesqueeze", "blocksign:block=64"),
                                          ("memsgd", "topk:ratio=0.1")])
def test_checkpoint_resume_continues_exactly(algorithm, up):
    comp = hvdcomp.Compression.algorithm(algorithm, up=up)
    straight = simulate(2, train, comp, steps=6)
    first = simulate(2, train, comp, steps=3)
    resumed = simulate(2, train, comp, steps=6, state=first, start=3)
    for rank in range(2):
        for key in straight[rank]["model"]:
            assert torch.equal(straight[rank]["model"][key], resumed[rank]["model"][key])
        a = straight[rank]["opt"]["hvdcomp"]["ranks"][rank]["algorithm"]
        b = resumed[rank]["opt"]["hvdcomp"]["ranks"][rank]["algorithm"]
        assert a.keys() == b.keys() and a["step"] == b["step"] == 6
        for attr, value in a.items():
            if isinstance(value, dict) and attr != "config":
                assert value.keys() == b[attr].keys()
                for k in value:
                    assert torch.equal(value[k], b[attr][k]), (attr, k)
        assert straight[rank]["bytes"] == resumed[rank]["bytes"]


def test_resume_with_another_world_size_is_refused():
    comp = hvdcomp.Compression.liec("sign")
    first = simulate(2, train, comp, steps=2)
    state3 = [first[0], first[1], first[0]]
    with pytest.raises(ValueError, match="state of 2 ranks and this job has 3.*"
                                         "reset_error_feedback=True"):
        simulate(3, train, comp, steps=3, state=state3, start=2)


def _train_reset(comm, state):
    model = make_model()
    opt = hvdcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       model.named_parameters(),
                                       compression=hvdcomp.Compression.liec("sign"), comm=comm)
    opt.load_state_dict(state[comm.rank]["opt"], reset_error_feedback=True)
    return opt.algorithm.step


def test_resume_with_reset_error_feedback_starts_errors_at_zero():
    first = simulate(2, train, hvdcomp.Compression.liec("sign"), steps=2)
    assert simulate(3, _train_reset, [first[0], first[1], first[0]]) == [0, 0, 0]


def _accumulate(comm, passes):
    model = make_model()
    opt = hvdcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       model.named_parameters(), comm=comm,
                                       backward_passes_per_step=passes)
    data = batches(comm.rank, 2 * passes)
    opt.zero_grad()
    for x, y in data[:passes]:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _accumulate_by_hand(comm, passes):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in batches(comm.rank, 2 * passes)[:passes]:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    for i, p in enumerate(model.parameters()):
        p.grad = comm.allreduce(p.grad, name=f"g{i}")
    opt.step()
    return [p.detach().clone() for p in model.parameters()]


def test_gradient_accumulation_sums_local_passes_then_averages():
    got = simulate(2, _accumulate, 3)
    want = simulate(2, _accumulate_by_hand, 3)
    for g, w in zip(got[0], want[0]):
        assert torch.allclose(g, w, rtol=0, atol=1e-14)


def _too_many_backwards(comm):
    model = make_model()
    # never stepped: its gradient hooks are what must refuse the second backward pass
    _optimizer = hvdcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       model.named_parameters(), comm=comm)
    x, y = batches(comm.rank, 1)[0]
    for _ in range(2):
        torch.nn.functional.cross_entropy(model(x), y).backward()


def test_more_backward_passes_than_declared_is_an_error():
    with pytest.raises(AssertionError, match="more than backward_passes_per_step times"):
        simulate(2, _too_many_backwards)


def _zero_grad_in_flight(comm):
    model = make_model()
    opt = hvdcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       model.named_parameters(), comm=comm)
    x, y = batches(comm.rank, 1)[0]
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.zero_grad()


def test_zero_grad_with_exchange_in_flight_is_refused():
    with pytest.raises(AssertionError, match="zero_grad"):
        simulate(2, _zero_grad_in_flight)


def _frozen_and_unused(comm):
    model = make_model()
    extra = torch.nn.Linear(3, 3)           # in the optimizer, never used: no gradient anywhere
    model[0].bias.requires_grad_(False)     # frozen: never exchanged
    params = list(model.parameters()) + list(extra.parameters())
    named = (list(model.named_parameters())
             + [("extra." + n, p) for n, p in extra.named_parameters()])
    opt = hvdcomp.DistributedOptimizer(torch.optim.SGD(params, lr=0.1), named, comm=comm,
                                       compression=hvdcomp.Compression.liec("sign"))
    x, y = batches(comm.rank, 1)[0]
    # Rank 1 uses only part of the model: the second layer gets no gradient there.
    out = model(x) if comm.rank == 0 else model[1](model[0](x)).sum(1, keepdim=True).expand(-1, 3)
    torch.nn.functional.cross_entropy(out, y).backward()
    opt.step()
    return model[0].bias.grad, extra.weight.grad is not None


def test_frozen_and_missing_gradients_do_not_hang():
    (bias_grad0, extra0), (bias_grad1, extra1) = simulate(2, _frozen_and_unused)
    assert bias_grad0 is None and bias_grad1 is None
    assert extra0 and extra1


def test_stateful_compression_refuses_horovods_allreduce():
    comp = hvdcomp.Compression.liec("sign")
    with pytest.raises(TypeError, match="use hvdcomp.DistributedOptimizer"):
        comp.compress(torch.ones(3))


def test_unknown_algorithm_in_compression_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown algorithm 'liecc'"):
        hvdcomp.Compression.algorithm("liecc", up="sign")
