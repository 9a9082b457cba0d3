"""hvdcomp.DistributedOptimizer against Horovod's contract, on the in-process simulator: every
compression object changes bytes and gradients as it says, Horovod's arguments are honoured or
refused up front, Horovod's errors and warnings, checkpoints in Horovod's habits."""
import warnings

import pytest
import torch

import hvdcomp
from hvdcomp.comm import simulate
from hvdcomp.optimizer import STEP_AFTER_SYNCHRONIZE
from hvdcomp.optimizer_args import OptimizerArgumentError
from hvdcomp.optimizer_state import CheckpointMismatchError

IN, OUT = 64, 32            # weight 2048 floats, bias 32


def _model():
    gen = torch.Generator().manual_seed(0)
    model = torch.nn.Linear(IN, OUT)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen))
    return model


def _inputs(rank):
    gen = torch.Generator().manual_seed(10 + rank)
    return torch.randn(8, IN, generator=gen)


def _local_grads(rank):
    model = _model()
    model(_inputs(rank)).square().sum().backward()
    return [p.grad.clone() for p in model.parameters()]


def _one_step(comm, compression, **kwargs):
    if compression == "randomk":  # one object per rank, as in real processes (it counts calls)
        compression = hvdcomp.Compression.randomk(0.25)
    if isinstance(compression, PerRank):
        compression = compression.make(comm.rank)
    model = _model()
    opt = hvdcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0),
                                       model.named_parameters(), compression=compression,
                                       comm=comm, **kwargs)
    model(_inputs(comm.rank)).square().sum().backward()
    opt.step()
    return [p.grad.clone() for p in model.parameters()], (opt.stats.bytes_up,
                                                          opt.stats.bytes_down)


class PerRank:
    """A compression built on each rank (its arguments name the rank)."""

    def __init__(self, make):
        self.make = make


class HalfCompressor(hvdcomp.Compression.none):
    """A user's own Horovod compressor: sends the first half of each gradient, zeros the rest."""
    calls = 0

    @staticmethod
    def compress(tensor):
        HalfCompressor.calls += 1
        flat = tensor.reshape(-1)
        return flat[:flat.numel() // 2].clone(), (tensor.shape, flat.numel())

    @staticmethod
    def decompress(tensor, ctx):
        shape, numel = ctx
        out = torch.zeros(numel, dtype=tensor.dtype)
        out[:tensor.numel()] = tensor
        return out.reshape(shape)


def _mean():
    grads = [_local_grads(r) for r in range(2)]
    return [(a + b) * 0.5 for a, b in zip(*grads)]


DENSE_BYTES = (IN * OUT + OUT) * 4 // 2      # a ring allreduce sends (N-1)/N of the fp32 gradient


def test_horovod_compressors_change_bytes_and_gradients_as_they_say():
    mean = _mean()
    none = simulate(2, _one_step, hvdcomp.Compression.none)
    for grad, want in zip(none[0][0], mean):
        assert torch.equal(grad, want)
    assert none[0][1] == (DENSE_BYTES, DENSE_BYTES)

    fp16 = simulate(2, _one_step, hvdcomp.Compression.fp16)
    assert fp16[0][1] == (DENSE_BYTES // 2, DENSE_BYTES // 2)
    local = [_local_grads(r)[0] for r in range(2)]
    halves = (local[0].half() + local[1].half()).mul_(0.5).float()   # Horovod's fp16 average
    assert torch.equal(fp16[0][0][0], halves) and not torch.equal(halves, mean[0])

    randomk = simulate(2, _one_step, "randomk")
    kept = randomk[0][0][0] != 0
    assert 0.2 < kept.float().mean() < 0.3
    assert torch.allclose(randomk[0][0][0][kept], mean[0][kept], rtol=1e-6, atol=1e-6)
    assert randomk[0][1][0] < DENSE_BYTES * 0.3

    HalfCompressor.calls = 0
    half = simulate(2, _one_step, HalfCompressor)
    assert HalfCompressor.calls == 4                       # 2 tensors on each of 2 ranks
    weight = half[0][0][0].reshape(-1)
    assert torch.equal(weight[IN * OUT // 2:], torch.zeros(IN * OUT // 2))
    assert torch.equal(weight[:IN * OUT // 2], mean[0].reshape(-1)[:IN * OUT // 2])
    assert half[0][1][0] == DENSE_BYTES // 2


ALGORITHMS = [
    ("psgd", hvdcomp.Compression.psgd(), False),
    ("memsgd", hvdcomp.Compression.memsgd("sign"), True),
    ("doublesqueeze", hvdcomp.Compression.doublesqueeze("sign"), True),
    ("liec", hvdcomp.Compression.liec("sign"), True),
    ("ef21", hvdcomp.Compression.ef21(), True),
    ("dgc", hvdcomp.Compression.dgc("topk:ratio=0.01"), True),
    ("algorithm", hvdcomp.Compression.algorithm("psgd", up="topk:ratio=0.1"), True),
    ("neolithic", hvdcomp.Compression.neolithic("sign"), True),
    ("cser", hvdcomp.Compression.cser("sign"), True),
    ("ef21pp", PerRank(lambda rank: hvdcomp.Compression.ef21pp(rank, participation=1.0)), True),
    # factories generated from the registry (hvdcomp.compression._registry_factory)
    ("ef21bc", hvdcomp.Compression.ef21bc("topk:ratio=0.1", "topk:ratio=0.1"), True),
    ("ef21sgdm", hvdcomp.Compression.ef21sgdm("topk:ratio=0.1"), True),
    ("ef21w", PerRank(lambda rank: hvdcomp.Compression.ef21w(
        "topk:ratio=0.1", rank=rank, smoothness=[1.0, 3.0])), True),
    ("ef21wpp", PerRank(lambda rank: hvdcomp.Compression.ef21wpp(
        "topk:ratio=0.1", rank=rank, smoothness=[1.0, 3.0], participation=1.0)), True),
    ("powersgd_ef", hvdcomp.Compression.powersgd_ef(), True),
]


@pytest.mark.parametrize("name,compression,compresses", ALGORITHMS, ids=[a[0] for a in ALGORITHMS])
def test_every_algorithm_compression_is_applied(name, compression, compresses):
    mean = _mean()
    got = simulate(2, _one_step, compression, small_tensor_bytes=0)
    grad, (up, down) = got[0]
    if compresses:
        assert up < DENSE_BYTES / 2, (name, up)
        assert not torch.equal(grad[0], mean[0])
    else:
        assert torch.equal(grad[0], mean[0]) and up == DENSE_BYTES


def test_every_public_compression_is_covered():
    public = {n for n in vars(hvdcomp.Compression) if not n.startswith("_")}
    covered = {"none", "fp16", "randomk"} | {a[0] for a in ALGORITHMS}
    assert public <= covered, public - covered


def test_hvdcomp_compressor_object_runs_as_psgd_with_it():
    from hvdcomp.compressors import from_spec
    got = simulate(2, _one_step, from_spec("topk:ratio=0.1"), small_tensor_bytes=0)
    assert (got[0][0][0] != 0).float().mean() < 0.25


# --- arguments --------------------------------------------------------------------------------
def _construct(comm, **kwargs):
    model = _model()
    named = kwargs.pop("named", model.named_parameters())
    opt = hvdcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1), named,
                                       comm=comm, **kwargs)
    return sorted(opt._parameter_names.values())


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(op="adasum"), OptimizerArgumentError, "Adasum.*op=hvd.Average"),
    (dict(op="max"), OptimizerArgumentError, "hvd.Average or hvd.Sum"),
    (dict(op="sum", gradient_predivide_factor=2.0), ValueError,
     "gradient_predivide_factor not supported with op != Average"),
    (dict(backward_passes_per_step=0), ValueError, "backward_passes_per_step must be > 0"),
    (dict(compression=hvdcomp.Compression.liec("sign"), gradient_predivide_factor=2.0),
     OptimizerArgumentError, "leave it at 1.0"),
    (dict(bucket_bytes=1024), OptimizerArgumentError, "bucket_bytes.*drop them"),
    (dict(pattern="allgather"), OptimizerArgumentError, "pattern.*drop them"),
    (dict(compression=hvdcomp.Compression.liec("sign"), groups=1, bucket_bytes=1024),
     OptimizerArgumentError, "pass one of them"),
    (dict(groups=[[torch.zeros(1)], [1]]), ValueError, "groups must consist of torch.Tensor."),
    (dict(groups=-1), ValueError, "groups should be a non-negative integer"),
    (dict(compression="sign"), TypeError, "Compression.algorithm\\('psgd', up='sign'\\)"),
    (dict(compression=object()), TypeError, "Compressor interface"),
    (dict(named=[("w", torch.zeros(1))]), ValueError, "were not named"),
    (dict(named=[("w", None), ("w", None)]), ValueError, "Found duplicates: w"),
    (dict(named=[["w", None]]), ValueError, "should be a sequence of tuples"),
])
def test_arguments_refused_up_front(kwargs, error, match):
    with pytest.raises(error, match=match):
        simulate(1, _construct, **kwargs)


class _InstanceMethods:
    def compress(self, tensor):
        return tensor, None

    def decompress(self, tensor, ctx):
        return tensor


def test_compressor_class_with_instance_methods_asks_for_an_instance():
    with pytest.raises(TypeError, match=r"pass an instance, _InstanceMethods\(...\)"):
        simulate(1, _construct, compression=_InstanceMethods)
    assert simulate(1, _construct, compression=_InstanceMethods())


def test_no_named_parameters_get_horovods_names():
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 3))
    opt = torch.optim.SGD([{"params": model[0].parameters()}, {"params": model[1].parameters()}],
                          lr=0.1)
    names = simulate(1, lambda comm: sorted(hvdcomp.DistributedOptimizer(
        opt, comm=comm)._parameter_names.values()))[0]
    assert names == ["allreduce.noname.0.0", "allreduce.noname.0.1", "allreduce.noname.1.0",
                     "allreduce.noname.1.1"]


def test_num_groups_warns_as_horovod():
    with pytest.warns(DeprecationWarning, match="`num_groups` has been replaced by `groups`"):
        simulate(1, _construct, num_groups=2, compression=hvdcomp.Compression.liec("sign"))


def test_bf16_parameters_refused_at_construction():
    def build(comm):
        model = torch.nn.Linear(4, 4).to(torch.bfloat16)
        hvdcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                     model.named_parameters(), comm=comm,
                                     compression=hvdcomp.Compression.liec("sign"))
    with pytest.raises(OptimizerArgumentError, match="'weight', 'bias' are bfloat16.*autocast"):
        simulate(1, build)


def test_wrapping_twice_or_a_wrapped_optimizer_is_refused():
    def build(comm):
        model = _model()
        base = torch.optim.SGD(model.parameters(), lr=0.1)
        wrapped = hvdcomp.DistributedOptimizer(base, model.named_parameters(), comm=comm)
        messages = []
        for target in (base, wrapped):
            try:
                hvdcomp.DistributedOptimizer(target, model.named_parameters(), comm=comm)
            except OptimizerArgumentError as exc:
                messages.append(str(exc))
        return messages
    messages = simulate(1, build)[0]
    assert "already wrapped by an hvdcomp.DistributedOptimizer" in messages[0]
    assert "already an hvdcomp.DistributedOptimizer" in messages[1]


def _sum_and_predivide(comm, compression, **kwargs):
    return _one_step(comm, compression, **kwargs)[0]


def test_op_sum_and_predivide():
    mean = _mean()
    for compression in (hvdcomp.Compression.none, hvdcomp.Compression.psgd()):
        summed = simulate(2, _sum_and_predivide, compression, op="sum")[0]
        assert torch.allclose(summed[0], mean[0] * 2, rtol=1e-6, atol=1e-5)
    split = simulate(2, _sum_and_predivide, hvdcomp.Compression.none,
                     gradient_predivide_factor=4.0)[0]
    assert torch.allclose(split[0], mean[0], rtol=1e-6, atol=1e-5)


def _step_after_synchronize(comm, compression):
    model = _model()
    opt = hvdcomp.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1),
                                       model.named_parameters(), comm=comm,
                                       compression=compression)
    model(_inputs(comm.rank)).sum().backward()
    opt.synchronize()
    opt.step()


@pytest.mark.parametrize("compression", [hvdcomp.Compression.none,
                                         hvdcomp.Compression.liec("sign")])
def test_step_after_synchronize_warns_with_horovods_message(compression):
    # warnings.catch_warnings swaps process-wide state, so it cannot be entered per simulated
    # rank (threads): a rank's warning lands in whichever rank's list was installed last. One
    # catch around the whole world instead, and one warning per rank.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        simulate(2, _step_after_synchronize, compression)
    messages = [str(w.message) for w in caught]
    assert messages.count(STEP_AFTER_SYNCHRONIZE) == 2, messages
    assert "optimizer.step() called without optimizer.skip_synchronize()" in STEP_AFTER_SYNCHRONIZE


# --- requires_grad changing between steps, sparse gradients -----------------------------------
def _gan(comm, compression):
    gen, disc = torch.nn.Linear(8, 16), torch.nn.Linear(16, 1)
    init = torch.Generator().manual_seed(0)   # simulated ranks share torch's global RNG
    with torch.no_grad():
        for p in list(gen.parameters()) + list(disc.parameters()):
            p.copy_(torch.randn(p.shape, generator=init))
    gen_opt = hvdcomp.DistributedOptimizer(torch.optim.SGD(gen.parameters(), lr=0.1),
                                           gen.named_parameters(), comm=comm,
                                           compression=compression)
    disc_opt = hvdcomp.DistributedOptimizer(torch.optim.SGD(disc.parameters(), lr=0.1),
                                            disc.named_parameters(), comm=comm,
                                            compression=compression)
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(comm.rank))
    for step in range(4):
        train_gen = step % 2 == 0
        for p in gen.parameters():
            p.requires_grad_(train_gen)
        for p in disc.parameters():
            p.requires_grad_(not train_gen)
        gen_opt.zero_grad()
        disc_opt.zero_grad()
        disc(gen(x)).sum().backward()
        assert all((p.grad is not None) == train_gen for p in gen.parameters())
        (gen_opt if train_gen else disc_opt).step()
    return [p.detach().clone() for p in list(gen.parameters()) + list(disc.parameters())]


@pytest.mark.parametrize("compression", [hvdcomp.Compression.none,
                                         hvdcomp.Compression.liec("sign")])
def test_requires_grad_switching_between_steps(compression):
    first, second = simulate(2, _gan, compression)
    for a, b in zip(first, second):
        assert torch.equal(a, b) or compression is not hvdcomp.Compression.none


def _sparse(comm, compression, sparse_as_dense):
    emb = torch.nn.Embedding(10, 4, sparse=True)
    opt = hvdcomp.DistributedOptimizer(torch.optim.SGD(emb.parameters(), lr=0.1),
                                       emb.named_parameters(), comm=comm,
                                       compression=compression, sparse_as_dense=sparse_as_dense)
    emb(torch.tensor([[1, 2, 4], [4, 3 + comm.rank, 9]])).sum().backward()
    opt.step()
    return emb.weight.grad.to_dense(), emb.weight.grad.is_sparse


def test_sparse_gradients_as_dense_are_averaged_and_sparse_again():
    for compression in (hvdcomp.Compression.none, hvdcomp.Compression.psgd()):
        (grad0, sparse0), (grad1, _) = simulate(2, _sparse, compression, True)
        assert sparse0 and torch.equal(grad0, grad1)
        assert grad0[3, 0] == 0.5 and grad0[4, 0] == 2.5 and grad0[0, 0] == 0


def test_sparse_gradients_without_sparse_as_dense_name_the_option():
    with pytest.raises(ValueError, match="sparse_as_dense=True"):
        simulate(2, _sparse, hvdcomp.Compression.liec("sign"), False)


# --- checkpoints in Horovod's habit: rank 0 saves one file, every rank loads it ---------------
def _train_liec(comm, steps, start=0, saved=None, consolidate=True, reset=False):
    model = _model()
    opt = hvdcomp.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9), model.named_parameters(),
        comm=comm, compression=hvdcomp.Compression.liec("sign", period=4), small_tensor_bytes=0)
    if saved is not None:
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"], reset_error_feedback=reset)
    gen = torch.Generator().manual_seed(comm.rank)
    for step in range(steps):
        x = torch.randn(8, IN, generator=gen)
        if step < start:
            continue
        opt.zero_grad()
        model(x).square().mean().backward()
        opt.step()
    if consolidate:
        opt.consolidate_state_dict()
    file = {"model": model.state_dict(), "opt": opt.state_dict()} if comm.rank == 0 else None
    return file, [p.detach().clone() for p in model.parameters()]


def test_rank0_checkpoint_restores_every_rank_exactly():
    straight = simulate(2, _train_liec, 6)
    first = simulate(2, _train_liec, 3)
    file = first[0][0]
    assert sorted(file["opt"]["hvdcomp"]["ranks"]) == [0, 1]
    resumed = simulate(2, _train_liec, 6, start=3, saved=file)
    for rank in range(2):
        for a, b in zip(straight[rank][1], resumed[rank][1]):
            assert torch.equal(a, b)
    assert not torch.equal(straight[0][1][0], straight[1][1][0])  # LIEC: each rank its own


def test_checkpoint_without_consolidate_names_the_ways_on():
    first = simulate(2, _train_liec, 2, consolidate=False)
    with pytest.raises(CheckpointMismatchError, match="rank\\(s\\) 0 only, not of rank 1.*"
                       "consolidate_state_dict.*reset_error_feedback=True"):
        simulate(2, _train_liec, 3, start=2, saved=first[0][0])
    simulate(2, _train_liec, 3, start=2, saved=first[0][0], reset=True)


def test_checkpoint_from_another_world_size_names_the_way_on():
    first = simulate(2, _train_liec, 2)
    with pytest.raises(CheckpointMismatchError, match="state of 2 ranks and this job has 3.*"
                       "reset_error_feedback=True"):
        simulate(3, _train_liec, 3, start=2, saved=first[0][0])
    simulate(3, _train_liec, 3, start=2, saved=first[0][0], reset=True)
