"""Emotions over time in a video: analyse every Nth frame, follow faces with IoU tracking (new tracks after a cut), smooth.

    timeline = analyze_video("talk.mp4", every=5, smooth=3)
    timeline.to_csv("talk.timeline.csv"); timeline.plot("talk.emotions.png")
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ferkit.draw import SteadyLabels, draw_faces, mark_video
from ferkit.errors import FerkitError
from ferkit.faces import box_iou
from ferkit.predict import UNCERTAIN_BELOW, analyze_images
from ferkit.results import Face, check_replaceable, timeline_columns
from ferkit.runtime import load_classifier
from ferkit.sources import open_video, video_frames

log = logging.getLogger("ferkit")


@dataclass
class TimelineRow:
    frame: int
    time_s: float
    track: int
    face: Face  # probabilities smoothed over the track when smoothing is on


PLOT_TRACKS = 6  # the plot's panels: more would be unreadable


@dataclass
class Timeline:
    source: str
    fps: float
    classes: tuple[str, ...]
    rows: list[TimelineRow] = field(default_factory=list)
    every: int = 1  # every how many frames one was analysed
    frames_analysed: int = 0
    last_frame: int = 0  # the index of the last frame analysed
    last_time_s: float = 0.0  # its time: how far the plot's time axis reaches
    cut_short: bool = False  # frames stopped coming well before the count its container lists
    frames_failed: int = 0  # frames decoded whose analysis failed (face detection raised): none of their faces is here

    @property
    def tracks(self) -> list[int]:
        return sorted({row.track for row in self.rows})

    def summary(self, **more) -> dict:
        """What was analysed, as `ferkit predict` reports it per video (JSON); `more` is added to it."""
        return {"source": self.source, "frames_analysed": self.frames_analysed, "every": self.every,
                "tracks": len(self.tracks), "tracks_plotted": min(len(self.tracks), PLOT_TRACKS), "faces": len(self.rows),
                "cut_short": self.cut_short, "frames_failed": self.frames_failed, **more}

    def to_csv(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """The timeline, a row per face per analysed frame; a file there that ferkit did not write is kept
        unless `overwrite`."""
        check_replaceable([path], overwrite=overwrite)
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(self.csv_header())
            writer.writerows(self.csv_row(r) for r in self.rows)
        return Path(path)

    def csv_header(self) -> list[str]:
        return timeline_columns(self.classes)

    def csv_row(self, r: TimelineRow) -> list:
        return [f"{r.time_s:.3f}", r.frame, r.track, *r.face.box, r.face.emotion, f"{r.face.score:.4f}",
                *(f"{r.face.probabilities[c]:.4f}" for c in self.classes), int(r.face.uncertain)]

    def plot(self, path: str | Path, *, max_tracks: int = PLOT_TRACKS, overwrite: bool = False) -> Path:
        """The emotions over time of the `max_tracks` longest face tracks (the title says when there are more);
        a file there that ferkit did not write is kept unless `overwrite`."""
        from ferkit.plots import plot_emotion_timeline

        check_replaceable([path], overwrite=overwrite)
        longest = sorted(self.tracks, key=lambda t: -sum(r.track == t for r in self.rows))[:max_tracks]
        series = {
            t: ([r.time_s for r in self.rows if r.track == t],
                {c: [r.face.probabilities[c] for r in self.rows if r.track == t] for c in self.classes})
            for t in sorted(longest)
        }
        title = Path(self.source).name
        if len(self.tracks) > max_tracks:
            title += f": the {max_tracks} longest of {len(self.tracks)} face tracks"
        return plot_emotion_timeline(series, path, title=title, until=self.last_time_s,
                                     source=os.path.abspath(self.source))


TRACK_GAP_S = 1.0  # seconds a face may go unfound (turned away, covered) and keep its track


class IouTracker:
    """Gives each face the id of the track whose last box overlaps it most (IoU >= min_iou); failing that,
    of the track whose last box is the nearest, of about its size, with its centre within `reach` of that
    box's side (a face moving fast between analysed frames); else a new id. Tracks unseen for more than
    `max_gap` analysed frames are closed."""

    def __init__(self, *, min_iou: float = 0.3, max_gap: int = 5, reach: float = 1.5):
        self.min_iou, self.max_gap, self.reach = min_iou, max_gap, reach
        self._tracks: dict[int, tuple[tuple, int]] = {}  # id -> (last box, last step)
        self._next, self._step = 1, 0

    def close_all(self) -> None:
        """End every track: after a cut to another shot, faces are other faces wherever they are."""
        self._tracks = {}

    def update(self, boxes: list[tuple]) -> list[int]:
        self._step += 1
        live = {t: v for t, v in self._tracks.items() if self._step - v[1] <= self.max_gap}
        pairs = sorted(((box_iou(b, live[t][0]), i, t) for i, b in enumerate(boxes) for t in live), reverse=True)
        ids: dict[int, int] = {}
        for overlap, i, t in pairs:
            if overlap < self.min_iou:
                break
            if i not in ids and t not in ids.values():
                ids[i] = t
        near = sorted((_centre_distance(b, live[t][0]), i, t) for i, b in enumerate(boxes) for t in live
                      if i not in ids and t not in ids.values() and _alike(b, live[t][0]))
        for distance, i, t in near:
            side = (live[t][0][2] + live[t][0][3]) / 2
            if distance <= self.reach * side and i not in ids and t not in ids.values():
                ids[i] = t
        for i in range(len(boxes)):
            if i not in ids:
                ids[i], self._next = self._next, self._next + 1
        for i, box in enumerate(boxes):
            live[ids[i]] = (box, self._step)
        self._tracks = live
        return [ids[i] for i in range(len(boxes))]


def _centre_distance(a: tuple, b: tuple) -> float:
    return float(np.hypot(a[0] + a[2] / 2 - b[0] - b[2] / 2, a[1] + a[3] / 2 - b[1] - b[3] / 2))


def _alike(a: tuple, b: tuple) -> bool:
    """Boxes of about one size (areas within a factor of 2): the same face, near or far, not another."""
    return 0.5 <= (a[2] * a[3]) / max(1, b[2] * b[3]) <= 2.0


# A cut to another shot changes both the picture (32x32 grey thumbnail, mean difference in grey levels) and
# how much of each grey level it holds (histogram, share of pixels moved). Measured on 9 real photos of
# people (the detection check's), at 640x480: any two of them differ by at least 40.8 and 0.18; one photo
# panned by a tenth of its width or zoomed 1.2x differs from itself by at most 0.13 in histogram, and
# brightened 1.3x by at most 30.4 in thumbnail.
CUT_THUMBNAIL_CHANGE = 35.0
CUT_HISTOGRAM_CHANGE = 0.15


def frame_signature(frame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """An RGB frame's 32x32 grey thumbnail and its grey-level histogram (32 bins, summing to 1)."""
    import cv2

    grey = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    thumbnail = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    histogram = np.bincount(grey.ravel() // 8, minlength=32).astype(np.float64)
    return thumbnail, histogram / max(1, grey.size)


def is_scene_cut(before: tuple[np.ndarray, np.ndarray], after: tuple[np.ndarray, np.ndarray]) -> bool:
    """Whether two frames' signatures (frame_signature) belong to different shots: a pan, a zoom or a
    change of light alters one measure, a cut both."""
    thumbnail_change = float(np.abs(before[0] - after[0]).mean())
    histogram_change = 0.5 * float(np.abs(before[1] - after[1]).sum())
    return thumbnail_change > CUT_THUMBNAIL_CHANGE and histogram_change > CUT_HISTOGRAM_CHANGE


FRAMES_PER_BATCH = 8


def frame_step(fps: float, every: int | None = None, target_fps: float | None = None) -> int:
    """Analyse every Nth frame: `every` if given, else about `target_fps` (default 5) frames per second."""
    check_video_options(every, target_fps)
    return every or max(1, round(fps / (target_fps or 5.0)))


def check_video_options(every: int | None = None, target_fps: float | None = None, smooth: int = 1) -> None:
    """Refuse a frame step below 1, a rate not above 0, both given, or smoothing over fewer than 1 frame."""
    if not _whole(smooth) or smooth < 1:
        raise FerkitError(f"smooth must be a whole number of frames, at least 1, not {smooth!r}")
    if every is not None and (not _whole(every) or every < 1):
        raise FerkitError(f"every must be a whole number of frames, at least 1, not {every!r}")
    if target_fps is not None and (isinstance(target_fps, bool) or not isinstance(target_fps, (int, float, np.number))
                                   or not 0 < target_fps < float("inf")):
        raise FerkitError(f"the frames per second to analyse must be a number above 0, not {target_fps!r}")
    if every is not None and target_fps is not None:
        raise FerkitError("give every (a frame count) or target_fps (frames per second), not both")


def _whole(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def analyze_video(
    path: str | Path,
    *,
    model=None,
    detector="auto",
    every: int | None = None,
    target_fps: float | None = None,
    smooth: int = 1,
    annotated: str | Path | None = None,
    progress: Callable[[int], None] | None = None,
    uncertain_below: float = UNCERTAIN_BELOW,
    timeline_csv: str | Path | None = None,
    overwrite: bool = False,
) -> Timeline:
    """Analyse every `every`-th frame, or about `target_fps` frames per second (default: about 5, as
    `ferkit predict` does; `every=1` for every frame). `smooth` > 1 averages each track's probabilities exponentially
    over about that many analysed frames. `annotated`: write an annotated video there (mp4).
    `progress(frame_index)` is called after each analysed frame. Faces (smoothed ones by their smoothed
    probabilities) whose top probability is below `uncertain_below` are marked `uncertain`.
    `timeline_csv`: write the timeline there row by row as frames are analysed, so that a run cut short
    keeps what it did. A file at `annotated` or `timeline_csv` that ferkit did not write is refused unless
    `overwrite`; the video itself always is."""
    check_video_options(every, target_fps, smooth)  # before the model and the video are opened
    if annotated and Path(annotated).suffix.lower() != ".mp4":  # written as MP4 whatever the name says
        raise FerkitError(f"the annotated video is written as an .mp4 file, not {Path(annotated).name}")
    outputs = [Path(output) for output in (annotated, timeline_csv) if output]
    for output in outputs:
        if os.path.realpath(output) == os.path.realpath(path):
            raise FerkitError(f"{output} is the video being analysed: write the results elsewhere")
    check_replaceable(outputs, overwrite=overwrite)
    classifier = load_classifier(model, prefer_export=True)
    capture, info = open_video(path)
    every = frame_step(info.fps, every, target_fps)
    timeline = Timeline(str(path), info.fps, classifier.classes, every=every)
    # a face missed for up to about a second keeps its track, however often frames are analysed
    tracker, smoothed = IouTracker(max_gap=max(1, round(TRACK_GAP_S * info.fps / every))), {}
    labels = SteadyLabels(frames_to_switch=max(3, round(info.fps / every)))  # held for about a second at least
    alpha = 2.0 / (smooth + 1)
    # written under a hidden name and moved into place once finished (or stopped by Ctrl-C), so that a process
    # killed outright leaves no unplayable file under the name a user opens
    partial = Path(annotated).with_name(f".{Path(annotated).stem}.part.mp4") if annotated else None
    size = annotated_size(info.size)
    writer = _video_writer(partial, info.fps / every, size, shown_as=annotated) if annotated else None
    if timeline_csv:
        Path(timeline_csv).parent.mkdir(parents=True, exist_ok=True)
    table = open(timeline_csv, "w", newline="", encoding="utf-8") if timeline_csv else None
    rows = csv.writer(table) if table else None
    if rows:
        rows.writerow(timeline.csv_header())
    frames: dict[str, np.ndarray] = {}
    signature = None
    labelled = _labelled(video_frames(capture, info, every=every), path, frames)
    try:
        # a few frames per batch: each waits, whole, in memory until its faces are classified (4K: 25 MB)
        for result in analyze_images(labelled, model=classifier, detector=detector, uncertain_below=uncertain_below,
                                     batch_images=FRAMES_PER_BATCH):
            index = int(result.source.rsplit("=", 1)[1])
            frame, time_s = frames.pop(result.source)
            if result.error:
                timeline.frames_failed += 1
                if timeline.frames_failed == 1:
                    log.warning("%s: frame %d could not be analysed (%s); such frames are left out of the timeline",
                                path, index, result.error)
            signature, before = frame_signature(frame), signature
            if before is not None and is_scene_cut(before, signature):  # no face carries over to another shot
                tracker.close_all()
                smoothed.clear()
                labels.reset()
            tracks = tracker.update([f.box for f in result.faces])
            faces = [_smooth(face, track, smoothed, alpha, classifier.classes, uncertain_below)
                     for face, track in zip(result.faces, tracks)]
            for face, track in zip(faces, tracks):
                timeline.rows.append(TimelineRow(index, time_s, track, face))
                if rows:
                    rows.writerow(timeline.csv_row(timeline.rows[-1]))
            if table:
                table.flush()
            timeline.frames_analysed += 1
            timeline.last_frame, timeline.last_time_s = index, time_s
            if writer is not None:
                # as the timeline and the plot have them: numbered by track, smoothed
                drawn = draw_faces(_to_image(frame), faces, numbers=tracks, enlarge_tiny=False, steady=labels)
                _write_frame(writer, drawn if drawn.size == size else drawn.resize(size))
            if progress:
                progress(index)
    finally:
        # at once, not when the frame generator is collected: a caller's traceback keeps it alive, and
        # Windows cannot remove a video that is still open
        capture.release()
        if writer is not None:
            writer.release()
            if partial.is_file():
                mark_video(partial)
                os.replace(partial, annotated)
        if table is not None:
            table.close()
    if timeline.frames_analysed == 0:
        raise FerkitError(f"no frame of {path} could be decoded: is it a video?")
    if timeline.frames_failed == timeline.frames_analysed:
        raise FerkitError(f"no frame of {path} could be analysed ({timeline.frames_failed} decoded; the first failure is "
                          "above)")
    if info.frames > 0 and timeline.last_frame + 1 + every <= 0.95 * info.frames:  # containers' counts are approximate
        timeline.cut_short = True
        log.warning("%s: frames stopped coming after frame %d of the %d its container lists; the file may be cut short or damaged",
                    path, timeline.last_frame + 1, info.frames)
    return timeline


def _labelled(frames, path, store):
    """(label, frame) pairs; each frame and its time are kept in `store` until its result comes back."""
    for index, time_s, frame in frames:
        label = f"{path}#frame={index}"
        store[label] = frame, time_s
        yield label, frame


def _smooth(face: Face, track: int, state: dict, alpha: float, classes, uncertain_below: float = UNCERTAIN_BELOW) -> Face:
    current = np.array([face.probabilities[c] for c in classes])
    previous = state.get(track)
    mixed = current if previous is None else alpha * current + (1 - alpha) * previous
    state[track] = mixed
    best = int(np.argmax(mixed))
    return Face(face.box, classes[best], float(mixed[best]), dict(zip(classes, map(float, mixed))),
                face.detector_score, face.landmarks, bool(mixed[best] < uncertain_below))


MAX_VIDEO_SIDE = 8190  # MPEG-4 Part 2 (mp4v) encodes at most 8191 pixels a side: a wider video's copy is scaled down


def annotated_size(size: tuple[int, int]) -> tuple[int, int]:
    """The size of a video's annotated copy: the video's, or scaled down to MAX_VIDEO_SIDE (even sides)."""
    scale = min(1.0, MAX_VIDEO_SIDE / max(size))
    return size if scale == 1.0 else (max(2, round(size[0] * scale / 2) * 2), max(2, round(size[1] * scale / 2) * 2))


def _video_writer(path, fps, size, *, shown_as):
    import cv2

    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
    if not writer.isOpened():  # OpenCV says nothing and writes nothing otherwise
        raise FerkitError(f"cannot write the annotated video {shown_as} (no such folder, or no mp4v encoder in this OpenCV)")
    return writer


def _to_image(frame):
    from PIL import Image

    return Image.fromarray(frame)


def _write_frame(writer, image) -> None:
    import cv2

    writer.write(cv2.cvtColor(np.asarray(image), cv2.COLOR_RGB2BGR))
