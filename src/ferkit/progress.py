"""Progress bars for long loops (rich, on stderr), shown only when asked for."""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Iterable, Sequence
from typing import TypeVar

from ferkit.errors import on_one_line

T = TypeVar("T")


def _visible(enabled: bool) -> bool:
    """Bars only on an interactive terminal: in logs and pipes they are noise."""
    return enabled and sys.stderr.isatty()


def track(items: Sequence[T], *, description: str, enabled: bool = True) -> Iterable[T]:
    if not _visible(enabled):
        return items
    from rich.console import Console
    from rich.progress import track as rich_track

    from rich.markup import escape  # file names are shown as they are, never read as markup

    return rich_track(items, description=escape(description), console=Console(stderr=True), transient=True)


@contextlib.contextmanager
def progress_bar(total: int | None, description: str, *, enabled: bool = True):
    """A context giving `advance()`: one more done, or `advance(done, total)`: so many of so many (the
    total may become known, or change, on the way). Shows count, rate and ETA when `total` is known."""
    if not _visible(enabled):
        yield lambda done=None, total=None: None
        return
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn()]
    global _LIVE
    # what is printed on stdout goes above the bar when both share the terminal, and where it belongs otherwise
    with Progress(*columns, console=Console(stderr=True), transient=True, redirect_stdout=sys.stdout.isatty()) as progress:
        task = progress.add_task(escape(description), total=total)
        _LIVE = progress

        def advance(done: int | None = None, total: int | None = None) -> None:
            if done is None:
                progress.advance(task)
            else:
                progress.update(task, completed=done, total=total)

        try:
            yield advance
        finally:
            _LIVE = None


_LIVE = None  # the bar on screen, if any


def echo_error(message: str, *, one_line: bool = True) -> None:
    """A line on stderr, printed above the progress bar on screen (if any), never glued onto it; with
    `one_line`, line breaks in it (a file name's) shown as \\n."""
    if one_line:
        message = on_one_line(message)
    if _LIVE is not None:
        _LIVE.console.print(message, markup=False, highlight=False, soft_wrap=True)
    else:
        import click

        click.echo(message, err=True)


class LineHandler(logging.Handler):
    """A logging handler writing each record as a line on stderr, above the progress bar on screen (if any)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            echo_error(self.format(record), one_line=record.exc_info is None)  # a traceback keeps its lines
        except Exception:
            self.handleError(record)
