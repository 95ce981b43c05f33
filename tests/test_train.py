import csv
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import write_pattern_dataset
from ferkit.config import TrainConfig
from ferkit.data import load_dataset
from ferkit.errors import FerkitError
from ferkit.evaluation import evaluate
from ferkit.labels import EMOTIONS
from ferkit.runtime import read_metadata
from ferkit.runs import HISTORY_COLUMNS, RUN_FILES, RunState, read_history
from ferkit.training import TrainingInterrupted, train
from click.testing import CliRunner
from ferkit.cli import cli


def _config(pattern_data, out, **overrides):
    return TrainConfig(data=str(pattern_data / "train"), val=str(pattern_data / "val"), out=str(out), **overrides)


def test_a_run_folder_holds_everything(trained_run):
    for name in RUN_FILES:
        assert (trained_run / name).exists(), name
    history = read_history(trained_run / "history.csv")
    assert history["epoch"] == list(range(1, 9))
    assert (trained_run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((trained_run / "config.json").read_text())
    assert config["model"] == "seed-cnn" and config["classes"] == list(read_metadata(trained_run).classes)
    state = RunState.load(trained_run)
    assert state.status == "finished" and state.epochs_done == 8


def test_training_learns_the_generated_classes(trained_run, pattern_data):
    state = RunState.load(trained_run)
    assert state.best_val_accuracy > 0.6  # chance is 1/7
    # The saved best model scores on val exactly what training recorded for that epoch.
    report = evaluate(trained_run, load_dataset(pattern_data / "val"))
    assert report.accuracy == pytest.approx(state.best_val_accuracy, abs=1e-6)


def test_training_is_repeatable_with_a_seed(pattern_data, tmp_path):
    first = read_history(train(_config(pattern_data, tmp_path / "a", epochs=2, seed=7), verbose=0) / "history.csv")
    second = read_history(train(_config(pattern_data, tmp_path / "b", epochs=2, seed=7), verbose=0) / "history.csv")
    assert np.allclose(first["loss"], second["loss"], rtol=1e-5)
    assert first["val_accuracy"] == second["val_accuracy"]


def test_resume_continues_where_the_run_stopped(pattern_data, tmp_path, caplog):
    given = _config(pattern_data, tmp_path / "r", epochs=2, augment=["flip", "zoom"])
    before = dataclasses.asdict(given)
    run = train(given, verbose=0)
    assert dataclasses.asdict(given) == before  # what training resolves goes to the run folder, not back into it
    assert TrainConfig.load(run / "config.json").classes == list(EMOTIONS)
    config = TrainConfig.load(run / "config.json")
    config.epochs = 4
    from ferkit.export import export_onnx

    export_onnx(run, run / "best.onnx")
    with caplog.at_level("WARNING", logger="ferkit"):
        train(config, resume=True, verbose=0)
    assert "holds exports of the model as it was before this resume (best.onnx)" in caplog.text
    history = read_history(run / "history.csv")
    assert history["epoch"] == [1, 2, 3, 4]
    assert RunState.load(run).epochs_done == 4
    # other settings would make it another run, recorded as this one: refused, the run left as it was
    recorded = (run / "config.json").read_text()
    with pytest.raises(FerkitError, match=r"was trained with other settings \(learning_rate, augment\)"):
        train(dataclasses.replace(config, epochs=6, learning_rate=0.5, augment=["flip"]), resume=True, verbose=0)
    assert (run / "config.json").read_text() == recorded and RunState.load(run).epochs_done == 4
    # without its checkpoint it cannot go on where it stopped: refused, not started again over its records
    shutil.rmtree(run / "backup")
    with pytest.raises(FerkitError, match=r"has 4 epoch\(s\) done but its checkpoint \(backup/\) is gone.*its last model \(--init .*last.keras"):
        train(dataclasses.replace(config, epochs=6), resume=True, verbose=0)
    (run / "last.keras").rename(run / "last.kept")  # as a run brought back from a GPU machine lacks it
    with pytest.raises(FerkitError, match=r"is gone.*its best model \(--init .*best.keras"):
        train(dataclasses.replace(config, epochs=6), resume=True, verbose=0)
    (run / "last.kept").rename(run / "last.keras")
    assert read_history(run / "history.csv")["epoch"] == [1, 2, 3, 4] and RunState.load(run).epochs_done == 4
    # the saved models are the bare network: augmentation layers stay out of them
    from ferkit.runtime import load_classifier

    layers = [type(layer).__name__ for layer in load_classifier(run / "last.keras").model.layers]
    assert not any(name.startswith("Random") for name in layers)


def test_a_resumed_run_starts_from_its_backed_up_weights_and_optimizer_step(pattern_data, tmp_path):
    import keras

    from ferkit.runtime import load_classifier

    run = train(_config(pattern_data, tmp_path / "r", epochs=2, batch_size=32, optimizer="sgd"), verbose=0)
    saved = load_classifier(run / "last.keras").model.get_weights()
    seen = {}

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):  # after ferkit's callbacks have restored the run
            seen["weights"] = self.model.get_weights()
            seen["step"] = int(self.model.optimizer.iterations)

    config = TrainConfig.load(run / "config.json")
    config.epochs = 3
    train(config, resume=True, verbose=0, callbacks=[Probe()])
    assert all(np.array_equal(a, b) for a, b in zip(seen["weights"], saved))
    assert seen["step"] == 2 * -(-len(load_dataset(pattern_data / "train")) // 32)


def test_a_cosine_run_given_more_epochs_on_resume_says_its_schedule_was_stretched(pattern_data, tmp_path, caplog):
    import dataclasses

    config = _config(pattern_data, tmp_path / "run", epochs=1, lr_schedule="cosine")
    train(config, verbose=0)
    with caplog.at_level("INFO", logger="ferkit"):
        train(dataclasses.replace(config, epochs=2), resume=True, verbose=0)
    assert "the cosine schedule now spans 2 epochs instead of 1" in caplog.text
    assert read_history(tmp_path / "run" / "history.csv")["epoch"] == [1, 2]


def test_an_existing_run_is_never_overwritten_silently(pattern_data, trained_run, tmp_path):
    with pytest.raises(FerkitError, match="already exists"):
        train(_config(pattern_data, trained_run, epochs=1), verbose=0)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    for overwrite in (False, True):  # neither --resume nor --overwrite is suggested for it
        with pytest.raises(FerkitError, match="^.*mine holds files and is not a ferkit run folder; choose another --out$"):
            train(_config(pattern_data, other, epochs=1), overwrite=overwrite, verbose=0)
    assert (other / "notes.txt").read_text() == "mine"


def test_a_run_folder_another_training_made_while_this_one_loaded_is_left_to_it(pattern_data, tmp_path, monkeypatch):
    import fcntl

    import ferkit.training

    run, holders = tmp_path / "run", []
    real_fit_data = ferkit.training.fit_data

    def another_training_starts_meanwhile(*args, **kwargs):  # `ferkit train --out run` in another shell
        run.mkdir()
        (run / "config.json").write_text("{}")
        holders.append(os.open(run, os.O_RDONLY))
        fcntl.flock(holders[0], fcntl.LOCK_EX | fcntl.LOCK_NB)
        return real_fit_data(*args, **kwargs)

    monkeypatch.setattr(ferkit.training, "fit_data", another_training_starts_meanwhile)
    with pytest.raises(FerkitError, match="is being trained by another process"):
        train(_config(pattern_data, run, epochs=1), overwrite=True, verbose=0)
    os.close(holders[0])
    assert (run / "config.json").read_text() == "{}"


def test_a_run_folder_on_a_file_system_without_locks_is_trained_without_one(tmp_path, monkeypatch):
    import errno
    import fcntl

    from ferkit.runs import hold_run_folder, release_run_folder

    (tmp_path / "run").mkdir()
    for code, refused in ((errno.ENOLCK, False), (errno.EWOULDBLOCK, True)):
        def flock(descriptor, operation, code=code):
            raise OSError(code, os.strerror(code))

        monkeypatch.setattr(fcntl, "flock", flock)  # as some NFS and FUSE mounts answer
        if refused:
            with pytest.raises(FerkitError, match="is being trained by another process"):
                hold_run_folder(tmp_path / "run")
        else:
            hold_run_folder(tmp_path / "run")
            release_run_folder(tmp_path / "run")


def test_replacing_a_run_removes_its_default_exports_and_keeps_other_files(tmp_path):
    from ferkit.runs import clear_run_folder

    run = tmp_path / "run"
    (run / "eval-best-val").mkdir(parents=True)
    for name in ("config.json", "best.keras", "best.onnx", "last.onnx", "mine-int8.onnx", "notes.txt"):
        (run / name).write_text("x")
    clear_run_folder(run)
    assert sorted(p.name for p in run.iterdir()) == ["mine-int8.onnx", "notes.txt"]


def test_a_killed_run_is_usable_and_resumes(pattern_data, tmp_path):
    run = tmp_path / "killed"
    command = [sys.executable, "-m", "ferkit.cli", "train", "--data", str(pattern_data / "train"),
               "--val", str(pattern_data / "val"), "--epochs", "500", "--out", str(run)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while RunState.load(run).epochs_done < 2 if (run / "state.json").exists() else True:
        assert time.time() < deadline and process.poll() is None, process.communicate()
        time.sleep(0.2)
    # a second process told to train the same folder meanwhile is refused, leaving the run to the first
    second = subprocess.run([sys.executable, "-m", "ferkit.cli", "train", "--resume", str(run), "--epochs", "500"],
                            capture_output=True, text=True, timeout=120)
    assert second.returncode == 2 and f"{run} is being trained by another process" in second.stderr, second.stderr
    replacing = subprocess.run([*command[:-2], "--out", str(run), "--overwrite"], capture_output=True, text=True, timeout=120)
    assert replacing.returncode == 2 and f"{run} is being trained by another process" in replacing.stderr
    assert {"config.json", "history.csv", "state.json"} <= {p.name for p in run.iterdir()}  # nothing cleared first
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert "continue with: ferkit train --resume" in err and "Traceback" not in err
    state = RunState.load(run)
    assert state.status == "interrupted" and state.epochs_done >= 2
    assert read_metadata(run).classes  # best.keras is complete and readable
    done = state.epochs_done
    resumed = subprocess.run(
        [sys.executable, "-m", "ferkit.cli", "train", "--resume", str(run), "--epochs", str(done + 1)],
        capture_output=True, text=True, env={**os.environ},
    )
    assert resumed.returncode == 0, resumed.stderr
    assert read_history(run / "history.csv")["epoch"] == list(range(1, done + 2))


def test_an_epoch_cut_short_prints_no_progress_line(pattern_data, tmp_path, capsys):
    import keras

    class KillInEpochThree(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_end(self, batch, logs=None):
            if self.epoch == 2 and batch == 0:
                os.kill(os.getpid(), signal.SIGTERM)

    config = _config(pattern_data, tmp_path / "run", epochs=5, batch_size=16)
    with pytest.raises(TrainingInterrupted, match="interrupted after 2 of 5 epochs"):
        train(config, verbose=2, callbacks=[KillInEpochThree()])
    lines = capsys.readouterr().out.splitlines()
    # a line per recorded epoch; epoch 3, dropped, has its heading but no line that reads like a finished epoch
    assert sum("/step" in line for line in lines) == 2 and "Epoch 3/5" in lines


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_while_training_starts_up_is_kept_and_leaves_the_run_folder_alone(pattern_data, tmp_path, monkeypatch, signum):
    """Ctrl-C or kill while the model and data are made ready: the run stops before its first epoch, even
    where a KeyboardInterrupt would be lost (raised in a garbage-collection callback), and an earlier run
    that --overwrite would replace is kept as it was."""
    import ferkit.training as training
    run = tmp_path / "run"
    config = _config(pattern_data, run, epochs=1, batch_size=16)
    train(config, verbose=0)
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    real_fit_data = training.fit_data

    def fit_data_with_a_signal(*args, **kwargs):
        os.kill(os.getpid(), signum)
        return real_fit_data(*args, **kwargs)

    monkeypatch.setattr(training, "fit_data", fit_data_with_a_signal)
    handler = signal.getsignal(signum)  # Python's own, or SIG_IGN where the suite runs in the background
    with pytest.raises(TrainingInterrupted, match=f"interrupted before training began; {run} was not written"):
        train(_config(pattern_data, run, epochs=3, batch_size=16), overwrite=True, verbose=0)
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before
    assert signal.getsignal(signum) is handler  # the run's own handler is gone with it


def test_a_stop_while_the_init_model_is_scored_leaves_the_run_folder_that_overwrite_would_replace(pattern_data, tmp_path,
                                                                                                    monkeypatch):
    import ferkit.training as training
    run = tmp_path / "run"
    train(_config(pattern_data, run, epochs=1, batch_size=16), verbose=0)
    before = {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()}
    real_score = training._log_starting_score

    def score_with_a_signal(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the --init model is scored: training has not begun
        return real_score(*args, **kwargs)

    monkeypatch.setattr(training, "_log_starting_score", score_with_a_signal)
    shutil.copytree(run, tmp_path / "init")
    with pytest.raises(TrainingInterrupted, match=f"interrupted before training began; {run} was not written"):
        train(_config(pattern_data, run, epochs=3, batch_size=16, init=str(tmp_path / "init")), overwrite=True, verbose=0)
    assert {path.name: path.read_bytes() for path in run.iterdir() if path.is_file()} == before


def test_overwrite_replaces_the_runs_own_files_and_names_the_users_it_keeps(pattern_data, tmp_path, caplog):
    run = tmp_path / "run"
    train(_config(pattern_data, run, epochs=1, batch_size=16), verbose=0)
    (run / "best.onnx").write_bytes(b"an export of the first model")  # where `ferkit export RUN` writes
    (run / "eval-val").mkdir()
    (run / "int8.onnx").write_bytes(b"an export the user named")
    first = (run / "last.keras").read_bytes()
    with caplog.at_level("WARNING", logger="ferkit"):
        train(_config(pattern_data, run, epochs=1, batch_size=16, seed=7), overwrite=True, verbose=0)
    assert not (run / "best.onnx").exists() and not (run / "eval-val").exists()
    assert (run / "int8.onnx").read_bytes() == b"an export the user named"
    assert (run / "last.keras").read_bytes() != first
    kept = [r.getMessage() for r in caplog.records if "kept what ferkit did not write" in r.getMessage()]
    assert len(kept) == 1 and "int8.onnx" in kept[0] and "best.onnx" not in kept[0]


def test_a_kill_during_the_saves_of_an_epoch_lets_them_finish(pattern_data, tmp_path, monkeypatch):
    """SIGTERM arrives while epoch 2's models are being written: epoch 2 is recorded whole, and the run
    stops in epoch 3, which leaves no trace."""
    import ferkit.callbacks

    real_save, calls = ferkit.callbacks.save_keras_model, []

    def save_with_a_kill(model, path, metadata):
        calls.append(Path(path).name)
        if calls.count("last.keras") == 2 and Path(path).name == "last.keras":
            os.kill(os.getpid(), signal.SIGTERM)
        return real_save(model, path, metadata)

    monkeypatch.setattr(ferkit.callbacks, "save_keras_model", save_with_a_kill)
    run = tmp_path / "run"
    config = _config(pattern_data, run, epochs=5, batch_size=16)
    with pytest.raises(TrainingInterrupted, match="interrupted after 2 of 5 epochs"):
        train(config, verbose=0)
    state = RunState.load(run)
    assert state.status == "interrupted" and state.epochs_done == 2
    assert read_history(run / "history.csv")["epoch"] == [1, 2]
    assert read_metadata(run / "last.keras").extra["epoch"] == 2
    best = read_metadata(run / "best.keras").extra
    assert best["epoch"] == state.best_epoch and best["val_accuracy"] == pytest.approx(state.best_val_accuracy)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone with the run
    monkeypatch.undo()
    train(config, resume=True, verbose=0)
    assert read_history(run / "history.csv")["epoch"] == [1, 2, 3, 4, 5]


def test_a_kill_between_the_history_row_and_the_models_still_records_the_epoch_whole(pattern_data, tmp_path, monkeypatch):
    """SIGTERM arrives after epoch 2's history row and backup, before its models and state: every record
    of the run still says 2 epochs."""
    import ferkit.callbacks

    real_remove, calls = ferkit.callbacks.remove_checkpoints, []

    def remove_with_a_kill(run, names):  # the last step of the backup, which follows the history row
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real_remove(run, names)

    monkeypatch.setattr(ferkit.callbacks, "remove_checkpoints", remove_with_a_kill)
    run = tmp_path / "run"
    with pytest.raises(TrainingInterrupted, match="interrupted after 2 of 5 epochs"):
        train(_config(pattern_data, run, epochs=5, batch_size=16), verbose=0)
    state = RunState.load(run)
    assert state.status == "interrupted" and state.epochs_done == 2
    assert read_history(run / "history.csv")["epoch"] == [1, 2]
    assert read_metadata(run / "last.keras").extra["epoch"] == 2


@pytest.mark.parametrize(
    "options",
    [
        {"optimizer": "sgd", "learning_rate": 0.01, "weight_decay": 1e-4, "lr_schedule": "cosine"},
        {"optimizer": "adamw", "weight_decay": 1e-4, "label_smoothing": 0.1, "class_weight": "balanced"},
        # one epoch: bfloat16 is emulated, and slow, on CPUs without it
        {"model": "ferkit-net-s", "precision": "mixed_bfloat16", "augment": ["flip", "erase"], "epochs": 1},
        {"lr_schedule": "plateau", "lr_patience": 1, "class_weight": "sqrt",
         "augment": ["flip", "shift", "rotate", "zoom", "contrast", "erase"]},
    ],
)
def test_training_options_run_and_are_recorded(pattern_data, tmp_path, options):
    run = train(_config(pattern_data, tmp_path / "opts", **{"epochs": 3, **options}), verbose=0)
    recorded = json.loads((run / "config.json").read_text())
    assert {k: recorded[k] for k in options} == options
    history = read_history(run / "history.csv")
    assert len(history["epoch"]) == recorded["epochs"] and all(np.isfinite(history["loss"]))
    if options.get("precision") == "mixed_bfloat16":
        # saved models compute in float32 whatever the training precision
        from ferkit.runtime import load_classifier

        model = load_classifier(run / "best.keras").model
        assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    if options.get("lr_schedule") == "cosine":
        assert history["learning_rate"][2] < history["learning_rate"][0]


def test_plateau_halves_the_rate_when_val_accuracy_stalls(pattern_data, tmp_path):
    # With patience 1 and a tiny learning rate, val accuracy cannot keep improving for 5 epochs.
    config = _config(pattern_data, tmp_path / "plateau", epochs=5, lr_schedule="plateau", lr_patience=1, learning_rate=1e-6)
    history = read_history(train(config, verbose=0) / "history.csv")
    assert min(history["learning_rate"]) <= history["learning_rate"][0] / 2 * (1 + 1e-6)


@pytest.mark.parametrize(
    "bad",
    [{"optimizer": "rmsprop"}, {"lr_schedule": "step"}, {"class_weight": "inverse"}, {"label_smoothing": 1.5}, {"distill": 0}, {"mixup": -0.2},
     {"ema": 1.0}, {"lr_patience": 0, "lr_schedule": "plateau"}, {"warmup_epochs": 2, "lr_schedule": "plateau"}, {"warmup_epochs": 30, "lr_schedule": "cosine"}],
)
def test_bad_options_are_refused(bad):
    with pytest.raises(FerkitError):
        TrainConfig(**bad)


@pytest.mark.parametrize(
    ("bad", "flag"),
    [({"zoom": 5.0}, "--zoom"), ({"shift": -2.0}, "--shift"), ({"rotate": 720.0}, "--rotate"), ({"val_split": 0.0}, "--val-split"),
     ({"weight_decay": -1.0}, "--weight-decay"), ({"learning_rate": float("nan")}, "--lr"), ({"mixup": float("inf")}, "--mixup"),
     ({"rotate": float("nan")}, "--rotate"), ({"weight_decay": float("nan")}, "--weight-decay"),
     ({"classes": ["happy", "happy", "sad"]}, "--classes"), ({"epochs": "2"}, "--epochs must be a number, not '2'"),
     ({"save_period": -1}, "--save-period must be 0 \\(off\\) or a number of epochs, not -1")],
)
def test_numbers_out_of_range_or_not_finite_are_refused_naming_their_option(bad, flag):
    with pytest.raises(FerkitError, match=flag):
        TrainConfig(**bad)


@pytest.mark.parametrize(
    ("given", "words"),
    [({"val": "val", "val_split": 0.3}, "--val-split applies without --val"), ({"distill": 0.7}, "--distill goes with --teacher"),
     ({"fine_tune_epochs": 3}, "--fine-tune-epochs goes with --fine-tune"),
     ({"lr_patience": 2, "lr_schedule": "cosine"}, "--lr-patience goes with --lr-schedule plateau"),
     ({"weight_decay": 1e-4}, "--weight-decay is decoupled weight decay, for --optimizer adamw or sgd"),
     ({"shift": 0.3, "augment": "flip"}, "--shift goes with --augment shift"), ({"rotate": 30.0}, "--rotate goes with --augment rotate"),
     ({"cache_features": False}, "--no-cache-features applies to a frozen pretrained backbone"),
     ({"init": "default", "weights": "none"}, "--weights chooses a new network's starting weights")],
)
def test_a_setting_that_would_change_nothing_is_refused_before_a_run_starts(pattern_data, tmp_path, given, words):
    config = TrainConfig(data=str(pattern_data / "train"), epochs=1, out=str(tmp_path / "run"), **given)
    with pytest.raises(FerkitError, match=f"{words}.*; as given it would change nothing"):
        train(config, verbose=0)
    assert not (tmp_path / "run").exists()
    TrainConfig(**given).save(tmp_path / "config.json")  # a recorded config is read as it was written
    assert TrainConfig.load(tmp_path / "config.json") == TrainConfig(**given)


def test_paths_serve_in_a_config_as_well_as_strings(tmp_path):
    config = TrainConfig(data=tmp_path / "train", val=tmp_path / "val", out=tmp_path / "run", init=tmp_path / "m.keras")
    assert (config.data, config.val, config.out, config.init) == tuple(str(tmp_path / n) for n in ("train", "val", "run", "m.keras"))
    config.save(tmp_path / "config.json")  # JSON-able: a Path was not
    assert TrainConfig.load(tmp_path / "config.json") == config


def test_train_given_a_run_folder_instead_of_a_config_says_how_to_go_on_with_it(trained_run):
    with pytest.raises(FerkitError, match="train takes a TrainConfig, not PosixPath"):
        train(trained_run)


def test_the_training_data_is_refused_as_its_own_validation_data(pattern_data, tmp_path):
    train_data = pattern_data / "train"
    config = TrainConfig(data=str(train_data), val=str(train_data / ".." / "train"), epochs=1, out=str(tmp_path / "run"))
    with pytest.raises(FerkitError, match="--val is the training data itself"):
        train(config, verbose=0)


def test_a_copy_of_the_training_data_is_refused_as_validation_data_and_a_few_copied_faces_are_warned_of(pattern_data, tmp_path):
    from click.testing import CliRunner

    from ferkit.cli import cli

    shutil.copytree(pattern_data / "train", tmp_path / "copy")
    config = TrainConfig(data=str(pattern_data / "train"), val=str(tmp_path / "copy"), epochs=1, out=str(tmp_path / "run"))
    faces = len(list((tmp_path / "copy").rglob("*.png")))
    with pytest.raises(FerkitError, match=f"{faces} of the {faces} faces of --val .* are copies of training faces"):
        train(config, verbose=0)
    assert not (tmp_path / "run").exists()
    shutil.copytree(pattern_data / "val", tmp_path / "val")
    for face in sorted((pattern_data / "train" / "happy").iterdir())[:3]:
        shutil.copy(face, tmp_path / "val" / "happy" / f"copy-{face.name}")
    result = CliRunner().invoke(cli, ["train", "--data", str(pattern_data / "train"), "--val", str(tmp_path / "val"),
                                      "--epochs", "1", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    val = len(list((tmp_path / "val").rglob("*.png")))
    assert f"3 of the {val} validation faces ({300 / val:.1f}%) are identical to training faces (copy-" in result.output
    tool = Path(__file__).resolve().parents[1] / "tools" / "seen_in_training.py"
    scored = subprocess.run([sys.executable, str(tool), str(tmp_path / "run"), "--data", str(pattern_data / "train"),
                             "--val", str(tmp_path / "val")], capture_output=True, text=True)
    assert scored.returncode == 0, scored.stderr
    lines = scored.stdout.splitlines()
    overall, seen, unseen = (float(line.rsplit(" ", 1)[1]) for line in lines)
    assert "3 faces identical to training faces" in lines[1] and f"{val - 3} faces not among" in lines[2]
    assert overall == pytest.approx((3 * seen + (val - 3) * unseen) / val, abs=1e-4)


def test_lists_may_be_given_as_comma_separated_names():
    config = TrainConfig(augment="flip, crop", classes="happy,sad")
    assert config.augment == ["flip", "crop"] and config.classes == ["happy", "sad"]


def test_a_run_whose_loss_becomes_nan_stops_with_an_error_and_records_no_nan_epoch(pattern_data, tmp_path):
    from ferkit.training import TrainingDiverged

    run = tmp_path / "diverged"
    config = _config(pattern_data, run, epochs=3, optimizer="sgd", learning_rate=1e30)
    with pytest.raises(TrainingDiverged, match="epoch 1"):
        train(config, verbose=0)
    state = RunState.load(run)
    assert (state.status, state.epochs_done) == ("diverged", 0)
    assert not (run / "last.keras").exists() and read_history(run / "history.csv")["epoch"] == []
    from ferkit.runtime import resolve_model_path

    with pytest.raises(FerkitError, match="its training diverged in the first epoch; train it again with a lower --lr"):
        resolve_model_path(run)  # what evaluate and predict say of it: not to resume it, which diverges again


def test_mixup_blends_two_faces_and_their_targets_alike():
    from ferkit.data.batches import face_batches

    # Face i is the unit vector e_i, so a blended face shows which faces it mixes and in what shares:
    # its target must be the same blend of their targets (x @ targets), its weight of their weights.
    n, classes = 50, 7
    labels = np.arange(n) % classes
    targets = np.eye(classes, dtype=np.float32)[labels] * 0.9 + 0.1 / classes
    batches = face_batches(np.eye(n, dtype=np.float32), targets, batch_size=16, to_input=lambda f: f, mixup=0.4,
                           sample_weight=1.0 + labels, seed=3)
    assert len(batches) == 4
    for epoch in range(2):
        seen, blended = np.zeros(n), 0
        for index in range(len(batches)):
            x, y, weight = batches[index]
            assert np.allclose(x.sum(axis=1), 1) and (x >= 0).all() and ((x > 0).sum(axis=1) <= 2).all()
            assert np.allclose(y, x @ targets, atol=1e-6)
            assert np.allclose(weight, x @ (1.0 + labels), atol=1e-5)
            seen += (x > 0).sum(axis=0)
            blended += ((x > 0).sum(axis=1) == 2).sum()
        assert (seen > 0).all()  # every face takes part in every epoch
        assert blended > n // 2  # faces are blended, not just copied
        batches.on_epoch_end()


def test_training_with_mixup_learns_the_generated_classes(pattern_data, tmp_path):
    run = train(_config(pattern_data, tmp_path / "mixup", epochs=8, mixup=0.2, class_weight="sqrt"), verbose=0)
    assert RunState.load(run).best_val_accuracy > 0.6  # chance is 1/7
    assert json.loads((run / "config.json").read_text())["mixup"] == 0.2


def test_a_student_learns_from_its_teacher_rather_than_wrong_labels(pattern_data, trained_run, tmp_path):
    # Every training face filed under the next class's name: alone, the labels teach the wrong classes.
    mislabelled = tmp_path / "mislabelled"
    for i, name in enumerate(EMOTIONS):
        shutil.copytree(pattern_data / "train" / name, mislabelled / EMOTIONS[(i + 1) % len(EMOTIONS)])
    common = dict(data=str(mislabelled), val=str(pattern_data / "val"), epochs=8)
    alone = train(TrainConfig(out=str(tmp_path / "alone"), **common), verbose=0)
    student = train(TrainConfig(out=str(tmp_path / "student"), teacher=str(trained_run), distill=1.0, **common), verbose=0)
    val = load_dataset(pattern_data / "val")
    assert evaluate(alone, val).accuracy < 0.3
    assert evaluate(student, val).accuracy > 0.6
    recorded = json.loads((student / "config.json").read_text())
    assert recorded["teacher"] == str(trained_run) and recorded["distill"] == 1.0


def test_distillation_mixes_the_teacher_with_the_true_label(pattern_data, trained_run):
    from ferkit.teacher import teacher_probabilities
    from ferkit.training_data import targets as _targets

    train_set = load_dataset(pattern_data / "train")
    teacher = teacher_probabilities(str(trained_run), train_set)
    assert teacher.shape == (len(train_set), 7) and np.allclose(teacher.sum(axis=1), 1, atol=1e-5)
    config = TrainConfig(teacher=str(trained_run), distill=0.25)
    targets = _targets(train_set.labels, 7, config, teacher)
    one_hot = np.eye(7)[train_set.labels]
    assert np.allclose(targets, 0.75 * one_hot + 0.25 * teacher, atol=1e-6)


def test_a_teacher_with_other_classes_is_refused(pattern_data, trained_run, tmp_path):
    data = tmp_path / "three"
    for name in ("happy", "sad", "surprise"):
        shutil.copytree(pattern_data / "train" / name, data / name)
    config = TrainConfig(data=str(data), val_split=0.2, classes=["happy", "sad", "surprise"], epochs=1,
                         out=str(tmp_path / "out"), teacher=str(trained_run))
    with pytest.raises(FerkitError, match="the teacher"):
        train(config, verbose=0)
    assert not (tmp_path / "out").exists()
    # nor are models of other classes averaged into one teacher: the message names the two models
    from ferkit.teacher import save_teacher_probabilities

    three = train(dataclasses.replace(config, teacher=None), verbose=0)
    with pytest.raises(FerkitError, match=f"{three} knows the classes happy, sad, surprise, {trained_run} angry, "):
        save_teacher_probabilities([trained_run, three], pattern_data / "train", tmp_path / "teacher.npz")
    assert not (tmp_path / "teacher.npz").exists()


JIT_PROBE = """
import keras, numpy as np
from ferkit.config import TrainConfig
from ferkit.training_model import build_training_model
config = TrainConfig(model="seed-cnn", data="unused", augment=["flip", "shift", "rotate", "zoom", "erase"])
model = build_training_model(keras, config, 7, 64)
model.fit(np.random.rand(64, *model.input_shape[1:]).astype("float32") * 255, np.arange(64) % 7, epochs=1, verbose=0)
print(keras.backend.backend(), model.jit_compile)
"""


def test_under_jax_the_augmented_train_step_is_compiled():
    # Keras' affine augmentation layers say they can't be XLA-compiled (true of TensorFlow's kernel
    # only); left so, JAX trains op by op, 0.7 s per step on an H100.
    pytest.importorskip("jax", reason="JAX is not installed (only the GPU training path uses it)")
    env = {**os.environ, "KERAS_BACKEND": "jax"}
    probe = subprocess.run([sys.executable, "-c", JIT_PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.split()[-2:] == ["jax", "True"]


def test_random_crops_are_whole_windows_of_the_face():
    from ferkit._keras import import_keras
    from ferkit.models import get_model_spec
    from ferkit.training_model import random_crop_layer

    keras = import_keras()
    spec = get_model_spec("ferkit-net-l")
    side, crop = spec.input_size[0], spec.crop
    face = np.arange(side * side, dtype=np.float32).reshape(1, side, side, 1)  # every pixel value unique
    layer = random_crop_layer(keras, TrainConfig(model=spec.name, augment=["crop"]), seed=3)
    shifted = keras.ops.convert_to_numpy(layer(np.repeat(face, 64, axis=0), training=True))
    start = (side - crop) // 2
    seen = set()
    for view in shifted[:, start:start + crop, start:start + crop, 0]:
        top, left = divmod(int(view[0, 0]), side)  # the window's first pixel says where it was cut
        assert top <= side - crop and left <= side - crop
        assert np.array_equal(view, face[0, top:top + crop, left:left + crop, 0])
        seen.add((top, left))
    assert len(seen) > 10  # crops from all over the face, not one fixed window


def test_the_crop_augmentation_needs_a_cropping_model(pattern_data, tmp_path):
    with pytest.raises(FerkitError, match="crop augmentation needs a model that crops"):
        train(_config(pattern_data, tmp_path / "crop", epochs=1, augment=["crop"]), verbose=0)
    assert not (tmp_path / "crop" / "config.json").exists()


def test_warmup_rises_to_the_peak_rate_then_cosine_decays(pattern_data, tmp_path):
    peak = 0.1
    config = _config(pattern_data, tmp_path / "warm", epochs=4, optimizer="sgd", learning_rate=peak,
                     lr_schedule="cosine", warmup_epochs=2)
    rates = read_history(train(config, verbose=0) / "history.csv")["learning_rate"]
    assert rates[0] == pytest.approx(peak / 10 + (peak - peak / 10) / 2, rel=1e-5)  # half-way up the ramp
    assert rates[1] == pytest.approx(peak, rel=1e-5)
    assert rates[3] == pytest.approx(peak * 0.01, rel=1e-4)  # cosine's floor
    assert rates[2] < rates[1]


@pytest.mark.parametrize("model", ["seed-cnn", "ferkit-net-s"])  # without and with batch norm
def test_ema_validates_and_saves_the_averaged_weights_and_resumes(pattern_data, tmp_path, model):
    from ferkit.runtime import load_classifier

    config = _config(pattern_data, tmp_path / "ema", model=model, epochs=2, optimizer="sgd", learning_rate=0.05, ema=0.9)
    run = train(config, verbose=0)
    config.epochs = 3
    train(config, resume=True, verbose=0)
    checkpoint = _backed_up_training_model(run)
    optimizer = checkpoint.optimizer
    averages = {id(v): a for v, a in zip(optimizer._trainable_variables, optimizer._model_variables_moving_average)}
    trainable = [v for v in checkpoint.weights if v.trainable]  # no augmentation: the checkpoint is the network
    saved_model = load_classifier(run / "last.keras").model
    saved = [np.asarray(v) for v in saved_model.weights if v.trainable]
    assert all(np.allclose(a, np.asarray(averages[id(v)])) for a, v in zip(saved, trainable))
    assert not all(np.allclose(a, np.asarray(v)) for a, v in zip(saved, trainable))  # the checkpoint keeps the raw ones
    # validation scored the averaged weights: the saved model reproduces the recorded accuracy
    report = evaluate(run / "last.keras", load_dataset(pattern_data / "val"))
    assert report.accuracy == pytest.approx(read_history(run / "history.csv")["val_accuracy"][-1], abs=1e-6)


def test_a_resumed_run_may_change_the_precision_of_its_arithmetic(pattern_data, tmp_path):
    """bfloat16 pays on a CPU with bf16 instructions and costs several times over on one without: a run
    that moves between machines resumes in what suits each. Its weights stay float32 either way."""
    import keras
    from click.testing import CliRunner

    from ferkit.checkpoints import save_compact_checkpoint
    from ferkit.cli import cli

    run = train(_config(pattern_data, tmp_path / "r", epochs=1), verbose=0)
    seen = []

    class Policy(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            seen.append(keras.mixed_precision.global_policy().name)

    config = dataclasses.replace(TrainConfig.load(run / "config.json"), epochs=2, precision="mixed_bfloat16")
    train(config, resume=True, verbose=0, callbacks=[Policy()])
    assert seen == ["mixed_bfloat16"]
    assert TrainConfig.load(run / "config.json").precision == "mixed_bfloat16"
    back = CliRunner().invoke(cli, ["train", "--resume", str(run), "--epochs", "3", "--precision", "float32"])
    assert back.exit_code == 0, back.output
    assert TrainConfig.load(run / "config.json").precision == "float32"
    assert read_history(run / "history.csv")["epoch"] == [1, 2, 3]
    assert all(w.dtype == "float32" for w in keras.saving.load_model(run / "last.keras").weights)
    # config.json holds the latest settings; resumes.csv says what each resume changed
    with open(run / "resumes.csv", newline="") as file:
        resumes = list(csv.DictReader(file))
    assert [(r["after_epoch"], r["processes"], r["changed"]) for r in resumes] == [
        ("1", "1", "epochs: 1 -> 2; precision: float32 -> mixed_bfloat16"),
        ("2", "1", "epochs: 2 -> 3; precision: mixed_bfloat16 -> float32")]
    packed = save_compact_checkpoint(run, tmp_path / "packed")  # and it travels with a pack
    assert (packed / "resumes.csv").read_bytes() == (run / "resumes.csv").read_bytes()


def test_a_packed_run_resumes_on_the_same_schedule(pattern_data, tmp_path, caplog):
    import keras

    from ferkit.checkpoints import restore_packed_best_model, save_compact_checkpoint
    from ferkit.runtime import load_classifier, save_keras_model

    options = dict(optimizer="sgd", learning_rate=0.05, lr_schedule="cosine", warmup_epochs=1, ema=0.9,
                   augment=["flip"], epochs=4)
    whole = read_history(train(_config(pattern_data, tmp_path / "whole", **options), verbose=0) / "history.csv")
    first = train(_config(pattern_data, tmp_path / "first", **{**options, "epochs": 2}), verbose=0)
    _call_best_model_of_epoch(first, 1)  # as when epoch 2 scores lower: the pack keeps it beside the checkpoint
    packed = save_compact_checkpoint(first, tmp_path / "packed")
    assert not (packed / "checkpoint.keras").exists()
    assert TrainConfig.load(packed / "config.json").out == str(packed)
    assert (packed / "checkpoint.npz").stat().st_size < (first / "backup" / "latest.weights.h5").stat().st_size / 2
    with pytest.raises(FerkitError, match="already exists"):
        save_compact_checkpoint(first, packed)
    # the best model travels too, and comes back as best.keras on resuming
    assert (packed / "best.npz").exists() and not (packed / "best.keras").exists()
    with pytest.raises(FerkitError, match="is a packed run: its models come back when it resumes"):
        load_classifier(packed)
    restored = shutil.copytree(packed, tmp_path / "restored")
    restore_packed_best_model(keras, restored, TrainConfig.load(restored / "config.json"))
    faces = load_dataset(pattern_data / "val").images
    best_before, best_after = (load_classifier(run / "best.keras").predict_proba(faces) for run in (first, restored))
    assert np.abs(best_after - best_before).max() < 0.01  # the same model, to float16's precision
    before, after = read_metadata(first / "best.keras"), read_metadata(restored / "best.keras")
    assert after.extra.pop("run") == str(restored) and before.extra.pop("run") == str(first)
    assert after == before  # the same classes, input, epoch and score
    # a best model of another epoch in the folder (an older copy of the run) gives way to the pack's, with a warning
    older = shutil.copytree(packed, tmp_path / "older")
    stale = read_metadata(first / "best.keras")
    stale.extra["epoch"] = 99
    save_keras_model(keras.saving.load_model(first / "best.keras"), older / "best.keras", stale)
    with caplog.at_level("WARNING", logger="ferkit"):
        restore_packed_best_model(keras, older, TrainConfig.load(older / "config.json"))
    assert "another best model than the pack's (epoch 99)" in caplog.text
    assert read_metadata(older / "best.keras").extra["epoch"] == before.extra["epoch"] and not (older / "best.npz").exists()

    config = TrainConfig.load(packed / "config.json")
    config.epochs, config.out = 4, str(packed)
    train(config, resume=True, verbose=0)
    assert (packed / "best.keras").exists() and not (packed / "best.npz").exists()
    resumed = read_history(packed / "history.csv")
    assert resumed["epoch"] == [1, 2, 3, 4]
    # the schedule went on from the step where the packed run stopped (the first two epochs had their own)
    assert np.allclose(resumed["learning_rate"][2:], whole["learning_rate"][2:], rtol=1e-5)
    # it kept learning from the packed weights rather than starting afresh
    assert resumed["val_accuracy"][-1] >= resumed["val_accuracy"][1] - 0.05
    report = evaluate(load_classifier(packed / "last.keras"), load_dataset(pattern_data / "val"))
    assert report.accuracy > 0.6  # chance is 1/7


def test_a_pack_whose_best_model_is_its_last_epoch_holds_it_once(pattern_data, tmp_path):
    import keras

    from ferkit.checkpoints import restore_packed_best_model, save_compact_checkpoint
    from ferkit.runtime import load_classifier

    run = train(_config(pattern_data, tmp_path / "run", ema=0.9, epochs=1), verbose=0)  # its one epoch is its best
    packed = save_compact_checkpoint(run, tmp_path / "packed")
    assert (packed / "checkpoint.npz").exists() and not (packed / "best.npz").exists()
    restored = shutil.copytree(packed, tmp_path / "restored")
    restore_packed_best_model(keras, restored, TrainConfig.load(restored / "config.json"))
    assert (restored / "checkpoint.npz").exists()  # still there to resume from
    faces = load_dataset(pattern_data / "val").images
    before, after = (load_classifier(folder / "best.keras").predict_proba(faces) for folder in (run, restored))
    assert np.abs(after - before).max() < 0.01  # the averaged weights it validated, to float16's precision
    assert read_metadata(restored / "best.keras").extra["epoch"] == 1
    # once a later epoch is not the best, the next pack keeps epoch 1's model in the same bytes (stored once)
    later = shutil.copytree(run, tmp_path / "later")
    config = dataclasses.replace(TrainConfig.load(later / "config.json"), epochs=2, out=str(later))
    train(config, resume=True, verbose=0)
    shutil.copy2(run / "best.keras", later / "best.keras")
    _call_best_model_of_epoch(later, 1)
    repacked = save_compact_checkpoint(later, tmp_path / "repacked")
    assert (repacked / "best.npz").read_bytes() == (packed / "checkpoint.npz").read_bytes()
    # the one-file pack resumes
    config = dataclasses.replace(TrainConfig.load(packed / "config.json"), epochs=2)
    train(config, resume=True, verbose=0)
    assert read_history(packed / "history.csv")["epoch"] == [1, 2]
    assert not (packed / "checkpoint.npz").exists() and read_metadata(packed / "best.keras").extra["epoch"] in (1, 2)


def _call_best_model_of_epoch(run: Path, epoch: int) -> None:
    """Record the run's best.keras, and its state, as epoch `epoch`'s best model."""
    import keras

    from ferkit.runtime import save_keras_model

    metadata = read_metadata(run / "best.keras")
    metadata.extra["epoch"] = epoch
    save_keras_model(keras.saving.load_model(run / "best.keras"), run / "best.keras", metadata)
    state = RunState.load(run)
    state.best_epoch = epoch
    state.save(run)


def test_saved_teacher_probabilities_train_a_student_like_the_teacher_itself(pattern_data, trained_run, tmp_path):
    from click.testing import CliRunner

    from ferkit.cli import cli
    from ferkit.teacher import load_teacher_probabilities

    saved = tmp_path / "teacher.npz"
    result = CliRunner().invoke(cli, ["teacher", str(trained_run), "--data", str(pattern_data / "train"),
                                      "--tta", "flip", "--out", str(saved)])
    assert result.exit_code == 0, result.output
    with np.load(saved) as stored:  # the command says how often the teacher agrees with the labels
        agree = np.mean(stored["probabilities"].argmax(axis=1) == stored["labels"])
    assert f"for {agree:.2%} of them" in result.output
    train_set = load_dataset(pattern_data / "train")
    from ferkit.teacher import teacher_probabilities

    # the file gives, face for face, what the model itself gives as a teacher (flip-averaged)
    assert np.allclose(load_teacher_probabilities(saved, train_set), teacher_probabilities(str(trained_run), train_set), atol=1e-6)
    shuffled = train_set.subset(np.random.default_rng(0).permutation(len(train_set)))
    assert np.allclose(load_teacher_probabilities(saved, shuffled), teacher_probabilities(str(trained_run), shuffled), atol=1e-6)
    run = train(_config(pattern_data, tmp_path / "student", epochs=2, teacher=str(saved), distill=0.7), verbose=0)
    assert json.loads((run / "config.json").read_text())["teacher"] == str(saved)
    assert CliRunner().invoke(cli, ["teacher", str(trained_run), "--data", str(pattern_data / "train"), "--out", str(saved)]).exit_code == 2


def test_saved_teacher_probabilities_follow_each_face_through_a_split(trained_run, tmp_path):
    """Faces in nested folders, and CSV rows, keep their own probabilities in the subset a
    validation split leaves for training."""
    from conftest import pattern_face
    from ferkit.data import split_dataset
    from ferkit.labels import FER2013_CSV_CODES
    from ferkit.teacher import load_teacher_probabilities, save_teacher_probabilities, teacher_probabilities

    rng = np.random.default_rng(3)
    codes = {name: code for code, name in FER2013_CSV_CODES.items()}
    rows = ["emotion,pixels,Usage"]
    for i in range(70):
        label = i % 7
        face = pattern_face(label, rng)
        rows.append(f"{codes[EMOTIONS[label]]},{' '.join(map(str, face.ravel()))},Training")
        folder = tmp_path / "nested" / EMOTIONS[label] / f"session{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        from PIL import Image

        Image.fromarray(face).save(folder / f"{i // 7 // 2}.png")  # the same file names in every class
    (tmp_path / "faces.csv").write_text("\n".join(rows) + "\n")
    for data in (tmp_path / "faces.csv", tmp_path / "nested"):
        dataset = load_dataset(data, usage="Training")
        saved = save_teacher_probabilities([trained_run], dataset, tmp_path / "teacher.npz", tta="flip", overwrite=True)
        train_set, _ = split_dataset(dataset, val_fraction=0.2, seed=1)
        assert np.allclose(load_teacher_probabilities(saved, train_set),
                           teacher_probabilities(str(trained_run), train_set), atol=1e-6), data.name


def test_teacher_probabilities_that_miss_faces_are_refused(pattern_data, trained_run, tmp_path):
    from PIL import Image

    from conftest import write_pattern_dataset
    from ferkit.teacher import load_teacher_probabilities, save_teacher_probabilities

    val = load_dataset(pattern_data / "val")
    saved = save_teacher_probabilities([trained_run], val, tmp_path / "val.npz")
    with pytest.raises(FerkitError, match="no probabilities for"):
        load_teacher_probabilities(saved, load_dataset(pattern_data / "train"))
    # made on a packed copy of the faces, which names them by row, not by file: said so
    from ferkit.data.packed import pack_dataset

    by_row = save_teacher_probabilities([trained_run], pack_dataset(pattern_data / "val", tmp_path / "packed"), tmp_path / "rows.npz")
    with pytest.raises(FerkitError, match=r"it names faces by their rows \(a CSV or a packed dataset\), this data by their files"):
        load_teacher_probabilities(by_row, val)
    with pytest.raises(FerkitError, match="takes 48x48 faces, the data is 40x40"):
        save_teacher_probabilities([trained_run], load_dataset(pattern_data / "val", image_size=(40, 40)), tmp_path / "x.npz")
    before = saved.read_bytes()
    with pytest.raises(FerkitError, match="already exists; pass --overwrite"):
        save_teacher_probabilities([trained_run], load_dataset(pattern_data / "train"), saved)
    assert saved.read_bytes() == before
    # a path serves as well as a dataset, and gives the same probabilities
    again = save_teacher_probabilities([trained_run], pattern_data / "val", tmp_path / "again.npz")
    with np.load(saved) as first, np.load(again) as second:
        assert np.array_equal(first["probabilities"], second["probabilities"])
    # other faces under the same names (a dataset written with another seed) are refused; the same faces at
    # another input size are not
    first_faces = write_pattern_dataset(tmp_path / "first", 3, seed=8)
    other_faces = write_pattern_dataset(tmp_path / "other", 3, seed=9)
    for photo in other_faces.rglob("*.png"):  # other photos under the same names and classes
        Image.open(photo).transpose(Image.Transpose.FLIP_TOP_BOTTOM).save(photo)
    for_first = save_teacher_probabilities([trained_run], first_faces, tmp_path / "first.npz")
    with pytest.raises(FerkitError, match="was saved for other faces: .* of the 21 training faces differ"):
        load_teacher_probabilities(for_first, load_dataset(other_faces))
    assert load_teacher_probabilities(saved, load_dataset(pattern_data / "val", image_size=(40, 40))).shape == (len(val), 7)


def test_a_teacher_made_one_model_at_a_time_equals_one_made_at_once(pattern_data, trained_run, tmp_path, caplog):
    import logging

    from ferkit.teacher import load_teacher_probabilities, save_teacher_probabilities

    val = load_dataset(pattern_data / "val")
    at_once = save_teacher_probabilities([trained_run, "default"], val, tmp_path / "both.npz", tta="flip")
    first = save_teacher_probabilities([trained_run], val, tmp_path / "run.npz", tta="flip")
    in_steps = save_teacher_probabilities([first, "default"], pattern_data / "val", tmp_path / "steps.npz", tta="flip")
    assert np.allclose(load_teacher_probabilities(in_steps, val), load_teacher_probabilities(at_once, val), atol=1e-6)
    with np.load(in_steps) as saved:
        assert json.loads(str(saved["about"]))["tta"] == ["saved", "flip"]
    # saved files alone need no model: their faces are read at the default size and matched by name
    default_only = save_teacher_probabilities(["default"], val, tmp_path / "default.npz", tta="flip")
    from_files = save_teacher_probabilities([first, default_only], pattern_data / "val", tmp_path / "files.npz")
    assert np.allclose(load_teacher_probabilities(from_files, val), load_teacher_probabilities(at_once, val), atol=1e-6)
    # a saved member must cover the faces, which is checked before any model member runs
    with caplog.at_level(logging.INFO, logger="ferkit"), pytest.raises(FerkitError, match="no probabilities for"):
        save_teacher_probabilities(["default", first], pattern_data / "train", tmp_path / "x.npz")
    assert "faces in" not in caplog.text
    with pytest.raises(FerkitError, match="no such file of teacher probabilities"):
        save_teacher_probabilities([tmp_path / "nosuch.npz"], val, tmp_path / "y.npz")
    with pytest.raises(FerkitError, match="a test-time augmentation applies to models only"):
        save_teacher_probabilities([first, default_only], val, tmp_path / "y.npz", tta="flip")
    (tmp_path / "junk.npz").write_text("junk")
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    for other in ("junk.npz", "other.npz"):  # read for the data's classes when no model is among the members
        with pytest.raises(FerkitError, match="is not a file of teacher probabilities"):
            save_teacher_probabilities([tmp_path / other], pattern_data / "val", tmp_path / "y.npz")
    assert not (tmp_path / "x.npz").exists() and not (tmp_path / "y.npz").exists()


def test_a_missing_teacher_or_weights_file_is_named_before_any_data_is_read(tmp_path):
    for options, message in (({"teacher": "nosuch.npz"}, "no such file of teacher probabilities: nosuch.npz"),
                             ({"teacher": "nosuch-run"}, "no such model or run folder: nosuch-run"),
                             ({"model": "vgg19-transfer", "weights": "nosuch.h5"}, "no such weights file: nosuch.h5")):
        # data that is not there either: reading it first would have said so instead
        config = TrainConfig(data=str(tmp_path / "no-data"), out=str(tmp_path / "student"), **options)
        with pytest.raises(FerkitError, match=message):
            train(config, verbose=0)
        assert not (tmp_path / "student").exists()


def test_the_pack_tool_replaces_an_earlier_pack_and_nothing_else(pattern_data, trained_run, tmp_path):
    tool = [sys.executable, str(Path(__file__).resolve().parents[1] / "tools" / "pack_run.py")]
    out = tmp_path / "packed"
    first = subprocess.run([*tool, str(trained_run), str(out)], capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    assert TrainConfig.load(out / "config.json").out == str(out) and (out / "checkpoint.npz").exists()
    weights = {path.name: path.read_bytes() for path in out.glob("*.npz")}
    again = subprocess.run([*tool, str(trained_run), str(out)], capture_output=True, text=True)
    assert again.returncode == 0, again.stderr  # an earlier pack of the run is replaced
    # byte for byte, for version control to keep once
    assert {path.name: path.read_bytes() for path in out.glob("*.npz")} == weights
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    refused = subprocess.run([*tool, str(trained_run), str(mine)], capture_output=True, text=True)
    assert refused.returncode != 0 and "not a packed run" in refused.stderr
    assert (mine / "notes.txt").read_text() == "mine"
    # the pack of another run (another seed), and a file, are refused in one line
    other = shutil.copytree(trained_run, tmp_path / "other")
    config = TrainConfig.load(other / "config.json")
    config.seed += 1
    config.save(other / "config.json")
    refused = subprocess.run([*tool, str(other), str(out)], capture_output=True, text=True)
    assert refused.returncode != 0 and refused.stderr.strip() == f"error: {out} holds the pack of another run (other seed); refusing to replace it"
    assert {path.name: path.read_bytes() for path in out.glob("*.npz")} == weights
    # another run of the same settings (its own history): refused too
    history = other / "history.csv"
    config.seed -= 1
    config.save(other / "config.json")
    history.write_text(_another_history(history.read_text()))
    refused = subprocess.run([*tool, str(other), str(out)], capture_output=True, text=True)
    assert refused.returncode != 0 and "its history.csv is not the start of" in refused.stderr
    assert {path.name: path.read_bytes() for path in out.glob("*.npz")} == weights
    (tmp_path / "file").write_text("mine")
    refused = subprocess.run([*tool, str(trained_run), str(tmp_path / "file")], capture_output=True, text=True)
    assert refused.returncode != 0 and refused.stderr.strip() == f"error: {tmp_path / 'file'} is a file; give a folder for the packed run"


def _another_history(text: str) -> str:
    """The same columns and epochs, other figures in the first epoch's row."""
    header, first, *rest = text.splitlines()
    cells = first.split(",")
    cells[1] = str(float(cells[1]) + 0.125)
    return "\n".join([header, ",".join(cells), *rest]) + "\n"


def _backed_up_training_model(run: Path):
    """The training model of a run with the weights and optimizer state of its backup."""
    import keras

    from ferkit.training_model import build_training_model

    from ferkit.checkpoints import load_backup

    config = TrainConfig.load(run / "config.json")
    model = build_training_model(keras, config, len(config.classes), train_size=1)
    load_backup(model, run / "backup")
    return model


OLD_HISTORY_COLUMNS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "learning_rate", "seconds")


def test_a_run_folder_of_the_older_layout_resumes_and_is_converted(pattern_data, tmp_path):
    """Runs made before the Keras callbacks kept checkpoint.keras (the whole training model) and
    another column order in history.csv; they resume on the same schedule, in the new layout."""
    import csv

    options = dict(optimizer="sgd", learning_rate=0.05, lr_schedule="cosine", augment=["flip"], epochs=3)
    whole = read_history(train(_config(pattern_data, tmp_path / "whole", **options), verbose=0) / "history.csv")
    run = train(_config(pattern_data, tmp_path / "old", **{**options, "epochs": 2}), verbose=0)
    # what ferkit wrote before: the training model saved whole, history in the old column order
    _backed_up_training_model(run).save(run / "checkpoint.keras")
    shutil.rmtree(run / "backup")
    rows = list(csv.DictReader(open(run / "history.csv", newline="")))
    with open(run / "history.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=OLD_HISTORY_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)

    config = TrainConfig.load(run / "config.json")
    config.epochs = 3
    # a whole saved model keeps the precision it was saved with: another one is refused, not ignored
    with pytest.raises(FerkitError, match="precision, which a whole saved model"):
        train(dataclasses.replace(config, precision="mixed_bfloat16"), resume=True, verbose=0)
    train(config, resume=True, verbose=0)
    resumed = read_history(run / "history.csv")
    assert resumed["epoch"] == [1, 2, 3]
    # the schedule went on from the step where the run stopped (its first two epochs had their own)
    assert np.allclose(resumed["learning_rate"][2:], whole["learning_rate"][2:], rtol=1e-5)
    assert np.allclose(resumed["loss"][:2], [float(row["loss"]) for row in rows])  # the old rows kept their values
    assert (run / "backup" / "latest.weights.h5").exists() and not (run / "checkpoint.keras").exists()
    assert open(run / "history.csv").readline().strip() == ",".join(HISTORY_COLUMNS)


def test_keras_that_is_installed_but_fails_to_import_is_not_called_missing(tmp_path, monkeypatch):
    from ferkit._keras import import_keras

    (tmp_path / "keras").mkdir()
    (tmp_path / "keras" / "__init__.py").write_text("raise ImportError('libcudart.so.12: cannot open shared object file')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "keras", raising=False)
    monkeypatch.setenv("KERAS_BACKEND", "tensorflow")
    with pytest.raises(FerkitError) as failed:
        import_keras()
    assert str(failed.value) == ("Keras is installed but failed to import on the tensorflow backend: "
                                 "libcudart.so.12: cannot open shared object file")


def test_validation_faces_without_some_classes_are_warned_of(pattern_data, tmp_path, caplog):
    val = tmp_path / "val"
    for name in ("happy", "sad"):
        shutil.copytree(pattern_data / "val" / name, val / name)
    config = TrainConfig(data=str(pattern_data / "train"), val=str(val), epochs=1, out=str(tmp_path / "run"))
    with caplog.at_level("WARNING", logger="ferkit"):
        train(config, verbose=0)
    assert ("the validation faces (--val) hold none of angry, disgust, fear, neutral, surprise: the best epoch is "
            "picked without them") in caplog.text


def test_save_period_keeps_every_nth_epochs_model_and_may_change_on_resume(pattern_data, tmp_path):
    from click.testing import CliRunner

    from ferkit.cli import cli

    run = train(_config(pattern_data, tmp_path / "r", epochs=3, save_period=2), verbose=0)
    kept = run / "epochs"
    assert sorted(p.name for p in kept.iterdir()) == ["epoch-002.keras"]
    assert read_metadata(kept / "epoch-002.keras").extra["epoch"] == 2
    resumed = CliRunner().invoke(cli, ["train", "--resume", str(run), "--epochs", "4", "--save-period", "1"])
    assert resumed.exit_code == 0, resumed.output
    assert TrainConfig.load(run / "config.json").save_period == 1
    assert sorted(p.name for p in kept.iterdir()) == ["epoch-002.keras", "epoch-004.keras"]  # epoch 3 came before
    assert (kept / "epoch-004.keras").read_bytes() == (run / "last.keras").read_bytes()
    # a fresh run in the same folder (--overwrite) starts without the old run's models
    train(_config(pattern_data, run, epochs=1), overwrite=True, verbose=0)
    assert not kept.exists()


def test_saved_models_hold_the_weights_without_the_optimizers_state(trained_run):
    """best.keras and last.keras are for predicting and --init (a run resumes from backup/): the Adam state of
    a network trained without augmentation layers would triple them."""
    import io
    import zipfile

    import h5py

    for name in ("best.keras", "last.keras"):
        with zipfile.ZipFile(trained_run / name) as archive:
            weights = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
            assert "layers" in weights and "optimizer" not in weights, list(weights)


def test_a_plateau_run_resumed_halves_its_rate_as_an_unbroken_run_does(pattern_data, tmp_path):
    """The plateau's best score and its count of epochs without a gain go on from the run's history, and a
    halving decided at the last epoch before a stop is kept."""
    settings = dict(lr_schedule="plateau", lr_patience=1, learning_rate=1e-6, batch_size=16, seed=3)
    whole = read_history(train(_config(pattern_data, tmp_path / "whole", epochs=5, **settings), verbose=0) / "history.csv")
    assert len(set(whole["learning_rate"])) > 2  # halved more than once: the test has something to compare
    for stop_after in (2, 3):
        run = train(_config(pattern_data, tmp_path / f"stopped-{stop_after}", epochs=stop_after, **settings), verbose=0)
        train(_config(pattern_data, run, epochs=5, **settings), resume=True, verbose=0)
        resumed = read_history(run / "history.csv")
        assert resumed["learning_rate"] == pytest.approx(whole["learning_rate"], rel=1e-6), stop_after


def test_an_epochs_change_that_would_rewind_fine_tuning_is_refused(pattern_data, tmp_path, caplog):
    config = TrainConfig(model="mobilenetv2-transfer", weights="none", data=str(pattern_data / "train"),
                         val=str(pattern_data / "val"), epochs=1, fine_tune=5, fine_tune_epochs=2, batch_size=32,
                         out=str(tmp_path / "ft"))
    run = train(config, verbose=0)
    assert "--weights none: mobilenetv2-transfer's backbone starts from random weights and is frozen" in caplog.text
    history = (run / "history.csv").read_text()
    with pytest.raises(FerkitError, match=r"is fine-tuning \(epoch 3; its backbone was unfrozen after 1 epochs\).*--epochs 1"):
        train(dataclasses.replace(config, epochs=2), resume=True, verbose=0)
    assert (run / "history.csv").read_text() == history
    train(dataclasses.replace(config, fine_tune_epochs=3), resume=True, verbose=0)  # fine-tuning itself may grow
    assert read_history(run / "history.csv")["epoch"] == [1, 2, 3, 4]
    with pytest.raises(FerkitError, match="has 4 epochs done, more than the 2 asked for; pass a larger --fine-tune-epochs"):
        train(dataclasses.replace(config, fine_tune_epochs=1), resume=True, verbose=0)


def test_a_run_may_not_be_written_inside_its_own_data(pattern_data, tmp_path):
    shutil.copytree(pattern_data / "train", tmp_path / "train")
    for out in (tmp_path / "train" / "run", tmp_path / "train" / "happy" / "run"):
        with pytest.raises(FerkitError, match="lies inside the data folder .*the run's files would be read as faces"):
            train(TrainConfig(data=str(tmp_path / "train"), val=str(pattern_data / "val"), epochs=1, out=str(out)), verbose=0)
        assert not out.exists()


def test_overwrite_keeps_the_users_own_files_inside_report_and_epoch_folders(pattern_data, tmp_path, caplog):
    run = tmp_path / "run"
    train(_config(pattern_data, run, epochs=2, batch_size=16, save_period=1), verbose=0)
    (run / "eval-val").mkdir()
    (run / "eval-val" / "report.html").write_text("<html>an earlier report</html>")
    (run / "eval-mine").mkdir()
    (run / "eval-mine" / "notes.md").write_text("my notes")
    (run / "epochs" / "README.txt").write_text("mine")
    with caplog.at_level("WARNING", logger="ferkit"):
        train(_config(pattern_data, run, epochs=1, batch_size=16), overwrite=True, verbose=0)
    assert not (run / "eval-val").exists()
    assert (run / "eval-mine" / "notes.md").read_text() == "my notes"
    assert [p.name for p in (run / "epochs").iterdir()] == ["README.txt"]
    kept = [r.getMessage() for r in caplog.records if "kept what ferkit did not write" in r.getMessage()]
    assert len(kept) == 1 and "epochs" in kept[0] and "eval-mine" in kept[0]


def test_classes_named_twice_in_another_case_are_refused_before_any_data_is_read(tmp_path):
    with pytest.raises(FerkitError, match="--classes names happy more than once"):
        TrainConfig(data=str(tmp_path / "nowhere"), classes=["angry", "happy", "Happy "], out=str(tmp_path / "r"))


def test_data_folders_that_hold_train_and_val_datasets_are_named_with_the_options_that_take_them(pattern_data, tmp_path):
    from ferkit.training_data import load_train_val

    with pytest.raises(FerkitError) as refused:
        load_train_val(TrainConfig(data=str(pattern_data), out=str(tmp_path / "r")), (48, 48))
    assert str(refused.value).endswith(f"train with --data {pattern_data / 'train'} --val {pattern_data / 'val'}")
    assert "--classes" not in str(refused.value)
    splits = tmp_path / "splits"
    for split in ("test", "train", "val"):  # the test split comes first, and is never the one to validate on
        shutil.copytree(pattern_data / "val", splits / split)
    with pytest.raises(FerkitError, match=f"train with --data {splits / 'train'} --val {splits / 'val'}$"):
        load_train_val(TrainConfig(data=str(splits), out=str(tmp_path / "r")), (48, 48))


def test_a_csv_without_the_rows_training_reads_says_how_to_train_on_its_rows(tmp_path):
    from ferkit.training_data import load_train_val

    pixels = " ".join(["128"] * 2304)
    (tmp_path / "private.csv").write_text("emotion,pixels,Usage\n" + "".join(f"{code},{pixels},PrivateTest\n" for code in range(7)))
    with pytest.raises(FerkitError) as refused:
        load_train_val(TrainConfig(data=str(tmp_path / "private.csv"), out=str(tmp_path / "r")), (48, 48))
    message = str(refused.value)
    assert "no rows with usage Training" in message and "--usage all" in message and "ferkit pack" in message
    from click.testing import CliRunner

    from ferkit.cli import cli

    packed = CliRunner().invoke(cli, ["pack", str(tmp_path / "private.csv"), str(tmp_path / "rows"), "--usage", "all"])
    assert packed.exit_code == 0 and len(load_dataset(tmp_path / "rows")) == 7, packed.output


def test_resume_takes_a_shipped_teacher_by_name_and_refuses_a_teacher_the_run_had_not(trained_run, tmp_path):
    from ferkit.cli import _resumed_config

    distilled = tmp_path / "distilled"
    distilled.mkdir()
    TrainConfig(data=str(tmp_path), val=str(tmp_path), teacher="default", out=str(distilled)).save(distilled / "config.json")
    flags = {"epochs": None, "fine_tune_epochs": None, "precision": None, "save_period": None, "data": None, "val": None,
             "teacher": None}
    assert _resumed_config(distilled, flags).teacher == "default"  # a shipped model's name, not a path
    assert _resumed_config(distilled, {**flags, "teacher": "default"}).teacher == "default"
    refused = CliRunner().invoke(cli, ["train", "--resume", str(trained_run), "--teacher", str(distilled)])
    assert refused.exit_code == 2 and "was trained without a teacher" in refused.output
    refused = CliRunner().invoke(cli, ["train", "--resume", str(trained_run), "--fine-tune-epochs", "3"])
    assert refused.exit_code == 2 and "does not fine-tune" in refused.output


def test_a_damaged_state_file_is_one_line_saying_what_it_records(trained_run, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    (run / "state.json").write_text("{bad")
    result = CliRunner().invoke(cli, ["train", "--resume", str(run), "--epochs", "20"])
    assert result.exit_code == 2 and f"{run / 'state.json'} is damaged" in result.output


def test_a_run_folder_under_a_file_is_refused_before_the_data_is_read(tmp_path):
    (tmp_path / "afile").write_text("x")
    result = CliRunner().invoke(cli, ["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "afile" / "sub")])
    assert result.exit_code == 2 and f"{tmp_path / 'afile'} is a file" in result.output


def test_zero_processes_are_named_as_such():
    from ferkit.distributed import Topology

    with pytest.raises(FerkitError, match="--num-processes is the job's count of processes, at least 1, not 0"):
        Topology(None, 0, 0)



def test_training_leaves_the_callers_random_state_as_it_was(pattern_data, tmp_path):
    import random

    np.random.seed(999)
    random.seed(999)
    expected = (np.random.rand(), random.random())
    np.random.seed(999)
    random.seed(999)
    train(_config(pattern_data, tmp_path / "run", epochs=1), verbose=0)
    assert (np.random.rand(), random.random()) == expected


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_resuming_with_fewer_epochs_than_done_is_refused(trained_run, tmp_path):
    copy = shutil.copytree(trained_run, tmp_path / "run")
    result = _cli("train", "--resume", copy, "--epochs", "2")
    assert result.exit_code == 2
    assert result.output.strip() == f"error: {copy} has 8 epochs done, more than the 2 asked for; pass a larger --epochs to train on"


def test_a_history_saved_by_a_spreadsheet_resumes_and_a_damaged_one_is_one_line(trained_run, tmp_path):
    copy = shutil.copytree(trained_run, tmp_path / "run")
    history = (copy / "history.csv").read_bytes()
    (copy / "history.csv").write_bytes(b"\xef\xbb\xbf" + history)  # "CSV UTF-8": a byte-order mark first
    resumed = _cli("train", "--resume", copy, "--epochs", "9")
    assert resumed.exit_code == 0, resumed.output
    assert read_history(copy / "history.csv")["epoch"] == list(range(1, 10))
    damaged = shutil.copytree(trained_run, tmp_path / "damaged")
    (damaged / "history.csv").write_text(history.decode() + "foo,bar\n")
    result = _cli("train", "--resume", damaged, "--epochs", "9")
    assert result.exit_code == 2 and result.output.startswith(f"error: {damaged / 'history.csv'} is damaged (")
    assert len(result.output.strip().splitlines()) == 1


def test_a_run_folder_that_cannot_be_made_is_said_before_the_data_loads(pattern_data):
    result = _cli("train", "--data", pattern_data / "train", "--val", pattern_data / "val", "--out", "/proc/ferkit-no/run")
    assert result.exit_code == 2
    assert result.output.startswith("error: cannot create the run folder /proc/ferkit-no/run: ")


def test_resuming_on_changed_data_names_the_class_that_changed_where_validation_was_split_off(tmp_path):
    data = write_pattern_dataset(tmp_path / "data", 12, seed=3)  # 84 faces: 8 held out, 1 or 2 of a class
    assert _cli("train", "--data", data, "--val-split", "0.1", "--epochs", "1", "--out", tmp_path / "r").exit_code == 0
    shutil.copy(next((data / "happy").iterdir()), data / "happy" / "one-more.png")  # the split moves a slot
    result = _cli("train", "--resume", tmp_path / "r", "--epochs", "2")
    assert result.exit_code == 2, result.output
    import ast
    import re

    given, recorded = (ast.literal_eval(counts) for counts in re.findall(r"\{[^}]*\}", result.output))
    changed = {name for name in given if given[name] != recorded[name]}
    assert changed == {"happy"} and given["happy"] == recorded["happy"] + 1, result.output


def test_a_distilling_run_resumes_only_with_the_teacher_it_began_with(pattern_data, trained_run, tmp_path):
    from ferkit.cli import cli

    teacher = shutil.copytree(trained_run, tmp_path / "teacher")
    run = train(_config(pattern_data, tmp_path / "student", epochs=1, teacher=str(teacher), distill=0.7), verbose=0)
    moved = shutil.move(teacher, tmp_path / "teacher-moved")  # the same teacher elsewhere: fine
    again = CliRunner().invoke(cli, ["train", "--resume", str(run), "--epochs", "2", "--teacher", str(moved)])
    assert again.exit_code == 0, again.output
    other = train(_config(pattern_data, tmp_path / "other", epochs=1, seed=9), verbose=0)  # another model
    refused = CliRunner().invoke(cli, ["train", "--resume", str(run), "--epochs", "3", "--teacher", str(other)])
    assert refused.exit_code == 2 and refused.output.startswith(
        f"error: the teacher given ({other / 'best.keras'}) is not the one {run} began to distil from")
    assert RunState.load(run).epochs_done == 2
    itself = CliRunner().invoke(cli, ["train", "--data", str(pattern_data / "train"), "--val", str(pattern_data / "val"),
                                      "--out", str(run), "--overwrite", "--teacher", str(run), "--epochs", "1"])
    assert itself.exit_code == 2 and f"--teacher {run} lies in {run}, which --overwrite clears" in itself.output
    assert RunState.load(run).epochs_done == 2  # nothing cleared
