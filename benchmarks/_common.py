"""What the benchmark scripts share: their inputs checked before any timing starts, and ferkit's
one-line errors instead of tracebacks."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from ferkit.errors import FerkitError


def check_exists(parser: argparse.ArgumentParser, path: str | Path, option: str) -> Path:
    """`path`, or the usage and one line naming `option` where there is nothing at it (exit 2)."""
    if not Path(path).exists():
        parser.error(f"{option} {path}: no such file or folder")
    return Path(path)


def check_photos(parser: argparse.ArgumentParser, folder: str | Path, option: str = "--faces") -> list[Path]:
    """The JPEG photos of `folder`, or the usage and one line where it holds none (exit 2)."""
    photos = sorted(check_exists(parser, folder, option).glob("*.jpg"))
    if not photos:
        parser.error(f"{option} {folder}: no .jpg photos there")
    return photos


def run(main: Callable[[], None]) -> None:
    """main(), with what ferkit refuses said in one line (exit 2)."""
    try:
        main()
    except FerkitError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
