"""The CLI in-process, on real files: what a user types and what they see."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import pattern_face, write_pattern_dataset
from ferkit.cli import cli
from ferkit.labels import EMOTIONS, FER2013_CSV_CODES
from ferkit.runs import RunState


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_models_lists_and_shows_the_layer_table():
    from ferkit.runtime import shipped_models

    listing = run("models")
    assert listing.exit_code == 0 and "seed-cnn" in listing.output
    # the first column's cells in order, so that a name folded over two lines reads whole again
    cells = "".join(line.split("│")[1].strip() for line in listing.output.splitlines() if line.startswith("│"))
    assert all(name in cells for name in shipped_models())  # whole names, even in 80 columns
    for args in (["models", "seed*"], ["models", "list", "seed*"]):  # a pattern with or without `list`
        matching = run(*args)
        assert matching.exit_code == 0 and "seed-cnn" in matching.output and "resnet" not in matching.output
    assert "no model matches 'nothing'" in _one_line_error(run("models", "nothing"))
    shown = run("models", "show", "seed-cnn")
    assert shown.exit_code == 0
    for count in ("422,375", "416", "4,128", "410,112", "3,591"):
        assert count in shown.output
    from ferkit.runtime import shipped_model

    shipped = run("models", "show", "default")  # what a model file, run folder or shipped model is
    assert shipped.exit_code == 0 and shipped_model()["model"] in shipped.output
    assert "angry, disgust, fear, happy, neutral, sad, surprise" in shipped.output and "central 40x40 crop" in shipped.output
    assert "/root/" not in shipped.output and "keeps the float model's top class" in shipped.output


def test_models_show_tells_what_a_users_run_is(trained_run):
    shown = run("models", "show", trained_run)
    assert shown.exit_code == 0, shown.output
    assert "seed-cnn" in shown.output and "48x48x3" in shown.output and "epoch" in shown.output
    assert "unknown model 'no-such-thing'" in _one_line_error(run("models", "show", "no-such-thing"))


def test_a_runs_export_is_what_models_show_describes_and_evaluate_names(trained_run, pattern_data, tmp_path):
    import shutil

    copy = shutil.copytree(trained_run, tmp_path / "run")
    exported = run("export", copy, "--onnx", "--tta", "flip")
    assert exported.exit_code == 0, exported.output
    shown = run("models", "show", copy)  # what predict runs: the export, with its flip
    assert shown.exit_code == 0, shown.output
    values = "".join(line.split("│")[2].strip() for line in shown.output.splitlines() if line.startswith("│"))
    assert f"{copy / 'best.onnx'}seed-cnn" in values and "flip" in values, shown.output  # its whole path, folded
    scored = run("evaluate", copy, "--data", pattern_data / "val", "--out", tmp_path / "eval")
    assert scored.exit_code == 0, scored.output
    assert (f"ferkit predict runs its export {copy / 'best.onnx'} (flip test-time augmentation): evaluate "
            f"{copy / 'best.onnx'} to score that") in " ".join(scored.output.split())


def test_output_piped_into_a_reader_that_stops_ends_quietly():
    # `ferkit models | head -1`: the reader is gone before ferkit writes
    process = subprocess.Popen([sys.executable, "-m", "ferkit", "models"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()
    assert process.wait(timeout=120) == 141 and process.stderr.read() == b""


def test_train_evaluate_predict_end_to_end(pattern_data, tmp_path):
    out = tmp_path / "run"
    trained = run("train", "--data", pattern_data / "train", "--val", pattern_data / "val",
                  "--epochs", 3, "--augment", "flip,zoom", "--out", out)
    assert trained.exit_code == 0, trained.output
    assert "best val accuracy" in trained.output and (out / "best.keras").exists()

    evaluated = run("evaluate", out, "--data", pattern_data / "val")
    assert evaluated.exit_code == 0, evaluated.output
    for name in EMOTIONS:
        assert name in evaluated.output
    assert "macro-F1" in evaluated.output
    assert (out / "eval-val" / "confusion_matrix.png").exists()
    assert len([line for line in evaluated.output.splitlines() if line.startswith("calibration: ECE ")]) == 1
    assert (out / "eval-val" / "reliability_diagram.png").exists()
    import base64

    embedded = base64.b64encode((out / "eval-val" / "reliability_diagram.png").read_bytes()).decode()
    assert f'src="data:image/png;base64,{embedded}"' in (out / "eval-val" / "report.html").read_text()  # a page on its own

    as_json = run("evaluate", out, "--data", pattern_data / "val", "--json")
    metrics = json.loads(as_json.output)
    assert len(metrics["confusion_matrix"]) == 7 and 0 <= metrics["accuracy"] <= 1
    assert 0 <= metrics["ece"] <= 1 and [row["confidence"] for row in metrics["confidence_levels"]][0] == 0.3
    assert metrics["samples"] == 7 * 8

    face = tmp_path / "face.jpg"
    Image.fromarray(pattern_face(3, np.random.default_rng(0))).resize((300, 300)).convert("RGB").save(face)
    predicted = run("predict", face, "--model", out, "--json", "--detector", "none", "--out", tmp_path / "p")
    assert predicted.exit_code == 0, predicted.output
    result = json.loads(predicted.output)
    assert list(result["faces"][0]["probabilities"]) == list(EMOTIONS)

    human = run("predict", face, "--model", out, "--detector", "none", "--out", tmp_path / "p")
    assert human.exit_code == 0 and "%" in human.output
    assert (tmp_path / "p" / "face.annotated.jpg").exists() and (tmp_path / "p" / "face.faces.json").exists()


def test_evaluate_a_fer2013_csv(trained_run, tmp_path):
    rng = np.random.default_rng(0)
    codes = {name: code for code, name in FER2013_CSV_CODES.items()}
    lines = ["emotion,pixels,Usage"]
    for label, name in enumerate(EMOTIONS):
        for _ in range(4):
            lines.append(f"{codes[name]},{' '.join(map(str, pattern_face(label, rng).ravel()))},PublicTest")
    (tmp_path / "fer.csv").write_text("\n".join(lines) + "\n")
    result = run("evaluate", trained_run, "--data", tmp_path / "fer.csv", "--json", "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["samples"] == 28


def test_evaluate_with_flip_tta_records_it(trained_run, pattern_data, tmp_path):
    plain = run("evaluate", trained_run, "--data", pattern_data / "val", "--json", "--out", tmp_path / "plain")
    flip = run("evaluate", trained_run, "--data", pattern_data / "val", "--json", "--tta", "flip", "--out", tmp_path / "flip")
    assert plain.exit_code == 0 and flip.exit_code == 0, flip.output
    assert json.loads(plain.output)["tta"] == "none" and json.loads(flip.output)["tta"] == "flip"
    # which epoch of the run made the model, as its best.keras records it
    epoch = RunState.load(trained_run).best_epoch
    assert json.loads(flip.output)["model_epoch"] == epoch
    assert f"{trained_run.name} (epoch {epoch}, flip TTA)" in (tmp_path / "flip" / "report.html").read_text()
    assert f"{trained_run.name} (epoch {epoch})" in run("evaluate", trained_run, "--data", pattern_data / "val", "--out", tmp_path / "plain",
                                     "--overwrite").output
    import shutil

    model = shutil.copy(trained_run / "best.keras", tmp_path / "best.keras")
    for extra in ([], ["--tta", "flip"]):  # without --out: a folder each, beside the model
        assert run("evaluate", model, "--data", pattern_data / "val", *extra).exit_code == 0
    assert sorted(p.name for p in tmp_path.glob("eval-*")) == ["eval-best-val", "eval-best-val-flip"]


def test_evaluate_never_replaces_reports_of_another_evaluation(trained_run, pattern_data, tmp_path):
    import shutil

    model = shutil.copy(trained_run / "best.keras", tmp_path / "best.keras")
    for name, keep in (("a", 8), ("b", 4)):  # two datasets whose last folder name is the same
        for folder in sorted((pattern_data / "val").iterdir()):
            (tmp_path / name / "val" / folder.name).mkdir(parents=True)
            for face in sorted(folder.iterdir())[:keep]:
                shutil.copy(face, tmp_path / name / "val" / folder.name)
    for data in ("a", "b", "a"):  # without --out: a folder each; the same evaluation again replaces its own
        result = run("evaluate", model, "--data", tmp_path / data / "val")
        assert result.exit_code == 0, result.output
    folders = sorted(tmp_path.glob("eval-*"))
    assert [f.name for f in folders] == ["eval-best-val", "eval-best-val-2"]
    assert [json.loads((f / "metrics.json").read_text())["samples"] for f in folders] == [7 * 8, 7 * 4]

    refused = run("evaluate", model, "--data", tmp_path / "b" / "val", "--out", folders[0])
    line = _one_line_error(refused)
    assert f"{folders[0]} holds the evaluation of" in line and f"on {tmp_path / 'a' / 'val'}" in line and "--overwrite" in line
    assert json.loads((folders[0] / "metrics.json").read_text())["samples"] == 7 * 8
    replaced = run("evaluate", model, "--data", tmp_path / "b" / "val", "--out", folders[0], "--overwrite")
    assert replaced.exit_code == 0 and json.loads((folders[0] / "metrics.json").read_text())["samples"] == 7 * 4

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "report.html").write_text("my own report")
    line = _one_line_error(run("evaluate", model, "--data", tmp_path / "a" / "val", "--out", mine))
    assert "holds files that are not a ferkit evaluation" in line
    assert (mine / "report.html").read_text() == "my own report" and sorted(p.name for p in mine.iterdir()) == ["report.html"]

    (tmp_path / "broken" / "happy").mkdir(parents=True)  # data that would fail as it loads: the folder is refused first
    (tmp_path / "broken" / "happy" / "face.jpg").write_text("not an image")
    line = _one_line_error(run("evaluate", model, "--data", tmp_path / "broken", "--out", folders[0]))
    assert f"{folders[0]} holds the evaluation of" in line


def test_usage_with_a_folder_dataset_is_refused_not_ignored(trained_run, pattern_data, tmp_path):
    line = _one_line_error(run("evaluate", trained_run, "--data", pattern_data / "val", "--usage", "PrivateTest",
                               "--out", tmp_path / "e"))
    assert "--usage selects rows of a FER2013 .csv file" in line and not (tmp_path / "e").exists()
    line = _one_line_error(run("pack", pattern_data / "val", tmp_path / "packed", "--usage", "Training"))
    assert "--usage" in line and not (tmp_path / "packed").exists()


def _one_line_error(result, code=2):
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.output
    return lines[0]


def test_bad_input_gives_one_line_and_an_exit_code(trained_run, tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.keras").write_text("not a model")
    pixels = " ".join(["1"] * 10)
    (tmp_path / "bad.csv").write_text(f"emotion,pixels,Usage\n0,{pixels},PublicTest\n")
    assert "no such" in _one_line_error(run("evaluate", trained_run, "--data", tmp_path / "nowhere"))
    assert "no class folders" in _one_line_error(run("evaluate", trained_run, "--data", tmp_path / "empty"))
    assert "line 2" in _one_line_error(run("evaluate", trained_run, "--data", tmp_path / "bad.csv"))
    zero = run("evaluate", trained_run, "--data", tmp_path / "bad.csv", "--batch-size", "0")
    assert zero.exit_code == 2 and "--batch-size" in zero.output and not (tmp_path / "eval-bad-PublicTest").exists()
    Image.new("RGB", (60, 60)).save(tmp_path / "x.png")
    assert "not a valid" in _one_line_error(run("predict", tmp_path / "x.png", "--model", tmp_path / "notes.keras"))
    assert "unknown model" in _one_line_error(run("train", "--model", "nope", "--data", tmp_path))
    assert "unknown augmentation" in _one_line_error(run("train", "--augment", "spin", "--data", tmp_path))
    (tmp_path / "text.jpg").write_text("hello")
    assert "not an image" in _one_line_error(run("predict", tmp_path / "text.jpg", "--model", trained_run, "--out", tmp_path / "p"))
    assert "offline" in _one_line_error(run("predict", "https://example.com/a.jpg", "--model", trained_run))
    assert "no such file" in _one_line_error(run("predict", tmp_path / "missing.jpg", "--model", trained_run))


def test_a_folder_reports_the_bad_item_and_goes_on(trained_run, tmp_path):
    folder = tmp_path / "photos"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "sub/b.png"]):
        Image.fromarray(pattern_face(i, np.random.default_rng(i))).save(folder / name)
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.txt").write_text("ignored: not an image name")
    out = tmp_path / "out"
    result = run("predict", folder, "--model", trained_run, "--detector", "none", "--out", out)
    assert result.exit_code == 1
    assert "empty file" in result.output and "3 images, 2 faces, 1 failed" in result.output
    rows = (out / "faces.csv").read_text().splitlines()
    assert len(rows) == 3 and rows[0].startswith("source,face,x,y,width,height")
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [("error" in r) for r in records] == [False, True, False]
    # a PNG of 20000x20000 pixels (its header: Pillow refuses to open it at all) is one bad item too
    import struct
    import zlib

    header = struct.pack(">IIBBBBB", 20000, 20000, 8, 0, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    (folder / "empty.png").write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b""))
    result = run("predict", folder, "--model", trained_run, "--detector", "none", "--out", tmp_path / "out-2")
    assert result.exit_code == 1 and "3 images, 2 faces, 1 failed" in result.output, result.output
    assert "empty.png is 20000x20000 pixels, over the limit" in result.output and "internal error" not in result.output


def test_a_results_folder_another_predict_is_writing_is_refused(trained_run, tmp_path):
    import fcntl
    import os

    for name in ("a.png", "b.png"):
        Image.fromarray(pattern_face(0, np.random.default_rng(0))).save(tmp_path / name)
    (tmp_path / "out").mkdir()
    holder = os.open(tmp_path / "out", os.O_RDONLY)  # as a `ferkit predict --out out` running elsewhere holds it
    try:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        args = ("predict", tmp_path / "a.png", tmp_path / "b.png", "--model", trained_run, "--detector", "none",
                "--out", tmp_path / "out")
        line = _one_line_error(run(*args))
        assert "is being written by another ferkit predict" in line and list((tmp_path / "out").iterdir()) == []
    finally:
        os.close(holder)
    assert run(*args).exit_code == 0  # free again


def test_a_file_name_with_a_line_break_stays_on_its_one_line(trained_run, tmp_path):
    (tmp_path / "photos").mkdir()
    Image.fromarray(pattern_face(0, np.random.default_rng(0))).save(tmp_path / "photos" / "good.png")
    (tmp_path / "photos" / "evil\nerror: all good.jpg").write_text("not an image")
    result = run("predict", tmp_path / "photos", "--model", trained_run, "--detector", "none", "--out", tmp_path / "o")
    errors = [line for line in result.output.splitlines() if line.startswith("error: ")]
    assert result.exit_code == 1 and len(errors) == 1 and "evil\\nerror: all good.jpg" in errors[0], result.output


def test_several_sources_go_on_past_a_missing_one(trained_run, tmp_path):
    good = tmp_path / "good.png"
    Image.fromarray(pattern_face(6, np.random.default_rng(0))).save(good)
    result = run("predict", tmp_path / "missing.png", good, "--model", trained_run, "--detector", "none",
                 "--json", "--out", tmp_path / "out")
    assert result.exit_code == 1 and "no such file" in result.output
    assert json.loads(result.output.strip().splitlines()[-1])["source"] == str(good)
    summary = run("predict", tmp_path / "missing.png", good, good, "--model", trained_run, "--detector", "none",
                  "--out", tmp_path / "out2")
    # the same photo given twice is analysed once
    assert summary.exit_code == 1 and "1 images, 1 faces, 0 failed, 1 source(s) not found or without images" in summary.output
    (tmp_path / "empty").mkdir()  # a folder without images is a source without images, not a failed image
    summary = run("predict", tmp_path / "empty", good, good, "--model", trained_run, "--detector", "none",
                  "--out", tmp_path / "out3")
    assert summary.exit_code == 1 and "1 images, 1 faces, 0 failed, 1 source(s) not found or without images" in summary.output


def test_one_photo_named_twice_is_one_photo(trained_run, tmp_path):
    photo = tmp_path / "face.png"
    Image.fromarray(pattern_face(3, np.random.default_rng(0))).save(photo)
    result = run("predict", photo, tmp_path / ".." / tmp_path.name / "face.png", "--model", trained_run,
                 "--box", "0,0,48,48", "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"face.faces.json", "face.annotated.jpg"}


def test_a_photo_with_no_face_says_so(trained_run, tmp_path):
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (240, 320, 3), dtype=np.uint8)).save(noise)
    result = run("predict", noise, "--model", trained_run, "--out", tmp_path / "out")
    assert result.exit_code == 0 and "no face found" in result.output
    assert json.loads((tmp_path / "out" / "noise.faces.json").read_text())["faces"] == []


def test_an_image_over_the_pixel_limit_is_refused(trained_run, tmp_path, monkeypatch):
    from ferkit import images

    Image.new("RGB", (500, 400)).save(tmp_path / "big.png")
    monkeypatch.setattr(images, "MAX_IMAGE_PIXELS", 100_000)
    line = _one_line_error(run("predict", tmp_path / "big.png", "--model", trained_run, "--out", tmp_path / "o"))
    assert "over the limit" in line


def _photo_folder_with_a_bad_file(folder: Path) -> Path:
    folder.mkdir()
    for i in range(3):
        Image.fromarray(pattern_face(i, np.random.default_rng(i))).save(folder / f"{i}.png")
    (folder / "bad.jpg").write_text("not an image")
    return folder


def _run_with_stderr_on_a_terminal(arguments, **popen) -> tuple[int, str]:
    """Exit code and what a terminal on stderr (where the progress bar shows) was sent."""
    import os
    import pty
    import subprocess
    import sys

    main, terminal = pty.openpty()
    command = [sys.executable, "-m", "ferkit.cli", *map(str, arguments)]
    process = subprocess.Popen(command, stderr=terminal, env={**os.environ, "COLUMNS": "100"}, **popen)
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the other end closed
            break
        if not chunk:
            break
        shown += chunk
    return process.wait(timeout=60), shown.decode(errors="replace")


def test_an_error_in_a_batch_on_a_terminal_is_printed_on_a_line_of_its_own(trained_run, tmp_path):
    import subprocess

    photos = _photo_folder_with_a_bad_file(tmp_path / "photos")
    code, shown = _run_with_stderr_on_a_terminal(
        ["predict", photos, "--model", trained_run, "--detector", "none", "--out", tmp_path / "o"], stdout=subprocess.DEVNULL)
    assert code == 1
    before = shown.split(f"error: {photos / 'bad.jpg'}")[0]
    assert "analysing images" in before
    assert before.endswith(("\n", "\x1b[2K")), repr(before[-80:])  # the bar's line cleared first, not glued onto


def test_json_lines_sent_to_a_file_leave_the_progress_bar_on_the_terminal(trained_run, tmp_path):
    photos = _photo_folder_with_a_bad_file(tmp_path / "photos")
    with open(tmp_path / "lines.jsonl", "w") as lines:
        code, shown = _run_with_stderr_on_a_terminal(
            ["predict", photos, "--model", trained_run, "--detector", "none", "--out", tmp_path / "o", "--json"], stdout=lines)
    assert code == 1
    assert "analysing images" in shown and "{" not in shown
    assert (tmp_path / "lines.jsonl").read_text() == (tmp_path / "o" / "results.jsonl").read_text()


def test_a_librarys_warning_is_one_line(trained_run, tmp_path):
    import io
    import subprocess
    import sys

    exif = Image.Exif()
    exif[0x010F], exif[0x0110] = "Camera", "Model"
    buffer = io.BytesIO()
    Image.fromarray(pattern_face(3, np.random.default_rng(3))).save(buffer, "JPEG", exif=exif.tobytes()[:-6] + b"\0\0")
    (tmp_path / "bad-exif.jpg").write_bytes(buffer.getvalue())  # Pillow warns while it reads the EXIF block
    command = [sys.executable, "-m", "ferkit.cli", "predict", str(tmp_path / "bad-exif.jpg"), "--model", str(trained_run),
               "--detector", "none", "--out", str(tmp_path / "o")]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines and all(line.startswith("WARNING: ") for line in lines), lines


def test_a_results_folder_that_cannot_be_made_is_named_as_such(trained_run, tmp_path, pattern_data):
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "results"
    photo = Path(__file__).resolve().parents[1] / "examples" / "people.jpg"
    line = _one_line_error(run("predict", photo, "--model", trained_run, "--detector", "none", "--out", out))
    assert line.startswith(f"error: cannot create the results folder {out}: ")
    line = _one_line_error(run("evaluate", trained_run, "--data", pattern_data / "val", "--out", out))
    assert line.startswith(f"error: cannot create the report folder {out}: ")


def test_a_model_file_that_cannot_be_written_is_refused_before_any_work(trained_run, pattern_data, tmp_path):
    (tmp_path / "a-file").write_text("")
    for command, name in (("export", "m.onnx"), ("ensemble", "e.keras"), ("teacher", "t.npz")):
        out = tmp_path / "a-file" / name
        args = {"export": [trained_run, "--onnx"], "ensemble": [trained_run, trained_run / "last.keras"],
                "teacher": [trained_run, "--data", pattern_data / "train"]}[command]
        line = _one_line_error(run(command, *args, "--out", out))
        assert line.startswith("error: cannot create the folder for ") and str(tmp_path / "a-file") in line, line
    assert list(tmp_path.iterdir()) == [tmp_path / "a-file"]


def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path):
    import subprocess
    import sys

    command = [sys.executable, "-m", "ferkit.cli", "--debug", "evaluate", str(tmp_path / "nope"), "--data", str(tmp_path)]
    shown = subprocess.run(command, capture_output=True, text=True)
    plain = subprocess.run([c for c in command if c != "--debug"], capture_output=True, text=True)
    assert shown.returncode == plain.returncode == 2
    assert "Traceback (most recent call last)" in shown.stderr and "ferkit.errors.FerkitError" in shown.stderr
    assert shown.stderr.rstrip().splitlines()[-1] == plain.stderr.strip()


def test_resume_refuses_other_flags(trained_run):
    assert "only --epochs" in _one_line_error(run("train", "--resume", trained_run, "--model", "seed-cnn"))
    assert "give one of them" in _one_line_error(run("train", "--resume", trained_run, "--overwrite"))
    before = (trained_run / "config.json").read_text()
    for epochs, words in (("0", "at least 1"), ("-3", "at least 1"), ("nan", "is not a valid integer")):
        assert words in _one_line_error(run("train", "--resume", trained_run, "--epochs", epochs))
    assert (trained_run / "config.json").read_text() == before


@pytest.mark.parametrize(("args", "words"), [
    (["train", "--zoom", "5"], "--zoom must be a fraction"), (["train", "--shift", "-2"], "--shift must be"),
    (["train", "--lr", "nan"], "--lr must be a finite number"), (["train", "--mixup", "inf"], "--mixup must be a finite"),
    (["train", "--weight-decay", "-1"], "--weight-decay must be"), (["train", "--classes", "happy,happy,sad"], "happy more than once"),
    (["train", "--augment", "flip,crop,flip"], "--augment names flip more than once"), (["train", "--classes", ","], "names no class"),
    (["train", "--seed", "-1"], "--seed must be a whole number from 0 to"), (["train", "--seed", str(2**32)], "not 4294967296"),
    (["serve", "--max-upload-mb", "nan"], "--max-upload-mb"), (["serve", "--max-video-mb", "inf"], "--max-video-mb"),
    (["evaluate", "--data", "x.csv", "--usage", "bogus"], "unknown FER2013 usage bogus"),
    (["pack", "x.csv", "out", "--usage", "bogus"], "unknown FER2013 usage bogus (choose from Training, PublicTest, PrivateTest or all)"),
])
def test_options_out_of_range_are_one_line_errors_before_any_work(args, words, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = run(*args, "--data", tmp_path) if args[0] == "train" else run(*args)
    assert words in _one_line_error(result) and result.exit_code == 2
    assert list(tmp_path.iterdir()) == []  # nothing written, nothing loaded


def test_a_run_stopped_before_its_first_epoch_says_to_resume_it(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    line = _one_line_error(run("evaluate", tmp_path / "run", "--data", tmp_path))
    assert "before the first epoch ended" in line and "--resume" in line


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["train", "--help"]])
def test_help_and_version(args):
    assert run(*args).exit_code == 0


def test_a_one_pixel_image_is_handled(trained_run, tmp_path):
    Image.new("RGB", (1, 1), (200, 10, 10)).save(tmp_path / "dot.png")
    detected = run("predict", tmp_path / "dot.png", "--model", trained_run, "--out", tmp_path / "a")
    assert detected.exit_code == 0 and "no face found" in detected.output
    whole = run("predict", tmp_path / "dot.png", "--model", trained_run, "--detector", "none", "--out", tmp_path / "b")
    assert whole.exit_code == 0 and "%" in whole.output


def test_annotated_copies_never_replace_the_photo(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.fromarray(pattern_face(3, np.random.default_rng(0))).convert("RGB").save("face.jpg")
    before = (tmp_path / "face.jpg").read_bytes()
    result = run("predict", "face.jpg", "--model", trained_run, "--detector", "none", "--out", ".")
    assert result.exit_code == 0
    assert (tmp_path / "face.jpg").read_bytes() == before and (tmp_path / "face.annotated.jpg").exists()


def test_a_users_photo_named_like_an_annotated_copy_is_analysed_and_never_written_over(trained_run, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, label in (("cat.jpg", 3), ("cat.annotated.jpg", 5)):
        Image.fromarray(pattern_face(label, np.random.default_rng(label))).convert("RGB").save(photos / name)
    before = (photos / "cat.annotated.jpg").read_bytes()
    result = run("predict", photos, "--model", trained_run, "--detector", "none", "--annotate", "--overwrite", "--out", photos)
    assert result.exit_code == 0, result.output
    assert "2 images" in result.output and (photos / "cat.annotated.jpg").read_bytes() == before
    assert {p.name for p in photos.iterdir() if p.suffix == ".jpg"} == {
        "cat.jpg", "cat.annotated.jpg", "cat-2.annotated.jpg", "cat.annotated.annotated.jpg"}


def test_a_batchs_json_lines_are_its_results_lines(trained_run, tmp_path):
    (tmp_path / "in").mkdir()
    for i in range(2):
        Image.fromarray(pattern_face(i, np.random.default_rng(i))).save(tmp_path / "in" / f"{i}.png")
    result = run("predict", tmp_path / "in", "--model", trained_run, "--detector", "none", "--annotate", "--json",
                 "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    printed = [json.loads(line) for line in result.stdout.splitlines()]
    written = [json.loads(line) for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert printed == written and [r["annotated"] for r in printed] == ["0.annotated.jpg", "1.annotated.jpg"]


def test_a_finished_batch_resumed_says_there_is_nothing_left(trained_run, tmp_path):
    (tmp_path / "in").mkdir()
    Image.fromarray(pattern_face(1, np.random.default_rng(1))).save(tmp_path / "in" / "a.png")
    args = ("predict", tmp_path / "in", "--model", trained_run, "--detector", "none", "--out", tmp_path / "o")
    assert run(*args).exit_code == 0
    again = run(*args, "--resume")
    assert again.exit_code == 0 and f"nothing left to do: all 1 images are in {tmp_path / 'o' / 'results.jsonl'}" in again.output


def test_a_batch_begun_before_its_run_was_exported_resumes_with_the_model_it_began_with(trained_run, tmp_path):
    import shutil

    model = shutil.copytree(trained_run, tmp_path / "run")
    (tmp_path / "in").mkdir()
    Image.fromarray(pattern_face(1, np.random.default_rng(1))).save(tmp_path / "in" / "a.png")
    args = ("predict", tmp_path / "in", "--model", model, "--detector", "none", "--out", tmp_path / "o")
    assert run(*args).exit_code == 0
    exported = run("export", model, "--onnx", "--tta", "flip")  # its own test-time augmentation, unlike the batch's
    assert exported.exit_code == 0 and (model / "best.onnx").is_file(), exported.output
    Image.fromarray(pattern_face(2, np.random.default_rng(2))).save(tmp_path / "in" / "b.png")
    again = run(*args, "--resume")
    assert again.exit_code == 0, again.output
    versions = [json.loads(line)["model_version"] for line in (tmp_path / "o" / "results.jsonl").read_text().splitlines()]
    assert len(versions) == 2 and versions[0] == versions[1] and "best.keras" in versions[0]
    from ferkit.batch import FolderBatch  # and so does the API's batch, given the run folder

    Image.fromarray(pattern_face(3, np.random.default_rng(3))).save(tmp_path / "in" / "c.png")
    batch = FolderBatch([tmp_path / "in"], tmp_path / "o", model=model, detector="none", resume=True)
    assert [r.model_version for r in batch.run()] == versions[:1]
    fresh = run("predict", tmp_path / "in", "--model", model, "--detector", "none", "--out", tmp_path / "new")
    assert fresh.exit_code == 0 and "best.onnx" in (tmp_path / "new" / "results.jsonl").read_text()


def test_no_face_in_a_small_picture_suggests_taking_it_as_the_face(trained_run, tmp_path):
    Image.new("L", (48, 48), 128).save(tmp_path / "crop.png")
    result = run("predict", tmp_path / "crop.png", "--model", trained_run, "--out", tmp_path / "o")
    assert result.exit_code == 0 and "no face found (a cropped face? --detector none takes the whole image" in result.output


def test_folder_annotations_with_the_same_name_do_not_collide(trained_run, tmp_path):
    for sub, name in (("a", "x.png"), ("b", "x.png"), ("c", "X.png")):  # X and x: one name on macOS and Windows
        (tmp_path / "in" / sub).mkdir(parents=True)
        Image.fromarray(pattern_face(1, np.random.default_rng(0))).save(tmp_path / "in" / sub / name)
    result = run("predict", tmp_path / "in", "--model", trained_run, "--detector", "none", "--annotate", "--out", tmp_path / "o")
    assert result.exit_code == 0
    assert {p.name for p in (tmp_path / "o").glob("*.jpg")} == {"x.annotated.jpg", "x-2.annotated.jpg", "X-3.annotated.jpg"}


def test_boxes_and_a_detector_are_alternatives(trained_run, tmp_path):
    Image.new("L", (100, 100), 90).save(tmp_path / "p.png")
    line = _one_line_error(run("predict", tmp_path / "p.png", "--model", trained_run, "--box", "10,10,40,40",
                               "--detector", "yunet", "--out", tmp_path / "o"))
    assert line == "error: --box gives the faces, so no detector looks for them; give --box or --detector"


def test_boxes_can_be_given_on_the_command_line(trained_run, tmp_path):
    canvas = np.full((100, 200), 90, np.uint8)
    canvas[10:58, 20:68] = pattern_face(0, np.random.default_rng(1))
    canvas[40:88, 130:178] = pattern_face(6, np.random.default_rng(2))
    Image.fromarray(canvas).save(tmp_path / "two.png")
    result = run("predict", tmp_path / "two.png", "--model", trained_run, "--box", "20,10,48,48",
                 "--box", "130,40,48,48", "--json", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    faces = json.loads(result.output)["faces"]
    assert [f["box"] for f in faces] == [[20, 10, 48, 48], [130, 40, 48, 48]]
    assert [f["emotion"] for f in faces] == ["angry", "surprise"]
    assert "four whole numbers" in _one_line_error(run("predict", tmp_path / "two.png", "--model", trained_run, "--box", "1,2"))


def _faces_of_varying_certainty(folder):
    """Pattern faces, blends of two patterns and noise: some faces the run is sure of, some it is not."""
    folder.mkdir()
    rng = np.random.default_rng(7)
    for i in range(7):
        Image.fromarray(pattern_face(i, rng)).save(folder / f"clear-{i}.png")
        blend = pattern_face(i, rng) * 0.5 + pattern_face((i + 3) % 7, rng) * 0.5
        Image.fromarray(blend.astype(np.uint8)).save(folder / f"blend-{i}.png")
    for i in range(3):
        Image.fromarray(rng.integers(0, 256, (48, 48), dtype=np.uint8)).save(folder / f"noise-{i}.png")
    return folder


def test_predict_marks_faces_below_the_threshold_as_uncertain(trained_run, tmp_path):
    folder = _faces_of_varying_certainty(tmp_path / "faces")
    off = run("predict", folder, "--model", trained_run, "--detector", "none", "--json", "--uncertain-below", 0,
              "--out", tmp_path / "off")
    assert off.exit_code == 0, off.output
    faces = [face for line in off.output.splitlines() for face in json.loads(line)["faces"]]
    assert len(faces) == 17 and not any(face["uncertain"] for face in faces)
    scores = sorted(face["score"] for face in faces)
    threshold = round((scores[3] + scores[-4]) / 2, 4)  # some faces on either side
    assert scores[0] < threshold < scores[-1]

    marked = run("predict", folder, "--model", trained_run, "--detector", "none", "--json",
                 "--uncertain-below", threshold, "--out", tmp_path / "on")
    assert marked.exit_code == 0, marked.output
    faces = [face for line in marked.output.splitlines() for face in json.loads(line)["faces"]]
    assert all(face["uncertain"] == (face["score"] < threshold) for face in faces)
    assert any(face["uncertain"] for face in faces) and not all(face["uncertain"] for face in faces)
    rows = (tmp_path / "on" / "faces.csv").read_text().splitlines()
    assert rows[0].endswith(",uncertain")
    assert sorted(row.rsplit(",", 1)[1] for row in rows[1:]) == sorted(str(int(f["uncertain"])) for f in faces)

    unsure = min(faces, key=lambda face: face["score"])
    [source] = [json.loads(line)["source"] for line in marked.output.splitlines()
                if unsure in json.loads(line)["faces"]]
    table = run("predict", source, "--model", trained_run, "--detector", "none", "--uncertain-below", threshold,
                "--out", tmp_path / "one")
    assert table.exit_code == 0 and f"{unsure['emotion']}?" in table.output
    saved = json.loads((tmp_path / "one" / (Path(source).stem + ".faces.json")).read_text())
    assert saved["faces"][0]["uncertain"] is True
    sure = run("predict", source, "--model", trained_run, "--detector", "none", "--uncertain-below", 0,
               "--out", tmp_path / "one")
    assert sure.exit_code == 0 and f"{unsure['emotion']}?" not in sure.output


@pytest.mark.parametrize("value", ["1", "1.5", "-0.1", "nan"])
def test_an_uncertainty_threshold_outside_0_to_1_is_refused(trained_run, tmp_path, value):
    Image.fromarray(pattern_face(3, np.random.default_rng(0))).save(tmp_path / "face.png")
    line = _one_line_error(run("predict", tmp_path / "face.png", "--model", trained_run, "--uncertain-below", value,
                               "--out", tmp_path / "o"))
    assert "uncertainty threshold" in line
    assert not (tmp_path / "o").exists()


def test_a_folder_run_cut_short_resumes_without_redoing_or_losing_images(trained_run, tmp_path):
    import csv as csv_module

    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(6):
        Image.fromarray(pattern_face(i % 7, np.random.default_rng(i))).save(folder / f"p{i}.png")
    (folder / "broken.jpg").write_text("not an image")
    whole = tmp_path / "whole"
    args = ["predict", str(folder), "--model", str(trained_run), "--detector", "none"]
    CliRunner().invoke(cli, [*args, "--out", str(whole)])

    cut = tmp_path / "cut"
    cut.mkdir()
    lines = (whole / "results.jsonl").read_text().splitlines(keepends=True)
    rows = list(csv_module.reader(open(whole / "faces.csv", newline="")))
    done = [json.loads(line)["source"] for line in lines[:3]]
    # as a kill leaves it: three complete lines, half of the fourth, and the fourth image's table row
    (cut / "results.jsonl").write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])
    keep = [row for row in rows[1:] if row[0] in done or row[0] == json.loads(lines[3])["source"]]
    with open(cut / "faces.csv", "w", newline="") as handle:
        csv_module.writer(handle).writerows(rows[:1] + keep)

    resumed = CliRunner().invoke(cli, [*args, "--out", str(cut), "--resume"])
    assert resumed.exit_code == 1  # the broken file still fails, and says so
    got = [json.loads(line) for line in (cut / "results.jsonl").read_text().splitlines()]
    assert sorted(r["source"] for r in got) == sorted(json.loads(line)["source"] for line in lines)
    assert sorted(map(tuple, csv_module.reader(open(cut / "faces.csv", newline="")))) == sorted(map(tuple, rows))


def test_a_resumed_batch_keeps_its_annotations_its_folder_and_refuses_lines_that_are_no_results(trained_run, tmp_path,
                                                                                               monkeypatch):
    (tmp_path / "photos").mkdir()
    for i in range(3):
        Image.fromarray(pattern_face(i, np.random.default_rng(i))).save(tmp_path / "photos" / f"p{i}.png")
    monkeypatch.chdir(tmp_path)
    args = ["predict", "photos", "--model", str(trained_run), "--detector", "none", "--out", str(tmp_path / "out")]
    assert run(*args, "--annotate").exit_code == 0
    before = (tmp_path / "out" / "results.jsonl").read_text()
    line = _one_line_error(run(*args, "--resume"))  # without the --annotate it began with
    assert "other settings: annotate True (now False)" in line
    monkeypatch.chdir(tmp_path / "photos")  # "photos/p0.png" leads nowhere from here
    line = _one_line_error(run("predict", ".", *args[2:], "--annotate", "--resume"))
    assert f"began in {tmp_path} and names its images from there: resume it from that folder" in line
    monkeypatch.chdir(tmp_path)
    with open(tmp_path / "out" / "results.jsonl", "a") as lines:
        lines.write('{"note": "checked by alice"}\n')
    line = _one_line_error(run(*args, "--annotate", "--resume"))
    assert "a line that is no image's result" in line
    assert (tmp_path / "out" / "results.jsonl").read_text() == before + '{"note": "checked by alice"}\n'


def _changed_config():
    """A TrainConfig with every field away from its default (valid together, never trained)."""
    from ferkit.config import TrainConfig

    return TrainConfig(
        model="ferkit-net-s", data="faces/train", val="faces/val", val_split=0.2, classes=["happy", "sad"], epochs=40,
        batch_size=32, optimizer="sgd", learning_rate=0.05, weight_decay=5e-3, lr_schedule="cosine", lr_patience=3,
        warmup_epochs=2, ema=0.99, label_smoothing=0.1, mixup=0.2, class_weight="sqrt", augment=["flip", "crop"],
        zoom=0.3, shift=0.2, rotate=15.0, precision="mixed_bfloat16", seed=7, out="runs/x", init="default",
        weights="none", cache_features=False, fine_tune=4, fine_tune_epochs=2, teacher="t.npz", distill=0.7,
    )


def test_every_training_setting_is_an_option_with_its_true_default():
    from dataclasses import MISSING, fields

    from ferkit.config import LEARNING_RATE, TrainConfig

    command = cli.commands["train"]
    options = {param.name: param for param in command.params}
    help_text = CliRunner().invoke(cli, ["train", "--help"], terminal_width=1000).output
    for item in fields(TrainConfig):
        assert item.name in options, f"no option for TrainConfig.{item.name}"
        default = item.default_factory() if item.default_factory is not MISSING else item.default
        # a default of None that the config resolves: the learning rate, which depends on --init
        assert getattr(TrainConfig(), item.name) == (LEARNING_RATE if item.name == "learning_rate" else default)
        if item.metadata.get("default_text") is None and default not in (None, "", []) and not isinstance(default, bool):
            assert f"[default: {','.join(default) if isinstance(default, list) else default}]" in " ".join(
                options[item.name].help.split()), item.name
    assert help_text.count("[default:") >= len(fields(TrainConfig))
    assert _changed_config() != TrainConfig()


def test_every_training_option_reaches_the_config():
    from dataclasses import fields

    from ferkit.cli import config_from_flags

    wanted = _changed_config()
    args = []
    for item in fields(wanted):
        value = getattr(wanted, item.name)
        flag = item.metadata.get("flag") or f"--{item.name.replace('_', '-')}"
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{item.name.replace('_', '-')}")
        else:
            args += [flag, ",".join(value) if isinstance(value, list) else str(value)]
    context = cli.commands["train"].make_context("train", args)
    names = {item.name for item in fields(wanted)}
    assert config_from_flags({k: v for k, v in context.params.items() if k in names}) == wanted
    # the options that are not settings: how to run, never recorded in the config
    assert set(context.params) - names == {"resume", "overwrite", "local_processes", "coordinator", "num_processes", "process_id"}


def test_an_out_that_is_a_file_or_bad_video_options_are_one_line_errors(trained_run, pattern_data, tmp_path):
    photo = Path(__file__).resolve().parents[1] / "examples" / "people.jpg"
    (tmp_path / "notes.txt").write_text("mine")
    line = _one_line_error(run("predict", photo, "--model", trained_run, "--out", tmp_path / "notes.txt"))
    assert "is a file" in line and (tmp_path / "notes.txt").read_text() == "mine"
    assert "notes.txt" in _one_line_error(run("evaluate", trained_run, "--data", pattern_data / "val", "--out", tmp_path / "notes.txt"))
    for option, value in [("--smooth", "0"), ("--smooth", "-1"), ("--every", "0"), ("--every", "-1"), ("--fps", "-3")]:
        result = run("predict", photo, "--model", trained_run, option, value, "--out", tmp_path / "o")
        assert result.exit_code == 2 and option in result.output and "Traceback" not in result.output
    both = _one_line_error(run("predict", photo, "--model", trained_run, "--every", "5", "--fps", "2", "--out", tmp_path / "o"))
    assert "--every" in both and "--fps" in both and "alternatives" in both


def test_a_second_run_into_a_folder_inside_the_photos_reads_only_the_photos(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for i in range(2):
        Image.fromarray(pattern_face(i, np.random.default_rng(i))).save(f"p{i}.png")
    args = ["predict", ".", "--model", str(trained_run), "--detector", "none", "--annotate", "--out", "results"]
    first, refused, second = run(*args), run(*args), run(*args, "--overwrite")
    assert first.exit_code == second.exit_code == 0
    assert _one_line_error(refused) == ("error: results holds the results of an earlier batch (results.jsonl): resume "
                                        "continues it (--resume; in Python, resume=True), overwrite replaces it "
                                        "(--overwrite; overwrite=True), or choose another folder")
    assert "2 images" in first.output and "2 images" in second.output
    assert sorted(p.name for p in Path("results").glob("*.jpg")) == ["p0.annotated.jpg", "p1.annotated.jpg"]
    assert "where the results go" not in second.output  # ferkit's own copies there are no photos to mention
    Image.fromarray(pattern_face(3, np.random.default_rng(3))).save("results/mine.png")  # a photo of the user's there
    third = run(*args, "--overwrite")
    assert "2 images" in third.output and "1 image(s) in results, where the results go, are left out" in third.output


def test_a_resumed_folder_run_names_its_annotated_copies_as_a_whole_run_does(trained_run, tmp_path):
    folder = tmp_path / "tree"
    for i, relative in enumerate(["x/a.jpg", "y/a.png", "y/z/a.jpeg"]):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pattern_face(i, np.random.default_rng(i))).convert("RGB").save(folder / relative)
    args = ["predict", str(folder), "--model", str(trained_run), "--detector", "none", "--annotate"]
    assert run(*args, "--out", tmp_path / "whole").exit_code == 0
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "results.jsonl").write_text((tmp_path / "whole" / "results.jsonl").read_text().splitlines(keepends=True)[0])
    assert run(*args, "--out", cut, "--resume").exit_code == 0
    names = ["a.annotated.jpg", "a-2.annotated.jpg", "a-3.annotated.jpg"]
    assert sorted(p.name for p in cut.glob("*.jpg")) == names[1:]  # the first was done before the cut
    for name in names[1:]:
        assert (cut / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_a_run_started_with_relative_paths_resumes_from_anywhere_told_where_its_data_is(pattern_data, tmp_path, monkeypatch):
    import shutil

    project = tmp_path / "project"
    shutil.copytree(pattern_data, project / "faces")
    monkeypatch.chdir(project)
    started = run("train", "--data", "faces/train", "--val", "faces/val", "--epochs", "1", "--out", "runs/r")
    assert started.exit_code == 0, started.output
    monkeypatch.chdir(tmp_path)
    line = _one_line_error(run("train", "--resume", "project/runs/r", "--epochs", "2"))
    assert line == ("error: the run's --data faces/train is not here (a relative path counts from where the run "
                    "started); pass --data with where it is now")
    resumed = run("train", "--resume", "project/runs/r", "--epochs", "2",
                  "--data", "project/faces/train", "--val", "project/faces/val")
    assert resumed.exit_code == 0, resumed.output
    assert "done: 2 epochs" in resumed.output and "other pixels" not in resumed.output
    assert "only --epochs, --fine-tune-epochs, --precision and --save-period may change" in _one_line_error(
        run("train", "--resume", "project/runs/r", "--lr", "0.1"))
    line = _one_line_error(run("train", "--resume", "project/runs/r", "--epochs", "3", "--data", "nope"))
    assert line == "error: --data nope: no such file or folder"
    write_pattern_dataset(tmp_path / "other", 2)  # other faces: not where the run's data is now
    line = _one_line_error(run("train", "--resume", "project/runs/r", "--epochs", "3", "--data", tmp_path / "other",
                               "--val", "project/faces/val"))
    assert line.startswith("error: the train data given (--data) holds other faces than project/runs/r was trained with")
    # as many faces per class, other pixels: said, and the run goes on
    write_pattern_dataset(tmp_path / "same-counts", 20, seed=7)
    resumed = run("train", "--resume", "project/runs/r", "--epochs", "3", "--data", tmp_path / "same-counts",
                  "--val", "project/faces/val")
    assert resumed.exit_code == 0, resumed.output
    assert "the train data given has as many faces per class as project/runs/r recorded, but other pixels" in resumed.output
    assert "the val data given" not in resumed.output


def test_ctrl_c_inside_a_garbage_collection_callback_still_stops_the_command():
    """Python drops a KeyboardInterrupt raised inside a gc callback (JAX registers one) or a weakref callback
    run by a collection; ferkit raises it again just after, so the command stops instead of running on."""
    import functools
    import gc
    import os
    import signal
    import time

    from ferkit.cli import redeliver_interrupt

    armed = [True]

    def callback(phase, info):
        if phase == "start" and armed:
            armed.clear()
            os.kill(os.getpid(), signal.SIGINT)
            sum(range(1000))  # Python code after the signal: its handler runs here, in the callback

    previous_hook = sys.unraisablehook
    previous_handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.unraisablehook = functools.partial(redeliver_interrupt, previous=previous_hook)
    gc.disable()  # only the collection below runs the callback
    gc.callbacks.append(callback)
    try:
        with pytest.raises(KeyboardInterrupt):
            gc.collect()
            time.sleep(2)
        assert not armed
    finally:
        gc.callbacks.remove(callback)
        gc.enable()
        sys.unraisablehook = previous_hook
        signal.signal(signal.SIGINT, previous_handler)
        signal.setitimer(signal.ITIMER_REAL, 0)


def test_usage_mistakes_are_one_line_errors_that_point_to_help():
    for args, words in [(["predict"], "Missing argument"), (["predict", "x.jpg", "--uncertain-below", "abc"], "abc"),
                        (["predcit"], "No such command"), (["--bogus"], "No such option"),
                        (["crop", "x.jpg", "--out", ""], "'--out': is empty"), (["pack", "x.csv", " "], "'OUT': is empty")]:
        result = run(*args)
        line = _one_line_error(result)
        assert words in line and line.endswith("--help)") and result.exit_code == 2
    assert _one_line_error(run("crop", "x.jpg", "--out", "y", "--debug")) == (
        "error: --debug goes before the command: ferkit --debug crop ...")
    for args, usage in ((["-h"], " [OPTIONS] COMMAND"), (["crop", "-h"], " crop [OPTIONS] SOURCE")):
        result = run(*args)
        assert result.exit_code == 0 and result.output.startswith("Usage: ") and usage in result.output.splitlines()[0]


def test_an_out_folder_that_cannot_be_made_is_bad_input_said_before_any_work(trained_run, pattern_data, tmp_path):
    photo = Path(__file__).resolve().parents[1] / "examples" / "people.jpg"
    too_long = tmp_path / ("x" * 300)
    assert "File name too long" in _one_line_error(run("predict", photo, "--model", trained_run, "--out", too_long))
    (tmp_path / "file").write_text("mine")
    line = _one_line_error(run("evaluate", trained_run, "--data", pattern_data / "val", "--out", too_long))
    assert "File name too long" in line and not any(tmp_path.glob("x*"))


def test_one_photos_results_never_replace_those_of_another_photo_of_its_name(trained_run, tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        Image.fromarray(pattern_face(len(folder), np.random.default_rng(3))).save(tmp_path / folder / "x.png")
    out = tmp_path / "out"
    assert run("predict", tmp_path / "a" / "x.png", "--model", trained_run, "--out", out).exit_code == 0
    before = (out / "x.faces.json").read_text()
    line = _one_line_error(run("predict", tmp_path / "b" / "x.png", "--model", trained_run, "--out", out))
    assert f"holds the results of another photo, {tmp_path / 'a' / 'x.png'}" in line
    assert (out / "x.faces.json").read_text() == before
    assert run("predict", tmp_path / "a" / "x.png", "--model", trained_run, "--out", out).exit_code == 0  # its own: replaced


def test_a_photos_results_replace_ferkits_own_but_not_a_users_file(trained_run, tmp_path):
    photo = Path(__file__).resolve().parents[1] / "examples" / "people.jpg"
    args = ["predict", photo, "--model", trained_run, "--out", tmp_path]
    assert run(*args).exit_code == 0 and run(*args).exit_code == 0  # the second run replaces the first's files
    assert json.loads((tmp_path / "people.faces.json").read_text())["faces"]
    (tmp_path / "people.annotated.jpg").write_bytes(b"my drawing")
    line = _one_line_error(run(*args))
    assert "people.annotated.jpg exists and ferkit did not write it" in line and "--overwrite" in line
    assert (tmp_path / "people.annotated.jpg").read_bytes() == b"my drawing"
    assert run(*args, "--overwrite").exit_code == 0 and Image.open(tmp_path / "people.annotated.jpg").size == (920, 360)


def test_a_photo_predicted_into_a_batchs_folder_keeps_the_batchs_copy_of_another_image(trained_run, tmp_path):
    import shutil

    example = Path(__file__).resolve().parents[1] / "examples" / "people.jpg"
    (tmp_path / "photos").mkdir()
    shutil.copy(example, tmp_path / "photos" / "people.jpg")
    out = tmp_path / "out"
    assert run("predict", tmp_path / "photos", "--model", trained_run, "--annotate", "--out", out).exit_code == 0
    batch_copy = (out / "people.annotated.jpg").read_bytes()
    other = tmp_path / "people.jpg"  # another photo of the same name
    Image.open(example).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(other)
    line = _one_line_error(run("predict", other, "--model", trained_run, "--out", out))
    assert f"is the annotated copy of {tmp_path / 'photos' / 'people.jpg'} in the batch results" in line
    assert (out / "people.annotated.jpg").read_bytes() == batch_copy
    # the batch's own photo again, or another with --overwrite, may replace it
    assert run("predict", tmp_path / "photos" / "people.jpg", "--model", trained_run, "--out", out).exit_code == 0
    assert run("predict", other, "--model", trained_run, "--out", out, "--overwrite").exit_code == 0


def test_names_with_markup_or_math_characters_are_shown_as_they_are(trained_run, pattern_data, tmp_path):
    """Square brackets are rich's markup and `$...$` matplotlib's math: in a file name they are neither."""
    import shutil

    from ferkit.evaluation import REPORT_FILES

    odd = tmp_path / "price$5 \\frac$x [/red]"
    shutil.copytree(pattern_data / "val", odd)
    evaluated = run("evaluate", trained_run, "--data", odd, "--out", tmp_path / "r")
    assert evaluated.exit_code == 0, evaluated.output
    assert "[/red]" in evaluated.output and all((tmp_path / "r" / name).is_file() for name in REPORT_FILES)
    (tmp_path / "x[").mkdir()
    photo = tmp_path / "x[" / "red]face [b].png"  # its path holds "[/red]"
    Image.fromarray(pattern_face(3, np.random.default_rng(0))).save(photo)
    predicted = run("predict", photo, "--model", trained_run, "--detector", "none", "--out", tmp_path / "o")
    assert predicted.exit_code == 0, predicted.output
    assert "x[/red]face [b].png" in predicted.output.replace("\n", "") and (tmp_path / "o" / "red]face [b].faces.json").is_file()


def test_the_same_data_written_another_way_is_the_same_evaluation(trained_run, pattern_data, tmp_path, monkeypatch):
    assert run("evaluate", trained_run, "--data", pattern_data / "val", "--out", tmp_path / "r").exit_code == 0
    monkeypatch.chdir(pattern_data)
    again = run("evaluate", trained_run, "--data", "./val", "--out", tmp_path / "r")  # replaces its own report
    assert again.exit_code == 0, again.output
    other = run("evaluate", trained_run, "--data", "./train", "--out", tmp_path / "r")
    assert other.exit_code == 2 and "holds the evaluation of" in other.output


def test_an_empty_or_dangling_out_is_refused_before_any_work(trained_run, tmp_path):
    photo = tmp_path / "face.png"
    Image.fromarray(pattern_face(3, np.random.default_rng(0))).save(photo)
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    for out, words in (("", "--out is empty"), (tmp_path / "dangling", "which does not exist")):
        line = _one_line_error(run("predict", photo, "--model", trained_run, "--detector", "none", "--out", out))
        assert words in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "face.png"]


def test_video_options_for_photos_and_annotate_for_videos_are_refused_not_ignored(trained_run, tmp_path):
    photo = tmp_path / "face.png"
    Image.fromarray(pattern_face(3, np.random.default_rng(0))).save(photo)
    line = _one_line_error(run("predict", photo, "--every", "3", "--save-video", "--out", tmp_path / "o"))
    assert line == "error: --every, --save-video: for videos, and no source is one"
    (tmp_path / "clip.mp4").write_bytes(b"")  # refused for its option before it is opened
    line = _one_line_error(run("predict", tmp_path / "clip.mp4", "--annotate", "--out", tmp_path / "o"))
    assert "--save-video writes an annotated copy" in line and not (tmp_path / "o").exists()


def test_train_names_a_missing_val_or_a_file_given_as_out_before_reading_the_data(pattern_data, tmp_path):
    line = _one_line_error(run("train", "--data", pattern_data / "train", "--val", tmp_path / "nope", "--out", tmp_path / "r"))
    assert line == f"error: --val {tmp_path / 'nope'}: no such file or folder"
    (tmp_path / "afile").write_text("mine")
    line = _one_line_error(run("train", "--data", pattern_data / "train", "--out", tmp_path / "afile"))
    assert line == f"error: {tmp_path / 'afile'} is a file, not a run folder"
    assert (tmp_path / "afile").read_text() == "mine"


def test_evaluating_a_run_on_its_own_training_data_is_warned_of(trained_run, tmp_path):
    from ferkit.config import TrainConfig

    data = TrainConfig.load(trained_run / "config.json").data
    result = run("evaluate", trained_run, "--data", data, "--json", "--out", tmp_path / "on-train")
    assert result.exit_code == 0
    assert "is the data" in result.output and "was trained on" in result.output
    saved = json.loads((tmp_path / "on-train" / "metrics.json").read_text())["warnings"]  # a reader of the report is told too
    assert len(saved) == 1 and "was trained on: its accuracy there says little" in saved[0]
    assert "Warning:</b>" in (tmp_path / "on-train" / "report.html").read_text()
    held_out = run("evaluate", trained_run, "--data", Path(data).parent / "val", "--json", "--out", tmp_path / "on-val")
    assert held_out.exit_code == 0 and "was trained on" not in held_out.output
    assert json.loads((tmp_path / "on-val" / "metrics.json").read_text())["warnings"] == []


def test_a_run_that_split_off_its_validation_faces_is_scored_on_those_when_given_its_training_data(pattern_data, tmp_path):
    from ferkit.runs import RunState

    trained = run("train", "--data", pattern_data / "train", "--val-split", "0.2", "--epochs", "2", "--out", tmp_path / "r")
    assert trained.exit_code == 0, trained.output
    result = run("evaluate", tmp_path / "r", "--data", pattern_data / "train", "--tta", "none", "--json",
                 "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    held = round(0.2 * len(list((pattern_data / "train").rglob("*.png"))))
    assert f"scoring the {held} faces it held out for validation" in result.output and "says little" not in result.output
    assert report["samples"] == held and "(the faces its run held out: --val-split 0.2, seed 0)" in report["data"]
    assert report["accuracy"] == pytest.approx(RunState.load(tmp_path / "r").best_val_accuracy, abs=1e-4)  # what training measured


def test_faces_renamed_since_a_run_split_them_are_not_taken_for_its_held_out_faces(pattern_data, tmp_path):
    import shutil

    data = shutil.copytree(pattern_data / "train", tmp_path / "data")
    assert run("train", "--data", data, "--val-split", "0.2", "--epochs", "1", "--out", tmp_path / "r").exit_code == 0
    for folder in data.iterdir():  # the same faces under names in the reverse order: the split picks others now
        files = sorted(folder.iterdir())
        for i, path in enumerate(files):
            path.rename(folder / f"tmp-{i}.png")
        for i in range(len(files)):
            (folder / f"tmp-{i}.png").rename(folder / f"face-{len(files) - 1 - i:03d}.png")
    result = run("evaluate", tmp_path / "r", "--data", data, "--tta", "none", "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert "held out for validation" not in result.output and "its accuracy there says little" in result.output


def test_other_faces_as_many_per_class_as_a_run_trained_on_are_not_taken_for_its_training_data(trained_run, tmp_path):
    other = write_pattern_dataset(tmp_path / "other", 20, seed=7)  # the training data's counts, other faces
    result = run("evaluate", trained_run, "--data", other, "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert "was trained on" not in result.output
    copy = tmp_path / "copy"  # the faces themselves, read from another folder, are still known
    import shutil

    shutil.copytree(Path(json.loads((trained_run / "config.json").read_text())["data"]), copy)
    result = run("evaluate", trained_run, "--data", copy, "--out", tmp_path / "eval-copy")
    assert result.exit_code == 0 and f"{copy} is the data {trained_run} was trained on" in result.output


def test_the_faces_a_run_held_out_are_found_from_any_working_folder_and_for_its_checkpoints(pattern_data, tmp_path, monkeypatch):
    import shutil

    shutil.copytree(pattern_data / "train", tmp_path / "work" / "data")
    monkeypatch.chdir(tmp_path / "work")  # the run records its data as given: "data", relative to here
    trained = run("train", "--data", "data", "--val-split", "0.2", "--epochs", "1", "--save-period", "1", "--out", "r")
    assert trained.exit_code == 0, trained.output
    monkeypatch.chdir(tmp_path)
    held = round(0.2 * len(list((pattern_data / "train").rglob("*.png"))))
    for model in ("work/r", "work/r/epochs/epoch-001.keras"):
        result = run("evaluate", model, "--data", "work/data", "--tta", "none", "--json")
        assert result.exit_code == 0, result.output
        assert f"scoring the {held} faces it held out" in result.output, (model, result.output)
        assert json.loads(result.output[result.output.index("{"):])["samples"] == held
    assert (tmp_path / "work" / "r" / "eval-epoch-001-data-none").is_dir()  # a checkpoint's report in its run folder


def test_an_export_moved_out_of_its_run_folder_still_knows_its_training_data(trained_run, tmp_path):
    data = json.loads((trained_run / "config.json").read_text())["data"]
    exported = run("export", trained_run, "--onnx", "--out", tmp_path / "moved" / "mine.onnx")
    assert exported.exit_code == 0, exported.output
    result = run("evaluate", tmp_path / "moved" / "mine.onnx", "--data", data, "--out", tmp_path / "eval")
    assert result.exit_code == 0 and f"{data} is the data the run that made mine.onnx was trained on" in result.output
    from ferkit.runtime import read_metadata

    assert read_metadata(tmp_path / "moved" / "mine.onnx").extra["trained_on"]["data"] == str(Path(data).resolve())


def test_a_run_whose_config_this_ferkit_refuses_is_still_evaluated(trained_run, tmp_path):
    import shutil

    copy = shutil.copytree(trained_run, tmp_path / "run")
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "optimizer": "a-future-one"}))
    result = run("evaluate", copy, "--data", Path(config["data"]).parent / "val", "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    assert result.output.count(f"the run config {copy / 'config.json'} holds a setting this ferkit refuses") == 1


def test_a_report_of_a_runs_last_model_says_so(trained_run, tmp_path):
    val = Path(json.loads((trained_run / "config.json").read_text())["data"]).parent / "val"
    result = run("evaluate", trained_run / "last.keras", "--data", val, "--json", "--out", tmp_path / "eval")
    assert result.exit_code == 0, result.output
    state = RunState.load(trained_run)
    assert f"{trained_run.name} (last.keras, epoch {state.epochs_done}" in (tmp_path / "eval" / "report.html").read_text()


def test_a_single_unreadable_photo_leaves_no_empty_results_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("not a photo")
    result = run("predict", tmp_path / "notes.txt", "--out", tmp_path / "new" / "out")
    assert result.exit_code != 0 and not (tmp_path / "new").exists()


def test_a_folder_where_a_result_file_goes_is_named_even_with_overwrite(tmp_path):
    photo = tmp_path / "face.png"
    Image.fromarray(pattern_face(3, np.random.default_rng(0))).save(photo)
    (tmp_path / "out" / "face.annotated.jpg").mkdir(parents=True)
    line = _one_line_error(run("predict", photo, "--out", tmp_path / "out", "--overwrite"))
    assert line.startswith(f"error: {tmp_path / 'out' / 'face.annotated.jpg'} is a folder, where ferkit writes a file")


def test_a_new_folder_made_for_work_that_fails_is_removed_unless_something_was_written(tmp_path):
    from ferkit.results import new_folder

    with pytest.raises(KeyboardInterrupt), new_folder(tmp_path / "a" / "b"):
        raise KeyboardInterrupt
    assert not (tmp_path / "a").exists()
    with pytest.raises(RuntimeError), new_folder(tmp_path / "a" / "b") as folder:
        (folder / "kept.txt").write_text("written before it failed")
        raise RuntimeError
    assert (tmp_path / "a" / "b" / "kept.txt").is_file()


def test_a_photo_is_said_to_be_scored_by_a_model_that_predict_takes_back(tmp_path, monkeypatch):
    import re
    import shutil

    shutil.copy(Path(__file__).resolve().parents[1] / "examples" / "people.jpg", tmp_path / "p.jpg")
    monkeypatch.chdir(tmp_path)
    first = CliRunner().invoke(cli, ["predict", "p.jpg", "--out", "a"])
    assert first.exit_code == 0, first.output
    named = re.search(r"face\(s\), model (\S+)", first.output).group(1)
    again = CliRunner().invoke(cli, ["predict", "p.jpg", "--model", named, "--out", "b"])
    assert again.exit_code == 0, again.output
    assert json.loads(Path("a/p.faces.json").read_text())["faces"] == json.loads(Path("b/p.faces.json").read_text())["faces"]


def test_resume_is_refused_where_there_is_no_batch_to_continue(tmp_path):
    import shutil

    shutil.copy(Path(__file__).resolve().parents[1] / "examples" / "people.jpg", tmp_path / "p.jpg")
    result = CliRunner().invoke(cli, ["predict", str(tmp_path / "p.jpg"), "--resume", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2 and "--resume continues a batch of photos" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGHUP"])
def test_kill_stops_a_batch_in_one_line_and_the_batch_resumes_where_it_stopped(trained_run, tmp_path, signal_name):
    """SIGTERM, and SIGHUP (the terminal closed), are handled as Ctrl-C is: the results written so far are
    kept, and exit code 143 says why."""
    import os
    import signal
    import time

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(pattern_face(3, np.random.default_rng(0))).save(folder / "face.png")
    for i in range(400):  # enough that the batch is still going when the signal comes
        os.link(folder / "face.png", folder / f"face-{i:04d}.png")
    command = [sys.executable, "-m", "ferkit.cli", "predict", folder, "--model", trained_run, "--detector", "none",
               "--no-annotate", "--out", tmp_path / "out"]
    # as from a terminal: under nohup (as in CI) SIGHUP is ignored, and a command rightly goes on
    default_hangup = lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL)
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               preexec_fn=default_hangup)
    results = tmp_path / "out" / "results.jsonl"
    while process.poll() is None and not (results.exists() and results.read_text().count("\n")):
        time.sleep(0.05)  # until the first image is done
    process.send_signal(getattr(signal, signal_name))
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 143 and stderr.strip().splitlines()[-1] == "terminated", stderr
    kept = results.read_text().splitlines()
    assert 1 <= len(kept) < 401
    if signal_name == "SIGHUP":
        return
    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert len(results.read_text().splitlines()) == 401


def test_reading_a_csv_shows_progress_on_a_terminal(tmp_path):
    import subprocess

    pixels = " ".join(["128"] * 2304)
    (tmp_path / "fer.csv").write_text("emotion,pixels\n" + "".join(f"{i % 7},{pixels}\n" for i in range(3000)))
    code, shown = _run_with_stderr_on_a_terminal(["pack", tmp_path / "fer.csv", tmp_path / "p"], stdout=subprocess.DEVNULL)
    assert code == 0 and "reading" in shown and "fer.csv" in shown, shown
