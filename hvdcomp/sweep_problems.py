"""Problems in a sweep spec, located: :class:`SpecError`, the line of a key in the TOML text
(``tomllib`` keeps no positions) and :class:`SpecContext`, which collects every problem of one
file as ``file:line: key: problem`` so that one run of ``render`` reports them all
(:mod:`hvdcomp.sweep` reads and expands specs with it)."""
from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Callable, Iterable, List, Optional, Sequence, Tuple

from .errors import UserError


class SpecError(UserError, ValueError):
    """A sweep spec is malformed; the message names file, line and key, and the fix: one
    ``file:line: key: problem`` line per problem found (``problems`` holds them)."""

    def __init__(self, message: str, problems: Sequence[str] = ()):
        super().__init__(message)
        self.problems = list(problems) or [message]


_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")


def _normalise_header(text: str) -> Tuple[str, ...]:
    return tuple(part.strip().strip('"').strip("'") for part in text.split("."))


def find_line(text: str, table: Sequence[str], key: Optional[str] = None) -> int:
    """1-based line of ``key`` inside ``[table]`` (or of the table header when ``key`` is None).

    Scans the text: headers set the current table; ``key =`` (bare or quoted) inside it is the hit;
    a dotted key ``table.key =`` written at the top level counts too. Returns the header's line, or
    1, when the key cannot be found (e.g. inside an inline table)."""
    table = tuple(table)
    current: Tuple[str, ...] = ()
    header_line = 1 if not table else 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        header = _HEADER.match(line)
        if header and "=" not in line.split("#", 1)[0].split("]")[0]:
            current = _normalise_header(header.group(1))
            if current == table and not header_line:
                header_line = lineno
            if key is not None and current[:len(table) + 1] == table + (key,):
                return lineno  # the key is itself a table: [cluster] or [cluster.env]
            continue
        if key is None:
            continue
        # a dotted key (bare or quoted parts) followed by '='
        m = re.match(r"""^\s*((?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*')"""
                     r"""(?:\s*\.\s*(?:[A-Za-z0-9_-]+|"[^"]*"|'[^']*'))*)\s*=""", line)
        if not m:
            continue
        dotted = current + _normalise_header(m.group(1))
        if dotted == table + (key,):
            return lineno
    return header_line or 1


class SpecContext:
    """File text and name, to turn a problem into ``file:line: key: message``; collects every
    problem so that one run of render reports them all."""

    def __init__(self, path: Path, text: str):
        self.path, self.text = path, text
        self.problems: List[str] = []

    def error(self, table: Sequence[str], key: Optional[str], message: str) -> SpecError:
        line = find_line(self.text, table, key)
        where = ".".join(list(table) + ([key] if key else [])) or "(top level)"
        return SpecError(f"{self.path}:{line}: {where}: {message}")

    def report(self, table: Sequence[str], key: Optional[str], message: str) -> None:
        self.add(self.error(table, key, message))

    def add(self, error: SpecError) -> None:
        for problem in error.problems:
            if problem not in self.problems:
                self.problems.append(problem)

    def _line_of(self, problem: str) -> int:
        line = problem[len(str(self.path)) + 1:].split(":", 1)[0]
        return int(line) if line.isdigit() else 0

    def attempt(self, check: Callable[..., Any], *args, **kwargs) -> Any:
        """``check(*args)``, or None after recording the SpecError it raised."""
        try:
            return check(*args, **kwargs)
        except SpecError as exc:
            self.add(exc)
            return None

    def raise_problems(self) -> None:
        if not self.problems:
            return
        self.problems.sort(key=self._line_of)  # in the order of the file
        if len(self.problems) == 1:
            raise SpecError(self.problems[0])
        count = len(self.problems)
        raise SpecError("\n".join(self.problems) + f"\n({count} problems in {self.path}; "
                        "nothing was written or submitted)", self.problems)


def unknown_key_message(key: str, known: Iterable[str]) -> str:
    known = sorted(known)
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    return f"unknown key {key!r}; {hint}known keys: {', '.join(known)}"
