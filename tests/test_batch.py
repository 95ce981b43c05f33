"""Many photos into one results folder through the Python API (`ferkit predict` on folders uses it)."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import pattern_face
from ferkit.batch import FolderBatch, list_batch_images
from ferkit.errors import FerkitError
from ferkit.predict import UNCERTAIN_BELOW


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.png", "sub/a.png"]):
        Image.fromarray(pattern_face(i, np.random.default_rng(i))).save(folder / name)
    (folder / "broken.jpg").write_text("not an image")
    return folder


def test_a_folder_batch_writes_every_result_and_counts_the_failures(trained_run, photos, tmp_path):
    batch = FolderBatch([photos, tmp_path / "nothing-*.png"], tmp_path / "out", model=trained_run, detector="none",
                        annotate=True)
    assert len(batch.todo) == 4 and len(batch.errors) == 1  # the glob matches nothing: a source without images
    sources = [result.source for result in batch.run()]
    assert sorted(sources) == sorted(str(p) for p in photos.rglob("*.*"))
    assert (batch.images, batch.faces, batch.failed) == (4, 3, 1)  # the one unreadable image; the glob is an error
    lines = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [line["source"] for line in lines] == sources
    assert {line["detector"] for line in lines} == {"none"}  # the unreadable image's line too, as batch.json says
    assert sorted(p.name for p in (tmp_path / "out").glob("*.annotated.jpg")) == ["a-2.annotated.jpg", "a.annotated.jpg", "b.annotated.jpg"]


def test_a_photo_removed_after_it_was_analysed_gets_no_annotated_copy_and_the_batch_goes_on(trained_run, photos, tmp_path, caplog):
    batch = FolderBatch([photos], tmp_path / "out", model=trained_run, detector="none", annotate=True)
    order = [Path(path) for path in batch.todo]
    done = []
    for result in batch.run():  # the photos are analysed in groups, and drawn on one by one afterwards
        done.append(result.source)
        if len(done) == 1:
            order[1].unlink()
    assert done == [str(p) for p in order] and batch.images == 4
    assert f"{order[1]}: no annotated copy, the photo cannot be read again" in caplog.text
    assert len(list((tmp_path / "out").glob("*.annotated.jpg"))) == 2  # the broken one has none either


def test_a_photo_and_a_link_to_it_are_analysed_once_under_the_photos_own_name(trained_run, photos, tmp_path, caplog):
    caplog.set_level("INFO", logger="ferkit")
    (photos / "0-link.png").symlink_to(photos / "b.png")  # listed first
    batch = FolderBatch([photos], tmp_path / "out", model=trained_run, detector="none")
    assert [Path(p).name for p in batch.todo] == ["a.png", "b.png", "broken.jpg", "a.png"]
    assert f"analysed once, e.g. {photos / '0-link.png'} as {photos / 'b.png'}" in caplog.text


def test_an_earlier_batch_is_continued_or_replaced_only_when_asked(trained_run, photos, tmp_path):
    out = tmp_path / "out"
    list(FolderBatch([photos], out, model=trained_run, detector="none").run())
    with pytest.raises(FerkitError, match="results of an earlier batch"):
        FolderBatch([photos], out, model=trained_run, detector="none")
    resumed = FolderBatch([photos], out, model=trained_run, detector="none", resume=True)
    assert resumed.skipped == 3 and [p.name for p in resumed.todo] == ["broken.jpg"]  # failures are tried again
    assert len(list(resumed.run())) == 1
    assert (out / "results.jsonl").read_text().count("\n") == 4
    # resumed with other sources: the earlier failure stays on record, not tried and not dropped
    (tmp_path / "more").mkdir()
    Image.fromarray(pattern_face(4, np.random.default_rng(4))).save(tmp_path / "more" / "c.png")
    other = FolderBatch([tmp_path / "more"], out, model=trained_run, detector="none", resume=True)
    assert [p.name for p in other.todo] == ["c.png"] and len(list(other.run())) == 1
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 5 and [Path(line["source"]).name for line in lines if line.get("error")] == ["broken.jpg"]
    (tmp_path / "link").symlink_to(photos)  # the same photos by another path: done, not analysed twice
    relinked = FolderBatch([tmp_path / "link"], out, model=trained_run, detector="none", resume=True)
    assert relinked.skipped == 3 and [p.name for p in relinked.todo] == ["broken.jpg"]
    replaced = FolderBatch([photos], out, model=trained_run, detector="none", overwrite=True)
    assert replaced.skipped == 0 and len(replaced.todo) == 4
    with pytest.raises(FerkitError, match="give one"):
        FolderBatch([photos], out, model=trained_run, resume=True, overwrite=True)


def test_a_results_folder_creates_its_folder_and_keeps_a_users_own_files(trained_run, photos, tmp_path):
    from ferkit.predict import analyze_images
    from ferkit.results import ResultsFolder

    results = list(analyze_images([photos / "a.png"], model=trained_run, detector="none"))
    with ResultsFolder(tmp_path / "new" / "out", results[0].faces[0].probabilities) as folder:
        folder.write(results[0])
    assert (tmp_path / "new" / "out" / "faces.csv").read_text().count("\n") == 2
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "faces.csv").write_text("my own notes\n")
    with pytest.raises(FerkitError, match="faces.csv exists and ferkit did not write it"):
        ResultsFolder(mine, results[0].faces[0].probabilities)
    assert (mine / "faces.csv").read_text() == "my own notes\n"
    with ResultsFolder(mine, results[0].faces[0].probabilities, overwrite=True) as folder:
        folder.write(results[0])
    with ResultsFolder(mine, results[0].faces[0].probabilities) as folder:  # its own files: replaced
        folder.write(results[0])
    assert (mine / "faces.csv").read_text().count("\n") == 2


def test_a_batch_replaced_takes_the_earlier_batchs_annotated_copies_with_it(trained_run, photos, tmp_path):
    out = tmp_path / "out"
    list(FolderBatch([photos], out, model=trained_run, detector="none", annotate=True).run())
    assert len(list(out.glob("*.annotated.jpg"))) == 3
    (out / "mine.annotated.jpg").write_bytes((photos / "a.png").read_bytes())  # not ferkit's: stays
    list(FolderBatch([photos / "b.png"], out, model=trained_run, detector="none", annotate=True, overwrite=True).run())
    assert sorted(p.name for p in out.glob("*.annotated.jpg")) == ["b.annotated.jpg", "mine.annotated.jpg"]


def test_one_folder_may_be_given_alone_and_bad_settings_are_refused_before_anything_is_replaced(trained_run, photos, tmp_path):
    out = tmp_path / "out"
    list(FolderBatch(photos, out, model=trained_run, detector="none").run())  # a folder, not a list of them
    before = (out / "results.jsonl").read_text()
    assert before.count("\n") == 4
    for bad in ({"detector": "typo"}, {"uncertain_below": 1.5}):
        with pytest.raises(FerkitError):
            FolderBatch(str(photos), out, model=trained_run, overwrite=True, **{"detector": "none", **bad})
    assert (out / "results.jsonl").read_text() == before


def test_a_video_goes_into_a_folder_made_for_it_and_bad_settings_are_refused_first(tmp_path):
    from ferkit.batch import analyze_video_into_folder

    with pytest.raises(FerkitError, match="smooth"):
        analyze_video_into_folder(tmp_path / "missing.mp4", tmp_path / "out", smooth=0)
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FerkitError, match="is a file"):
        analyze_video_into_folder(tmp_path / "missing.mp4", tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"


def test_a_lone_source_without_images_is_bad_input(tmp_path):
    with pytest.raises(FerkitError):
        list_batch_images([str(tmp_path)])
    paths, errors = list_batch_images([str(tmp_path), str(tmp_path / "none-*.png")])
    assert paths == [] and len(errors) == 2


def test_files_ferkit_did_not_write_are_never_replaced_without_overwrite(trained_run, photos, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for name in ("faces.csv", "batch.json", "a.annotated.jpg"):
        (out / name).write_text("mine")
        with pytest.raises(FerkitError, match=f"{name} exists and ferkit did not write it"):
            FolderBatch([photos], out, model=trained_run, detector="none", annotate=True)
        assert (out / name).read_text() == "mine"
        (out / name).unlink()
    batch = FolderBatch([photos], out, model=trained_run, detector="none", annotate=True)
    list(batch.run())
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [line.get("annotated") for line in lines] == ["a.annotated.jpg", "b.annotated.jpg", None, "a-2.annotated.jpg"]
    # ferkit's own copies are replaced by a later batch that is told to replace the results
    list(FolderBatch([photos], out, model=trained_run, detector="none", annotate=True, overwrite=True).run())
    (out / "results.jsonl").unlink()
    list(FolderBatch([photos], out, model=trained_run, detector="none", annotate=True).run())


def test_results_written_among_the_photos_are_not_read_back_as_photos(trained_run, photos):
    list(FolderBatch([photos], photos, model=trained_run, detector="none", annotate=True).run())
    again = FolderBatch([photos], photos, model=trained_run, detector="none", annotate=True, overwrite=True)
    assert sorted(p.name for p in again.todo) == ["a.png", "a.png", "b.png", "broken.jpg"]


def test_a_batch_resumes_only_with_the_model_and_settings_it_began_with(trained_run, photos, tmp_path, caplog):
    from ferkit.runtime import load_classifier

    out = tmp_path / "out"
    list(FolderBatch([photos], out, model=trained_run, detector="none").run())
    settings = json.loads((out / "batch.json").read_text())
    assert settings["tta"] == "none" and settings["detector"] == "none" and len(settings["classes"]) == 7
    for changed in ({"uncertain_below": UNCERTAIN_BELOW / 2}, {"model": load_classifier(trained_run).with_tta("flip")}):
        with pytest.raises(FerkitError, match="made with other settings"):
            FolderBatch([photos], out, **{"model": trained_run, "detector": "none", "resume": True, **changed})
    assert FolderBatch([photos], out, model=trained_run, detector="none", resume=True).skipped == 3
    other = tmp_path / "other"  # resuming with another folder by mistake: said, since the results would be one
    other.mkdir()
    Image.fromarray(pattern_face(4, np.random.default_rng(4))).save(other / "c.png")
    with caplog.at_level("WARNING", logger="ferkit"):
        assert FolderBatch([other], out, model=trained_run, detector="none", resume=True).skipped == 0
    assert f"{out} holds the results of 3 images, none of them among these" in caplog.text
    # a folder of an older version, without batch.json: its table's header says the classes
    (out / "batch.json").unlink()
    header = (out / "faces.csv").read_text().splitlines()[0].replace("surprise", "contempt")
    (out / "faces.csv").write_text(header + "\n")
    with pytest.raises(FerkitError, match="classes"):
        FolderBatch([photos], out, model=trained_run, detector="none", resume=True)


def test_a_batch_begun_with_one_crop_per_face_is_not_resumed_with_three(trained_run, photos, tmp_path):
    """Batches begun before faces were classified at several scales recorded no face_crops: one crop each.
    Going on with three would mix two kinds of answers in one table."""
    out = tmp_path / "out"
    list(FolderBatch([photos], out, model=trained_run, detector="yunet").run())
    settings = json.loads((out / "batch.json").read_text())
    assert settings["face_crops"] == 3
    del settings["face_crops"]
    (out / "batch.json").write_text(json.dumps(settings))
    with pytest.raises(FerkitError, match="face_crops 1 \\(now 3\\)"):
        FolderBatch([photos], out, model=trained_run, detector="yunet", resume=True)
    list(FolderBatch([photos], tmp_path / "whole", model=trained_run, detector="none").run())
    assert json.loads((tmp_path / "whole" / "batch.json").read_text())["face_crops"] == 1  # pictures taken as one face


def test_the_same_photo_given_twice_is_analysed_once(photos):
    paths, errors = list_batch_images([str(photos / "a.png"), str(photos), str(photos / "sub" / ".." / "a.png")])
    assert [str(p) for p in paths] == [str(photos / "a.png"), str(photos / "b.png"), str(photos / "broken.jpg"),
                                       str(photos / "sub" / "a.png")] and errors == []


def test_a_folder_listing_leaves_out_ferkits_annotated_copies_and_says_what_else_it_leaves_out(tmp_path, caplog):
    from ferkit.draw import save_annotated
    from ferkit.sources import list_images

    face = Image.fromarray(pattern_face(1, np.random.default_rng(1))).convert("RGB")
    (tmp_path / "photos" / "earlier").mkdir(parents=True)
    for name in ("a.jpg", "b.jfif", "mine.annotated.jpg"):  # the last: a user's photo, not marked as ferkit's
        face.save(tmp_path / "photos" / name, format="JPEG")
    face.save(tmp_path / "photos" / "IMG_0001", format="JPEG")
    save_annotated(face, tmp_path / "photos" / "earlier" / "a.annotated.jpg")
    with caplog.at_level("INFO", logger="ferkit"):
        listed = list_images(str(tmp_path / "photos"))
    assert [p.name for p in listed] == ["a.jpg", "b.jfif", "mine.annotated.jpg"]
    assert "1 annotated copies or plots that ferkit made" in caplog.text and "1 files without a name suffix" in caplog.text
    assert "IMG_0001" in caplog.text


def test_a_folder_listing_follows_links_in_but_not_back_up_and_names_links_to_nothing(tmp_path, caplog):
    from ferkit.sources import list_images

    face = Image.fromarray(pattern_face(1, np.random.default_rng(1)))
    (tmp_path / "elsewhere").mkdir()
    face.save(tmp_path / "elsewhere" / "linked.png")
    face.save(tmp_path / "outside.png")
    photos = tmp_path / "photos"
    photos.mkdir()
    face.save(photos / "a.png")
    (photos / "part").symlink_to(tmp_path / "elsewhere")  # a dataset's part linked in: followed
    (photos / "up").symlink_to(tmp_path)  # back up: would list the whole tree around the folder
    (photos / "gone.png").symlink_to(tmp_path / "nothing.png")
    (photos / "loop-a.png").symlink_to(photos / "loop-b.png")  # two links to each other: to nothing
    (photos / "loop-b.png").symlink_to(photos / "loop-a.png")
    (photos / "results").mkdir()  # where the results go: skipped
    face.save(photos / "results" / "a.png")
    with caplog.at_level("WARNING", logger="ferkit"):
        assert list_images(str(photos), skip=photos / "results", quiet=True) and not caplog.text
        listed = list_images(str(photos), skip=photos / "results")
    assert [p.relative_to(photos).as_posix() for p in listed] == ["a.png", "part/linked.png"]
    assert caplog.text.count(f"{photos / 'up'}: a link back up to {tmp_path.resolve()}, not followed") == 1
    assert f"left out 3 link(s) to nothing: {photos / 'gone.png'}, {photos / 'loop-a.png'}, {photos / 'loop-b.png'}" in caplog.text


def test_folders_and_photos_that_cannot_be_read_are_named(trained_run, tmp_path):
    import os
    import shutil
    import subprocess
    import sys

    photos = tmp_path / "photos"
    (photos / "locked").mkdir(parents=True)
    for path in (photos / "a.png", photos / "c.png", photos / "locked" / "b.png"):
        Image.fromarray(pattern_face(2, np.random.default_rng(2))).save(path)
    prefix = []
    if os.geteuid() == 0:  # root reads anything: run without the capabilities that let it
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv, so file permissions do not apply")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    (photos / "c.png").chmod(0)
    (photos / "locked").chmod(0)
    try:
        def predict(source, out):
            command = [*prefix, sys.executable, "-m", "ferkit.cli", "predict", str(source), "--model", str(trained_run),
                       "--detector", "none", "--out", str(tmp_path / out)]
            return subprocess.run(command, capture_output=True, text=True)

        batch = predict(photos, "o")
        assert batch.returncode == 1, batch.stderr
        assert f"cannot read 1 folder(s), their images left out: {photos / 'locked'}" in batch.stderr
        assert f"{photos / 'c.png'} cannot be read: permission denied" in batch.stderr + batch.stdout
        alone = predict(photos / "locked", "o2")
        assert alone.returncode == 2 and f"cannot read the folder {photos / 'locked'}: permission denied" in alone.stderr
    finally:
        (photos / "c.png").chmod(0o644)
        (photos / "locked").chmod(0o755)


def test_a_file_name_that_is_not_utf8_is_written_as_the_file_system_holds_it(trained_run, tmp_path):
    from ferkit.results import ResultsFolder

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(pattern_face(0, np.random.default_rng(0))).save(os.fsdecode(bytes(folder) + b"/caf\xe9.png"))
    Image.fromarray(pattern_face(1, np.random.default_rng(1))).save(folder / "ok.png")
    out = tmp_path / "out"
    batch = FolderBatch([folder], out, model=trained_run, detector="none")
    list(batch.run())
    assert (batch.images, batch.failed) == (2, 0)
    assert b"/caf\xe9.png," in (out / ResultsFolder.TABLE).read_bytes()  # the very name, for the next tool to open
    resumed = FolderBatch([folder], out, model=trained_run, detector="none", resume=True)
    assert resumed.skipped == 2 and not resumed.todo


def test_a_resumed_batch_keeps_each_annotated_copy_to_its_photo_when_photos_of_that_name_were_added(trained_run, tmp_path):
    out, photos = tmp_path / "out", tmp_path / "photos"
    (photos / "b").mkdir(parents=True)
    Image.fromarray(pattern_face(1, np.random.default_rng(1))).save(photos / "b" / "x.png")
    list(FolderBatch([photos], out, model=trained_run, detector="none", annotate=True).run())
    first_copy = (out / "x.annotated.jpg").read_bytes()
    (photos / "a").mkdir()  # listed before b/: a whole run would name its copy x.annotated.jpg
    Image.fromarray(pattern_face(2, np.random.default_rng(2), size=96)).save(photos / "a" / "x.png")
    list(FolderBatch([photos], out, model=trained_run, detector="none", annotate=True, resume=True).run())
    assert (out / "x.annotated.jpg").read_bytes() == first_copy
    lines = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {Path(line["source"]).parent.name: line["annotated"] for line in lines} == {
        "b": "x.annotated.jpg", "a": "x-2.annotated.jpg"}
    assert Image.open(out / "x-2.annotated.jpg").width > Image.open(out / "x.annotated.jpg").width  # a/x.png's, the larger


def test_a_batch_that_replaces_another_never_removes_one_of_its_own_photos(trained_run, photos, tmp_path):
    out = tmp_path / "out"
    list(FolderBatch([photos], out, model=trained_run, detector="none", annotate=True).run())
    again = FolderBatch([out / "b.annotated.jpg", photos / "a.png"], out, model=trained_run, detector="none",
                       overwrite=True)  # an earlier copy given as a photo of this batch
    assert [r.error for r in again.run()] == [None, None]
    assert sorted(p.name for p in out.glob("*.annotated.jpg")) == ["b.annotated.jpg"]


def test_photos_with_names_at_the_file_systems_limit_get_annotated_copies_and_a_panorama_too(trained_run, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    face = Image.fromarray(pattern_face(1, np.random.default_rng(1)))
    for stem in ("é" * 120 + "a", "é" * 120 + "b"):  # 241 bytes, and the same first 240: cut short, kept apart
        face.save(photos / f"{stem}.png")
    Image.new("L", (66_000, 48), 128).save(photos / "wide.png")  # wider than a JPEG can be
    batch = FolderBatch([photos], tmp_path / "out", model=trained_run, detector="none", annotate=True)
    assert [r.error for r in batch.run()] == [None, None, None]
    copies = sorted((tmp_path / "out").glob("*.annotated.jpg"))
    assert len(copies) == 3 and all(len(os.fsencode(p.name)) <= 255 for p in copies)
    assert max(Image.open(tmp_path / "out" / "wide.annotated.jpg").size) <= 65_500


def test_a_folder_listing_leaves_out_ferkits_plots_and_annotated_videos_but_not_face_crops(trained_run, tmp_path, caplog):
    from ferkit.data.crops import crop_faces
    from ferkit.draw import mark_video
    from ferkit.plots import plot_history
    from ferkit.sources import list_images, videos_in

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(pattern_face(1, np.random.default_rng(1), size=96)).save(folder / "me.png")
    crop_faces(folder, folder / "faces", detector="none")
    plot_history({"epoch": [1, 2], "loss": [1.0, 0.5], "accuracy": [0.3, 0.5]}, folder / "curves.png")
    for name in ("clip.mp4", "clip.annotated.mp4"):
        (folder / name).write_bytes(b"\0\0\0\x08free")
    mark_video(folder / "clip.annotated.mp4")
    with caplog.at_level("INFO", logger="ferkit"):
        listed = list_images(str(folder))
    assert [p.relative_to(folder).as_posix() for p in listed] == ["faces/me.face1.png", "me.png"]
    assert "1 annotated copies or plots that ferkit made" in caplog.text
    assert [p.name for p in videos_in(str(folder))] == ["clip.mp4"]


def test_a_ferkit_plot_is_known_by_its_text_chunk_without_decoding_its_pixels(tmp_path):
    from PIL.PngImagePlugin import PngInfo

    from ferkit.sources import list_images

    info = PngInfo()
    info.add_text("Software", "ferkit 1.0")
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 400), dtype=np.uint8)).save(tmp_path / "plot.png", pnginfo=info)
    data = (tmp_path / "plot.png").read_bytes()
    (tmp_path / "plot.png").write_bytes(data[: len(data) // 2])  # its pixels cut short: only decoding them would fail
    Image.fromarray(pattern_face(0, np.random.default_rng(1))).save(tmp_path / "face.png")
    assert [Path(p).name for p in list_images(tmp_path)] == ["face.png"]


def test_a_folder_listing_takes_every_photo_format_ferkit_reads(tmp_path):
    from ferkit.images import load_image
    from ferkit.sources import list_images

    Image.init()
    saveable = {suffix for suffix, format in Image.registered_extensions().items() if format in Image.SAVE}
    suffixes = [s for s in (".jpg", ".png", ".bmp", ".gif", ".tif", ".webp", ".pgm", ".ppm", ".tga", ".qoi", ".jp2")
                if s in saveable]  # Pillow writes QOI from 11.3 on
    assert ".pgm" in suffixes and ".tga" in suffixes
    for k, suffix in enumerate(suffixes):
        face = Image.fromarray(pattern_face(k, np.random.default_rng(k), size=60))
        (face if suffix == ".pgm" else face.convert("RGB")).save(tmp_path / f"face{k}{suffix}")
    listed = list_images(str(tmp_path))
    assert sorted(p.suffix for p in listed) == sorted(suffixes)
    assert all(load_image(p).size == (60, 60) for p in listed)
