"""What a user points ferkit at — an image, a folder, a glob, a video — turned into images or frames."""

from __future__ import annotations

import glob
import logging
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ferkit.errors import FerkitError
from ferkit.extras import require
from ferkit.images import IMAGE_SUFFIXES

ANNOTATED_SUFFIX = ".annotated.jpg"  # ferkit's annotated copy of a photo: NAME.annotated.jpg
CROP_NAME = re.compile(r"\.face(\d+)\.png$")  # a face crop that `ferkit crop` wrote: NAME.face<k>.png
NAME_MAX = 255  # bytes in a file name, on the common file systems
log = logging.getLogger("ferkit")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".wmv", ".3gp", ".3g2", ".mts",
                  ".m2ts", ".flv", ".ogv")
# .ts and .mts are TypeScript's suffixes too (a folder of photos may hold such files): looked into where the file
# is at hand (is_video_file); .ts is left out of VIDEO_SUFFIXES, by which remote files are told by name alone
TRANSPORT_STREAM_SUFFIXES = (".ts", ".mts")


def source_kind(source: str) -> str:
    """"image", "folder", "glob" or "video"; a one-line FerkitError for URLs and missing paths."""
    if "://" in source:
        raise FerkitError(f"{source}: URLs are not fetched (ferkit works offline); download the file first")
    if not source.strip():
        raise FerkitError("an empty name is no file or folder")
    if source == "-" and not Path(source).exists():
        raise FerkitError("- (standard input) is not read: give the image's file name")
    if glob.has_magic(source) and not Path(source).exists():
        return "glob"
    path = Path(source)
    if not path.exists():
        raise FerkitError(f"no such file or folder: {source}")
    if path.is_dir():
        return "folder"
    return "video" if is_video_file(path) else "image"


def is_video_file(path: Path) -> bool:
    """Whether a file is a video, by its suffix; a .ts or .mts file (an MPEG transport stream, or TypeScript)
    by the sync bytes of its first two packets too."""
    suffix = path.suffix.lower()
    if suffix not in TRANSPORT_STREAM_SUFFIXES:
        return suffix in VIDEO_SUFFIXES
    try:
        with open(path, "rb") as handle:
            start = handle.read(197)
    except OSError:
        return True  # unreadable: said so where it is read as a video
    sync = b"\x47"  # 188-byte packets, or 192 with a 4-byte time code before each
    return (start[0:1] == sync and start[188:189] == sync) or (start[4:5] == sync and start[196:197] == sync)


def list_images(source: str | os.PathLike, *, skip: str | Path | None = None, quiet: bool = False) -> list[Path]:
    """The image files of a folder (recursively, hidden ones left out) or a glob, sorted; none inside
    the folder `skip` (where ferkit writes its results) when it lies within the folder listed.
    Annotated copies and plots that ferkit made (marked inside) are left out wherever they are, face crops
    (which are faces) are not; a user's own photo named like one is listed. What is left out besides (files without a name suffix, links to
    nothing, folders that cannot be read or that lead back up) is logged, unless `quiet`."""
    source = os.fspath(source)
    kind = source_kind(source)
    unreadable: list[str] = []
    if kind == "glob":
        paths = [Path(p) for p in glob.glob(source, recursive=True)]
    else:
        paths = files_under(source, unreadable=unreadable, quiet=quiet)
    if skip is not None and Path(skip).is_dir():
        skipped = Path(os.path.realpath(skip))
        if kind == "folder" and skipped != Path(os.path.realpath(source)):
            # os.path.realpath, unlike Path.resolve, takes links in a loop (left out below as links to nothing)
            inside = [p for p in paths if Path(os.path.realpath(p)).is_relative_to(skipped)]
            mine = [p for p in inside if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")
                    and not _annotated_or_plotted_by_ferkit(p) and not CROP_NAME.search(p.name)]
            if mine and not quiet:
                log.warning("%d image(s) in %s, where the results go, are left out (e.g. %s): move them out to "
                            "analyse them", len(mine), skip, mine[0])
            left_out = set(inside)
            paths = [p for p in paths if p not in left_out]
    files = [p for p in paths if p.is_file()]
    dangling = [p for p in paths if p.is_symlink() and not p.exists()]
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    ours = {p for p in images if _annotated_or_plotted_by_ferkit(p)}
    images = sorted(p for p in images if p not in ours)
    if not quiet:
        _note_left_out(source, ours, [p for p in files if not p.suffix], unreadable, dangling)
    if not images:
        if unreadable and os.path.realpath(unreadable[0]) == os.path.realpath(source):
            raise FerkitError(f"cannot read the folder {source}: permission denied")
        raise FerkitError(f"no image files in {source}")
    return images


def _annotated_or_plotted_by_ferkit(path: Path) -> bool:
    """An annotated copy (NAME.annotated.jpg) or a plot (a PNG: a video's emotions, a report's figures)
    that ferkit wrote: not a photo. Only names ferkit gives such files are opened to look."""
    from ferkit.draw import written_by_ferkit

    name = path.name.lower()
    if not (name.endswith(ANNOTATED_SUFFIX) or (name.endswith(".png") and not CROP_NAME.search(name))):
        return False
    return written_by_ferkit(path)


def _note_left_out(source: str, annotated, unnamed: list[Path], unreadable: list[str], dangling: list[Path]) -> None:
    def some(paths) -> str:
        names = [str(p) for p in paths]
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    if annotated:
        log.info("%s: left out %d annotated copies or plots that ferkit made (%s)", source, len(annotated),
                 some(sorted(annotated)))
    if unnamed:
        log.warning("%s: left out %d files without a name suffix, which is how ferkit picks images (%s); "
                    "rename them, e.g. to .jpg, or give them one by one", source, len(unnamed), some(unnamed))
    if unreadable:
        log.warning("%s: cannot read %d folder(s), their images left out: %s", source, len(unreadable), some(unreadable))
    if dangling:
        log.warning("%s: left out %d link(s) to nothing: %s", source, len(dangling), some(dangling))


def videos_of(source: str) -> list[Path]:
    """The videos that a folder or glob SOURCE gives to analyse: a glob's, like videos named one by one;
    none of a folder's (which are logged as left out: a folder of photos often holds clips not meant)."""
    videos = videos_in(source)
    if source_kind(source) == "folder":
        if videos:
            log.warning("%s holds %d video(s), left out: give videos by name or glob to analyse them", source, len(videos))
        return []
    return videos


def videos_in(source: str) -> list[Path]:
    """The video files of a folder (recursively) or a glob, sorted; annotated videos that ferkit made
    (marked inside) left out."""
    from ferkit.draw import written_by_ferkit

    paths = [Path(p) for p in glob.glob(source, recursive=True)] if source_kind(source) == "glob" else files_under(source)
    videos = [p for p in paths if p.is_file() and is_video_file(p)]
    return sorted(p for p in videos if not written_by_ferkit(p))


def once_each(paths: list[Path]) -> tuple[list[Path], dict[Path, Path]]:
    """`paths` in order, each file once however it is reached (given twice, or through a link): by its
    own name where that is among them, else by the first path to it; and each path left out, with the
    one kept of its file."""
    reals = [os.path.realpath(path) for path in paths]
    chosen: dict[str, int] = {}
    for i, (path, real) in enumerate(zip(paths, reals)):
        if real not in chosen or (Path(paths[chosen[real]]).is_symlink() and not Path(path).is_symlink()):
            chosen[real] = i
    kept = set(chosen.values())
    return ([path for i, path in enumerate(paths) if i in kept],
            {path: paths[chosen[real]] for i, (path, real) in enumerate(zip(paths, reals)) if i not in kept})


def fitting_name(stem: str, suffix: str) -> str:
    """stem + suffix, the stem cut short where the name would be too long for a file system (a photo's own
    name may be at the limit, and ferkit adds a suffix to it), with room left for a "-NN" to tell two apart."""
    if len(os.fsencode(stem + suffix)) <= NAME_MAX:
        return stem + suffix
    room = NAME_MAX - len(os.fsencode(suffix)) - 4
    return os.fsencode(stem)[:room].decode("utf-8", "ignore") + suffix  # no character cut in two


def files_under(folder: str | Path, *, unreadable: list[str] | None = None, quiet: bool = False) -> list[Path]:
    """Every file in `folder` and its subfolders, sorted, hidden names left out. Subfolders reached
    through symbolic links are followed (a dataset often links its parts in), each real folder once;
    a link to the folder itself or to a folder above it is not (it would list far more than was given).
    Folders that cannot be read are added to `unreadable`; links back up are logged, unless `quiet`."""
    seen: set[str] = set()
    files: list[Path] = []
    note = (lambda err: unreadable.append(err.filename)) if unreadable is not None else None
    top = Path(os.path.realpath(folder))
    for root, subfolders, names in os.walk(folder, followlinks=True, onerror=note):
        real = os.path.realpath(root)
        if real in seen:
            subfolders[:] = []
            continue
        if root != str(folder) and top.is_relative_to(real):
            if not quiet:
                log.warning("%s: a link back up to %s, not followed", root, real)
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        files += [Path(root, name) for name in names if not name.startswith(".")]
    return sorted(files)


@dataclass
class VideoInfo:
    path: Path
    fps: float
    frames: int  # as the container reports it (may be 0 or approximate)
    size: tuple[int, int]  # (width, height)


def open_video(path: str | Path):
    """An opened cv2.VideoCapture and its VideoInfo; FerkitError if OpenCV cannot decode it."""
    cv2 = require("cv2", "reading videos")

    path = Path(path)
    if not path.exists():
        raise FerkitError(f"no such file: {path}")
    if path.is_dir():
        raise FerkitError(f"{path} is a folder, not a video")
    if path.stat().st_size == 0:
        raise FerkitError(f"{path} is an empty file")
    if not os.environ.get("FERKIT_DEBUG"):  # FFmpeg's own lines ("moov atom not found") would precede ferkit's one
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
    capture = cv2.VideoCapture(str(path))
    ok, _ = capture.read() if capture.isOpened() else (False, None)
    if not ok:
        capture.release()
        raise FerkitError(f"{path} is not a video ferkit can read")
    capture.release()  # back to the first frame by opening it again: seeking fails in some files (stills, streams)
    capture = cv2.VideoCapture(str(path))
    fps = capture.get(cv2.CAP_PROP_FPS) or 25.0
    info = VideoInfo(path, fps, int(capture.get(cv2.CAP_PROP_FRAME_COUNT)),
                     (int(capture.get(cv2.CAP_PROP_FRAME_WIDTH)), int(capture.get(cv2.CAP_PROP_FRAME_HEIGHT))))
    return capture, info


BAD_FRAMES_IN_A_ROW = 10  # undecodable frames in a row that end a video: its end, cut short


def video_frames(capture, info: VideoInfo, *, every: int = 1) -> Iterator[tuple[int, float, np.ndarray]]:
    """(frame index, time in seconds, RGB array) for every `every`-th frame; frames are decoded in order.
    The time is the frame's own timestamp where the container has one: a phone's video has no fixed frame
    rate, and the index over the average rate would drift from it."""
    import cv2

    index, failed, in_a_row = 0, 0, 0
    offset, last = 0.0, None  # (index, time) of the last frame yielded
    try:
        while True:
            if index % every == 0:
                ok, frame = capture.read()
                if ok:
                    stamp = capture.get(cv2.CAP_PROP_POS_MSEC) / 1000  # 0 where the backend has none
                    time_s = (stamp if stamp > 0 else index / info.fps) + offset
                    if last is not None and time_s <= last[1]:  # the clock restarted (clips joined): carried on
                        carried = last[1] + (index - last[0]) / info.fps
                        offset, time_s = offset + carried - time_s, carried
                    last = index, time_s
                    yield index, time_s, cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            else:
                ok = capture.grab()  # skip without decoding
            # a damaged frame inside the video is passed over; several in a row, or none listed after it, end it
            in_a_row = 0 if ok else in_a_row + 1
            if not ok and (index >= info.frames - 1 or in_a_row >= BAD_FRAMES_IN_A_ROW):
                failed -= in_a_row - 1  # the frames before this one in the run were the end, not damage
                break
            failed += not ok
            index += 1
    finally:
        capture.release()
        if failed:
            log.warning("%d frame(s) of the video could not be decoded and were passed over", failed)
