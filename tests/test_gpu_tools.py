"""tools/gpu/train.sh, which trains runs side by side on a GPU machine, here on this machine's backend and
generated faces."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from ferkit.runs import RunState, read_history

REPO = Path(__file__).resolve().parents[1]


def _pack_devdata(folder: Path, pattern_data: Path) -> None:
    (folder / ".devdata").mkdir()
    with tarfile.open(folder / ".devdata" / "fer2013.tar.xz", "w:xz") as archive:
        archive.add(pattern_data / "train", "fer2013/train")
        archive.add(pattern_data / "val", "fer2013/val")


def _first_snapshot_while_running(script: subprocess.Popen, archive: Path, keep: Path) -> Path | None:
    while script.poll() is None:
        if archive.exists():
            shutil.copy(archive, keep)  # may race with the next snapshot's rename: then try again
            if tarfile.is_tarfile(keep):
                return keep
        time.sleep(0.5)
    return None


@pytest.mark.slow
def test_gpu_train_script_stops_each_run_on_time_and_brings_back_its_folder(pattern_data, tmp_path):
    _pack_devdata(tmp_path, pattern_data)
    (tmp_path / "runs.txt").write_text(
        "# name  flags\n"
        "short --model seed-cnn --epochs 1\n"
        "long  --model seed-cnn --epochs 100000 --seed 3\n"
        "broken --model no-such-network"  # fails at once; the file's last line, without its newline
    )
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TMPDIR": str(tmp_path / "tmp"),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    # two minutes: on a busy machine TensorFlow's start and the first epoch of the short run took over one
    command = ["bash", str(REPO / "tools" / "gpu" / "train.sh"), "--snapshot-s", "5", "2", "runs.txt",
               ".devdata/fer2013.tar.xz", str(out)]
    script = subprocess.Popen(command, cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    snapshot = _first_snapshot_while_running(script, out / "long.tar.gz", tmp_path / "snapshot.tar.gz")
    _, stderr = script.communicate(timeout=300)
    assert script.returncode == 1, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == f"error: failed: broken (exit 2); their logs are in their archives in {out}"
    assert sorted(p.name for p in out.iterdir()) == ["broken.tar.gz", "long.tar.gz", "short.tar.gz"]
    assert not list((tmp_path / "tmp").iterdir())  # the dataset's copy and the runs are gone once archived
    with tarfile.open(out / "broken.tar.gz") as archive:
        assert "unknown model 'no-such-network'" in archive.extractfile("broken.log").read().decode()

    # a call cut short still brings back the run as it stood at the last snapshot
    assert snapshot is not None, "no snapshot of the long run appeared while it trained"
    with tarfile.open(snapshot) as archive:
        assert "long/config.json" in archive.getnames()

    back = tmp_path / "back"
    for name in ("short", "long"):
        with tarfile.open(out / f"{name}.tar.gz") as archive:
            archive.extractall(back, filter="data")
        files = {p.name for p in (back / name).iterdir()}
        assert {"best.keras", "config.json", "history.csv", "state.json", "train.log"} <= files
        assert not {"last.keras", "backup"} & files
        assert json.loads((back / name / "config.json").read_text())["model"] == "seed-cnn"

    assert len(read_history(back / "short" / "history.csv")["epoch"]) == 1
    # the long run was stopped by the time limit, cleanly: some epochs recorded, resumable state
    long_epochs = len(read_history(back / "long" / "history.csv")["epoch"])
    assert 0 < long_epochs < 100000
    assert RunState.load(back / "long").epochs_done == long_epochs

    # the same job again into the same OUT: refused before anything starts, the archives as they were
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and again.stderr.strip() == (f"error: {out} already holds short.tar.gz of an earlier "
                                                              "job: choose another OUT, or --overwrite")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
