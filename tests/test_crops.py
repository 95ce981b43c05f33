"""Face crops for training (`ferkit crop`, ferkit.data.crops): photos in class folders become faces in
class folders, framed as predict frames the faces it finds."""

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import one_crop_per_face_model, pattern_face
from ferkit import analyze
from ferkit.cli import cli
from ferkit.data import load_dataset
from ferkit.data.crops import RECORD, crop_faces
from ferkit.errors import FerkitError
from ferkit.faces import get_detector
from ferkit.runtime import resolve_model_path

PEOPLE = Path(__file__).resolve().parents[1] / "examples" / "people.jpg"


def _photos(root: Path) -> Path:
    (root / "happy").mkdir(parents=True)
    (root / "sad").mkdir()
    shutil.copy(PEOPLE, root / "happy" / "people.jpg")
    Image.fromarray(np.full((120, 160, 3), 128, np.uint8)).save(root / "sad" / "wall.png")  # no face
    (root / "sad" / "broken.jpg").write_text("not an image")
    return root


def test_class_folders_of_photos_become_class_folders_of_faces_framed_as_predict_frames_them(tmp_path):
    photos = _photos(tmp_path / "photos")
    summary = crop_faces(photos, tmp_path / "faces")
    expected = [tmp_path / "faces" / "happy" / f"people.face{k}.png" for k in (1, 2, 3)]
    assert summary.written == expected and summary.photos == 3
    assert summary.without_faces == [str(photos / "sad" / "wall.png")]
    assert summary.several_faces == [str(photos / "happy" / "people.jpg")]
    assert len(summary.failed) == 1 and "broken.jpg" in summary.failed[0]
    assert load_dataset(tmp_path / "faces", cache=False).class_counts()["happy"] == 3
    # each crop, classified as a face photo, gets the answer its face's one crop gets in the whole photo
    in_photo = analyze(PEOPLE, model=one_crop_per_face_model(tmp_path))
    for face, crop in zip(in_photo, expected):
        assert analyze(crop, detector="none")[0].probabilities == pytest.approx(face.probabilities, abs=1e-6)


def test_a_rerun_crops_new_and_changed_photos_only_and_never_replaces_a_users_file(tmp_path):
    photos = _photos(tmp_path / "photos")
    crop_faces(photos, tmp_path / "faces")
    again = crop_faces(photos, tmp_path / "faces")
    assert again.written == [] and len(again.unchanged) == 2 and len(again.failed) == 1  # the broken photo, tried again
    mine = tmp_path / "faces" / "happy" / "people.face1.png"
    Image.fromarray(pattern_face(1, np.random.default_rng(1))).save(mine)
    before = mine.read_bytes()
    assert crop_faces(photos, tmp_path / "faces").written == [] and mine.read_bytes() == before
    shutil.copy(PEOPLE, photos / "happy" / "people.jpg")  # copied again: a new time, the same content
    assert crop_faces(photos, tmp_path / "faces").written == []
    Image.open(PEOPLE).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photos / "happy" / "people.jpg")  # changed
    with pytest.raises(FerkitError, match="ferkit did not write it"):
        crop_faces(photos, tmp_path / "faces")
    assert mine.read_bytes() == before
    assert len(crop_faces(photos, tmp_path / "faces", overwrite=True).written) == 3
    assert mine.read_bytes() != before
    assert len(crop_faces(photos, tmp_path / "faces", detector="none").written) == 2  # other framing: all cropped again


def test_crops_moved_to_another_class_or_deleted_by_hand_stay_so(tmp_path):
    photos = _photos(tmp_path / "photos")
    faces = tmp_path / "faces"
    crop_faces(photos, faces)
    (faces / "sad").mkdir()
    (faces / "happy" / "people.face2.png").rename(faces / "sad" / "people.face2.png")  # this face is not happy
    (faces / "happy" / "people.face3.png").unlink()  # a bad crop
    for prune in (False, True):
        summary = crop_faces(photos, faces, prune=prune)
        assert summary.written == [] and summary.stale == []
    assert sorted(p.relative_to(faces).as_posix() for p in faces.rglob("*.png")) == [
        "happy/people.face1.png", "sad/people.face2.png"]


def test_a_crop_moved_to_another_class_by_hand_is_not_replaced_by_a_new_photo_of_its_name(tmp_path):
    photos = _photos(tmp_path / "photos")
    faces = tmp_path / "faces"
    crop_faces(photos, faces)
    (faces / "sad").mkdir()
    moved = faces / "sad" / "people.face2.png"
    (faces / "happy" / "people.face2.png").rename(moved)  # relabelled by hand
    before = moved.read_bytes()
    Image.open(PEOPLE).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photos / "sad" / "people.jpg")  # other faces
    summary = crop_faces(photos, faces)
    assert moved.read_bytes() == before
    assert [line for line in summary.failed if "moved there by hand" in line] == [
        f"{moved} holds a face crop moved there by hand (ferkit wrote it as happy/people.face2.png): a crop of "
        f"{photos / 'sad' / 'people.jpg'} would replace it; rename the photo or that crop (or replace it: --overwrite)"]
    assert summary.written == [faces / "sad" / "people.face1.png", faces / "sad" / "people.face3.png"]
    assert crop_faces(photos, faces, prune=True).stale == [] and moved.read_bytes() == before


def test_a_photo_edited_in_place_with_its_times_set_back_is_cropped_again(tmp_path):
    """A tool that edits a photo and sets its time back (exiftool -P, rsync -t) keeps its size and time."""
    photo = tmp_path / "photos" / "happy" / "people.bmp"  # a BMP keeps its size in bytes whatever its pixels
    photo.parent.mkdir(parents=True)
    Image.open(PEOPLE).save(photo)
    faces = tmp_path / "faces"
    crop_faces(tmp_path / "photos", faces)
    first = (faces / "happy" / "people.face1.png").read_bytes()
    stat = photo.stat()
    Image.open(PEOPLE).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photo)
    os.utime(photo, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert photo.stat().st_size == stat.st_size and photo.stat().st_mtime_ns == stat.st_mtime_ns
    again = crop_faces(tmp_path / "photos", faces)
    assert len(again.written) == 3 and (faces / "happy" / "people.face1.png").read_bytes() != first


def test_a_huge_photo_without_faces_is_named_and_the_rest_is_cropped(tmp_path):
    (tmp_path / "photos" / "happy").mkdir(parents=True)
    panorama = tmp_path / "photos" / "happy" / "a-panorama.jpg"
    Image.new("L", (19000, 10000), 128).save(panorama)  # past Pillow's decompression-bomb limit
    shutil.copy(PEOPLE, tmp_path / "photos" / "happy" / "b.jpg")
    summary = crop_faces(tmp_path / "photos", tmp_path / "faces")
    assert summary.without_faces == [str(panorama)] and len(summary.written) == 3 and summary.failed == []


def test_a_source_folder_renamed_and_renamed_back_keeps_its_crops_and_their_hand_edits(tmp_path):
    photos = _photos(tmp_path / "photos")
    faces = tmp_path / "faces"
    crop_faces(photos, faces)
    (faces / "sad").mkdir()
    (faces / "happy" / "people.face2.png").rename(faces / "sad" / "people.face2.png")  # sorted by hand
    (faces / "happy" / "people.face3.png").unlink()
    sorted_by_hand = ["happy/people.face1.png", "sad/people.face2.png"]
    photos.rename(tmp_path / "pics")
    moved = crop_faces(tmp_path / "pics", faces, prune=True)  # the same photos, found by their content
    assert moved.written == [] and moved.stale == [] and len(moved.unchanged) == 2
    (tmp_path / "pics").rename(photos)
    again = crop_faces(photos, faces, prune=True)
    assert again.stale == [] and again.written == [] and len(again.unchanged) == 2
    assert sorted(p.relative_to(faces).as_posix() for p in faces.rglob("*.png")) == sorted_by_hand


def test_pruning_one_source_leaves_the_crops_of_another_alone(tmp_path):
    for source in ("a", "b"):
        (tmp_path / source / "happy").mkdir(parents=True)
        Image.fromarray(pattern_face(2, np.random.default_rng(2), size=64)).save(tmp_path / source / "happy" / f"{source}.png")
    faces = tmp_path / "faces"
    crop_faces(tmp_path / "a", faces, detector="none")
    crop_faces(tmp_path / "b", faces, detector="none")
    shutil.rmtree(tmp_path / "b")  # an unplugged drive, say
    summary = crop_faces(tmp_path / "a", faces, detector="none", prune=True)
    assert summary.stale == [] and (faces / "happy" / "b.face1.png").exists()
    assert [p.name for p in crop_faces(tmp_path, faces, detector="none", prune=True).stale] == ["b.face1.png"]
    assert not (faces / "happy" / "b.face1.png").exists()


def test_the_same_detector_and_framing_by_another_name_crop_nothing_again(tmp_path):
    photos = _photos(tmp_path / "photos")
    faces = tmp_path / "faces"
    crop_faces(photos, faces)
    (faces / "happy" / "people.face3.png").unlink()
    auto = get_detector("auto")
    assert crop_faces(photos, faces, detector=auto.name).written == []
    record = json.loads((faces / RECORD).read_text())
    for entry in record["photos"].values():  # as earlier versions recorded them: as typed, and the model's path
        entry["settings"] = {"detector": "auto", "model": str(resolve_model_path(None))}
    (faces / RECORD).write_text(json.dumps(record))
    assert crop_faces(photos, faces).written == [] and not (faces / "happy" / "people.face3.png").exists()
    assert len(crop_faces(photos, faces, detector=auto).unchanged) == 2  # a detector object too


def test_each_failure_is_told_as_it_happens_and_debug_logging_shows_where(tmp_path, caplog):
    photos = _photos(tmp_path / "photos")
    told = []

    def failing(rgb):
        raise IndexError("a bug in the detector")

    with caplog.at_level(logging.DEBUG, logger="ferkit"):
        summary = crop_faces(photos, tmp_path / "faces", detector=failing, on_failure=told.append)
    assert told == summary.failed and len(told) == 3 and "IndexError: a bug in the detector" in told[-1]
    assert "Traceback" in caplog.text and 'raise IndexError("a bug in the detector")' in caplog.text


def test_a_changed_photo_whose_crops_were_sorted_by_hand_is_named_and_the_record_stays_readable(tmp_path, caplog):
    photos = _photos(tmp_path / "photos")
    faces = tmp_path / "faces"
    crop_faces(photos, faces)
    (faces / "sad").mkdir()
    (faces / "happy" / "people.face2.png").rename(faces / "sad" / "people.face2.png")
    mine = faces / "happy" / "people.face3.png"
    Image.fromarray(pattern_face(1, np.random.default_rng(1))).save(mine)  # a user's own file: that crop fails
    Image.open(PEOPLE).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(photos / "happy" / "people.jpg")
    summary = crop_faces(photos, faces)
    assert summary.edited_before == [str(photos / "happy" / "people.jpg")] and len(summary.failed) == 2
    again = crop_faces(photos, faces)  # the photo whose crop failed is tried again, the rest are not
    assert "cannot be read" not in caplog.text and len(again.unchanged) == 1 and len(again.failed) == 2


def test_crops_at_the_top_of_out_and_face_crops_given_as_photos_are_pointed_out(tmp_path):
    photos = _photos(tmp_path / "photos")
    Image.fromarray(pattern_face(2, np.random.default_rng(2), size=48)).save(photos / "sad" / "crop.png")
    result = CliRunner().invoke(cli, ["crop", str(photos / "happy" / "people.jpg"), "--out", str(tmp_path / "faces")])
    assert f"3 face crop(s) written at the top of {tmp_path / 'faces'}" in result.output
    assert "are not training faces" in result.output
    result = CliRunner().invoke(cli, ["crop", str(photos), "--out", str(tmp_path / "more")])
    assert f"no face found: {photos / 'sad' / 'crop.png'} (a cropped face? --detector none" in result.output
    assert f"no face found: {photos / 'sad' / 'wall.png'}\n" in result.output  # a scene: no hint


def test_photos_of_one_name_from_two_sources_do_not_replace_each_others_crops(tmp_path):
    for source in ("a", "b"):
        (tmp_path / source / "happy").mkdir(parents=True)
    shutil.copy(PEOPLE, tmp_path / "a" / "happy" / "people.jpg")
    Image.open(PEOPLE).crop((600, 0, 920, 360)).save(tmp_path / "b" / "happy" / "people.jpg")  # one face of the three
    crop_faces(tmp_path / "a", tmp_path / "faces")
    before = {p: p.read_bytes() for p in (tmp_path / "faces").rglob("*.png")}
    assert len(before) == 3
    record = (tmp_path / "faces" / RECORD).read_text()
    with pytest.raises(FerkitError, match=f"1 photo.* would replace the crops of other photos.*is the crop of "
                                          f"{tmp_path / 'a' / 'happy' / 'people.jpg'}"):
        crop_faces(tmp_path / "b", tmp_path / "faces", detector=_no_detection_expected)  # refused before any work
    assert {p: p.read_bytes() for p in (tmp_path / "faces").rglob("*.png")} == before
    assert (tmp_path / "faces" / RECORD).read_text() == record


def _no_detection_expected(rgb):
    raise AssertionError("a photo was read")


def test_photos_of_one_name_in_one_folder_keep_their_crops_apart(tmp_path):
    (tmp_path / "photos").mkdir()
    for suffix in ("jpg", "png"):
        Image.fromarray(pattern_face(2, np.random.default_rng(2), size=96)).save(tmp_path / "photos" / f"a.{suffix}")
    summary = crop_faces(tmp_path / "photos", tmp_path / "faces", detector="none")
    assert sorted(p.name for p in summary.written) == ["a.jpg.face1.png", "a.png.face1.png"]


def test_the_crop_command_reports_each_photo_it_cannot_use_and_goes_on(tmp_path):
    photos = _photos(tmp_path / "photos")
    result = CliRunner().invoke(cli, ["crop", str(photos), "--out", str(tmp_path / "faces")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"no face found: {photos / 'sad' / 'wall.png'}" in result.output
    assert f"several faces, each cropped into the photo's folder: {photos / 'happy' / 'people.jpg'}" in result.output
    assert "broken.jpg" in result.output
    assert "3 photos, 3 faces written to" in result.output and "1 without a face, 1 failed" in result.output
    (tmp_path / "clip.mp4").write_bytes(b"a video")
    for source, error in ((tmp_path / "nowhere", "no such file"), ("http://example.com/a.jpg", "URLs are not fetched"),
                          (tmp_path / "clip.mp4", "is a video; ferkit crop takes photos")):
        refused = CliRunner().invoke(cli, ["crop", str(source), "--out", str(tmp_path / "faces")])
        assert refused.exit_code == 2 and refused.output.startswith("error: ") and error in refused.output
        assert len(refused.output.strip().splitlines()) == 1


def test_one_photo_or_a_glob_keeps_the_folders_below_where_it_points(tmp_path, monkeypatch):
    photos = _photos(tmp_path / "photos")
    one = crop_faces(photos / "happy" / "people.jpg", tmp_path / "one")
    assert [p.relative_to(tmp_path / "one") for p in one.written] == [Path(f"people.face{k}.png") for k in (1, 2, 3)]
    monkeypatch.chdir(tmp_path)
    globbed = crop_faces("photos/*/*.jpg", "globbed")  # only the happy folder has JPEGs, and keeps its name
    assert [p.relative_to("globbed").parent for p in globbed.written] == [Path("happy")] * 3


def test_crops_written_into_a_folder_inside_the_photos_folder_are_not_cropped_again(tmp_path):
    photos = _photos(tmp_path / "photos")
    first = crop_faces(photos, photos / "faces")
    second = crop_faces(photos, photos / "faces", detector="none")  # other framing: every photo cropped again
    assert second.photos == first.photos == 3 and len(second.written) == 2


def test_crops_among_the_photos_themselves_are_refused_before_anything_is_written(tmp_path, monkeypatch):
    photos = _photos(tmp_path / "photos")
    before = sorted(photos.rglob("*"))
    monkeypatch.chdir(tmp_path)
    for source, out in ((str(photos), "photos"), ("photos/*/*.jpg", "photos"), ("photos/happy/people.jpg", "photos/happy")):
        result = CliRunner().invoke(cli, ["crop", source, "--out", out])
        assert result.exit_code == 2 and "is the photos' own folder" in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert sorted(photos.rglob("*")) == before


def test_a_photo_with_fewer_faces_than_before_leaves_no_stale_crops(tmp_path):
    photos = _photos(tmp_path / "photos")
    crop_faces(photos, tmp_path / "faces")
    shutil.copy(photos / "happy" / "people.jpg", tmp_path / "people.jpg")
    Image.open(tmp_path / "people.jpg").crop((600, 0, 920, 360)).save(photos / "happy" / "people.jpg")  # one face left
    summary = crop_faces(photos, tmp_path / "faces")
    assert sorted(p.name for p in (tmp_path / "faces" / "happy").iterdir()) == ["people.face1.png"]
    assert [p.name for p in summary.written] == ["people.face1.png"]


def test_crops_of_photos_moved_or_gone_are_named_and_removed_when_asked(tmp_path):
    photos = _photos(tmp_path / "photos")
    shutil.copy(PEOPLE, photos / "sad" / "others.jpg")
    crop_faces(photos, tmp_path / "faces")
    (tmp_path / "faces" / "happy" / "mine.face1.png").write_bytes(b"my own file, named like a crop")
    (photos / "happy" / "people.jpg").rename(photos / "sad" / "people.jpg")  # relabelled
    (photos / "sad" / "others.jpg").unlink()
    result = CliRunner().invoke(cli, ["crop", str(photos), "--out", str(tmp_path / "faces")])
    assert result.exit_code == 1  # the broken photo
    stale = ["happy/people.face1.png", "happy/people.face2.png", "happy/people.face3.png",
             "sad/others.face1.png", "sad/others.face2.png", "sad/others.face3.png"]
    assert f"6 face crop(s) in {tmp_path / 'faces'} of photos that are no longer there" in result.output
    summary = crop_faces(photos / "*" / "*.jpg", tmp_path / "faces", prune=True)  # a glob too
    assert sorted(p.relative_to(tmp_path / "faces").as_posix() for p in summary.stale) == stale
    assert sorted(p.relative_to(tmp_path / "faces").as_posix() for p in (tmp_path / "faces").rglob("*.png")) == [
        "happy/mine.face1.png", "sad/people.face1.png", "sad/people.face2.png", "sad/people.face3.png"]


def test_names_that_would_collide_are_kept_apart(tmp_path):
    (tmp_path / "photos").mkdir()
    for name in ("a.jpg", "a.png", "a.jpg.png", "b.png", "B.jpg"):
        Image.fromarray(pattern_face(2, np.random.default_rng(2), size=64)).convert("RGB").save(tmp_path / "photos" / name)
    summary = crop_faces(tmp_path / "photos", tmp_path / "faces", detector="none")
    names = [p.name.casefold() for p in summary.written]
    assert len(summary.written) == 5 and len(set(names)) == 5


def test_a_photo_linked_into_two_class_folders_is_cropped_once_and_its_crops_stay(tmp_path):
    (tmp_path / "shared").mkdir()
    shutil.copy(PEOPLE, tmp_path / "shared" / "x.jpg")
    for label in ("happy", "sad"):
        (tmp_path / "photos" / label).mkdir(parents=True)
        (tmp_path / "photos" / label / f"{label}.jpg").symlink_to(tmp_path / "shared" / "x.jpg")
    summary = crop_faces(tmp_path / "photos", tmp_path / "faces")
    crops = sorted(p.relative_to(tmp_path / "faces").as_posix() for p in (tmp_path / "faces").rglob("*.png"))
    assert crops == [f"happy/happy.face{k}.png" for k in (1, 2, 3)] and summary.photos == 1
    assert summary.repeats == [f"{tmp_path / 'photos' / 'sad' / 'sad.jpg'} (as {tmp_path / 'photos' / 'happy' / 'happy.jpg'})"]
    again = crop_faces(tmp_path / "photos", tmp_path / "faces")
    assert again.written == [] and len(again.unchanged) == 1
    assert sorted(p.relative_to(tmp_path / "faces").as_posix() for p in (tmp_path / "faces").rglob("*.png")) == crops


def test_a_photo_named_at_the_file_systems_limit_is_cropped_under_a_shorter_name(tmp_path):
    (tmp_path / "photos" / "sad").mkdir(parents=True)
    long_name = "c" * 248 + ".jpg"
    shutil.copy(PEOPLE, tmp_path / "photos" / "sad" / long_name)
    summary = crop_faces(tmp_path / "photos", tmp_path / "faces")
    assert len(summary.written) == 3 and not summary.failed
    assert all(p.name.startswith("c" * 200) and len(p.name) <= 255 for p in summary.written)
    assert crop_faces(tmp_path / "photos", tmp_path / "faces").written == []  # found again under that name


def test_one_photos_crops_into_a_class_folder_given_as_out_raise_no_warning(tmp_path):
    result = CliRunner().invoke(cli, ["crop", str(PEOPLE), "--out", str(tmp_path / "faces" / "Sad")])
    assert result.exit_code == 0 and "are not training faces" not in result.output
    assert len(list((tmp_path / "faces" / "Sad").glob("*.png"))) == 3


def test_crop_faces_is_reached_from_import_ferkit_as_the_readme_writes_it():
    import subprocess
    import sys

    code = ("import ferkit\nprint(ferkit.data.crops.crop_faces.__name__)\n"
            "try:\n    ferkit.data.nothing\nexcept AttributeError as err:\n    print(err)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out == ["crop_faces", "module 'ferkit.data' has no attribute 'nothing'"]
