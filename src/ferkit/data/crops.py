"""Face crops for training: every face found in photos, framed as a model frames the faces it is shown,
written as PNG files in the same folder tree, so that class folders of photos become class folders of
faces (`ferkit crop photos/ --out faces/`, then `ferkit train --data faces/`). A dataset's images are
taken whole, each as one face; ordinary photos need this step first."""

from __future__ import annotations

import glob
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, PngImagePlugin

from ferkit import __version__
from ferkit.errors import FerkitError
from ferkit.faces import crop_for_model, get_detector, whole_image_face
from ferkit.images import load_image, to_rgb
from ferkit.results import check_replaceable, check_writable_folder, create_folder
from ferkit.runtime import read_metadata, resolve_model_path
from ferkit.draw import written_by_ferkit
from ferkit.sources import list_images, source_kind

MAX_SIDE = 256  # larger crops are scaled down: a model sees 40-64 pixels of a face
CROP_NAME = re.compile(r"\.face(\d+)\.png$")


@dataclass
class CropSummary:
    """What `crop_faces` did: the photos read, the crops written, and the photos it could not use."""

    photos: int = 0
    written: list[Path] = field(default_factory=list)
    without_faces: list[str] = field(default_factory=list)
    several_faces: list[str] = field(default_factory=list)  # each crop takes the photo's folder, and so its class
    failed: list[str] = field(default_factory=list)  # "path: why"
    # crops ferkit wrote in `out` of photos no longer in the source (moved to another class, or deleted):
    # removed with `prune`, else left, and listed here
    stale: list[Path] = field(default_factory=list)


def crop_faces(source: str | Path, out: str | Path, *, detector="auto", model=None, overwrite: bool = False,
               prune: bool = False, progress: Callable[[int, int], None] | None = None) -> CropSummary:
    """Write every face of the photos in `source` (a folder, read recursively, a glob or one photo) to
    `out` as `<photo name>.face<k>.png`, largest face first, each in the folder of its photo relative
    to `source` (for a glob: to its folder before the first wildcard). Crops an earlier run wrote of a
    photo beyond the faces found now are removed; crops ferkit wrote are never read as photos. Faces are framed as `model` (default: the default shipped model) frames the faces it
    is shown, and kept in colour, at most MAX_SIDE pixels a side. A photo that cannot be read, or whose
    detection fails, is named in `failed` and the rest goes on. Files in `out` that ferkit did not
    write are never replaced unless `overwrite`. Of a folder, crops ferkit wrote in `out` of photos that
    are not in it (a photo moved to another class folder, or deleted) are listed in `stale`, and removed
    with `prune`: `out` may also hold the crops of other sources."""
    source, out = Path(source), Path(out)
    photos, root = _photos_and_root(source, out)
    metadata = read_metadata(resolve_model_path(model))
    find = get_detector(detector)
    check_writable_folder(create_folder(out, "folder for the face crops"))
    bases = _base_names(photos)
    check_replaceable([_crop_path(out, photo, root, bases[photo], 1) for photo in photos], overwrite=overwrite)
    summary = CropSummary(photos=len(photos))
    for done, photo in enumerate(photos, 1):
        try:
            faces = _faces_of(photo, find, metadata)
        except FerkitError as err:
            summary.failed.append(str(err))  # it names the photo
            faces = None
        except Exception as err:  # a detector's failure on one photo: report it, go on with the rest
            summary.failed.append(f"{photo}: face detection failed: {type(err).__name__}: {err}".splitlines()[0])
            faces = None
        else:
            if not faces:
                summary.without_faces.append(str(photo))
            elif len(faces) > 1:
                summary.several_faces.append(str(photo))
        for k, face in enumerate(faces or [], 1):
            path = _crop_path(out, photo, root, bases[photo], k)
            try:
                check_replaceable([path], overwrite=overwrite)
            except FerkitError as err:
                summary.failed.append(str(err))
                continue
            summary.written.append(_save_crop(face, path))
        if faces is not None:
            _remove_earlier_crops(_crop_path(out, photo, root, bases[photo], 1), beyond=len(faces))
        if progress:
            progress(done, len(photos))
    if source.is_dir():  # one photo or a glob is a part of what `out` may hold
        summary.stale = _crops_of_other_photos(out, {_crop_path(out, photo, root, bases[photo], 1) for photo in photos})
    if prune:
        for path in summary.stale:
            path.unlink()
    return summary


def _crops_of_other_photos(out: Path, firsts: set[Path]) -> list[Path]:
    """The crops ferkit wrote in `out` of photos other than those whose first crops are `firsts`."""
    ours = {(first.parent.absolute(), first.name.removesuffix(".face1.png")) for first in firsts}
    found = []
    for path in sorted(out.rglob("*.face*.png")):
        number = CROP_NAME.search(path.name)
        if number and (path.parent.absolute(), path.name[: number.start()]) not in ours and written_by_ferkit(path):
            found.append(path)
    return found


def _faces_of(photo: Path, find, metadata) -> list[Image.Image]:
    picture = to_rgb(load_image(photo))
    if find is None:
        return [whole_image_face(picture)]
    from ferkit.predict import detected_faces

    return [crop_for_model(picture, d, metadata) for d in detected_faces(find, picture)]


def _photos_and_root(source: Path, out: Path) -> tuple[list[Path], Path]:
    """The photos to crop, less crops that ferkit wrote (where --out lies in the source), and the folder
    below which their folders are kept: the source folder, a glob's folder before its first wildcard,
    or a photo's own folder."""
    if source_kind(str(source)) == "image":
        return [source], source.parent
    photos = [p for p in list_images(str(source), skip=out) if not _a_crop_of_ours(p)]
    if not photos:
        raise FerkitError(f"no photos in {source} but face crops that ferkit wrote")
    if source.is_dir():
        return photos, source
    wild = next(i for i, part in enumerate(source.parts) if glob.has_magic(part))
    return photos, Path(*source.parts[:wild]) if wild else Path(".")


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
            taken[key(base)] += 1
            bases[photo] = base if taken[key(base)] == 1 else f"{base}-{taken[key(base)]}"
    return bases


def _remove_earlier_crops(first: Path, *, beyond: int) -> None:
    """Crops an earlier run wrote of this photo past its `beyond` faces (it may have found more then)."""
    stem = first.name.removesuffix(".face1.png")
    for path in first.parent.glob(f"{glob.escape(stem)}.face*.png"):
        number = CROP_NAME.search(path.name)
        if number and path.name == f"{stem}.face{number[1]}.png" and int(number[1]) > beyond and written_by_ferkit(path):
            path.unlink()


def _crop_path(out: Path, photo: Path, root: Path, base: str, k: int) -> Path:
    return out / photo.parent.absolute().relative_to(root.absolute()) / f"{base}.face{k}.png"


def _save_crop(face: Image.Image, path: Path) -> Path:
    if max(face.size) > MAX_SIDE:
        face = face.resize((MAX_SIDE, MAX_SIDE), Image.Resampling.BOX)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = PngImagePlugin.PngInfo()
    info.add_text("Software", f"ferkit {__version__}")  # so that a later run may replace it
    face.save(path, format="PNG", pnginfo=info)
    return path
