"""The ``hvdcomp.allreduce`` pattern of its docstring, run in a training loop on 2 real ranks:
every step is one round of the same algorithm, so the updates equal the single-server oracle's
(tests/oracle.py) step after step; a compression object built anew inside the loop is refused."""
from __future__ import annotations

import pytest
import torch

from multirank import run_ranks
from oracle import decoded, gradients, oracle

STEPS, D, SPEC = 5, 300, "blocksign:block=64"


def _docstring_loop():
    import horovod.torch as hvd
    import hvdcomp

    grads = gradients(seed=11, steps=STEPS, n=hvd.size(), d=D)
    compression = hvdcomp.Compression.liec(SPEC, period=3)   # once, before the loop
    updates = []
    for step in range(STEPS):
        grad = grads[step, hvd.rank()]
        if step % 2:
            handle = hvdcomp.allreduce_async(grad, name="layer1.weight", compression=compression)
            updates.append(hvdcomp.synchronize(handle))
        else:
            updates.append(hvdcomp.allreduce(grad, name="layer1.weight", compression=compression))
    try:   # the pattern the docstring warns about: a new compression object on the next step
        hvdcomp.allreduce(grads[0, hvd.rank()], name="layer1.weight",
                          compression=hvdcomp.Compression.liec(SPEC, period=3))
        refused = None
    except ValueError as exc:
        refused = str(exc)
    return torch.stack(updates), refused


@pytest.mark.mpi
def test_the_docstring_pattern_works_in_a_loop():
    from hvdcomp.compressors import from_spec
    results = run_ranks(_docstring_loop, np=2)
    grads = gradients(seed=11, steps=STEPS, n=2, d=D)
    compress = decoded(from_spec(SPEC))
    expected = oracle("liec", grads, compress, compress, period=3)
    for rank, (updates, refused) in enumerate(results):
        torch.testing.assert_close(updates, expected[:, rank], rtol=0, atol=1e-12)
        assert refused and "was first used with" in refused
    # error feedback really acted: the updates are not the plain averages
    assert not torch.allclose(results[0][0], grads.mean(1))
