"""Files ``hvdcomp slurm`` ships inside the package, found with :mod:`importlib.resources` so that
they are there after a plain ``pip install`` of the wheel as well as in a checkout.

``hvdcomp/shipped/`` holds the sbatch templates (``templates/``) and two symbolic links that the
wheel stores as plain folders: ``jobs/`` (the repository's example sweep specs) and ``cluster/``
(``slurm/cluster/``: start and stop a single-node Slurm cluster).
``HVDCOMP_SLURM_TEMPLATES`` names a folder of your own templates instead of the shipped ones.
"""
from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Dict

from .errors import UserError

TEMPLATES_ENV = "HVDCOMP_SLURM_TEMPLATES"


def shipped_dir(name: str) -> Path:
    """``hvdcomp/shipped/<name>`` as a path. The package is installed as files (never zipped:
    the sbatch scripts and tests run them), so the resource is a real folder."""
    return Path(str(resources.files("hvdcomp") / "shipped" / name))


def template_dir() -> Path:
    """Where the sbatch templates are read from: ``$HVDCOMP_SLURM_TEMPLATES`` when set (your own
    copies), else the package's ``shipped/templates``."""
    override = os.environ.get(TEMPLATES_ENV)
    return Path(override) if override else shipped_dir("templates")


def example_specs() -> Dict[str, Path]:
    """The shipped example sweep specs by name (``smoke-digits`` -> .../smoke-digits.toml)."""
    folder = shipped_dir("jobs")
    return {p.stem: p for p in sorted(folder.glob("*.toml"))} if folder.is_dir() else {}


def resolve_spec(spec: "str | Path") -> Path:
    """The spec file to read: ``spec`` itself when it exists or looks like a path, else the
    shipped example of that name (``hvdcomp slurm render smoke-digits`` from any directory)."""
    path = Path(spec)
    if path.exists() or os.sep in str(spec) or path.suffix:
        return path
    examples = example_specs()
    if str(spec) in examples:
        return examples[str(spec)]
    raise UserError(f"{spec}: no such spec file, and no shipped example of that name; "
                    f"shipped examples: {', '.join(examples) or '(none)'} "
                    "(`hvdcomp slurm examples` lists them)")
