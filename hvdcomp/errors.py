"""The one error type the command line shows as a message rather than a traceback.

Every error a user can fix by changing what they typed or what is on disk (a bad option, a
missing data file, a damaged sweep spec, ranks started with different settings) derives from
:class:`UserError`. ``hvdcomp`` (cli/main.py) prints it as one line, ``Error: <message>``, tagged
with the rank when it is not rank 0, and exits with :attr:`UserError.exit_code` (2). ``--debug``
or ``HVDCOMP_DEBUG=1`` shows the traceback instead.

Anything else that escapes a command is a bug in hvdcomp and keeps its traceback.
"""
from __future__ import annotations

import os


class UserError(Exception):
    """Bad input or environment the user can fix; the CLI prints one line and exits 2.

    ``shown`` is False on the ranks that stay silent because another rank prints the same
    problem (see :mod:`hvdcomp.train.agreement`): the job's output carries it once."""
    exit_code = 2
    shown = True


def debug_enabled() -> bool:
    """``--debug`` on the command line (it sets the variable) or ``HVDCOMP_DEBUG=1``."""
    return os.environ.get("HVDCOMP_DEBUG", "").strip().lower() in ("1", "true", "yes", "on")
