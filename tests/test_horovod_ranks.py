"""Real Horovod ranks under mpirun (MPI controller) and horovodrun --gloo: the collectives that
hvdcomp's exchange is built on, checked against values each rank can compute on its own."""
import pytest
import torch

from multirank import run_ranks

LAUNCHES = [pytest.param(np, ctl, marks=getattr(pytest.mark, ctl), id=f"{ctl}-{np}")
            for ctl in ("mpi", "gloo") for np in (2, 4)]


def _collectives():
    import horovod.torch as hvd

    rank, size = hvd.rank(), hvd.size()
    out = {"rank": rank, "size": size}
    # allreduce (float64 Sum and Average)
    x = torch.arange(5, dtype=torch.float64) + 10 * rank
    out["sum"] = hvd.allreduce(x, op=hvd.Sum, name="t.sum")
    out["avg"] = hvd.allreduce(x, op=hvd.Average, name="t.avg")
    # allgather of uint8 with a different first dimension on each rank
    mine = torch.full((rank + 1,), rank, dtype=torch.uint8)
    out["gathered"] = hvd.allgather(mine, name="t.gather")
    # alltoall of packed uint8 bytes with int32 splits: rank r sends (j + 1) bytes of value
    # 16*r + j to rank j.
    splits = torch.tensor([j + 1 for j in range(size)], dtype=torch.int32)
    send = torch.cat([torch.full((j + 1,), 16 * rank + j, dtype=torch.uint8) for j in range(size)])
    received, received_splits = hvd.alltoall(send, splits=splits, name="t.alltoall")
    out["alltoall"] = received
    out["alltoall_splits"] = received_splits
    # async ops with names complete in any order
    handles = [hvd.allreduce_async(torch.ones(3) * (i + 1), op=hvd.Sum, name=f"t.async.{i}")
               for i in (range(3) if rank % 2 == 0 else reversed(range(3)))]
    out["async"] = sorted(hvd.synchronize(h)[0].item() for h in handles)
    return out


@pytest.mark.parametrize("np,controller", LAUNCHES)
def test_collectives(np, controller):
    results = run_ranks(_collectives, np=np, controller=controller, timeout=180)
    assert [r["rank"] for r in results] == list(range(np))
    assert all(r["size"] == np for r in results)
    base = torch.arange(5, dtype=torch.float64)
    expected_sum = np * base + 10 * sum(range(np))
    for r in results:
        assert torch.equal(r["sum"], expected_sum)
        assert torch.allclose(r["avg"], expected_sum / np, rtol=0, atol=1e-12)
        assert r["gathered"].tolist() == [k for k in range(np) for _ in range(k + 1)]
        j = r["rank"]
        assert r["alltoall"].tolist() == [16 * src + j for src in range(np) for _ in range(j + 1)]
        assert r["alltoall_splits"].tolist() == [j + 1] * np
        assert r["async"] == [np * 1.0, np * 2.0, np * 3.0]


def _raise_on_rank1():
    import horovod.torch as hvd

    if hvd.rank() == 1:
        raise RuntimeError("deliberate failure on rank 1")
    hvd.allreduce(torch.ones(1), name="t.never")  # rank 0 would wait here for ever
    return "unreachable"


@pytest.mark.mpi
def test_failing_rank_fails_the_test_with_its_output():
    with pytest.raises(pytest.fail.Exception, match="deliberate failure on rank 1"):
        run_ranks(_raise_on_rank1, np=2, controller="mpi", timeout=60)


def _hang():
    import horovod.torch as hvd

    if hvd.rank() == 0:
        hvd.allreduce(torch.ones(1), name="t.lonely")  # rank 1 never joins
    else:
        import time
        time.sleep(600)


@pytest.mark.mpi
def test_hang_is_killed_and_reported():
    with pytest.raises(pytest.fail.Exception, match="ranks hung: killed after 15 s"):
        run_ranks(_hang, np=2, controller="mpi", timeout=15)


# --- broadcasts within a process set --------------------------------------------------------------
def _broadcasts_in_a_process_set():
    """The communicator of the set {1, 2} of 3 ranks: its root 0 is global rank 1, its root 1
    global rank 2 (Horovod names a broadcast's root by its global rank)."""
    import horovod.torch as hvd

    from hvdcomp.algorithms import make_algorithm
    from hvdcomp.comm import HorovodCommunicator
    from hvdcomp.exchange import Exchange
    late = hvd.add_process_set([1, 2])
    out = {}
    if late.included():
        comm = HorovodCommunicator(late)
        mine = torch.full((3,), float(hvd.rank()))
        for root in (0, 1):
            out[f"copy from {root}"] = comm.broadcast(mine, root, f"b{root}")
            inside = mine.clone()
            out[f"into from {root}"] = comm.broadcast_into_async(inside, root, f"i{root}").wait()
            out[f"object from {root}"] = comm.broadcast_object({"rank": hvd.rank()}, root,
                                                               f"o{root}")
        # LIEC-SGD's exact round broadcasts each server-error chunk from its owner in the set
        exchange = Exchange(make_algorithm("liec", up="sign", period=2), comm)
        exchange.finish(exchange.start("b", torch.randn(256)))
        exchange.end_round()
        own = exchange.algorithm.server_error["b"].clone()
        grad = torch.randn(256, generator=torch.Generator().manual_seed(hvd.rank()))
        expected = comm.allreduce(grad, "ref.mean") + comm.allgather(own, "ref.error")
        out["exact round"] = (exchange.finish(exchange.start("b", grad, update_into=grad)),
                              expected)
    out["optimizer state"] = _broadcast_optimizer_state_in(late)
    hvd.remove_process_set(late)
    return out


def _broadcast_optimizer_state_in(process_set):
    """hvd.broadcast_optimizer_state on every rank, from global roots 1 and 2, of an optimizer
    whose error feedback runs on ``process_set``: every rank of the set gets back the byte
    counters of the checkpoint the root loaded (a wrong root restores nothing)."""
    import horovod.torch as hvd

    import hvdcomp
    model = torch.nn.Linear(8, 8)
    opt = hvdcomp.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), named_parameters=model.named_parameters(),
        compression=hvdcomp.Compression.liec("sign", period=4), process_set=process_set)

    def step():
        opt.zero_grad()
        model(torch.ones(2, 8)).sum().backward()
        opt.step()

    def bytes_up():
        if not process_set.included():
            return None
        return opt._reducer.exchange.bytes_up + opt._reducer.dense_exchange.bytes_up
    step()
    seen = {}
    for root in (1, 2):
        if process_set.included():                    # the set's rank of global rank root
            opt.consolidate_state_dict(to=process_set.ranks.index(root))
        saved, at_save = (opt.state_dict() if hvd.rank() == root else None), bytes_up()
        step()                                        # the counters move on
        if hvd.rank() == root:
            opt.load_state_dict(saved)
        hvd.broadcast_optimizer_state(opt, root_rank=root)
        seen[root] = bytes_up() == at_save
    if process_set.included():                        # a root outside the set: refused
        from hvdcomp import optimizer_state
        try:
            optimizer_state.root_in(opt._comm, 0)
        except ValueError as exc:
            seen[0] = str(exc)
    return seen


@pytest.mark.mpi
def test_broadcast_roots_count_within_the_process_set(monkeypatch):
    monkeypatch.setenv("HOROVOD_DYNAMIC_PROCESS_SETS", "1")
    results = run_ranks(_broadcasts_in_a_process_set, np=3)
    assert results[0] == {"optimizer state": {1: True, 2: True}}    # outside the set
    for out in results[1:]:
        for root, source in ((0, 1), (1, 2)):
            assert torch.equal(out[f"copy from {root}"], torch.full((3,), float(source)))
            assert torch.equal(out[f"into from {root}"], torch.full((3,), float(source)))
            assert out[f"object from {root}"] == {"rank": source}
        update, expected = out["exact round"]
        assert torch.equal(update, expected)
        assert out["optimizer state"][1] is out["optimizer state"][2] is True
        assert "root_rank=0): rank 0 is not in the optimizer's process set (ranks [1, 2])" in \
            out["optimizer state"][0]
    assert torch.equal(results[1]["exact round"][0], results[2]["exact round"][0])
