"""Photos, folders and videos analysed into one results folder, as `ferkit predict` writes them.

    batch = FolderBatch(["shoot/", "extra.jpg"], "runs/predict", annotate=True)
    for result in batch.run():          # faces.csv and results.jsonl grow as it goes
        print(result.summary())
    print(batch.images, batch.faces, batch.failed)

    summary = analyze_video_into_folder("talk.mp4", "runs/predict")   # timeline CSV and plot

A batch cut short goes on with `resume=True`: the images already in results.jsonl are skipped.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from ferkit.draw import save_annotated
from ferkit.errors import FerkitError
from ferkit.predict import UNCERTAIN_BELOW, analyze_images, check_uncertain_below
from ferkit.results import ImageResult, ResultsFolder, check_replaceable, create_folder, hold_folder, release_folder
from ferkit.sources import ANNOTATED_SUFFIX, fitting_name
from ferkit.runtime import load_classifier

log = logging.getLogger("ferkit")

class FolderBatch:
    """The images of `sources` (a file, folder or glob, or a list of them) analysed into the folder `out`: `faces.csv` and
    `results.jsonl` (see ResultsFolder), and `NAME.annotated.jpg` per image when `annotate`.

    An earlier batch's results in `out` are continued with `resume` (images already there are skipped)
    or replaced with `overwrite`; otherwise they are refused. `errors` lists the sources without a single
    image; `failed` counts the images that could not be analysed. A lone source without images is bad
    input (raised), unless `alone=False` says other work (videos) goes on beside it."""

    def __init__(self, sources, out: str | Path, *, model=None, detector="auto", annotate: bool = False,
                 uncertain_below: float = UNCERTAIN_BELOW, resume: bool = False, overwrite: bool = False,
                 alone: bool | None = None):
        from ferkit.faces import get_detector

        self.out = Path(out)
        check_results_folder(self.out, resume=resume, overwrite=overwrite)
        self.uncertain_below = check_uncertain_below(uncertain_below)
        sources = [sources] if isinstance(sources, (str, Path)) else sources
        paths, self.errors = list_batch_images([str(s) for s in sources], skip=self.out, alone=alone)
        # everything checked before the model loads and before an earlier batch's files are replaced
        self.detector = get_detector(detector)
        self.classifier = load_classifier(model, prefer_export=True)
        if resume:
            self.classifier = model_the_batch_began_with(self.classifier, model, self.out)
        self.annotated = annotated_copy_paths(self.out, paths, resume=resume) if annotate else {}
        written = [self.out / name for name in (ResultsFolder.TABLE, ResultsFolder.LINES, ResultsFolder.SETTINGS)]
        check_replaceable([*written, *self.annotated.values()], overwrite=overwrite)
        create_folder(self.out)
        hold_folder(self.out, _busy(self.out))  # until run_records ends
        if overwrite and not resume:
            _remove_earlier_annotated_copies(self.out, keep=paths)
        self.results = ResultsFolder(self.out, self.classifier.classes, resume=resume, sources=paths, overwrite=overwrite,
                                     settings=batch_settings(self.classifier, self.detector, self.uncertain_below,
                                                             annotate=annotate))
        self.todo = [p for p in paths if not self.results.is_finished(p)]
        self.skipped = len(paths) - len(self.todo)  # done by an earlier run (resume)
        if resume and self.results.finished and not self.skipped:
            log.warning("%s holds the results of %d images, none of them among these: resumed, the two batches' "
                        "results are one", self.out, len(self.results.finished))
        self.images = self.faces = 0
        self.failed = 0  # images that could not be analysed (sources without images are in `errors`)

    def run(self) -> Iterator[ImageResult]:
        """Analyse the images still to do, yielding each result once it is written."""
        for result, _ in self.run_records():
            yield result

    def run_records(self) -> Iterator[tuple[ImageResult, dict]]:
        """As `run`, with each result's line of results.jsonl as written (its annotated copy named)."""
        try:
            with self.results:
                for result in analyze_images(self.todo, model=self.classifier, detector=self.detector,
                                             uncertain_below=self.uncertain_below):
                    annotated = None
                    if result.ok and self.annotated:
                        annotated = self._save_annotated_copy(result)
                    record = self.results.write(result, **({"annotated": annotated} if annotated else {}))
                    self.images += 1
                    if result.error:
                        self.failed += 1
                    else:
                        self.faces += len(result.faces)
                    yield result, record
        finally:
            release_folder(self.out)

    def _save_annotated_copy(self, result: ImageResult) -> str | None:
        """The name of the result's annotated copy, once saved; None, with a warning, if it cannot be (the
        results are written all the same, and the batch goes on). The photo is read again to draw on:
        removed or damaged since it was analysed, it gets no copy."""
        try:
            return save_annotated(result.draw(result.source), self.annotated[result.source]).name
        except OSError as err:
            log.warning("%s: its annotated copy could not be written: %s", result.source, err.strerror or err)
        except FerkitError as err:
            log.warning("%s: no annotated copy, the photo cannot be read again to draw on: %s", result.source, err)
        return None


def annotated_copy_paths(out: Path, paths: list[Path], *, resume: bool = False) -> dict[str, Path]:
    """Each image's annotated copy in `out`: NAME.annotated.jpg, NAME-2.annotated.jpg for a second image of
    that name (named in listing order, as a whole run would), never the name of a photo of the batch that
    lies in `out` (a user's own NAME.annotated.jpg). A resumed batch keeps the names its results.jsonl
    gives, and gives no other image one of them, though images were added or removed since."""
    recorded = recorded_annotated_copies(out) if resume else {}
    used = {name.casefold() for name in [p.name for p in paths if p.parent.resolve() == out.resolve()] + list(recorded.values())}
    return {str(p): out / recorded[os.path.realpath(p)] if os.path.realpath(p) in recorded
            else unique_path(out, p.stem, ANNOTATED_SUFFIX, used) for p in paths}


def recorded_annotated_copies(out: Path) -> dict[str, str]:
    """The annotated copies that an earlier batch's results.jsonl in `out` names: each image's real path
    and the file name of its copy."""
    import json

    try:
        lines = (out / ResultsFolder.LINES).read_text(errors="replace").splitlines()
    except OSError:
        return {}
    copies = {}
    for line in lines:
        try:
            record = json.loads(line)
            name, source = record.get("annotated"), record["source"]
        except (ValueError, AttributeError, KeyError):
            continue
        if name:
            copies[os.path.realpath(str(source))] = Path(str(name)).name
    return copies


def check_not_another_images_copy(out: Path, source: str | Path, copy: Path, *, overwrite: bool = False) -> None:
    """Refuse, unless told to `overwrite`, to write one photo's annotated `copy` where a batch's results in
    `out` name that file as the copy of another image: the batch's results would point to this photo."""
    if overwrite:
        return
    owners = [s for s, name in recorded_annotated_copies(out).items() if name == copy.name]
    if owners and os.path.realpath(str(source)) not in owners:
        raise FerkitError(f"{copy} is the annotated copy of {owners[0]} in the batch results in {out}: choose "
                          "another --out (or --overwrite)")


def check_not_another_photos_results(results: Path, source: str | Path, *, overwrite: bool = False) -> None:
    """Refuse, unless told to `overwrite`, to write one photo's NAME.faces.json where ferkit's results of
    another photo of that name lie (photos/a/x.jpg after photos/b/x.jpg into one folder)."""
    import json

    if overwrite or not results.is_file():
        return
    try:
        earlier = json.loads(results.read_text()).get("source")
    except (OSError, ValueError, AttributeError):
        return  # not ferkit's results: check_replaceable says so
    if isinstance(earlier, str) and os.path.realpath(earlier) != os.path.realpath(str(source)):
        raise FerkitError(f"{results} holds the results of another photo, {earlier}: choose another --out "
                          "(or --overwrite)")


def _remove_earlier_annotated_copies(out: Path, keep: list[Path]) -> None:
    """The annotated copies an earlier batch in `out` made (its results.jsonl names them), removed when a
    new batch replaces it: they would no longer match the results beside them. Only ferkit's own copies go,
    and none that is an image of the new batch, `keep`."""
    from ferkit.draw import written_by_ferkit

    sources = {os.path.realpath(p) for p in keep}
    for name in recorded_annotated_copies(out).values():
        copy = out / name
        if copy.is_file() and os.path.realpath(copy) not in sources and written_by_ferkit(copy):
            copy.unlink()


def model_the_batch_began_with(classifier, model, out: Path, tta: str | None = None):
    """`classifier` (loaded from `model`) or, for a run folder exported since the batch in `out` began, the
    run's Keras model that the batch began with: a run folder predicts with its export once there is one
    (ferkit.runtime.exported_model_path), and a resumed batch must go on with the model it began with.
    `tta`: the test-time augmentation asked for now (None: the batch's own)."""
    import json

    from ferkit.predict import model_version
    from ferkit.runtime import resolve_model_path

    try:
        began = json.loads((Path(out) / ResultsFolder.SETTINGS).read_text())
        began_with = began.get("model_version")
    except (OSError, ValueError, AttributeError):
        return classifier
    if began_with in (None, model_version(classifier)) or not isinstance(model, (str, Path)) or not Path(model).is_dir():
        return classifier
    keras_file = resolve_model_path(model)
    if f"({keras_file.name}" not in str(began_with):  # it began with another file: refused as other settings
        return classifier
    keras_model = load_classifier(keras_file).with_tta(tta or began.get("tta"))
    return keras_model if model_version(keras_model) == began_with else classifier


def batch_settings(classifier, detector, uncertain_below: float, *, annotate: bool | None = None) -> dict:
    """What a batch's results depend on beyond its images, kept with them so that a resumed run must match
    (`annotate`: whether each image has an annotated copy; None: not said)."""
    from ferkit.predict import model_version

    return {"model": classifier.name, "model_version": model_version(classifier), "tta": classifier.tta,
            "detector": getattr(detector, "name", "custom") if detector is not None else "none",
            "uncertain_below": uncertain_below, "face_crops": face_crops(classifier, detector),
            **({} if annotate is None else {"annotate": bool(annotate)})}


def face_crops(classifier, detector) -> int:
    """How many crops of each face are classified and averaged: one for pictures taken as one face."""
    return 1 if detector is None else 1 + len(classifier.metadata.extra_margins)


def check_results_folder(out: Path, *, resume: bool, overwrite: bool) -> None:
    """Refuse a folder that holds an earlier batch's results unless told to continue or replace them."""
    if resume and overwrite:
        raise FerkitError("resume continues the results in the folder and overwrite replaces them; give one")
    check_output_folder(out)
    earlier = out / ResultsFolder.LINES
    if not (resume or overwrite) and earlier.exists() and earlier.stat().st_size:
        raise FerkitError(f"{out} holds the results of an earlier batch ({earlier.name}): resume continues it "
                          "(--resume; in Python, resume=True), overwrite replaces it (--overwrite; overwrite=True), "
                          "or choose another folder")


def check_output_folder(out: Path) -> None:
    """A FerkitError unless `out` is a folder results can be written to, or can become one."""
    if out.is_symlink() and not out.exists():
        raise FerkitError(f"{out} is a link to {os.readlink(out)}, which does not exist; give a folder for the results")
    if out.exists() and not out.is_dir():
        raise FerkitError(f"{out} is a file; give a folder for the results")
    if out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise FerkitError(f"{out} cannot be written to: permission denied")


def list_batch_images(sources: list[str], *, skip: Path | None = None,
                      alone: bool | None = None) -> tuple[list[Path], list[str]]:
    """The images of `sources` in order (files as given, folders and globs listed, `skip` left out), and an
    error per folder or glob without one. A lone source without images is bad input, raised (`alone`:
    whether the sources are all there is to do; default: when there is one)."""
    from ferkit.sources import list_images, once_each

    paths, errors = [], []
    for source in sources:
        if Path(source).is_file():
            paths.append(Path(source))
            continue
        try:
            paths += list_images(source, skip=skip)
        except FerkitError as err:
            if (len(sources) == 1) if alone is None else alone:
                raise
            errors.append(str(err))
    paths, repeats = once_each(paths)  # the same photo given twice, or by two routes, is analysed once
    if repeats:
        left, kept = next(iter(repeats.items()))
        log.info("%d image(s) reached a second time (given twice, or through a link) are analysed once, "
                 "e.g. %s as %s", len(repeats), left, kept)
    return paths, errors


def analyze_video_into_folder(source: str | Path, out: str | Path, *, stem: str | None = None, model=None,
                              detector="auto", every: int | None = None, target_fps: float | None = None,
                              smooth: int = 1, save_video: bool = False, uncertain_below: float = UNCERTAIN_BELOW,
                              progress: Callable[[int, int | None], None] | None = None,
                              overwrite: bool = False) -> dict:
    """Analyse a video into `out`: STEM.timeline.csv (written as frames are analysed), STEM.emotions.png,
    and STEM.annotated.mp4 with `save_video` (`video_outputs`). Returns the summary (Timeline.summary) with
    the files. `progress(frames_analysed, frames_to_analyse)` after each analysed frame; the total is as
    the container says (None when it does not know). Files of those names that ferkit did not write are
    refused unless `overwrite` (ferkit.results.check_replaceable)."""
    from ferkit.sources import open_video
    from ferkit.video import analyze_video, check_video_options, frame_step

    out = Path(out)
    check_video_options(every, target_fps, smooth)
    check_output_folder(out)
    stem = stem or Path(source).stem
    outputs = video_outputs(out, stem, save_video)
    check_replaceable(outputs, overwrite=overwrite)
    _check_not_another_videos_results(outputs[1], source, overwrite=overwrite)
    timeline_csv, plot, annotated = outputs[0], outputs[1], outputs[2] if save_video else None
    capture, info = open_video(source)
    capture.release()
    step = frame_step(info.fps, every, target_fps)
    total = max(1, -(-info.frames // step)) if info.frames > 0 else None
    create_folder(out)
    held = hold_folder(out, _busy(out))  # two runs into one folder would mix their timelines
    try:
        from ferkit.draw import written_by_ferkit

        earlier = video_outputs(out, stem, True)[2]  # an annotated video of an earlier run would no longer match
        if not save_video and earlier.is_file() and written_by_ferkit(earlier):
            earlier.unlink()
        if plot.is_file() and written_by_ferkit(plot):  # drawn again at the end: an earlier run's would outlive Ctrl-C
            plot.unlink()
        timeline = analyze_video(source, model=model, detector=detector, every=step, smooth=smooth,
                                 annotated=annotated, uncertain_below=uncertain_below,
                                 timeline_csv=timeline_csv, overwrite=overwrite,
                                 progress=(lambda index: progress(index // step + 1, total)) if progress else None)
        timeline.plot(plot, overwrite=overwrite)
    finally:
        if held:
            release_folder(out)
    return timeline.summary(files=[str(p) for p in outputs])


def _check_not_another_videos_results(plot: Path, source: str | Path, *, overwrite: bool = False) -> None:
    """Refuse, unless told to `overwrite`, to write a video's results where ferkit's results of another video
    of that name lie (cam1/clip.mp4 after cam2/clip.mp4 into one folder): its plot names the video it is of."""
    from PIL import Image

    from ferkit.plots import PLOT_SOURCE

    if overwrite or not plot.is_file():
        return
    try:
        with Image.open(plot) as image:
            earlier = image.info.get(PLOT_SOURCE)
    except (OSError, ValueError):
        return  # not ferkit's plot: check_replaceable says so
    if isinstance(earlier, str) and os.path.realpath(earlier) != os.path.realpath(str(source)):
        raise FerkitError(f"{plot.parent / plot.name.removesuffix('.emotions.png')}.* hold the results of another video, "
                          f"{earlier}: choose another --out (or --overwrite)")


def _busy(out: Path) -> str:
    return (f"{out} is being written by another ferkit predict; let it finish, or stop it (Ctrl-C, kill) and then "
            "--resume")


VIDEO_SUFFIXES_WRITTEN = (".timeline.csv", ".emotions.png", ".annotated.mp4")


def video_outputs(out: Path, stem: str, save_video: bool = False) -> list[Path]:
    """The files analyze_video_into_folder writes for a video: its timeline, its plot, its annotated copy."""
    stem = video_stem(stem)
    return [out / f"{stem}{suffix}" for suffix in VIDEO_SUFFIXES_WRITTEN[:3 if save_video else 2]]


def video_stem(stem: str) -> str:
    """A video's name for its files, cut short where the longest of them would be too long a name."""
    longest = max(VIDEO_SUFFIXES_WRITTEN, key=len)
    return fitting_name(stem, longest).removesuffix(longest)


def unique_path(folder: Path, stem: str, suffix: str, used: set[str]) -> Path:
    """folder/stem+suffix, or stem-2, stem-3, ... when files from different folders share a name (a stem
    too long for a file name cut short). `used` holds the names taken, case-folded: Photo.jpg and photo.jpg
    are one file on macOS and Windows."""
    stem = fitting_name(stem, suffix).removesuffix(suffix)
    name, n = f"{stem}{suffix}", 1
    while name.casefold() in used:
        n += 1
        name = f"{stem}-{n}{suffix}"
    used.add(name.casefold())
    return folder / name
