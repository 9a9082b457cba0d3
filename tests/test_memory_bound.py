"""Memory: between rounds a rank keeps at most its algorithm's own state plus one bucket of
scratch (issue 16, item 8), counted as the bytes of the tensors reachable from the exchange
(tracemalloc does not see torch's allocations); and every tensor an algorithm keeps across rounds
is declared state (Algorithm.state_fields), so checkpoints cannot miss one."""
from __future__ import annotations

import pytest
import torch

from hvdcomp.algorithms import make_algorithm
from hvdcomp.comm.simulator import simulate
from hvdcomp.compressors import _native
from hvdcomp.exchange import Exchange
from hvdcomp.exchange_codec import chunk_bounds
from hvdcomp.exchange_buffers import held_bytes
from pointer_spy import record_data_pointers

D = 1 << 14          # a bucket of fp32 elements, a multiple of the chunk alignment

CASES = [  # algorithm, up, down, pattern
    ("psgd", "sign", None, "two_phase"),
    ("psgd", "none", None, "allreduce"),
    ("liec", "sign", "sign", "two_phase"),
    ("liec", "sign", "sign", "allgather"),
    ("doublesqueeze", "blocksign:block=64", "sign", "two_phase"),
    ("neolithic", "sign", "sign", "two_phase"),
    ("memsgd", "topk:ratio=0.1", None, "two_phase"),
    ("memsgd", "none", None, "allreduce"),
    ("cser", "sign", None, "two_phase"),
    ("ef21", "topk:ratio=0.1", None, "two_phase"),
    ("ef21bc", "topk:ratio=0.1", "topk:ratio=0.1", "two_phase"),
    ("dgc", "dgc:ratio=0.01", None, "allgather"),
]


def _algorithm(name, up, down):
    hyper = {"steps_per_epoch": 100} if name == "dgc" else {}
    if name in ("liec", "cser"):
        hyper["period"] = 3                 # an exact round among the four below
    return make_algorithm(name, up=up, down=down, **hyper)


def _rounds(comm, name, up, down, pattern):
    algo = _algorithm(name, up, down)
    exchange = Exchange(algo, comm, pattern=pattern)
    for step in range(4):
        g = torch.randn(D, generator=torch.Generator().manual_seed(10 * comm.rank + step))
        exchange.finish(exchange.start("b", g))
        exchange.end_round()
    state = sum(t.numel() * t.element_size()
                for field in algo.state_fields for t in getattr(algo, field).values())
    undeclared = {attr: len(value) for attr, value in vars(algo).items()
                  if isinstance(value, dict) and attr not in algo.state_fields
                  and any(isinstance(v, torch.Tensor) for v in value.values())}
    return held_bytes(exchange), state, undeclared


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("name,up,down,pattern", CASES)
def test_a_rank_keeps_its_state_plus_one_bucket(name, up, down, pattern, n):
    bucket = 4 * D
    for rank, (held, state, _) in enumerate(simulate(n, _rounds, name, up, down, pattern)):
        assert held <= state + bucket, (
            f"rank {rank} keeps {held / bucket:.2f} buckets: state {state / bucket:.2f} "
            f"+ scratch {(held - state) / bucket:.2f} (at most 1)")


def _rounds_into_the_callers_buffer(comm, name, up, down, into, pattern="two_phase"):
    """Four rounds with the gradient in one buffer that is also ``update_into`` (what the
    optimizer does), or without ``update_into``: the updates, and the bytes held."""
    algo = _algorithm(name, up, down)
    exchange = Exchange(algo, comm, pattern=pattern)
    flat, updates, in_buffer = torch.empty(D), [], []
    for step in range(4):
        flat.copy_(torch.randn(D, generator=torch.Generator().manual_seed(10 * comm.rank + step)))
        handle = exchange.start("b", flat, update_into=flat if into else None)
        update = exchange.finish(handle)
        updates.append(update.clone())
        in_buffer.append(update.data_ptr() == flat.data_ptr())
        exchange.end_round()
    state = sum(t.numel() * t.element_size()
                for field in algo.state_fields for t in getattr(algo, field).values())
    return updates, held_bytes(exchange), state, in_buffer


@pytest.mark.parametrize("n", [2, 3])
@pytest.mark.parametrize("name,up,down", [("doublesqueeze", "sign", "sign"),
                                          ("memsgd", "topk:ratio=0.1", None),
                                          ("liec", "sign", "sign")])
def test_with_the_callers_buffer_a_rank_keeps_only_what_the_algorithm_must(name, up, down, n):
    """Given ``update_into``, DoubleSqueeze and MEM-SGD (which read C(p_i) only in worker_sent)
    write their residual over their error (``sign``) or have C(p_i) decoded into the caller's
    buffer (top-k) and keep nothing but their errors; LIEC-SGD keeps r_i for the round in the
    caller's buffer, and takes scratch shared by all buckets only off the C kernels (one chunk
    for its worker's decode, two where its server decodes the mean into a buffer). The server
    adds the mean onto its error (v) and writes the residual over v, so it keeps nothing of its
    own. The updates are those of rounds without ``update_into``, bit for bit."""
    bucket = 4 * D
    into = simulate(n, _rounds_into_the_callers_buffer, name, up, down, True)
    fresh = simulate(n, _rounds_into_the_callers_buffer, name, up, down, False)
    for rank, ((updates, held, state, _), (expected, *_)) in enumerate(zip(into, fresh)):
        assert all(torch.equal(a, b) for a, b in zip(updates, expected)), rank
        bounds = chunk_bounds(D, n)
        own = bounds[rank][1] - bounds[rank][0]
        # LIEC-SGD's worker takes a chunk of scratch to decode C(v), and its server two (the
        # mean and the addend), only where sign cannot add in the decoder's pass
        native = _native.library() is not None
        server, worker = (0, 0) if native else (2 * own, bounds[0][1])
        scratch = 4 * max(server, worker) if name == "liec" else 0
        assert held == state + scratch, (rank, held / bucket, state / bucket)


@pytest.mark.parametrize("name,up,down,pattern", CASES)
def test_every_round_kind_gives_the_same_updates_into_the_callers_buffer(name, up, down, pattern):
    """Every pattern writes the update into ``update_into``, which is also the gradient's buffer
    (the optimizer's bucket buffer): no algorithm step may read the gradient after ``start``.
    Bit for bit the updates of rounds into fresh tensors (an exact round among the four for
    LIEC-SGD and CSER)."""
    into = simulate(3, _rounds_into_the_callers_buffer, name, up, down, True, pattern)
    fresh = simulate(3, _rounds_into_the_callers_buffer, name, up, down, False, pattern)
    for rank, ((updates, _, _, in_buffer), (expected, *_)) in enumerate(zip(into, fresh)):
        assert all(torch.equal(a, b) for a, b in zip(updates, expected)), rank
        if name in ("psgd", "liec", "memsgd", "doublesqueeze"):  # worker_update returns it
            assert all(in_buffer), (rank, in_buffer)


@pytest.mark.parametrize("name,up,down,pattern", CASES)
def test_every_tensor_kept_across_rounds_is_declared_state(name, up, down, pattern):
    for _, _, undeclared in simulate(2, _rounds, name, up, down, pattern):
        assert not undeclared, f"{name} keeps tensors outside state_fields: {undeclared}"


def test_held_bytes_counts_each_storage_once_and_would_see_an_extra_buffer():
    class Holder:
        pass
    holder = Holder()
    big = torch.zeros(1000)
    holder.views = {"a": big[:10], "b": [big[500:], (big,)]}
    assert held_bytes(holder) == 4000
    holder.extra = torch.zeros(250, dtype=torch.float64)
    assert held_bytes(holder) == 6000


def test_a_kept_extra_bucket_breaks_the_bound():
    """The bound is not vacuous: LIEC-SGD keeping r_i in a buffer of its own (as it did before
    it wrote r_i over the exchange's C(g_i)) fails it."""
    from hvdcomp.algorithms.liec import LIEC
    from hvdcomp.exchange_buffers import ReusedBuffers

    class OwnBufferLIEC(LIEC):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._buffers = ReusedBuffers()

        def worker_sent(self, key, message, sent):
            own = self._buffers.like(key, "local_error", message)
            self.local_error[key] = torch.sub(message, sent, out=own)

    def rounds(comm):
        exchange = Exchange(OwnBufferLIEC(up="sign", down="sign", period=3), comm)
        for step in range(2):
            exchange.finish(exchange.start("b", torch.randn(D)))
            exchange.end_round()
        return held_bytes(exchange)

    for held in simulate(2, rounds):
        assert held > 4 * D // 2 + 4 * D          # server error (half) + one bucket


# --- LIEC-SGD's exact round averages the gradient in the caller's buffer ------------------------
# Every bucket's exact-round buffers are in flight at once. A copy of the parameters to reduce
# held the model once more; a [gradient, parameters] buffer held a copy of the gradient beside
# the optimizer's bucket buffer (twice the model in all, not once).
def _exact_round_allreduces(comm):
    calls = []
    for method in ("allreduce_async", "allreduce_into_async"):
        inner = getattr(comm, method)

        def spy(tensor, name, op="average", _inner=inner, _method=method):
            calls.append((_method, name.split(".", 2)[-1], tensor.numel(), tensor.data_ptr()))
            return _inner(tensor, name, op)
        setattr(comm, method, spy)
    exchange = Exchange(make_algorithm("liec", up="sign", period=1), comm)
    params = [torch.randn(D // 2, generator=torch.Generator().manual_seed(comm.rank))]
    bucket = torch.randn(D, generator=torch.Generator().manual_seed(comm.rank))
    update = exchange.finish(exchange.start("b", bucket, params=params, update_into=bucket))
    return calls, bucket.data_ptr(), update.data_ptr(), params[0].data_ptr()


def test_the_exact_round_averages_the_gradient_and_the_parameters_in_place():
    for calls, bucket, update, param in simulate(2, _exact_round_allreduces):
        # (the simulator's allreduce_into_async is the default: it calls allreduce_async in turn)
        first = [call for call in calls if call[0] == "allreduce_into_async"]
        assert [call[1:3] for call in first] == [("sync_grad", D), ("sync_params.0", D // 2)]
        assert first[0][3] == bucket                    # the gradient: the caller's buffer
        assert update == bucket                         # and the update written there too
        assert first[1][3] == param                     # the parameter: its own storage


def _exact_round_collectives(comm):
    calls = []
    for method in ("allgather_async", "broadcast_async", "broadcast_into_async"):
        inner = getattr(comm, method)

        def spy(tensor, *args, _inner=inner, _method=method):
            calls.append((_method, tensor.numel(), tensor.data_ptr()))
            return _inner(tensor, *args)
        setattr(comm, method, spy)
    exchange = Exchange(make_algorithm("liec", up="sign", period=2), comm)
    exchange.finish(exchange.start("b", torch.randn(D)))        # a server error to fold in
    exchange.end_round()
    calls.clear()
    bucket = torch.randn(D, generator=torch.Generator().manual_seed(comm.rank))
    exchange.finish(exchange.start("b", bucket, update_into=bucket))
    return calls, bucket.data_ptr()


def test_the_exact_round_broadcasts_each_server_chunk_into_the_update():
    """No bucket-sized tensor gathers the server error (an allgather allocated one, the exact
    round's peak): each owner's chunk of the update is broadcast in place, into the bucket."""
    for calls, bucket in simulate(2, _exact_round_collectives):
        into = [call for call in calls if call[0] == "broadcast_into_async"]
        assert [numel for _, numel, _ in into] == [D // 2, D // 2]
        assert [ptr for _, _, ptr in into] == [bucket, bucket + 4 * D // 2]
        assert not [call for call in calls if call[0] == "allgather_async"]


def _allreduce_into_on_horovod_ranks():
    from hvdcomp.comm import HorovodCommunicator
    comm = HorovodCommunicator()
    reduced = record_data_pointers(comm._hvd, "allreduce_async_")   # what Horovod reduced
    out = {}
    for dtype in (torch.float32, torch.float64):
        for op in ("average", "sum"):
            x = torch.randn(3 * D + 1, dtype=dtype,
                            generator=torch.Generator().manual_seed(comm.rank))
            name = f"{dtype}/{op}"
            outside = comm.allreduce_async(x, f"out/{name}", op).wait()
            inside = x.clone()
            reduced.clear()
            result = comm.allreduce_into_async(inside, f"in/{name}", op).wait()
            out[name] = (reduced == [inside.data_ptr()],
                         result.data_ptr() == inside.data_ptr(),
                         torch.equal(inside, outside), torch.equal(x, inside))
    return out


@pytest.mark.mpi
def test_horovods_in_place_allreduce_gives_the_out_of_place_bits_in_the_same_buffer():
    """The 2 real ranks' in-place allreduce writes into the tensor given, with the bits of the
    out-of-place one (Horovod runs the same operation with output = input)."""
    from multirank import run_ranks
    for rank, cases in enumerate(run_ranks(_allreduce_into_on_horovod_ranks, np=2)):
        for name, (in_place, same_buffer, same_bits, unchanged) in cases.items():
            assert in_place and same_buffer and same_bits and not unchanged, (rank, name)


def _broadcast_into_on_horovod_ranks():
    from hvdcomp.comm import HorovodCommunicator
    comm = HorovodCommunicator()
    sent = record_data_pointers(comm._hvd, "broadcast_async_")      # what Horovod broadcast
    out = {}
    for root in range(comm.size):
        x = torch.randn(3 * D + 1, generator=torch.Generator().manual_seed(comm.rank))
        outside = comm.broadcast_async(x, root, f"out/{root}").wait()
        inside = x.clone()
        sent.clear()
        result = comm.broadcast_into_async(inside[1:], root, f"in/{root}").wait()
        out[root] = (sent == [inside.data_ptr() + 4], result.data_ptr() == inside.data_ptr() + 4,
                     torch.equal(inside[1:], outside[1:]), torch.equal(inside[0], x[0]))
    return out


@pytest.mark.mpi
def test_horovods_in_place_broadcast_writes_the_roots_bits_into_a_view():
    """The exact round broadcasts each server chunk into its slice of the update: Horovod's
    in-place broadcast on 2 real ranks writes the root's bits there and nowhere else."""
    from multirank import run_ranks
    for rank, cases in enumerate(run_ranks(_broadcast_into_on_horovod_ranks, np=2)):
        for root, checks in cases.items():
            assert all(checks), (rank, root, checks)


def test_the_default_allreduce_into_writes_the_out_of_place_result_into_the_tensor():
    def ranks(comm):
        x = torch.randn(D, generator=torch.Generator().manual_seed(comm.rank))
        outside = comm.allreduce(x, "out")
        inside = x.clone()
        result = comm.allreduce_into_async(inside, "in").wait()
        return result is inside and torch.equal(inside, outside)
    assert all(simulate(3, ranks))


def test_an_exact_round_lets_go_of_the_buckets_work_buffers():
    """An exact round compresses nothing: the bucket's C(g_i) buffer is released while the
    exact round's allreduces are in flight, and the next compressed round allocates it again
    (the memory bound above still holds after it)."""
    def rounds(comm):
        exchange = Exchange(make_algorithm("liec", up="sign", period=2), comm)
        held = []
        for step in range(3):
            g = torch.randn(D, generator=torch.Generator().manual_seed(10 * comm.rank + step))
            params = [torch.randn(D, generator=torch.Generator().manual_seed(step))]
            handle = exchange.start("b", g, params=params)
            held.append(len(exchange.buffers.tensors()))
            exchange.finish(handle)
            exchange.end_round()
        return held
    for held in simulate(2, rounds):
        assert held == [1, 0, 1]         # compressed, exact, compressed


def _optimizer_rounds(comm):
    """Three DistributedOptimizer steps (LIEC/sign, two-phase, several buckets): each bucket's
    gradient buffer, and whether its update was decoded over it, per step."""
    import hvdcomp
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 64),
                                torch.nn.Linear(64, 10))
    torch.manual_seed(0)
    optimizer = hvdcomp.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), model.named_parameters(),
        compression=hvdcomp.Compression.liec("sign", period=1000), comm=comm,
        bucket_bytes=4 * 64 * 65, small_tensor_bytes=0)
    reducer = optimizer._reducer
    seen = []
    for step in range(3):
        optimizer.zero_grad()
        model(torch.randn(8, 64, generator=torch.Generator().manual_seed(step))).sum().backward()
        handles = {b.key: b.handle for b in reducer.buckets}
        optimizer.step()
        seen.append({b.key: (b.flat.data_ptr() if b.flat is not None else None,
                             handles[b.key].context.get("update_into") is not None)
                     for b in reducer.buckets if b.exchange is reducer.exchange})
    return seen


def test_the_optimizer_reuses_one_gradient_buffer_per_bucket_for_the_update():
    """No bucket-sized tensor per round: the bucket's concatenated gradients go into the same
    buffer every step, and the two-phase round decodes the update over it."""
    seen = simulate(2, _optimizer_rounds)[0]
    assert len(seen[0]) >= 2
    assert seen[0] == seen[1] == seen[2]                       # the same buffers every step
    assert all(into for _, into in seen[0].values())           # the update went into them
    # a bucket of several tensors has its own buffer (one of one tensor: that tensor's grad)
    assert sum(ptr is not None for ptr, _ in seen[0].values()) >= 2
