"""Compressors: pure tensor math with packed ``uint8`` wire formats (see :mod:`.base`)."""
from .base import CompressionError, Compressor, check_finite, pack_payloads, split_payloads
from .registry import REGISTRY, from_spec, register

__all__ = ["Compressor", "CompressionError", "check_finite", "pack_payloads", "split_payloads",
           "REGISTRY", "from_spec", "register"]
