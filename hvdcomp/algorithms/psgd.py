"""P-SGD: parallel SGD, the uncompressed average (the baseline every paper compares against).

    u_i = (1/n) Σ_j g_j

With the default compressors (``none`` both ways) the exchange returns the exact average. With a
compressor it is compressed averaging *without* error feedback, u = C_down(mean_j C_up(g_j)),
which is what "just compress the gradients" does and what error feedback is measured against.
The base class's five steps already are this algorithm; the class only gives it a name.
"""
from __future__ import annotations

from .base import Algorithm
from .registry import MethodInfo


class PSGD(Algorithm):
    """Parallel SGD; see the module docstring."""
    name = "psgd"
    info = MethodInfo(
        name="psgd", label="P-SGD", order=10, up="none", sgd_momentum=0.9,
        summary="parallel SGD: the average of the (optionally compressed) gradients, no error "
                "feedback; with none both ways hvdcomp train runs Horovod's own allreduce")
    error_feedback = False  # any unbiased compressor will do, QSGD without rescale included
