"""Record which storage a collective was handed: the in-place tests check that the tensor given
is the one reduced or broadcast, not a copy."""
from __future__ import annotations

from typing import Any, List


def record_data_pointers(owner: Any, attr: str) -> List[int]:
    """Replace ``owner.attr`` by a wrapper that appends the data pointer of its first argument
    to the list returned, then calls the original."""
    seen: List[int] = []
    original = getattr(owner, attr)

    def spy(tensor, *args, **kwargs):
        seen.append(tensor.data_ptr())
        return original(tensor, *args, **kwargs)
    setattr(owner, attr, spy)
    return seen
