"""Face crops for training: every face found in photos, framed as a model frames the faces it is shown,
written as PNG files in the same folder tree, so that class folders of photos become class folders of
faces (`ferkit crop photos/ --out faces/`, then `ferkit train --data faces/`). A dataset's images are
taken whole, each as one face; ordinary photos need this step first."""

from __future__ import annotations

import functools
import glob
import importlib.util
import json
import logging
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

from ferkit import __version__
from ferkit.errors import FerkitError, first_line
from ferkit.faces import CROPPED_FACE_SIDE, crop_for_model, get_detector, whole_image_face
from ferkit.images import load_image, open_without_size_guard, to_rgb
from ferkit.results import check_replaceable, check_writable_folder, create_folder
from ferkit.runtime import read_metadata, resolve_model_path, sha256_of
from ferkit.draw import written_by_ferkit
from ferkit.sources import CROP_NAME, fitting_name, list_images, once_each, source_kind

log = logging.getLogger("ferkit")

MAX_SIDE = 256  # larger crops are scaled down: a model sees 40-64 pixels of a face
RECORD = ".ferkit-crops.json"  # in `out`: which photo each crop was made of, and how (hidden from datasets)
SAVE_EVERY = 100  # photos between saves of the record, so that a run cut short keeps most of what it did
WRITTEN_AS = "ferkit-crop"  # a crop's PNG text: where in `out` it was written


@dataclass
class CropSummary:
    """What `crop_faces` did: the photos read, the crops written, and the photos it could not use."""

    photos: int = 0
    written: list[Path] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)  # cropped by an earlier run and unchanged since: left as they are
    # changed since an earlier run had cropped them, and some of those crops moved or deleted by hand since
    edited_before: list[str] = field(default_factory=list)
    without_faces: list[str] = field(default_factory=list)
    several_faces: list[str] = field(default_factory=list)  # each crop takes the photo's folder, and so its class
    failed: list[str] = field(default_factory=list)  # "path: why"
    repeats: list[str] = field(default_factory=list)  # "path (as the path it was cropped as)": a photo listed twice
    # crops ferkit wrote in `out` of photos that are no longer there (moved to another class, or deleted):
    # removed with `prune`, else left, and listed here
    stale: list[Path] = field(default_factory=list)


def crop_faces(source: str | Path, out: str | Path, *, detector="auto", model=None, overwrite: bool = False,
               prune: bool = False, progress: Callable[[int, int], None] | None = None,
               on_failure: Callable[[str], None] | None = None) -> CropSummary:
    """Write every face of the photos in `source` (a folder, read recursively, a glob or one photo) to
    `out` as `<photo name>.face<k>.png`, largest face first, each in the folder of its photo relative
    to `source` (for a glob: to its folder before the first wildcard). Faces are framed as `model`
    (default: the default shipped model) frames the faces it is shown, and kept in colour, at most
    MAX_SIDE pixels a side. A photo that cannot be read, or whose detection fails, is named in `failed`
    and the rest goes on. A photo reached by two paths (a link to it) is cropped once, by its own name
    where that is among them; the others are named in `repeats`.

    `out/.ferkit-crops.json` records which photo each crop was made of. A photo cropped before (with the
    same detector and framing) whose content is unchanged since is not cropped again, so crops moved to
    another class folder or deleted by hand stay so, also when the source folder was renamed or moved; a
    changed photo is cropped anew (and named in `edited_before` if some of its earlier crops had been
    moved or deleted by hand). Crops of photos under `source` that are no longer there (moved to another
    class folder, deleted) are listed in `stale`, and removed with `prune`; crops of other sources are
    left alone. Files in `out` that ferkit did not write, or crops of another photo that is still there
    (two sources of one name cropped into one `out`), are never replaced unless `overwrite`: both are
    refused before any photo is read. `on_failure` is told of each photo in `failed` as it fails."""
    photos, root = _photos_and_root(str(source), Path(out))
    photos, repeats = once_each(photos)  # one photo reached by two paths (a link) is cropped once
    out = Path(out)
    metadata = read_metadata(resolve_model_path(model))
    find = get_detector(detector)
    check_writable_folder(create_folder(out, "folder for the face crops"))
    record = CropRecord.load(out, _settings(find, metadata))
    bases = _base_names(photos)
    first_crops = {photo: _crop_path(out, photo, root, bases[photo], 1) for photo in photos}
    todo = {photo for photo in photos if not record.is_unchanged(photo, first_crops[photo])}
    check_replaceable([first_crops[photo] for photo in photos if photo in todo], overwrite=overwrite)  # before any work
    if not overwrite:
        record.check_none_anothers([(first_crops[photo], photo) for photo in photos if photo in todo])
    summary = CropSummary(photos=len(photos), repeats=[f"{path} (as {kept})" for path, kept in repeats.items()])
    try:
        for done, photo in enumerate(photos, 1):
            if photo in todo:
                path_of = functools.partial(_crop_path, out, photo, root, bases[photo])
                failed = len(summary.failed)
                _crop_one(photo, path_of, find, metadata, record, summary, overwrite)
                for line in summary.failed[failed:] if on_failure else []:
                    on_failure(line)
            else:
                summary.unchanged.append(str(photo))
            if progress:
                progress(done, len(photos))
            if done % SAVE_EVERY == 0:
                record.save()
        summary.stale = record.crops_of_photos_gone(under=root)
        if prune:
            record.remove(summary.stale, under=root)
    finally:
        record.save()
    return summary


def _crop_one(photo: Path, path_of: Callable[[int], Path], find, metadata, record: CropRecord,
              summary: CropSummary, overwrite: bool) -> None:
    try:
        faces, size = _faces_of(photo, find, metadata)
    except FerkitError as err:
        summary.failed.append(str(err))  # it names the photo
        return
    except Exception as err:  # a detector's failure on one photo: report it, go on with the rest
        log.debug("face detection failed on %s", photo, exc_info=True)  # --debug shows where
        summary.failed.append(f"{photo}: face detection failed: {type(err).__name__}: {err}".splitlines()[0])
        return
    if not faces:
        summary.without_faces.append(str(photo) + (" (a cropped face? --detector none takes the whole image as the face)"
                                                   if find is not None and max(size) <= CROPPED_FACE_SIDE else ""))
    elif len(faces) > 1:
        summary.several_faces.append(str(photo))
    if record.edited_by_hand(photo):
        summary.edited_before.append(str(photo))
    written = []
    for k, face in enumerate(faces, 1):
        path = path_of(k)
        try:
            check_replaceable([path], overwrite=overwrite)
            if not overwrite:
                record.check_not_anothers(path, photo)
                _check_not_moved_there(path, out=record.out, photo=photo)
        except FerkitError as err:
            summary.failed.append(str(err))
            continue
        written.append(_save_crop(face, path, record.out))
    summary.written.extend(written)
    _remove_earlier_crops(path_of(1), record.out, beyond=len(faces), anothers=lambda path: record.is_anothers(path, photo))
    record.cropped(photo, written, complete=len(written) == len(faces))


class CropRecord:
    """`out/.ferkit-crops.json`: each photo cropped into `out` (its absolute path), its size, time and
    SHA-256 when cropped, the detector and framing it was cropped with, and its crops (relative to `out`)."""

    def __init__(self, out: Path, settings: dict, photos: dict[str, dict]):
        self.out, self.settings, self.photos = out, settings, photos
        self.owners = {crop: photo for photo, entry in photos.items() for crop in entry["crops"]}
        self.by_name: dict[str, list[str]] = {}  # the photos recorded, by file name: looked up for each new photo
        for photo in photos:
            self.by_name.setdefault(os.path.basename(photo), []).append(photo)

    @classmethod
    def load(cls, out: Path, settings: dict) -> CropRecord:
        try:
            saved = json.loads((out / RECORD).read_text())["photos"]
            photos = {str(photo): {"stamp": entry.get("stamp"), "sha256": entry.get("sha256"),
                                   "settings": _current_form(entry.get("settings")),
                                   "crops": [str(crop) for crop in entry["crops"]]}
                      for photo, entry in saved.items()}
        except FileNotFoundError:
            return cls(out, settings, {})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            log.warning("%s cannot be read (%s): every photo is cropped again", out / RECORD, first_line(err))
            return cls(out, settings, {})
        return cls(out, settings, photos)

    def is_unchanged(self, photo: Path, first_crop: Path) -> bool:
        """Cropped before, with these settings, into this folder, and its content not changed since (a
        copy or `touch` changes its time, not its content)."""
        entry = self.photos.get(_key(photo)) or self._taken_over(photo, first_crop)
        if entry is None or entry["settings"] != self.settings or entry["sha256"] is None:
            return False
        if entry["crops"] and Path(entry["crops"][0]).parent != first_crop.relative_to(self.out).parent:
            return False
        if entry["stamp"] != _stamp(photo):
            if sha256_of(photo) != entry["sha256"]:
                return False
            entry["stamp"] = _stamp(photo)
        return True

    def _taken_over(self, photo: Path, first_crop: Path) -> dict | None:
        """The entry of a photo of this name that is gone, cropped with these settings into this crop's
        folder, whose content `photo` has: the same photo, the source folder renamed or moved since. It
        becomes `photo`'s."""
        folder = first_crop.relative_to(self.out).parent
        size = photo.stat().st_size
        named = [(key, self.photos[key]) for key in self.by_name.get(photo.name, []) if key in self.photos]
        gone = [key for key, entry in named
                if entry["sha256"] and entry["settings"] == self.settings
                and (entry["stamp"] or [None])[0] == size
                and (not entry["crops"] or Path(entry["crops"][0]).parent == folder) and not os.path.exists(key)]
        digest = sha256_of(photo) if gone else None
        for key in gone:
            if self.photos[key]["sha256"] == digest:
                entry = self.photos[_key(photo)] = self.photos.pop(key)
                entry["stamp"] = _stamp(photo)
                self.owners.update({crop: _key(photo) for crop in entry["crops"]})
                return entry
        return None

    def is_anothers(self, path: Path, photo: Path) -> bool:
        """Whether the crop at `path` is that of another photo, one that is still there."""
        owner = self.owners.get(path.relative_to(self.out).as_posix())
        return owner is not None and owner != _key(photo) and os.path.exists(owner)

    def check_not_anothers(self, path: Path, photo: Path) -> None:
        if self.is_anothers(path, photo):
            owner = self.owners[path.relative_to(self.out).as_posix()]
            raise FerkitError(f"{path} is the crop of another photo, {owner}: crop photos of the same name into "
                              "different --out folders (or replace it: --overwrite)")

    def check_none_anothers(self, crops: list[tuple[Path, Path]]) -> None:
        """Refuses, in one line, photos whose (first crop, photo) would replace another photo's crop."""
        clashes = [(path, photo) for path, photo in crops if self.is_anothers(path, photo)]
        if clashes:
            path, photo = clashes[0]
            owner = self.owners[path.relative_to(self.out).as_posix()]
            raise FerkitError(f"{len(clashes)} photo(s) would replace the crops of other photos of the same name: {path} "
                              f"is the crop of {owner}, not of {photo}; crop them into different --out folders "
                              "(or replace them: --overwrite)")

    def edited_by_hand(self, photo: Path) -> bool:
        """Whether some of the crops an earlier run made of `photo` were moved, deleted or replaced since."""
        crops = self.photos.get(_key(photo), {"crops": []})["crops"]
        return any(not _where_ferkit_wrote_it(self.out, crop) for crop in crops)

    def cropped(self, photo: Path, crops: list[Path], complete: bool) -> None:
        """`photo`'s crops are now `crops`: those of an earlier version of it, still where ferkit wrote them
        and not written over, are removed (crops moved or replaced by hand are elsewhere, or not ferkit's)."""
        key = _key(photo)
        relative = [crop.relative_to(self.out).as_posix() for crop in crops]
        for crop in self.photos.get(key, {"crops": []})["crops"]:
            if crop not in relative and _where_ferkit_wrote_it(self.out, crop):
                (self.out / crop).unlink()
            self.owners.pop(crop, None)
        for crop in relative:
            owner = self.owners.get(crop)
            if owner not in (None, key):  # the crop of a photo that is gone (or moved): no longer its
                self.photos[owner]["crops"].remove(crop)
                self.photos[owner]["sha256"] = None  # were it seen again, it is cropped again
            self.owners[crop] = key
        self.photos[key] = {"stamp": _stamp(photo), "sha256": sha256_of(photo) if complete else None,
                            "settings": self.settings, "crops": relative}

    def crops_of_photos_gone(self, under: Path) -> list[Path]:
        """The crops, still where ferkit wrote them, of the photos below the folder `under` that are no
        longer where they were (photos of other sources cropped into `out` are not looked at)."""
        return sorted(self.out / crop for photo in self._photos_gone(under)
                      for crop in self.photos[photo]["crops"] if _where_ferkit_wrote_it(self.out, crop))

    def remove(self, crops: list[Path], under: Path) -> None:
        for path in crops:
            path.unlink()
        for photo in self._photos_gone(under):
            for crop in self.photos.pop(photo)["crops"]:
                self.owners.pop(crop, None)

    def _photos_gone(self, under: Path) -> list[str]:
        folder = os.path.join(os.path.realpath(under), "")
        return [photo for photo in self.photos if photo.startswith(folder) and not os.path.exists(photo)]

    def save(self) -> None:
        partial = self.out / f"{RECORD}.partial"
        partial.write_text(json.dumps({"photos": self.photos}, indent=1) + "\n")
        os.replace(partial, self.out / RECORD)


def _settings(find, metadata) -> dict:
    """What a photo's crops depend on besides the photo: the detector, and the framing a model asks for
    (none with --detector none, which takes the whole image)."""
    if find is None:
        return {"detector": "none"}
    name = getattr(find, "name", None) or getattr(find, "__qualname__", type(find).__name__)
    return {"detector": str(name), "face_margin": metadata.face_margin, "level_eyes": metadata.level_eyes}


def _current_form(settings):
    """Settings recorded by earlier versions: the detector as named on the command line and the model's
    path. The same settings as they are recorded now, where that model can still be read."""
    if not isinstance(settings, dict) or "model" not in settings:
        return settings
    detector = settings.get("detector")
    if detector == "none":
        return {"detector": "none"}
    if detector == "auto":  # what get_detector("auto") takes first
        detector = "yunet" if importlib.util.find_spec("yuface") else "mtcnn"
    if detector not in ("yunet", "mtcnn"):
        return settings
    try:
        return {"detector": detector, **_framing(settings["model"])}
    except (OSError, ValueError, FerkitError):
        return settings  # never equal to today's settings: its photos are cropped again


@functools.lru_cache(maxsize=8)
def _framing(model: str) -> dict:
    metadata = read_metadata(model)
    return {"face_margin": metadata.face_margin, "level_eyes": metadata.level_eyes}


def _key(photo: Path) -> str:
    return os.path.realpath(photo)


def _stamp(photo: Path) -> list[int]:
    # the change time too: a photo edited in place by a tool that sets its time back (exiftool -P, rsync -t)
    # keeps its size and modification time, but not that
    stat = photo.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns]


def _faces_of(photo: Path, find, metadata) -> tuple[list[Image.Image], tuple[int, int]]:
    """The photo's faces framed for `metadata`'s model, and the size it was decoded at (a photo as small as
    face crops are, FER2013's 48x48, is likely one: a detector needs more around a face)."""
    picture = to_rgb(load_image(photo))
    if find is None:
        return [whole_image_face(picture)], picture.size
    from ferkit.predict import detected_faces

    return [crop_for_model(picture, d, metadata) for d in detected_faces(find, picture)], picture.size


def _photos_and_root(source: str, out: Path) -> tuple[list[Path], Path]:
    """The photos to crop, less crops that ferkit wrote (where --out lies in the source), and the folder
    below which their folders are kept: the source folder, a glob's folder before its first wildcard,
    or a photo's own folder."""
    kind = source_kind(source)  # before Path(), which would fold a URL's // and hide what it is
    if kind == "image":
        load_image(source)  # one photo that cannot be read is bad input, refused before --out is made
        return [Path(source)], _not_the_output(Path(source).parent, out)
    if kind == "video":
        raise FerkitError(f"{source} is a video; ferkit crop takes photos (extract frames first)")
    photos = [p for p in list_images(source, skip=out) if not _a_crop_of_ours(p)]
    if not photos:
        raise FerkitError(f"no photos in {source} but face crops that ferkit wrote")
    if Path(source).is_dir():
        root = Path(source)
    else:
        parts = Path(source).parts
        wild = next(i for i, part in enumerate(parts) if glob.has_magic(part))
        root = Path(*parts[:wild]) if wild else Path(".")
    return photos, _not_the_output(root, out)


def _not_the_output(root: Path, out: Path) -> Path:
    """`root`, refused as the crops' folder: they would lie among the photos, and both be read as faces."""
    if os.path.realpath(out) == os.path.realpath(root):
        raise FerkitError(f"--out {out} is the photos' own folder: the face crops would lie among the photos, and "
                          f"both be read as faces; choose another folder (e.g. {root.resolve().name}-faces)")
    return root


def _a_crop_of_ours(path: Path) -> bool:
    return CROP_NAME.search(path.name) is not None and written_by_ferkit(path)


def _base_names(photos: list[Path]) -> dict[Path, str]:
    """Each photo's name for its crops, unique in its folder whatever the case: its stem, or its whole
    name where another photo in its folder has that stem or name (a.jpg and a.png; a.jpg and a.jpg.png),
    numbered if need be."""
    key = str.casefold
    by_folder: dict[Path, list[Path]] = {}
    for photo in photos:
        by_folder.setdefault(photo.parent, []).append(photo)
    bases: dict[Path, str] = {}
    for group in by_folder.values():
        stems = Counter(key(p.stem) for p in group)
        names = {key(p.name) for p in group}
        taken: Counter = Counter()
        for photo in group:
            base = photo.stem if stems[key(photo.stem)] == 1 and key(photo.stem) not in names else photo.name
            base = fitting_name(base, ".face99.png").removesuffix(".face99.png")  # a long name, cut short
            taken[key(base)] += 1
            bases[photo] = base if taken[key(base)] == 1 else f"{base}-{taken[key(base)]}"
    return bases


def _remove_earlier_crops(first: Path, out: Path, *, beyond: int, anothers: Callable[[Path], bool]) -> None:
    """Crops an earlier run wrote of this photo past its `beyond` faces (it may have found more then), but
    none that `anothers` says are another photo's (of the same name, from another source)."""
    stem = first.name.removesuffix(".face1.png")
    for path in first.parent.glob(f"{glob.escape(stem)}.face*.png"):
        number = CROP_NAME.search(path.name)
        if (number and path.name == f"{stem}.face{number[1]}.png" and int(number[1]) > beyond
                and _where_ferkit_wrote_it(out, path.relative_to(out).as_posix()) and not anothers(path)):
            path.unlink()


def _crop_path(out: Path, photo: Path, root: Path, base: str, k: int) -> Path:
    return out / photo.parent.absolute().relative_to(root.absolute()) / f"{base}.face{k}.png"


def _save_crop(face: Image.Image, path: Path, out: Path) -> Path:
    if max(face.size) > MAX_SIDE:
        face = face.resize((MAX_SIDE, MAX_SIDE), Image.Resampling.BOX)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", f"ferkit {__version__}")  # so that a later run may replace it
    info.add_text(WRITTEN_AS, path.relative_to(out).as_posix())  # so that one moved by hand is told from it
    face.save(path, format="PNG", pnginfo=info)
    return path


def _where_ferkit_wrote_it(out: Path, crop: str) -> bool:
    """Whether the crop at `out/crop` (relative, as the record names crops) is one ferkit wrote there, not one
    moved there by hand from another class folder (crops written by earlier versions name no place: taken as
    there)."""
    path = out / crop
    try:
        with open_without_size_guard(path) as image:  # a PNG's text chunks are read on opening: one look tells both
            if image.format != "PNG":
                return written_by_ferkit(path)
            software, written_as = str(image.info.get("Software", "")), image.info.get(WRITTEN_AS)
    except (OSError, ValueError):
        return False
    return software.startswith("ferkit") and written_as in (None, crop)


def _written_as(path: Path) -> str | None:
    try:
        with open_without_size_guard(path) as image:  # a PNG's text chunks are read on opening
            return image.info.get(WRITTEN_AS)
    except (OSError, ValueError):
        return None


def _check_not_moved_there(path: Path, out: Path, photo: Path) -> None:
    """A FerkitError where a crop ferkit wrote elsewhere in `out` lies at `path`: moved there by hand (to
    relabel the face), it is the user's, not a crop to replace."""
    written_as = _written_as(path) if path.exists() else None
    if written_as is not None and written_as != path.relative_to(out).as_posix():
        raise FerkitError(f"{path} holds a face crop moved there by hand (ferkit wrote it as {written_as}): a crop of "
                          f"{photo} would replace it; rename the photo or that crop (or replace it: --overwrite)")
