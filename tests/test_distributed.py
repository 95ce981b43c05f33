"""Data-parallel training: two processes on loopback end with the weights one process reaches on the
same global batches, and only process 0 writes the run folder."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from ferkit.data import load_dataset
from ferkit.distributed import run_together
from ferkit.runs import RunState, read_history
from ferkit.runtime import load_classifier, read_metadata

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="needs ferkit's 'distributed' extra (JAX)")


def _train(pattern_data, out, processes: int, *extra: str, data=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "ferkit.cli", "train", "--data", str(data or pattern_data / "train"),
               "--val", str(pattern_data / "val"), "--epochs", "2", "--batch-size", "32", "--augment", "flip",
               "--out", str(out), "--local-processes", str(processes), *extra]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def _weights(path) -> list[np.ndarray]:
    import keras

    return keras.saving.load_model(path, compile=False).get_weights()


def test_two_processes_train_exactly_like_one(pattern_data, tmp_path):
    # with mixup (partners drawn over the global batch) and a moving average of the weights (what is saved
    # and validated is the average)
    one = _train(pattern_data, tmp_path / "one", 1, "--ema", "0.9", "--mixup", "0.2")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _train(pattern_data, tmp_path / "two", 2, "--ema", "0.9", "--mixup", "0.2")
    assert two.returncode == 0, two.stderr[-3000:]
    for a, b in zip(_weights(tmp_path / "one" / "last.keras"), _weights(tmp_path / "two" / "last.keras")):
        # gradients summed in another order across two processes: a few of the float32 weights land up to
        # 3e-5 apart after two epochs on an AVX-512 machine; wrong sharding or averaging moves them far more
        np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
    history_one, history_two = read_history(tmp_path / "one" / "history.csv"), read_history(tmp_path / "two" / "history.csv")
    assert history_two["epoch"] == [1, 2]
    np.testing.assert_allclose(history_one["val_accuracy"], history_two["val_accuracy"], atol=1e-6)
    # 56 val faces in batches of 32: the padding of the last batch counts for nothing
    val = load_dataset(pattern_data / "val")
    probabilities = load_classifier(tmp_path / "two" / "last.keras").with_tta("none").predict_proba(val.images)
    cross_entropy = -np.mean(np.log(np.clip(probabilities[np.arange(len(val)), val.labels], 1e-7, 1)))
    assert history_two["val_loss"][-1] == pytest.approx(cross_entropy, rel=1e-3)
    assert history_two["val_accuracy"][-1] == pytest.approx(np.mean(probabilities.argmax(1) == val.labels), abs=1e-6)
    topology = json.loads((tmp_path / "two" / "topology.json").read_text())
    assert topology["num_processes"] == 2 and len(topology["devices"]) == 2 and topology["backend"] == "jax"
    assert RunState.load(tmp_path / "two").status == "finished" and read_metadata(tmp_path / "two").classes


def test_two_processes_train_on_their_own_shards_of_a_packed_dataset_and_resume(pattern_data, tmp_path):
    packed = subprocess.run([sys.executable, "-m", "ferkit.cli", "pack", str(pattern_data / "train"), str(tmp_path / "packed"),
                             "--shard-size", "30"], capture_output=True, text=True, timeout=120)
    assert packed.returncode == 0, packed.stderr[-3000:]
    two = _train(pattern_data, tmp_path / "two", 2, data=tmp_path / "packed")
    assert two.returncode == 0, two.stderr[-3000:]
    history = read_history(tmp_path / "two" / "history.csv")
    assert history["epoch"] == [1, 2] and all(np.isfinite(history["loss"]))
    assert RunState.load(tmp_path / "two").status == "finished"

    command = [sys.executable, "-m", "ferkit.cli", "train", "--resume", str(tmp_path / "two"), "--epochs", "3",
               "--local-processes", "4"]
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert read_history(tmp_path / "two" / "history.csv")["epoch"] == [1, 2, 3]
    assert f"{tmp_path / 'two'} was trained by a job of 2 processes; it goes on in 4" in resumed.stderr
    assert (tmp_path / "two" / "resumes.csv").read_text().splitlines()[1].startswith("2,")  # after epoch 2, ...
    assert ",4,epochs: 2 -> 3" in (tmp_path / "two" / "resumes.csv").read_text()  # ... in 4 processes


def test_unsupported_options_and_bad_topologies_are_one_line_errors(pattern_data, tmp_path):
    command = [sys.executable, "-m", "ferkit.cli", "train", "--data", str(pattern_data / "train"), "--model",
               "vgg19-transfer", "--weights", "none", "--out", str(tmp_path / "cached"), "--local-processes", "2"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "does not support cached features" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "cached").exists()
    bad = subprocess.run([sys.executable, "-m", "ferkit.cli", "train", "--data", "x", "--num-processes", "2"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "--coordinator" in bad.stderr
    both = subprocess.run([sys.executable, "-m", "ferkit.cli", "train", "--data", "x", "--local-processes", "2",
                           "--num-processes", "4"], capture_output=True, text=True)
    assert both.returncode == 2 and both.stderr == "error: --local-processes sets --num-processes itself: give one or the other\n"
    (tmp_path / "taken" / "config.json").parent.mkdir()
    (tmp_path / "taken" / "config.json").write_text("{}")
    for extra, error in ((["--batch-size", "9"], "must be a multiple of the number of processes (2)"),
                         (["--out", str(tmp_path / "taken")], "already exists")):
        command = [sys.executable, "-m", "ferkit.cli", "train", "--data", str(pattern_data / "train"), "--epochs", "1",
                   "--out", str(tmp_path / "new"), "--local-processes", "2", *extra]
        refused = subprocess.run(command, capture_output=True, text=True, timeout=600)
        assert refused.returncode == 2 and refused.stderr.count(error) == 1 and len(refused.stderr.splitlines()) == 1


def test_when_one_process_dies_the_others_are_stopped_and_the_job_fails(capfd):
    python = [sys.executable, "-c"]
    # a process stuck waiting for a dead peer never reaches the end of a batch, where SIGTERM would stop it
    stuck = [*python, "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)"]
    killed = [*python, "import os, signal, time; time.sleep(1); os.kill(os.getpid(), signal.SIGKILL)"]
    began = time.monotonic()
    assert run_together([stuck, killed], grace_s=1) == 128 + signal.SIGKILL
    assert time.monotonic() - began < 60
    assert "error: process 1 of the training job was stopped by SIGKILL" in capfd.readouterr().err
    failing = [*python, "import sys; sys.stderr.write('bad data\\n'); sys.exit(2)"]
    assert run_together([stuck, failing], grace_s=1) == 2
    assert "bad data" in capfd.readouterr().err  # a failed process's own output is shown
    assert run_together([[*python, "pass"], [*python, "pass"]]) == 0


def test_each_machine_may_hold_only_its_own_shards_of_a_packed_dataset(pattern_data, tmp_path):
    """As docs/distributed-training.md lays it out: every machine has the index and labels, and the face
    shards of its own process only (shard s is read by process s mod P)."""
    import shutil

    from ferkit.distributed import free_port

    packed = subprocess.run([sys.executable, "-m", "ferkit.cli", "pack", str(pattern_data / "train"), str(tmp_path / "packed"),
                             "--shard-size", "30"], capture_output=True, text=True, timeout=120)
    assert packed.returncode == 0, packed.stderr[-3000:]
    coordinator = f"127.0.0.1:{free_port()}"
    commands = []
    for process in (0, 1):
        machine = shutil.copytree(tmp_path / "packed", tmp_path / f"machine-{process}")
        for faces in machine.glob("faces-*.npy"):
            if int(faces.stem.split("-")[1]) % 2 != process:
                faces.unlink()
        commands.append([sys.executable, "-m", "ferkit.cli", "train", "--data", str(machine), "--val", str(pattern_data / "val"),
                         "--epochs", "1", "--batch-size", "32", "--out", str(tmp_path / f"run-{process}"),
                         "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(process)])
    assert run_together(commands, env={**os.environ, "KERAS_BACKEND": "jax"}) == 0
    assert RunState.load(tmp_path / "run-0").status == "finished"
    recorded = json.loads((tmp_path / "run-0" / "datasets.json").read_text())
    assert "train_faces_sha256" not in recorded  # a digest of faces this machine does not hold cannot be taken


def test_a_coordinator_address_is_checked_and_waited_for_with_a_one_line_error():
    from ferkit.distributed import Topology, _wait_for_coordinator, free_port, lost_a_peer
    from ferkit.errors import FerkitError

    for address in ("notaport", "127.0.0.1:abc", ":1234", "127.0.0.1:70000"):
        with pytest.raises(FerkitError, match="--coordinator is HOST:PORT"):
            Topology(address, 2, 1)
    began = time.monotonic()
    with pytest.raises(FerkitError, match="nothing listens at --coordinator 127.0.0.1:"):
        _wait_for_coordinator(f"127.0.0.1:{free_port()}", wait_s=1)
    assert time.monotonic() - began < 10
    assert lost_a_peer(ValueError("UNKNOWN: Gloo AllGather failed: Connection reset by peer"))
    assert not lost_a_peer(ValueError("could not broadcast input array"))


def _process_zero_of_two(pattern_data, tmp_path, wait_s: int) -> subprocess.Popen:
    from ferkit.distributed import free_port

    command = [sys.executable, "-m", "ferkit.cli", "train", "--data", str(pattern_data / "train"), "--epochs", "1",
               "--out", str(tmp_path / "run"), "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2",
               "--process-id", "0"]
    # Ctrl-C as at a terminal: a process started by one that ignores SIGINT (a pytest-xdist worker) ignores it too
    return subprocess.Popen(command, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "FERKIT_COORDINATOR_WAIT_S": str(wait_s)},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_process_zero_says_it_waits_for_the_others_and_stops_on_ctrl_c_or_after_its_wait(pattern_data, tmp_path):
    alone = _process_zero_of_two(pattern_data, tmp_path / "a", wait_s=5)
    _, stderr = alone.communicate(timeout=120)
    assert alone.returncode == 2 and "listening at 127.0.0.1:" in stderr
    assert stderr.strip().splitlines()[-1].startswith("error: the other processes of the job did not join at --coordinator")
    stopped = _process_zero_of_two(pattern_data, tmp_path / "b", wait_s=300)
    for line in stopped.stderr:
        if "listening at" in line:
            break
    stopped.send_signal(signal.SIGINT)
    began = time.monotonic()
    stopped.communicate(timeout=60)
    assert stopped.returncode == 130 and time.monotonic() - began < 30


def test_a_python_caller_of_a_job_that_never_completes_keeps_its_own_exit_code(pattern_data, tmp_path):
    from ferkit.distributed import free_port

    code = ("import sys\n"
            "from ferkit.config import TrainConfig\n"
            "from ferkit.distributed import Topology\n"
            "from ferkit.errors import FerkitError\n"
            "from ferkit.training import train\n"
            f"config = TrainConfig(data={str(pattern_data / 'train')!r}, epochs=1, out={str(tmp_path / 'run')!r})\n"
            "try:\n"
            f"    train(config, topology=Topology('127.0.0.1:{free_port()}', 2, 0))\n"
            "except FerkitError as err:\n"
            "    print('caught:', err)\n"
            "    sys.exit(0)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "FERKIT_COORDINATOR_WAIT_S": "3"})
    assert done.returncode == 0 and "caught: the other processes of the job did not join" in done.stdout


@pytest.mark.parametrize("differs", ["batch size", "data"])
def test_processes_given_other_settings_stop_at_once_with_one_line(pattern_data, tmp_path, differs):
    """Another --batch-size, or another copy of the data under the same option (one face fewer, as on a
    machine whose copy is out of date): the processes would wait on each other for ever in their first step."""
    from ferkit.distributed import free_port

    older = shutil.copytree(pattern_data / "train", tmp_path / "older")
    next(older.glob("happy/*")).unlink()
    coordinator = f"127.0.0.1:{free_port()}"
    given = {"batch size": ((pattern_data / "train", "32"), (pattern_data / "train", "16")),
             "data": ((pattern_data / "train", "32"), (older, "32"))}[differs]
    commands = [[sys.executable, "-m", "ferkit.cli", "train", "--data", str(data), "--val",
                 str(pattern_data / "val"), "--epochs", "1", "--batch-size", batch, "--out", str(tmp_path / "run"),
                 "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(process)]
                for process, (data, batch) in enumerate(given)]
    began = time.monotonic()
    processes = [subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env={**os.environ, "KERAS_BACKEND": "jax"})
                 for command in commands]
    errors = [process.communicate(timeout=300)[1] for process in processes]
    assert [process.returncode for process in processes] == [2, 2], errors
    for error in errors:
        assert error.strip().splitlines()[-1] == ("error: process 1 was given other settings or data (faces per class) "
                                                   "than process 0: give every process of the job the same options, "
                                                   "and the same data")
    assert time.monotonic() - began < 300


def test_each_local_process_is_given_its_own_share_of_the_gpus(monkeypatch):
    from ferkit.distributed import gpus_of, visible_gpus

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3,4,5,6,7")
    gpus = visible_gpus()
    assert [gpus_of(p, 8, gpus) for p in (0, 7)] == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "7"}]
    assert [gpus_of(p, 2, gpus) for p in (0, 1)] == [{"CUDA_VISIBLE_DEVICES": "0,1,2,3"}, {"CUDA_VISIBLE_DEVICES": "4,5,6,7"}]
    assert gpus_of(0, 3, gpus) == {}  # not an even split: JAX places them
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == [] and gpus_of(0, 2, []) == {}  # a CPU job's processes are left as they are
