"""Compressors: pure tensor math with packed ``uint8`` wire formats (see :mod:`.base`)."""
from .base import (CompressionError, Compressor, check_finite, finite_check_mode, pack_payloads,
                   raise_if_nonfinite, read_field, set_finite_check, split_payloads)
from .registry import REGISTRY, CompressorSpecError, from_spec, register

__all__ = ["Compressor", "CompressionError", "check_finite", "pack_payloads", "split_payloads",
           "read_field", "set_finite_check", "finite_check_mode", "raise_if_nonfinite",
           "REGISTRY", "CompressorSpecError", "from_spec", "register"]
