"""Face crops for training: every face found in photos, framed as a model frames the faces it is shown,
written as PNG files in the same folder tree, so that class folders of photos become class folders of
faces (`ferkit crop photos/ --out faces/`, then `ferkit train --data faces/`). A dataset's images are
taken whole, each as one face; ordinary photos need this step first."""

from __future__ import annotations

import os
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
from ferkit.sources import list_images

MAX_SIDE = 256  # larger crops are scaled down: a model sees 40-64 pixels of a face


@dataclass
class CropSummary:
    """What `crop_faces` did: the photos read, the crops written, and the photos it could not use."""

    photos: int = 0
    written: list[Path] = field(default_factory=list)
    without_faces: list[str] = field(default_factory=list)
    several_faces: list[str] = field(default_factory=list)  # each crop takes the photo's folder, and so its class
    failed: list[str] = field(default_factory=list)  # "path: why"


def crop_faces(source: str | Path, out: str | Path, *, detector="auto", model=None, overwrite: bool = False,
               progress: Callable[[int, int], None] | None = None) -> CropSummary:
    """Write every face of the photos in `source` (a folder, read recursively, a glob or one photo) to
    `out` as `<photo name>.face<k>.png`, largest face first, each in the folder of its photo relative
    to `source`. Faces are framed as `model` (default: the default shipped model) frames the faces it
    is shown, and kept in colour, at most MAX_SIDE pixels a side. A photo that cannot be read, or whose
    detection fails, is named in `failed` and the rest goes on. Files in `out` that ferkit did not
    write are never replaced unless `overwrite`."""
    source, out = Path(source), Path(out)
    photos = list_images(str(source), skip=out)
    # crops keep their photos' folders below this one (for a glob or a photo: the one their folders share)
    root = source if source.is_dir() else Path(os.path.commonpath([photo.parent.absolute() for photo in photos]))
    metadata = read_metadata(resolve_model_path(model))
    find = get_detector(detector)
    check_writable_folder(create_folder(out, "folder for the face crops"))
    bases = _base_names(photos)
    check_replaceable([_crop_path(out, photo, root, bases[photo], 1) for photo in photos], overwrite=overwrite)
    summary = CropSummary()
    for done, photo in enumerate(photos, 1):
        summary.photos += 1
        try:
            faces = _faces_of(photo, find, metadata)
        except FerkitError as err:
            summary.failed.append(str(err))  # it names the photo
            faces = []
        except Exception as err:  # a detector's failure on one photo: report it, go on with the rest
            summary.failed.append(f"{photo}: face detection failed: {type(err).__name__}: {err}".splitlines()[0])
            faces = []
        else:
            if not faces:
                summary.without_faces.append(str(photo))
            elif len(faces) > 1:
                summary.several_faces.append(str(photo))
        for k, face in enumerate(faces, 1):
            path = _crop_path(out, photo, root, bases[photo], k)
            try:
                check_replaceable([path], overwrite=overwrite)
            except FerkitError as err:
                summary.failed.append(str(err))
                continue
            summary.written.append(_save_crop(face, path))
        if progress:
            progress(done, len(photos))
    return summary


def _faces_of(photo: Path, find, metadata) -> list[Image.Image]:
    picture = to_rgb(load_image(photo))
    if find is None:
        return [whole_image_face(picture)]
    from ferkit.predict import detected_faces

    return [crop_for_model(picture, d, metadata) for d in detected_faces(find, picture)]


def _base_names(photos: list[Path]) -> dict[Path, str]:
    """Each photo's name for its crops: its stem, or its whole name where another photo in its folder
    has the same stem (a.jpg and a.png)."""
    stems = Counter((photo.parent, photo.stem) for photo in photos)
    return {photo: photo.stem if stems[photo.parent, photo.stem] == 1 else photo.name for photo in photos}


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
