"""The Kaggle FER2013 CSV: `emotion,pixels,Usage`, 48x48 faces as space-separated gray values."""

from __future__ import annotations

import contextlib
import csv
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ferkit.data.cache import cache_key, load_cached, save_cached
from ferkit.data.dataset import FaceDataset
from ferkit.errors import FerkitError
from ferkit.images import to_model_input
from ferkit.labels import EMOTIONS, FER2013_CSV_CODES
from ferkit.progress import progress_bar

USAGES = ("Training", "PublicTest", "PrivateTest")
TRAIN_USAGE, VAL_USAGE = "Training", "PublicTest"  # the rows that train, and those that validate, wherever a CSV is read
_SIDE = 48
log = logging.getLogger("ferkit")


def load_fer2013_csv(
    path: str | Path,
    *,
    usage: str | Sequence[str] | None = None,
    classes: Sequence[str] = EMOTIONS,
    image_size: tuple[int, int] = (48, 48),
    cache: bool = True,
    progress: bool = False,
) -> FaceDataset:
    """Rows of the given `usage` ("Training", "PublicTest", "PrivateTest", a list, or None for all);
    every row of a CSV without a Usage column.

    Labels are remapped from the CSV's codes (0 angry ... 4 sad, 5 surprise, 6 neutral) to `classes`
    by name, so the class order matches folder datasets. Malformed rows are left out, with a warning
    that counts them and names the first one's line; a CSV of malformed rows only is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FerkitError(f"no such CSV file: {path}")
    usages = check_usages(usage)
    stat = path.stat()
    key = cache_key(kind="fer2013-csv", path=str(path.resolve()), bytes=stat.st_size, mtime=stat.st_mtime_ns)
    parsed = load_cached(key) if cache else None
    if parsed is None:
        parsed = _parse(path, progress)
        if cache:
            save_cached(key, parsed, dataset=cache_key(kind="fer2013-csv", path=str(path.resolve())))

    skipped = parsed.get("skipped", np.zeros(0, str))
    if len(skipped):
        log.warning("%s: %d malformed row%s left out (the first: %s)", path, len(skipped),
                    "" if len(skipped) == 1 else "s", skipped[0])
    row_usages = _canonical_usages(parsed["usage"])
    if not has_usage_column(path):
        usages = ()  # a CSV without a Usage column (Kaggle's train.csv, a CSV of one's own): every row
    elif usages:
        _warn_of_unknown_usages(path, row_usages, parsed.get("lines"))
    selected = np.isin(row_usages, usages) if usages else np.ones(len(row_usages), bool)
    names = [FER2013_CSV_CODES[int(code)] for code in parsed["codes"][selected]]
    missing = sorted(set(names) - set(classes))
    if missing:
        raise FerkitError(f"{path} has classes missing from the class list: {', '.join(missing)}")
    images = parsed["images"][selected]
    if tuple(image_size) != (_SIDE, _SIDE):
        # as faces are resized at inference (images.to_model_input), so that training sees what predict will
        images = np.stack([to_model_input(Image.fromarray(img, "L"), image_size) for img in images]) if len(images) else images
    if len(images) == 0:
        raise NoRowsOfUsage(path, usages)
    return FaceDataset(
        images=images,
        labels=np.asarray([list(classes).index(n) for n in names], dtype=np.int64),
        classes=tuple(classes),
        source=f"{path}" + (f" ({', '.join(usages)})" if usages else ""),
    )


class NoRowsOfUsage(FerkitError):
    """A FER2013 CSV none of whose rows has the usage asked for."""

    def __init__(self, path: Path, usages: tuple[str, ...]):
        super().__init__(f"{path} has no rows with usage {', '.join(usages)} (--usage all, usage=None in Python, reads every row)")
        self.path, self.usages = path, usages


def check_usages(usage: str | Sequence[str] | None) -> tuple[str, ...]:
    """The usages named (in any case: "publictest" is PublicTest), or a FerkitError naming the unknown."""
    if usage is None:
        return ()
    usages = _canonical_usages((usage,) if isinstance(usage, str) else tuple(usage))
    bad = [u for u in usages if u not in USAGES]
    if bad:
        raise FerkitError(f"unknown FER2013 usage {', '.join(bad)} (choose from {', '.join(USAGES)})")
    return tuple(usages)


def _canonical_usages(usages) -> np.ndarray:
    """Usage values spelled as FER2013 does, whatever their case; others as they are."""
    canonical = {u.lower(): u for u in USAGES}
    return np.asarray([canonical.get(u.lower(), u) for u in usages], dtype=str)


def _warn_of_unknown_usages(path: Path, row_usages: np.ndarray, lines: np.ndarray | None) -> None:
    """`lines`: each face row's line in the file (None in caches written before they were kept)."""
    unknown = ~np.isin(row_usages, USAGES)
    if unknown.any():
        first = int(np.argmax(unknown))
        where = f"line {int(lines[first])}" if lines is not None else f"face row {first + 1}"
        log.warning("%s: %d rows have no known Usage and are left out (e.g. %s: %r)", path, int(unknown.sum()),
                    where, str(row_usages[first]))


def has_usage_column(path: str | Path) -> bool:
    """Whether the CSV at `path` has a Usage column (without one, every row is read whatever the usage asked)."""
    try:
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle:
            return "usage" in [h.strip().lower() for h in next(csv.reader(handle), [])]
    except OSError:
        return False


def _parse(path: Path, progress: bool = False) -> dict[str, np.ndarray]:
    codes, images, usages, lines, skipped = [], [], [], [], []
    size = path.stat().st_size
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as handle, \
            progress_bar(size, f"reading {path}", enabled=progress) as advance, _long_fields():
        reader = csv.reader(_counted(handle, lambda done: advance(min(done, size), size)))
        header = [h.strip().lower() for h in next(reader, [])]
        if "emotion" not in header or "pixels" not in header:
            raise FerkitError(f"{path} is not a FER2013 CSV (its header needs 'emotion' and 'pixels' columns)")
        i_emotion, i_pixels = header.index("emotion"), header.index("pixels")
        i_usage = header.index("usage") if "usage" in header else None
        for line, row in _rows_with_lines(reader, path):
            if not row:
                continue
            try:
                code, pixels = _parse_code(row, i_emotion, path, line), _parse_pixels(row, i_pixels, path, line)
            except FerkitError as err:
                skipped.append(str(err).removeprefix(f"{path}, "))
                continue
            codes.append(code)
            images.append(pixels)
            usages.append(row[i_usage].strip() if i_usage is not None and i_usage < len(row) else "")
            lines.append(int(line.split("-")[0]))
    if not codes:
        raise FerkitError(f"{path}, {skipped[0]}; no row is a face" if skipped else f"{path} has a header but no rows")
    return {
        "codes": np.asarray(codes, dtype=np.int64),
        "images": np.stack(images),
        "usage": np.asarray(usages, dtype=str),
        "lines": np.asarray(lines, dtype=np.int64),
        "skipped": np.asarray(skipped, dtype=str),  # "line N: why", as the warning names them
    }


MAX_FIELD = 16 * 1024 * 1024  # a 1000x1000 face's pixels; a field longer still is a stray quote's swallowed lines


@contextlib.contextmanager
def _long_fields():
    """Rows of faces larger than 48x48 read as rows: their pixel count, not the CSV reader's field limit
    (128 KB, less than a 200x200 face's pixels), is what gets them refused."""
    limit = csv.field_size_limit()
    csv.field_size_limit(max(limit, MAX_FIELD))
    try:
        yield
    finally:
        csv.field_size_limit(limit)


def _counted(lines, report, every: int = 1000):
    """`lines` as they are, calling `report(characters so far)` every `every` lines."""
    done = 0
    for number, line in enumerate(lines, 1):
        done += len(line)
        if number % every == 0:
            report(done)
        yield line


def _rows_with_lines(reader, path: Path):
    """(where the row is in the file, row): "N", or "N-M" for a row whose quoted field spans lines (a stray
    quote swallows the lines after it); a record too long to be a row is a one-line FerkitError."""
    last = reader.line_num
    try:
        for row in reader:
            first, last = last + 1, reader.line_num
            yield (str(first) if first == last else f"{first}-{last}"), row
    except csv.Error as err:
        raise FerkitError(f"{path}, line {last + 1}: {err} (a stray quote?)") from None


def _parse_code(row, index, path, line) -> int:
    try:
        code = int(row[index])
    except (ValueError, IndexError):
        raise FerkitError(f"{path}, line {line}: the emotion code is not a number") from None
    if code not in FER2013_CSV_CODES:
        raise FerkitError(f"{path}, line {line}: emotion code {code} is not one of 0-6")
    return code


def _parse_pixels(row, index, path, line) -> np.ndarray:
    if index >= len(row):
        raise FerkitError(f"{path}, line {line}: the row has no pixels column")
    try:
        values = np.array(row[index].split(), dtype=np.int64)
    except (ValueError, OverflowError):  # OverflowError: a number past 64 bits
        raise FerkitError(f"{path}, line {line}: the pixels are not whole numbers") from None
    if values.size != _SIDE * _SIDE:
        raise FerkitError(f"{path}, line {line}: expected {_SIDE * _SIDE} pixel values, got {values.size}")
    if values.min() < 0 or values.max() > 255:
        raise FerkitError(f"{path}, line {line}: pixel values must lie in 0-255")
    return values.astype(np.uint8).reshape(_SIDE, _SIDE)
