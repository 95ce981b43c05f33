"""tools/plot_runs.py: the campaign's runs compared in one plot and one table."""

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("matplotlib", reason="ferkit[evaluate] is not installed")
TOOL = [sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "plot_runs.py")]


def _val_column(run: Path) -> list[float]:
    with open(run / "history.csv", newline="") as handle:
        return [float(row["val_accuracy"]) for row in csv.DictReader(handle)]


def test_runs_are_plotted_together_and_their_best_epochs_tabled(trained_run, tmp_path):
    longer = shutil.copytree(trained_run, tmp_path / "longer")
    with open(longer / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows = [{**row, "val_accuracy": "0.5"} for row in rows]
    extra = {**rows[-1], "epoch": str(len(rows) + 1), "val_accuracy": "0.9"}  # a later, better epoch
    with open(longer / "history.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows([*rows, extra])
    out = tmp_path / "runs.png"
    done = subprocess.run([*TOOL, str(trained_run), str(longer), "--line", "target=0.73", "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert Image.open(out).size[0] > 500
    table = done.stdout.splitlines()
    val = _val_column(trained_run)
    best = max(range(len(val)), key=val.__getitem__)
    assert f"| {trained_run.name} | {len(val)} | {val[best]:.4f} ({best + 1}) | {val[-1]:.4f} |" in table
    assert f"| longer | {len(val) + 1} | 0.9000 ({len(val) + 1}) | 0.9000 |" in table
    # a --ymin above a whole run leaves it out of sight: said so
    done = subprocess.run([*TOOL, str(trained_run), str(longer), "--ymin", "0.95", "--out", str(out)], capture_output=True, text=True)
    hidden = ", ".join(name for name, top in ((trained_run.name, max(val)), ("longer", 0.9)) if top < 0.95)
    assert done.returncode == 0 and f"warning: --ymin 0.95 is above every epoch of {hidden}: not drawn" in done.stderr


def test_a_folder_without_a_history_is_one_line_of_error(tmp_path):
    done = subprocess.run([*TOOL, str(tmp_path), "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.strip() == f"error: {tmp_path} has no history.csv; give ferkit run folders"
    assert not (tmp_path / "x.png").exists()


def test_two_runs_of_one_folder_name_and_an_out_that_cannot_be_written_are_refused(trained_run, tmp_path):
    twin = shutil.copytree(trained_run, tmp_path / "elsewhere" / trained_run.name)
    for runs, out, error in (([trained_run, twin], tmp_path / "x.png", f"two runs of one folder name ({trained_run.name})"),
                             ([trained_run], tmp_path / "no" / "x.png", "give a .png file in a folder that exists"),
                             ([trained_run], tmp_path / "x.txt", "give a .png file in a folder that exists")):
        done = subprocess.run([*TOOL, *map(str, runs), "--out", str(out)], capture_output=True, text=True)
        assert done.returncode == 2 and error in done.stderr.splitlines()[-1]
    assert not list(tmp_path.glob("x.*"))


def test_a_png_of_the_users_is_not_replaced_and_empty_or_na_cells_are_left_out(trained_run, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    with open(run / "history.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows[0]["val_accuracy"], rows[-1]["loss"] = "NA", ""  # cells Keras's CSVLogger writes where a value is missing
    with open(run / "history.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    mine = tmp_path / "mine.png"
    Image.new("RGB", (8, 8)).save(mine)
    before = mine.read_bytes()
    refused = subprocess.run([*TOOL, str(run), "--out", str(mine)], capture_output=True, text=True)
    assert refused.returncode == 2 and mine.read_bytes() == before and "--overwrite" in refused.stderr.splitlines()[-1]
    done = subprocess.run([*TOOL, str(run), "--out", str(tmp_path / "runs.png")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    val = [float(row["val_accuracy"]) for row in rows[1:]]
    best = max(range(len(val)), key=val.__getitem__)
    assert f"| run | {len(rows)} | {val[best]:.4f} ({best + 2}) | {val[-1]:.4f} |" in done.stdout.splitlines()
    again = subprocess.run([*TOOL, str(run), "--out", str(tmp_path / "runs.png")], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr  # its own drawing is replaced
