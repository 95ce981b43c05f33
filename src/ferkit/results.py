"""Plain result types shared by the Python API and the CLI.

Boxes are `(x, y, width, height)` in pixels of the upright (EXIF-rotated) original image, origin top-left.
"""

from __future__ import annotations

import csv
import errno
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ferkit.errors import FerkitError, first_line


@dataclass
class Face:
    """One face found in a picture and its emotion. `box` is (x, y, width, height) in the picture's own
    pixels; a face cut by the picture's border keeps its whole box, which then reaches past the edge (x or
    y negative, or past the width or height): clip it before slicing the picture's array with it. `score`
    is the top emotion's probability, `uncertain` whether it is below ferkit.predict.UNCERTAIN_BELOW;
    `detector_score` the detector's confidence that this is a face."""

    box: tuple[int, int, int, int]  # (x, y, width, height), pixels of the upright original
    emotion: str  # the most probable class
    score: float  # its probability
    probabilities: dict[str, float]  # every class, in the model's class order
    detector_score: float | None = None  # None when the box was given, not detected
    landmarks: list[tuple[int, int]] | None = None  # eyes, nose tip, mouth corners, if the detector gives them
    uncertain: bool = False  # the top probability is below the uncertainty threshold (ferkit.predict.UNCERTAIN_BELOW)

    def to_dict(self) -> dict:
        data = {
            "box": list(self.box),
            "emotion": self.emotion,
            "score": round(self.score, 6),
            "uncertain": self.uncertain,
            "probabilities": {k: round(v, 6) for k, v in self.probabilities.items()},
        }
        if self.detector_score is not None:
            data["detector_score"] = round(self.detector_score, 4)
        if self.landmarks is not None:
            data["landmarks"] = [list(p) for p in self.landmarks]
        return data


@dataclass
class ImageResult:
    source: str  # path, or "<array>", "<image>" (PIL) or "<bytes>"
    image_size: tuple[int, int] | None  # (width, height) of the upright image; None when it could not be decoded
    faces: list[Face] = field(default_factory=list)
    model: str = ""
    model_version: str = ""
    timings_ms: dict[str, float] = field(default_factory=dict)  # per stage: decode, detect, classify
    detector: str = ""  # "yunet", "mtcnn", "boxes" (given), "none" (the whole image is the face)
    error: str | None = None  # why this image could not be analysed (then `faces` is empty)
    channels: str = field(default="rgb", repr=False)  # the order of an array's colours, as analyze_images was told
    failure: BaseException | None = field(default=None, repr=False, compare=False)  # a detector's error behind `error`
    # what an image given in memory was ("an array", "a PIL image", "bytes"), also under a label of its own
    in_memory: str | None = field(default=None, repr=False, compare=False)

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_dict(self) -> dict:
        data = {
            "source": self.source,
            "image_size": None if self.image_size is None else list(self.image_size),
            "model": self.model,
            "model_version": self.model_version,
            "detector": self.detector,
            "faces": [face.to_dict() for face in self.faces],
            "timings_ms": {k: round(v, 3) for k, v in self.timings_ms.items()},
        }
        if self.error is not None:
            data["error"] = self.error
        return data

    def draw(self, image=None, *, channels: str | None = None):
        """The image with a box and label per face (a PIL image); see ferkit.draw.draw_faces. `channels`:
        the order of an array's colours, by default the one analyze_images was told."""
        from ferkit.draw import draw_faces

        given_as = self.in_memory or {"<array>": "an array", "<image>": "a PIL image", "<bytes>": "bytes"}.get(self.source)
        if image is None and given_as:  # its label may name a file, which is not the image analysed
            raise FerkitError(f"this result came from {given_as}, not a file: pass the image, result.draw(image)")
        return draw_faces(image if image is not None else self.source, self.faces, channels=channels or self.channels)

    def summary(self) -> str:
        if self.error is not None:
            return f"{self.source}: {self.error}"
        if not self.faces:
            return f"{self.source}: no face"
        return "; ".join(f"{self.source}: {f.emotion} ({f.score:.0%})" for f in self.faces)


def face_columns(classes) -> list[str]:
    """The columns of a table with a row per face (faces.csv, and the Parquet parts of a Ray run)."""
    return ["source", "face", "x", "y", "width", "height", "detector_score", "emotion", "score", *classes, "uncertain"]


def timeline_columns(classes) -> list[str]:
    """The columns of a video's timeline (ferkit.video.Timeline): a row per face per analysed frame."""
    return ["time_s", "frame", "track", "x", "y", "width", "height", "emotion", "score", *classes, "uncertain"]


def face_rows(result: ImageResult, classes) -> list[dict]:
    """A row per face of `result`, keyed by `face_columns(classes)`, numbered from 1 (largest first)."""
    rows = []
    for number, face in enumerate(result.faces, start=1):
        x, y, width, height = face.box
        rows.append({"source": result.source, "face": number, "x": x, "y": y, "width": width, "height": height,
                     "detector_score": face.detector_score, "emotion": face.emotion, "score": face.score,
                     **{name: face.probabilities[name] for name in classes}, "uncertain": face.uncertain})
    return rows


def check_output_file(out: str | Path, suffix: str, what: str, *, overwrite: bool = False) -> Path:
    """`out` as a Path if `what` (say "an exported model") may be written there as a `suffix` file, else a
    FerkitError saying why: another suffix, a folder, or a file there already and no `overwrite`."""
    out = Path(out)
    if out.suffix.lower() != suffix:
        raise FerkitError(f"{what} is written as a {suffix} file, not {out.name}")
    if out.is_dir():
        raise FerkitError(f"{out} is a folder; give the {suffix} file to write")
    if out.exists() and not overwrite:
        raise FerkitError(f"{out} already exists; pass --overwrite to replace it")
    check_writable_folder(create_folder(out.parent, f"folder for {what}"))  # now, not after the work
    return out


def check_out_outside_data(out: str | Path | None, data: str | None, what: str) -> None:
    """Refuse an output folder inside the class-folder tree it is made from: its files would be read as
    faces, or as a class folder, the next time that data is read."""
    if out is not None and data and Path(data).is_dir() and Path(os.path.realpath(out)).is_relative_to(os.path.realpath(data)):
        raise FerkitError(f"{out} lies inside the data folder {data}: {what} would be read as faces the next "
                          "time; choose a folder outside it")


def check_writable_folder(folder: Path) -> None:
    """A one-line FerkitError unless a file can be created in `folder` (tried: permissions alone do not
    say it for root, or for /proc and read-only mounts)."""
    import tempfile

    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".ferkit-check-"):
            pass
    except OSError as err:
        raise FerkitError(f"cannot write in {folder}: {err.strerror or err}") from None


def check_replaceable(paths, *, overwrite: bool = False) -> None:
    """Refuse to write over a file that ferkit did not write (a user's own `faces.csv`, say) unless told
    to `overwrite`: ferkit's own results of an earlier run are replaced, nothing else is. A folder where a
    file is to go is refused even so: nothing can replace it."""
    for path in map(Path, paths):
        if path.is_dir():
            raise FerkitError(f"{path} is a folder, where ferkit writes a file of that name: move it or choose another folder for the results")
    if overwrite:
        return
    for path in map(Path, paths):
        if path.exists() and not _written_by_ferkit(path):
            raise FerkitError(f"{path} exists and ferkit did not write it: overwrite it (--overwrite; in Python, "
                              "overwrite=True) or choose another folder for the results")


def _written_by_ferkit(path: Path) -> bool:
    """Whether `path` holds one of ferkit's result files: an image's JSON, a faces table, results lines,
    a batch's settings, a video's timeline, or an annotated copy, video or plot (marked as ferkit's inside)."""
    from ferkit.draw import written_by_ferkit

    if path.is_dir() or not path.is_file():
        return False
    if path.suffix in (".json", ".jsonl", ".csv"):
        with open(path, errors="replace") as handle:
            first = handle.readline()
        if path.suffix == ".csv":
            return first.startswith((",".join(face_columns(())[:6]), ",".join(timeline_columns(())[:9])))
        if path.suffix == ".jsonl" and not first:
            return True
        try:
            record = json.loads(first if path.suffix == ".jsonl" else path.read_text(errors="replace"))
        except ValueError:
            return False
        ours = {"classes"} if path.name == ResultsFolder.SETTINGS else {"classes", "model"}  # settings: classes at least
        return isinstance(record, dict) and ({"source", "faces"} <= record.keys() or ours <= record.keys())
    return written_by_ferkit(path)


def create_folder(folder: str | Path, what: str = "results folder") -> Path:
    """`folder` made (with its parents) if need be; a one-line FerkitError that names it as the `what`
    when it cannot be (a read-only place, /proc, a file on the way)."""
    try:
        Path(folder).mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise FerkitError(f"cannot create the {what} {folder}: {err.strerror or err}") from None
    return Path(folder)


@contextmanager
def new_folder(folder: str | Path, what: str = "results folder"):
    """`folder`, made as create_folder makes it, and removed again (with the parents made for it) where
    the work done inside fails or is cut short before anything is written there."""
    made = _missing_folders(folder)
    create_folder(folder, what)
    try:
        yield Path(folder)
    except BaseException:
        _remove_if_empty(made)
        raise


def check_creatable(folder: str | Path, what: str) -> None:
    """A one-line FerkitError now, not after minutes of work, where `folder` cannot be made; nothing is left."""
    made = _missing_folders(folder)
    create_folder(folder, what)
    _remove_if_empty(made)


def _missing_folders(folder: str | Path) -> list[Path]:
    """`folder` and those of its parents that do not exist yet, deepest first."""
    return [path for path in (Path(folder), *Path(folder).parents) if not path.exists()]


def _remove_if_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first: a parent is empty once its child is gone
        try:
            folder.rmdir()
        except OSError:  # something was written there after all
            return


class ResultsFolder:
    """A batch's results in a folder, written as they come: `faces.csv` (a row per face, `face_columns`)
    and `results.jsonl` (an ImageResult per line, failures included). An image is done once its line is
    complete, so a batch cut short can go on where it stopped:

        with ResultsFolder(out, classifier.classes, resume=True, sources=paths) as results:
            for result in analyze_images([p for p in paths if not results.is_finished(p)]):
                results.write(result)

    A resumed run tries its failed images again: their lines go. `sources`, the images this run is given,
    keeps the failures of other images on record (default: every earlier failure goes). A fresh run
    replaces an earlier batch's files, but not a user's own `faces.csv` (say) unless told to `overwrite`.
    The folder is created if need be.
    """

    TABLE, LINES, SETTINGS = "faces.csv", "results.jsonl", "batch.json"

    def __init__(self, folder: str | Path, classes, *, resume: bool = False, settings: dict | None = None,
                 sources=None, overwrite: bool = False):
        self.folder, self.classes, self.resume = Path(folder), tuple(classes), resume
        self.settings = {"classes": list(self.classes), **(settings or {})}
        self.began_in = os.getcwd()  # where the images' paths, as written, lead from
        if resume:
            self._check_same_settings()
        else:
            check_replaceable([self.folder / name for name in (self.TABLE, self.LINES, self.SETTINGS)], overwrite=overwrite)
        # the images an earlier run finished (no error), with both files cut back to them
        retried = None if sources is None else {_file_key(s) for s in sources}
        self.finished: set[str] = self._cut_back_to_finished(retried) if resume else set()
        self._finished_files = {_file_key(s) for s in self.finished}
        self._table = self._lines = self._writer = None

    def _check_same_settings(self) -> None:
        """A resumed batch must go on as it began: other classes or another model would put rows of another
        meaning under the same header. `settings` (model, test-time augmentation, ...) are kept in batch.json."""
        earlier = self.folder / self.SETTINGS
        try:
            before = json.loads(earlier.read_text()) if earlier.is_file() else {}
        except ValueError:
            before = {}  # damaged: the table's header still says the classes
        table = self.folder / self.TABLE
        if "classes" not in before and table.is_file():
            with open(table, newline="", **TABLE_TEXT) as handle:
                header = next(csv.reader(handle), [])
            before["classes"] = header[9:-1] if header[:1] == ["source"] else header
        if "model" in before:  # a batch begun before faces were classified at several scales had one crop each
            before.setdefault("face_crops", 1)
        changed = [f"{key} {before[key]} (now {value})" for key, value in self.settings.items()
                   if key in before and before[key] != value]
        if changed:
            raise FerkitError(f"the results in {self.folder} were made with other settings: {'; '.join(changed)}. "
                              "Resume with the same ones, or choose another folder")
        began_in = before.get("working_folder")
        if isinstance(began_in, str) and os.path.realpath(began_in) != os.path.realpath(self.began_in) \
                and not self._names_absolute_paths():
            raise FerkitError(f"the batch in {self.folder} began in {began_in} and names its images from there: "
                              "resume it from that folder")
        self.began_in = began_in if isinstance(began_in, str) else self.began_in

    def _names_absolute_paths(self) -> bool:
        """Whether the first image in results.jsonl is named by an absolute path (true also of none)."""
        try:
            with open(self.folder / self.LINES, encoding="utf-8") as lines:
                source = json.loads(lines.readline() or "{}").get("source")
        except (OSError, ValueError, AttributeError):
            return True
        return not isinstance(source, str) or os.path.isabs(source)

    def __enter__(self) -> ResultsFolder:
        create_folder(self.folder)
        mode = "a" if self.resume else "w"
        self._table = open(self.folder / self.TABLE, mode, newline="", **TABLE_TEXT)
        self._lines = open(self.folder / self.LINES, mode, encoding="utf-8")  # JSON: ASCII, names escaped
        self._writer = csv.writer(self._table)
        if self._table.tell() == 0:
            self._writer.writerow(face_columns(self.classes))
        (self.folder / self.SETTINGS).write_text(json.dumps({**self.settings, "working_folder": self.began_in}, indent=2) + "\n")
        return self

    def __exit__(self, *exc) -> None:
        self._table.close()
        self._lines.close()

    def write(self, result: ImageResult, **extra) -> dict:
        """Add `result` to both files, `extra` keys (such as the name of its annotated copy) to its line;
        returns its dictionary, as written to results.jsonl."""
        record = {**result.to_dict(), **extra}
        for row in face_rows(result, self.classes):  # in face_columns' order
            row["detector_score"] = "" if row["detector_score"] is None else f"{row['detector_score']:.3f}"
            row.update({c: f"{row[c]:.4f}" for c in ("score", *self.classes)}, uncertain=int(row["uncertain"]))
            self._writer.writerow(row.values())
        self._table.flush()
        self._lines.write(json.dumps(record) + "\n")  # last: an image is done once its line is complete
        self._lines.flush()
        return record

    def is_finished(self, path: str | Path) -> bool:
        """Whether an earlier run finished the image at `path`, however either run spelled its path."""
        return _file_key(path) in self._finished_files

    def _cut_back_to_finished(self, retried: set[str] | None) -> set[str]:
        """The images a run cut short had finished (a complete line in results.jsonl, no error), with both
        files cut back to them: a half-written last line, table rows of an image without its line, and the
        failures of the images to be `retried` (None: all) go."""
        lines, table = self.folder / self.LINES, self.folder / self.TABLE
        if not lines.exists():
            return set()
        done, kept = set(), []
        for line in lines.read_text(encoding="utf-8").splitlines(keepends=True):
            try:
                record = json.loads(line)
            except ValueError:
                break  # the line a kill cut short, and anything after it
            if not line.endswith("\n"):
                break
            if not isinstance(record, dict) or not isinstance(record.get("source"), str):
                raise FerkitError(f"{lines}: a line that is no image's result ({first_line(line)[:60]}); remove it "
                                  "to resume, or choose another folder")
            if not record.get("error"):
                done.add(record["source"])
                kept.append(line)
            elif retried is not None and _file_key(record["source"]) not in retried:
                kept.append(line)
        lines.write_text("".join(kept), encoding="utf-8")
        if table.exists():
            with open(table, newline="", **TABLE_TEXT) as handle:
                rows = list(csv.reader(handle))
            with open(table, "w", newline="", **TABLE_TEXT) as handle:
                csv.writer(handle).writerows(rows[:1] + [row for row in rows[1:] if row and row[0] in done])
        return done


# A file name that is not UTF-8 (Latin-1 from an old camera or a zip file, say) is written to a table as
# the bytes the file system holds, so that the table names the very file.
TABLE_TEXT = {"encoding": "utf-8", "errors": "surrogateescape"}


def _file_key(path: str | Path) -> str:
    """The same file's key however its path is written (relative, absolute, through links)."""
    return os.path.realpath(path)


_HELD: dict[str, int] = {}  # folders this process writes, locked: their open descriptors, which hold the locks


def hold_folder(folder: Path, busy: str) -> bool:
    """Lock `folder` for this process until release_folder: another ferkit process that would write into
    it is refused with the one line `busy`. The lock (flock on the folder itself) ends with the process,
    however it ends; where flock is missing (Windows), or the file system has no locks, nothing is locked.
    Returns whether this call took the lock (False where this process held it already: its holder releases it)."""
    try:
        import fcntl
    except ImportError:
        return False
    key = str(Path(folder).resolve())
    if key in _HELD or not Path(folder).is_dir():
        return False
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        os.close(descriptor)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # a file system without locks (some NFS, FUSE)
            logging.getLogger("ferkit").debug("%s cannot be locked (%s): written without a lock", folder, err.strerror)
            return False
        raise FerkitError(busy) from None
    _HELD[key] = descriptor
    return True


def release_folder(folder: Path) -> None:
    descriptor = _HELD.pop(str(Path(folder).resolve()), None)
    if descriptor is not None:
        os.close(descriptor)
