import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import FER2013, needs_fer2013, pattern_face, write_pattern_dataset
from ferkit.data import load_dataset, load_fer2013_csv, load_folder, split_dataset
from ferkit.data.cache import cache_dir, cache_files
from ferkit.data.crops import crop_faces
from ferkit.errors import FerkitError
from ferkit.labels import EMOTIONS, FER2013_CSV_CODES


def test_folder_names_match_loosely_and_keep_the_emotion_order(tmp_path):
    names = ["Anger", "DISGUSTED", "fearful", "Happiness", "neutral", "Sadness", "surprised"]
    write_pattern_dataset(tmp_path, 3, folder_names=names)
    data = load_folder(tmp_path)
    assert data.classes == EMOTIONS
    assert data.class_counts() == {name: 3 for name in EMOTIONS}
    assert data.images.shape == (21, 48, 48) and data.images.dtype == np.uint8
    assert repr(data) == f"FaceDataset(21 faces of 48x48, classes {list(EMOTIONS)}, source={str(tmp_path)!r})"
    # each image is labelled by the folder it came from
    for path, label in zip(data.paths, data.labels):
        assert names[label] in path


def test_two_folders_of_one_class_are_read_as_one_and_said_so(tmp_path, caplog):
    write_pattern_dataset(tmp_path, 2)
    shutil.copytree(tmp_path / "happy", tmp_path / "Happiness")
    with caplog.at_level("WARNING", logger="ferkit"):
        data = load_folder(tmp_path, cache=False)
    assert data.class_counts()["happy"] == 4
    assert "folders Happiness, happy in" in caplog.text and "all hold the class happy" in caplog.text


def test_any_common_format_loads(tmp_path):
    rng = np.random.default_rng(0)
    for i, suffix in enumerate([".jpg", ".png", ".bmp", ".gif", ".tif", ".webp"]):
        folder = tmp_path / EMOTIONS[i]
        folder.mkdir()
        Image.fromarray(pattern_face(i, rng, size=60)).convert("RGB").save(folder / f"x{suffix}")
    data = load_folder(tmp_path)
    assert len(data) == 6 and data.image_size == (48, 48)


def test_unknown_folders_are_named_or_kept_with_an_explicit_class_list(tmp_path):
    write_pattern_dataset(tmp_path, 2, folder_names=["happy", "contempt", "weird"])
    with pytest.raises(FerkitError, match="contempt, weird"):
        load_folder(tmp_path)
    (tmp_path / "weird").rename(tmp_path / "sad")
    data = load_folder(tmp_path, classes=[*EMOTIONS, "contempt"])
    assert data.classes[-1] == "contempt"
    assert data.class_counts()["contempt"] == 2 and data.class_counts()["angry"] == 0


def test_unreadable_files_are_skipped_with_one_warning(tmp_path, caplog):
    write_pattern_dataset(tmp_path, 3, folder_names=["happy", "sad"])
    (tmp_path / "happy" / "empty.jpg").write_bytes(b"")
    (tmp_path / "sad" / "notes.txt").write_text("not an image")
    (tmp_path / "sad" / "half.png").write_bytes((tmp_path / "sad" / "sad_0.png").read_bytes()[:60])
    os.symlink(tmp_path / "moved.png", tmp_path / "happy" / "gone.png")  # a link whose face was moved away
    with caplog.at_level(logging.WARNING, logger="ferkit"):
        data = load_folder(tmp_path)
    assert len(data) == 6
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 4" in warnings[0].getMessage()
    assert {p.split("/")[-1] for p, _ in data.skipped} == {"empty.jpg", "notes.txt", "half.png", "gone.png"}
    assert dict(data.skipped)[str(tmp_path / "happy" / "gone.png")] == "a link to a file that does not exist"
    (tmp_path / "only-links" / "sad").mkdir(parents=True)
    os.symlink(tmp_path / "moved.png", tmp_path / "only-links" / "sad" / "gone.png")
    with pytest.raises(FerkitError, match=r"holds no image files in its class folders \(only 1 link\(s\) to files that"):
        load_folder(tmp_path / "only-links")


def test_images_outside_the_class_folders_are_said_to_be_left_out(tmp_path, caplog):
    write_pattern_dataset(tmp_path, 3, folder_names=["happy", "sad"])
    shutil.copy(tmp_path / "sad" / "sad_0.png", tmp_path / "new.face1.png")  # a crop written in no class folder
    with caplog.at_level(logging.WARNING, logger="ferkit"):
        data = load_folder(tmp_path)
    assert len(data) == 6
    assert f"1 image(s) at the top of {tmp_path}, in no class folder, are left out (e.g. new.face1.png)" in caplog.text


@pytest.mark.parametrize("layout", ["missing", "empty", "no-images"])
def test_unusable_folders_raise(tmp_path, layout):
    if layout == "empty":
        (tmp_path / "data").mkdir()
    if layout == "no-images":
        (tmp_path / "data" / "happy").mkdir(parents=True)
    with pytest.raises(FerkitError):
        load_dataset(tmp_path / "data")


def test_second_load_comes_from_the_cache(tmp_path, monkeypatch):
    import ferkit.data.folder

    write_pattern_dataset(tmp_path, 4)
    first = load_folder(tmp_path)
    cached = list((cache_dir() / "datasets").glob("*.npz"))
    assert len(cached) == 1

    def decoded_again(*args, **kwargs):
        raise AssertionError("the files were decoded again")

    monkeypatch.setattr(ferkit.data.folder, "_decode_files", decoded_again)
    second = load_folder(tmp_path)
    assert np.array_equal(first.images, second.images) and np.array_equal(first.labels, second.labels)
    assert not second.skipped


def test_files_of_one_size_swapped_with_their_times_set_back_are_read_again(tmp_path):
    """BMP files all have one size; an archive's extraction (or rsync -t) sets their times back: the cache
    gave the faces they held before, under the other's label."""
    for name, grey in (("happy/a.bmp", 30), ("sad/b.bmp", 220)):
        (tmp_path / name).parent.mkdir()
        Image.fromarray(np.full((48, 48), grey, np.uint8)).save(tmp_path / name)
        os.utime(tmp_path / name, ns=(10**18, 10**18))
    first = load_folder(tmp_path)
    (tmp_path / "happy" / "a.bmp").rename(tmp_path / "a.bmp")
    (tmp_path / "sad" / "b.bmp").rename(tmp_path / "happy" / "a.bmp")
    (tmp_path / "a.bmp").rename(tmp_path / "sad" / "b.bmp")
    second = load_folder(tmp_path)
    happy = list(first.classes).index("happy")
    assert first.images[first.labels == happy].mean() == 30 and second.images[second.labels == happy].mean() == 220


def test_cache_notices_changed_files(tmp_path):
    write_pattern_dataset(tmp_path, 2)
    assert len(load_folder(tmp_path)) == 14
    Image.fromarray(pattern_face(0, np.random.default_rng(5))).save(tmp_path / "angry" / "new.png")
    assert len(load_folder(tmp_path)) == 15
    assert len(cache_files()) == 1  # the copy of the folder before the new file is gone: never read again
    load_folder(tmp_path, image_size=(40, 40))
    assert len(cache_files()) == 2  # the same folder at another size is another dataset


def test_a_file_skipped_for_its_permissions_is_read_once_they_allow_it(tmp_path):
    import subprocess
    import sys

    write_pattern_dataset(tmp_path / "faces", 2, folder_names=("happy", "sad"))
    prefix = []
    if os.geteuid() == 0:  # root reads anything: run without the capabilities that let it
        if not shutil.which("setpriv"):
            pytest.skip("running as root without setpriv, so file permissions do not apply")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]
    locked = tmp_path / "faces" / "happy" / "happy_0.png"

    def pack(out):
        command = [*prefix, sys.executable, "-m", "ferkit.cli", "pack", str(tmp_path / "faces"), str(tmp_path / out)]
        return subprocess.run(command, capture_output=True, text=True, env={**os.environ, "FERKIT_CACHE_DIR": str(cache_dir())})

    locked.chmod(0)
    try:
        first = pack("p1")
    finally:
        locked.chmod(0o644)
    assert first.returncode == 0 and f"{locked} (permission denied)" in first.stderr and "packed 3 faces" in first.stdout
    cached = sorted((cache_dir() / "datasets").glob("*.npz"))
    assert len(cached) == 1  # the three faces read are cached all the same
    os.utime(cached[0], (0, 0))
    second = pack("p2")
    assert second.returncode == 0 and "skipped" not in second.stderr and "packed 4 faces" in second.stdout
    assert len(list((cache_dir() / "datasets").glob("*.npz"))) == 1  # the one before, replaced
    fresh = load_folder(tmp_path / "faces", cache=False)
    again = load_folder(tmp_path / "faces")
    assert again.paths == fresh.paths and np.array_equal(again.images, fresh.images)


def test_a_higher_pixel_limit_set_at_run_time_reads_the_image_it_skipped(tmp_path, monkeypatch):
    from ferkit import images

    write_pattern_dataset(tmp_path, 1, folder_names=("happy", "sad"))
    Image.new("L", (300, 200), 128).save(tmp_path / "sad" / "large.png")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 50_000)
    assert len(load_folder(tmp_path)) == 2
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100_000)
    assert len(load_folder(tmp_path)) == 3


def _write_csv(path, rows):
    lines = ["emotion,pixels,Usage"] + [f"{code},{' '.join(map(str, pixels))},{usage}" for code, pixels, usage in rows]
    path.write_text("\n".join(lines) + "\n")


def test_fer2013_csv_codes_map_to_class_names(tmp_path):
    rng = np.random.default_rng(0)
    rows = [(code, rng.integers(0, 256, 2304), usage) for code in range(7) for usage in ("Training", "PublicTest")]
    _write_csv(tmp_path / "fer.csv", rows)
    train = load_fer2013_csv(tmp_path / "fer.csv", usage="Training")
    assert len(train) == 7
    names = [train.classes[label] for label in train.labels]
    assert names == [FER2013_CSV_CODES[code] for code in range(7)]
    # images come through unchanged
    assert np.array_equal(train.images[0].ravel(), rows[0][1])
    assert len(load_dataset(tmp_path / "fer.csv")) == 14
    # as Excel saves a CSV: a byte-order mark before the header
    (tmp_path / "excel.csv").write_bytes(b"\xef\xbb\xbf" + (tmp_path / "fer.csv").read_bytes())
    assert np.array_equal(load_fer2013_csv(tmp_path / "excel.csv", usage="Training").images, train.images)
    # without a Usage column (Kaggle's train.csv): every row, whatever usage is asked for
    lines = (tmp_path / "fer.csv").read_text().splitlines()
    (tmp_path / "plain.csv").write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
    assert len(load_fer2013_csv(tmp_path / "plain.csv", usage="Training")) == 14


def test_a_usage_column_left_empty_selects_no_row_of_a_usage_but_all_rows_for_none(tmp_path, caplog):
    """Only a CSV without the column is read whole whatever usage is asked: one whose column is blank
    holds no PublicTest rows, so it cannot validate a run that trains on all of it."""
    rng = np.random.default_rng(0)
    _write_csv(tmp_path / "blank.csv", [(code, rng.integers(0, 256, 2304), "") for code in range(7)])
    with caplog.at_level("WARNING", logger="ferkit"), pytest.raises(FerkitError, match="no rows with usage PublicTest"):
        load_fer2013_csv(tmp_path / "blank.csv", usage="PublicTest")
    assert "7 rows have no known Usage" in caplog.text
    assert len(load_fer2013_csv(tmp_path / "blank.csv")) == 7


def test_a_row_of_no_known_usage_is_named_by_its_line_past_malformed_rows(tmp_path, caplog):
    face = " ".join(["128"] * 2304)
    lines = ["emotion,pixels,Usage", "3,1 2 3,Training", f"3,{face},Training", f"4,{face},Weird"]
    (tmp_path / "fer.csv").write_text("\n".join(lines) + "\n")
    with caplog.at_level("WARNING", logger="ferkit"):
        assert len(load_fer2013_csv(tmp_path / "fer.csv", usage="Training", cache=False)) == 1
    assert "1 rows have no known Usage and are left out (e.g. line 4: 'Weird')" in caplog.text


def test_csv_usages_match_in_any_case_and_rows_of_no_known_usage_are_reported(tmp_path, caplog):
    rng = np.random.default_rng(0)
    rows = [(code, rng.integers(0, 256, 2304), usage) for code in range(7) for usage in ("training", "PUBLICTEST", "")]
    _write_csv(tmp_path / "fer.csv", rows)
    with caplog.at_level("WARNING", logger="ferkit"):
        assert len(load_fer2013_csv(tmp_path / "fer.csv", usage="PublicTest")) == 7
    assert "7 rows have no known Usage" in caplog.text
    assert len(load_fer2013_csv(tmp_path / "fer.csv", usage="publictest")) == 7
    with pytest.raises(FerkitError, match="unknown FER2013 usage bogus"):
        load_fer2013_csv(tmp_path / "fer.csv", usage="bogus")


@pytest.mark.parametrize("size", [(40, 40), (64, 64)])
def test_a_csv_and_a_folder_of_the_same_faces_load_alike_at_another_size(tmp_path, size):
    """Both are resized as predict resizes a face, so training at another size sees what inference will."""
    rng = np.random.default_rng(1)
    faces = [pattern_face(code, rng) for code in range(7)]
    _write_csv(tmp_path / "fer.csv", [(code, face.ravel(), "Training") for code, face in enumerate(faces)])
    for code, face in enumerate(faces):
        (tmp_path / "faces" / FER2013_CSV_CODES[code]).mkdir(parents=True)
        Image.fromarray(face).save(tmp_path / "faces" / FER2013_CSV_CODES[code] / "face.png")
    from_csv = load_fer2013_csv(tmp_path / "fer.csv", usage="Training", image_size=size)
    from_folder = load_folder(tmp_path / "faces", image_size=size, cache=False)
    by_class = np.argsort(from_csv.labels)
    assert from_csv.images.shape == (7, *size)
    assert np.array_equal(from_csv.images[by_class], from_folder.images[np.argsort(from_folder.labels)])


@pytest.mark.parametrize(
    "row, message",
    [("3,1 2 3,Training", "line 3: expected 2304"), ("9,{px},Training", "code 9"), ("x,{px},Training", "not a number"),
     ("3,99999999999999999999 {px},Training", "not whole numbers"),  # past 64 bits
     ("3", "line 3: the row has no pixels column")],
)
def test_malformed_csv_rows_are_left_out_naming_their_line(tmp_path, row, message, caplog):
    pixels = " ".join(["7"] * 2304)
    (tmp_path / "bad.csv").write_text(f"emotion,pixels,Usage\n0,{pixels},Training\n{row.format(px=pixels)}\n")
    for cached in (False, True):  # said again when the parsed rows come from the cache
        caplog.clear()
        with caplog.at_level("WARNING", logger="ferkit"):
            loaded = load_fer2013_csv(tmp_path / "bad.csv")
        assert len(loaded) == 1 and "1 malformed row left out (the first: line 3: " in caplog.text and message in caplog.text
    (tmp_path / "only-bad.csv").write_text(f"emotion,pixels,Usage\n{row.format(px=pixels)}\n")
    with pytest.raises(FerkitError, match=f"line 2: .*{message.removeprefix('line 3: ')}.*; no row is a face"):
        load_fer2013_csv(tmp_path / "only-bad.csv")


def test_a_csv_without_the_columns_is_refused(tmp_path):
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(FerkitError, match="not a FER2013 CSV"):
        load_dataset(tmp_path / "other.csv")


def test_split_is_stratified_and_repeatable(tmp_path):
    write_pattern_dataset(tmp_path, 10)
    data = load_folder(tmp_path)
    train_a, val_a = split_dataset(data, val_fraction=0.2, seed=3)
    train_b, val_b = split_dataset(data, val_fraction=0.2, seed=3)
    assert val_a.paths == val_b.paths
    assert set(val_a.class_counts().values()) == {2}
    assert len(train_a) + len(val_a) == len(data) and not set(train_a.paths) & set(val_a.paths)


def test_a_split_too_small_to_hold_every_class_says_what_would(tmp_path):
    write_pattern_dataset(tmp_path, 6)  # 42 faces, 7 classes: 10% is 5 faces
    with pytest.raises(FerkitError) as refused:
        split_dataset(load_folder(tmp_path), val_fraction=0.1)
    assert str(refused.value) == ("a validation split of 0.1 of 42 faces cannot hold each of their 7 classes; "
                                  "give validation faces with --val, or --val-split 0.17 or more")
    train_set, val_set = split_dataset(load_folder(tmp_path), val_fraction=0.17)
    assert min(val_set.class_counts().values()) >= 1 and len(train_set) + len(val_set) == 42


def test_a_class_of_one_face_is_refused_a_split_it_would_be_missing_from(tmp_path):
    write_pattern_dataset(tmp_path, 1, folder_names=["angry", "happy", "sad"])
    with pytest.raises(FerkitError, match="^angry, happy, sad have one face only, too few to split off validation faces"):
        split_dataset(load_folder(tmp_path), val_fraction=0.5)


@needs_fer2013()
def test_real_fer2013_val_loads_every_file():
    files = {c: len(list((FER2013 / "val" / c).iterdir())) for c in EMOTIONS}
    data = load_dataset(FER2013 / "val")
    assert data.class_counts() == files
    assert data.images.shape[1:] == (48, 48) and not data.skipped


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_a_damaged_cache_file_is_rebuilt_not_fatal(tmp_path, damage):
    write_pattern_dataset(tmp_path / "data", 3)
    first = load_folder(tmp_path / "data")
    [cached] = (cache_dir() / "datasets").glob("*.npz")
    content = cached.read_bytes()
    cached.write_bytes({"truncated": content[: len(content) // 2], "garbage": os.urandom(500), "empty": b""}[damage])
    again = load_folder(tmp_path / "data")
    assert np.array_equal(first.images, again.images)
    [rebuilt] = (cache_dir() / "datasets").glob("*.npz")
    assert rebuilt.read_bytes() == content


def test_the_cache_command_shows_and_clears_the_cache(tmp_path):
    from click.testing import CliRunner

    from ferkit.cli import cli

    write_pattern_dataset(tmp_path / "data", 2)
    load_folder(tmp_path / "data")
    datasets = cache_dir() / "datasets"
    (datasets / ".partial-k3j9x0.tmp").write_bytes(b"x" * 1000)  # writes cut short, by this version and earlier ones
    (datasets / "tmpa8_Zk2q1.tmp").write_bytes(b"x" * 1000)
    (datasets / "teacher-probs.npz").write_bytes(b"mine")  # not ferkit's
    shown = CliRunner().invoke(cli, ["cache"])
    assert shown.exit_code == 0 and "1 cached dataset" in shown.output
    size = sum(p.stat().st_size for p in datasets.iterdir() if p.name != "teacher-probs.npz")
    cleared = CliRunner().invoke(cli, ["cache", "clear"])
    assert cleared.exit_code == 0 and f"removed 1 cached dataset(s), {size / 1e6:.1f} MB" in cleared.output
    assert [p.name for p in datasets.iterdir()] == ["teacher-probs.npz"]


def test_a_cache_folder_that_is_a_file_is_said_to_be(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from ferkit.cli import cli

    (tmp_path / "cache").write_text("mine")
    monkeypatch.setenv("FERKIT_CACHE_DIR", str(tmp_path / "cache"))
    for args in (["cache"], ["cache", "clear"]):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2 and "is a file" in result.output
    assert (tmp_path / "cache").read_text() == "mine"


def test_subfolders_linked_in_are_read_and_a_link_back_up_does_not_loop(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    write_pattern_dataset(elsewhere, 2, folder_names=["happy", "sad"])
    data_root = tmp_path / "data"
    write_pattern_dataset(data_root, 3, folder_names=["happy", "sad"])
    os.symlink(elsewhere / "happy", data_root / "happy" / "more")  # a class's faces kept in another folder
    os.symlink(data_root / "sad", data_root / "sad" / "again")  # a link back up: a loop
    data = load_folder(data_root, cache=False)
    assert data.class_counts()["happy"] == 5 and data.class_counts()["sad"] == 3
    assert sum("more" in path for path in data.paths) == 2


def test_the_images_of_a_folder_include_linked_subfolders_and_leave_out_hidden_ones(tmp_path):
    from ferkit.sources import list_images

    photos, trip = tmp_path / "photos", tmp_path / "trip"
    for folder, names in ((photos, ["a.jpg", ".hidden.jpg"]), (trip, ["b.png", "c.JPG"])):
        folder.mkdir()
        for name in names:
            Image.new("RGB", (8, 8)).save(folder / name, format="PNG" if name.endswith(".png") else "JPEG")
    os.symlink(trip, photos / "trip")
    (photos / ".thumbnails").mkdir()
    Image.new("RGB", (8, 8)).save(photos / ".thumbnails" / "d.jpg")
    assert [p.relative_to(photos).as_posix() for p in list_images(str(photos))] == ["a.jpg", "trip/b.png", "trip/c.JPG"]


def test_heic_faces_skipped_without_the_extra_are_read_once_it_is_installed(tmp_path):
    """The dataset cache must not replay "needs the heic extra" after pillow-heif is installed."""
    import subprocess
    import sys

    from ferkit.images import enable_heif

    if not enable_heif():
        pytest.skip("ferkit[heic] (pillow-heif) is not installed")
    (tmp_path / "happy").mkdir()
    face = Image.fromarray(pattern_face(3, np.random.default_rng(0)))
    face.save(tmp_path / "happy" / "a.png")
    face.convert("RGB").save(tmp_path / "happy" / "b.heic", format="HEIF")
    code = ("import sys\n{hide}from ferkit.data import load_folder\n"
            f"data = load_folder({str(tmp_path)!r})\nprint(len(data.labels), len(data.skipped))\n")
    runs = [subprocess.run([sys.executable, "-c", code.format(hide=hide)], capture_output=True, text=True)
            for hide in ("sys.modules['pillow_heif'] = None\n", "")]  # the extra missing, then installed
    assert [run.stdout.split() for run in runs] == [["1", "1"], ["2", "0"]], [run.stderr for run in runs]


@pytest.mark.parametrize("mode, suffix", [("L", "png"), ("P", "png"), ("RGBA", "png"), ("CMYK", "jpg")])
def test_a_picture_that_is_not_square_is_framed_as_predict_frames_it(trained_run, tmp_path, mode, suffix):
    from ferkit import analyze
    from ferkit.runtime import load_classifier

    face = pattern_face(3, np.random.default_rng(3), size=96)
    wide = np.concatenate([np.full((96, 40), 30, np.uint8), face, np.full((96, 70), 200, np.uint8)], axis=1)
    (tmp_path / "data" / "happy").mkdir(parents=True)
    picture = tmp_path / "data" / "happy" / f"wide.{suffix}"
    Image.fromarray(np.stack([wide, wide // 2, 255 - wide], axis=-1)).convert(mode).save(picture)
    dataset = load_dataset(tmp_path / "data", cache=False)
    classifier = load_classifier(trained_run)
    trained_on = classifier.predict_proba(dataset.images)[0]
    predicted = analyze(picture, model=classifier, detector="none")[0].probabilities
    assert np.allclose(trained_on, [predicted[name] for name in classifier.classes], atol=1e-6)


def test_one_fer2013_csv_trains_on_its_training_rows_and_packs_only_those(tmp_path):
    import json

    from click.testing import CliRunner

    from ferkit.cli import cli
    from ferkit.runs import RunState

    rng = np.random.default_rng(0)
    rows = [(code, rng.integers(0, 256, 2304), usage) for code in range(7)
            for usage in ("Training", "Training", "PublicTest", "PrivateTest")]
    _write_csv(tmp_path / "fer.csv", rows)
    runner = CliRunner()
    # the same CSV as --data and --val: its Training rows train and its PublicTest rows validate
    trained = runner.invoke(cli, ["train", "--data", str(tmp_path / "fer.csv"), "--val", str(tmp_path / "fer.csv"),
                                  "--epochs", "1", "--batch-size", "8", "--out", str(tmp_path / "run")])
    assert trained.exit_code == 0, trained.output
    assert RunState.load(tmp_path / "run").epochs_done == 1
    sizes = json.loads((tmp_path / "run" / "datasets.json").read_text())
    assert sum(sizes["train"].values()) == 14 and sum(sizes["val"].values()) == 7
    # a folder given twice is refused as before
    write_pattern_dataset(tmp_path / "faces", per_class=2)
    same = runner.invoke(cli, ["train", "--data", str(tmp_path / "faces"), "--val", str(tmp_path / "faces"),
                               "--epochs", "1", "--out", str(tmp_path / "run2")])
    assert same.exit_code == 2 and "--val is the training data itself" in same.output
    # packing a CSV keeps its Training rows, unless asked for all
    packed = runner.invoke(cli, ["pack", str(tmp_path / "fer.csv"), str(tmp_path / "packed")])
    assert packed.exit_code == 0 and "packed 14 faces (Training rows)" in packed.output, packed.output
    assert len(load_dataset(tmp_path / "packed")) == 14
    every = runner.invoke(cli, ["pack", str(tmp_path / "fer.csv"), str(tmp_path / "every"), "--usage", "all"])
    assert every.exit_code == 0 and len(load_dataset(tmp_path / "every")) == 28, every.output
    # evaluating on the rows it trained on is said; on its validation rows, not
    csv = str(tmp_path / "fer.csv")
    for usage, warned in (("Training", True), ("PublicTest", False)):
        result = runner.invoke(cli, ["evaluate", str(tmp_path / "run"), "--data", csv, "--usage", usage,
                                     "--out", str(tmp_path / f"eval-{usage}")])
        assert result.exit_code == 0, result.output
        assert ("is the data" in result.output and "was trained on" in result.output) == warned, result.output
    # and so are packed copies of those rows: the pack records what it was packed from, through a pack of a pack
    public = runner.invoke(cli, ["pack", csv, str(tmp_path / "public"), "--usage", "PublicTest"])
    assert public.exit_code == 0, public.output
    assert runner.invoke(cli, ["pack", str(tmp_path / "packed"), str(tmp_path / "repacked")]).exit_code == 0
    from ferkit.data.packed import pack_dataset

    pack_dataset(load_dataset(tmp_path / "every"), tmp_path / "from-api")  # a FaceDataset knows its source
    for copy, warned in (("packed", True), ("every", True), ("public", False), ("repacked", True), ("from-api", True)):
        result = runner.invoke(cli, ["evaluate", str(tmp_path / "run"), "--data", str(tmp_path / copy),
                                     "--out", str(tmp_path / f"eval-{copy}")])
        assert result.exit_code == 0, result.output
        assert ("is the data" in result.output and "was trained on" in result.output) == warned, (copy, result.output)
    # a CSV without a Usage column trains on every row: its PublicTest rows are none of its own
    from ferkit.config import TrainConfig
    from ferkit.runs import trained_on

    lines = (tmp_path / "fer.csv").read_text().splitlines()
    (tmp_path / "plain.csv").write_text("\n".join(line.rsplit(",", 1)[0] for line in lines) + "\n")
    (tmp_path / "plain-run").mkdir()
    TrainConfig(data=str(tmp_path / "plain.csv")).save(tmp_path / "plain-run" / "config.json")
    assert trained_on(tmp_path / "plain-run" / "best.keras", tmp_path / "plain.csv", usage="PublicTest")
    assert trained_on(tmp_path / "run" / "best.keras", tmp_path / "fer.csv", usage="PublicTest") is None


def test_photos_given_as_a_dataset_are_said_to_be_photos_and_their_face_crops_are_not(tmp_path, caplog):
    people = Path(__file__).resolve().parents[1] / "examples" / "people.jpg"
    photos = tmp_path / "photos"
    for label in ("happy", "sad"):
        (photos / label).mkdir(parents=True)
        shutil.copy(people, photos / label / "people.jpg")
    with caplog.at_level(logging.WARNING, logger="ferkit"):
        load_folder(photos, cache=False)
    assert (f"2 of 2 images checked in {photos} look like photos, not face crops (happy/people.jpg: 3 faces); each "
            f"image is taken whole as one face: `ferkit crop {photos} --out FACES`") in caplog.text

    crop_faces(photos, tmp_path / "faces")
    crops = sorted((tmp_path / "faces").rglob("*.png")) + sorted((tmp_path / "faces").rglob("*.jpg"))
    assert len(crops) == 6
    for crop in crops:  # larger than face crops usually are, so the detector does look at them
        with Image.open(crop) as image:
            image.resize((256, 256)).save(crop)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ferkit"):
        assert len(load_folder(tmp_path / "faces", cache=False)) == 6
    assert "look like photos" not in caplog.text


def test_a_csv_row_with_a_stray_quote_is_named_by_the_lines_it_spans_and_an_endless_field_in_one_line(tmp_path, caplog):
    pixels = " ".join(["7"] * 2304)
    rows = [f"0,{pixels},Training", f'0,"{pixels},Training', f'0,{pixels}",Training', f"9,{pixels},Training"]
    (tmp_path / "stray.csv").write_text("emotion,pixels,Usage\n" + "\n".join(rows) + "\n")  # lines 3-4: one field
    with caplog.at_level("WARNING", logger="ferkit"):
        loaded = load_fer2013_csv(tmp_path / "stray.csv")
    assert len(loaded) == 1 and "2 malformed rows left out (the first: line 3-4: " in caplog.text
    (tmp_path / "code.csv").write_text("emotion,pixels,Usage\n" + "\n".join(rows[1:]) + "\n")
    with pytest.raises(FerkitError, match="line 2-3: "):  # the row after it is counted from its own line
        load_fer2013_csv(tmp_path / "code.csv")
    from ferkit.data.fer2013_csv import MAX_FIELD

    (tmp_path / "endless.csv").write_text(f'emotion,pixels,Usage\n0,"{"7 " * (MAX_FIELD // 2 + 1)}\n')
    with pytest.raises(FerkitError, match=r"endless.csv, line 2: field larger than field limit"):
        load_fer2013_csv(tmp_path / "endless.csv")


def test_a_csv_of_larger_faces_is_refused_by_their_pixel_count(tmp_path):
    (tmp_path / "large.csv").write_text("emotion,pixels\n" + f"3,{' '.join(['100'] * 200 * 200)}\n")
    with pytest.raises(FerkitError, match="line 2: expected 2304 pixel values, got 40000"):
        load_fer2013_csv(tmp_path / "large.csv")


def test_classes_given_in_another_case_or_by_an_alias_load_a_csv_and_a_pack_as_a_folder(tmp_path):
    from ferkit.data.packed import pack_dataset

    rng = np.random.default_rng(0)
    _write_csv(tmp_path / "fer.csv", [(code, rng.integers(0, 256, 2304), "Training") for code in range(7)])
    named = ["Anger", "disgust", "FEAR", "happiness", "neutral", "sadness", "surprised", "contempt"]
    csv_faces = load_dataset(tmp_path / "fer.csv", classes=named)
    assert csv_faces.classes == (*EMOTIONS, "contempt") and len(csv_faces) == 7
    packed = pack_dataset(tmp_path / "fer.csv", tmp_path / "packed")
    assert load_dataset(packed, classes=named).class_counts() == csv_faces.class_counts()
    with pytest.raises(FerkitError, match="the classes name happy more than once"):
        load_dataset(tmp_path / "fer.csv", classes=[*EMOTIONS, "Happy"])


def test_an_alias_named_beside_its_class_is_a_class_of_its_own(tmp_path, caplog):
    write_pattern_dataset(tmp_path, 2, folder_names=("neutral", "Calm", "happy"))  # as RAVDESS tells them apart
    with caplog.at_level("WARNING", logger="ferkit"):
        merged = load_folder(tmp_path)
    assert merged.class_counts()["neutral"] == 4 and "Calm, neutral" in caplog.text
    apart = load_dataset(tmp_path, classes=["neutral", "calm", "happy"])
    assert apart.classes == ("neutral", "calm", "happy") and list(apart.class_counts().values()) == [2, 2, 2]
    assert [Path(apart.paths[i]).parent.name for i in np.flatnonzero(apart.labels == 1)] == ["Calm", "Calm"]
    caplog.clear()
    with caplog.at_level("INFO", logger="ferkit"):
        assert load_dataset(tmp_path, classes=["calm", "happy"]).classes == ("neutral", "happy")  # alone, still an alias
    assert "classes taken by their usual names: calm as neutral" in caplog.text  # and said so


def test_the_cache_size_leaves_out_files_removed_meanwhile(tmp_path):
    from ferkit.data.cache import files_size

    (tmp_path / "a.npz").write_bytes(b"x" * 10)
    assert files_size([tmp_path / "a.npz", tmp_path / "gone.npz"]) == 10
