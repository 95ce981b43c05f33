"""Progress bars for long loops (rich), shown on stderr only when asked for."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")


def track(items: Sequence[T], *, description: str, enabled: bool = True) -> Iterable[T]:
    if not enabled:
        return items
    from rich.console import Console
    from rich.progress import track as rich_track

    return rich_track(items, description=description, console=Console(stderr=True), transient=True)
