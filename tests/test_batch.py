"""Many photos into one results folder through the Python API (`ferkit predict` on folders uses it)."""

import json

import numpy as np
import pytest
from PIL import Image

from conftest import pattern_face
from ferkit.batch import FolderBatch, list_batch_images
from ferkit.errors import FerkitError


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
    assert len(batch.todo) == 4 and len(batch.errors) == 1  # the glob matches nothing: one failed item
    sources = [result.source for result in batch.run()]
    assert sorted(sources) == sorted(str(p) for p in photos.rglob("*.*"))
    assert (batch.images, batch.faces, batch.failed) == (4, 3, 2)
    lines = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [line["source"] for line in lines] == sources
    assert sorted(p.name for p in (tmp_path / "out").glob("*.annotated.jpg")) == ["a-2.annotated.jpg", "a.annotated.jpg", "b.annotated.jpg"]


def test_an_earlier_batch_is_continued_or_replaced_only_when_asked(trained_run, photos, tmp_path):
    out = tmp_path / "out"
    list(FolderBatch([photos], out, model=trained_run, detector="none").run())
    with pytest.raises(FerkitError, match="results of an earlier batch"):
        FolderBatch([photos], out, model=trained_run, detector="none")
    resumed = FolderBatch([photos], out, model=trained_run, detector="none", resume=True)
    assert resumed.skipped == 3 and [p.name for p in resumed.todo] == ["broken.jpg"]  # failures are tried again
    assert len(list(resumed.run())) == 1
    assert (out / "results.jsonl").read_text().count("\n") == 4
    replaced = FolderBatch([photos], out, model=trained_run, detector="none", overwrite=True)
    assert replaced.skipped == 0 and len(replaced.todo) == 4
    with pytest.raises(FerkitError, match="give one"):
        FolderBatch([photos], out, model=trained_run, resume=True, overwrite=True)


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
