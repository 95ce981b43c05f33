"""Fine-tuning from a trained model (--init): what it learnt is kept, and new classes can be added."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import write_pattern_dataset
from ferkit.config import INIT_LEARNING_RATE, LEARNING_RATE, TrainConfig
from ferkit.data import load_dataset
from ferkit.errors import FerkitError
from ferkit.evaluation import evaluate
from ferkit.labels import EMOTIONS
from ferkit.runs import RunState, read_history
from ferkit.runtime import files_path, read_metadata, shipped_model
from ferkit.training import train
from ferkit.training_data import warn_of_classes_with_few_faces


def _contempt_face(rng):
    image = rng.normal(90, 25, (48, 48))
    image[:, 20:28] += 120  # a vertical band, unlike the seven horizontal ones
    return np.clip(image, 0, 255).astype(np.uint8)


def test_init_keeps_what_the_model_learnt(trained_run, pattern_data, tmp_path):
    common = dict(data=str(pattern_data / "train"), val=str(pattern_data / "val"), epochs=1, learning_rate=1e-6)
    started = train(TrainConfig(init=str(trained_run), out=str(tmp_path / "init"), **common), verbose=0)
    fresh = train(TrainConfig(out=str(tmp_path / "fresh"), **common), verbose=0)
    first = read_history(started / "history.csv")["val_accuracy"][0]
    assert first > 0.6 and first > read_history(fresh / "history.csv")["val_accuracy"][0] + 0.3


def test_init_trains_in_mixed_precision_from_a_float32_model(trained_run, pattern_data, tmp_path):
    config = TrainConfig(init=str(trained_run), data=str(pattern_data / "train"), val=str(pattern_data / "val"),
                         epochs=1, learning_rate=1e-6, precision="mixed_bfloat16", out=str(tmp_path / "bf16"))
    run = train(config, verbose=0)
    assert read_history(run / "history.csv")["val_accuracy"][0] > 0.6


def test_init_with_a_new_class_replaces_the_head_and_keeps_the_old_classes(trained_run, pattern_data, tmp_path, caplog):
    rng = np.random.default_rng(0)
    root = write_pattern_dataset(tmp_path / "mine", 6, seed=4)
    (root / "contempt").mkdir()
    for i in range(6):
        Image.fromarray(_contempt_face(rng)).save(root / "contempt" / f"c{i}.png")
    classes = [*EMOTIONS, "contempt"]
    with pytest.raises(FerkitError, match=f"match no class: contempt .*; --classes {','.join(classes)} trains contempt too"):
        train(TrainConfig(init=str(trained_run), data=str(root), epochs=1, out=str(tmp_path / "refused")), verbose=0)
    config = TrainConfig(init=str(trained_run), data=str(root), val=str(pattern_data / "val"), classes=classes,
                         epochs=2, learning_rate=1e-4, out=str(tmp_path / "run"))
    with caplog.at_level("INFO", logger="ferkit"):
        run = train(config, verbose=0)
    meta = read_metadata(run)
    assert meta.classes == classes and meta.model == "seed-cnn"
    # the figure to beat: the model as it was, answering with the seven classes it knows
    val = load_dataset(pattern_data / "val")
    from ferkit.runtime import load_classifier

    before = evaluate(load_classifier(trained_run).with_tta("none"), val).accuracy
    assert (f"before training, the --init network (best.keras) scores {before:.4f} on the {len(val)} validation faces, "
            "choosing among the run's classes it knows (contempt new to it)") in caplog.text
    # the seven known classes are still recognised on their own validation faces
    report = evaluate(run, load_dataset(pattern_data / "val", classes=classes))
    assert report.accuracy > 0.6
    # int8 export calibrates on the run's own training data, eighth class included
    from click.testing import CliRunner

    from ferkit.cli import cli

    exported = CliRunner().invoke(cli, ["export", str(run), "--onnx", "--int8", "--out", str(tmp_path / "m.onnx")])
    assert exported.exit_code == 0, exported.output
    assert read_metadata(tmp_path / "m.onnx").classes == classes


def test_a_run_that_ends_below_the_model_it_started_from_says_so(trained_run, pattern_data, tmp_path):
    from click.testing import CliRunner

    from ferkit.cli import cli

    result = CliRunner().invoke(cli, ["train", "--init", str(trained_run), "--data", str(pattern_data / "train"),
                                      "--val", str(pattern_data / "val"), "--epochs", "1", "--lr", "0.5",
                                      "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    state = RunState.load(tmp_path / "run")
    assert state.best_val_accuracy < state.start_val_accuracy  # a learning rate that wrecks what it knew
    assert (f"warning: the --init network (best.keras) scored {state.start_val_accuracy:.4f} on the same validation faces "
            "before training: this run did not improve on it") in result.output


def test_init_default_starts_from_the_bundled_model(pattern_data, tmp_path, caplog):
    config = TrainConfig(init="default", data=str(pattern_data / "train"), val=str(pattern_data / "val"),
                         epochs=1, learning_rate=1e-5, out=str(tmp_path / "run"))
    with caplog.at_level("INFO", logger="ferkit"):
        run = train(config, verbose=0)
    faces = len(load_dataset(pattern_data / "val"))
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("before training")]
    assert [line.split(" scores ")[0] for line in said] == [  # the network that trains, then the ensemble it came from
        f"before training, the --init network ({shipped_model()['keras_file']})", "before training, the shipped default model itself"]
    assert all(line.endswith(f"on the {faces} validation faces") for line in said)
    scores = {line.split(" scores ")[0].removeprefix("before training, "): float(line.split(" scores ")[1].split()[0])
              for line in said}
    state = RunState.load(run)  # the figure to beat is kept with the run
    assert (state.start_model, state.start_val_accuracy) == max(scores.items(), key=lambda item: item[1])
    # the bundled Keras twin (for an ensemble: its best member) is what training starts from
    bundled = files_path("weights", shipped_model()["keras_file"])
    assert read_metadata(run).model == read_metadata(bundled).model
    import keras

    start, after = keras.saving.load_model(bundled, compile=False), keras.saving.load_model(run / "last.keras", compile=False)
    kernels = [(a.kernel, b.kernel) for a, b in zip(start.layers, after.layers) if hasattr(a, "kernel")]
    assert kernels and all(np.abs(np.asarray(a) - np.asarray(b)).max() < 1e-3 for a, b in kernels)  # barely moved


def test_options_that_contradict_the_network_are_refused_before_any_training(trained_run, pattern_data, tmp_path):
    common = dict(data=str(pattern_data / "train"), val=str(pattern_data / "val"), epochs=1)
    with pytest.raises(FerkitError, match="is a seed-cnn network, not ferkit-net-l"):
        train(TrainConfig(init=str(trained_run), model="ferkit-net-l", out=str(tmp_path / "a"), **common), verbose=0)
    with pytest.raises(FerkitError, match="--fine-tune unfreezes a pretrained backbone"):
        train(TrainConfig(fine_tune=2, fine_tune_epochs=1, out=str(tmp_path / "b"), **common), verbose=0)
    assert not (tmp_path / "a" / "history.csv").exists() and not (tmp_path / "b" / "history.csv").exists()
    # on the command line, a --model typed by the user counts, even the default one
    from click.testing import CliRunner

    from ferkit.cli import cli

    bundled = read_metadata(files_path("weights", shipped_model()["keras_file"])).model
    typed = CliRunner().invoke(cli, ["train", "--init", "default", "--model", "seed-cnn", "--data", common["data"],
                                     "--epochs", "1", "--out", str(tmp_path / "d")])
    assert bundled != "seed-cnn"
    assert typed.exit_code == 2 and f"is a {bundled} network, not seed-cnn: leave --model out" in typed.output
    assert not (tmp_path / "d").exists()
    # naming the network it already is, is fine
    run = train(TrainConfig(init=str(trained_run), model="seed-cnn", learning_rate=1e-6, out=str(tmp_path / "c"), **common), verbose=0)
    assert read_metadata(run).model == "seed-cnn"


def test_faces_of_one_class_are_refused_and_classes_without_faces_are_named(trained_run, pattern_data, tmp_path, caplog):
    one = write_pattern_dataset(tmp_path / "one", 6, folder_names=["happy"])
    config = TrainConfig(init=str(trained_run), data=str(one), val=str(pattern_data / "val"), epochs=1, out=str(tmp_path / "a"))
    with pytest.raises(FerkitError, match="holds faces of happy only; training needs faces of at least two classes"):
        train(config, verbose=0)
    assert not (tmp_path / "a").exists()
    two = write_pattern_dataset(tmp_path / "two", 6, folder_names=["happy", "sad"])
    config = TrainConfig(init=str(trained_run), data=str(two), val=str(pattern_data / "val"), epochs=1, out=str(tmp_path / "b"))
    with caplog.at_level("WARNING", logger="ferkit"):
        train(config, verbose=0)
    assert "no training faces of angry, disgust, fear, neutral, surprise: the model will hardly ever predict them" in caplog.text
    assert "few training faces of happy (6), sad (6): the model will learn them poorly" in caplog.text
    assert "validation faces: one face moves" not in caplog.text  # 56 are enough to pick an epoch by
    caplog.clear()
    config = TrainConfig(init=str(trained_run), data=str(two), epochs=1, out=str(tmp_path / "c"))  # --val-split 0.1
    with caplog.at_level("WARNING", logger="ferkit"):
        train(config, verbose=0)
    held_out = sum(json.loads((tmp_path / "c" / "datasets.json").read_text())["val"].values())
    assert f"only {held_out} validation faces: one face moves the val accuracy by {100 / held_out:.1f} points" in caplog.text
    # a trained network starts at a tenth of the from-scratch learning rate, unless told otherwise
    assert TrainConfig.load(tmp_path / "b" / "config.json").learning_rate == INIT_LEARNING_RATE == LEARNING_RATE / 10
    assert read_history(tmp_path / "b" / "history.csv")["learning_rate"] == pytest.approx([INIT_LEARNING_RATE])
    caplog.clear()
    with caplog.at_level("WARNING", logger="ferkit"):  # 20 faces of each class are not few
        warn_of_classes_with_few_faces(load_dataset(pattern_data / "train"))
    assert "few training faces" not in caplog.text


def test_a_misspelt_class_is_refused_with_what_it_may_mean(trained_run, pattern_data, tmp_path):
    mine = write_pattern_dataset(tmp_path / "mine", 6, seed=4)
    misspelt = [("hapy" if name == "happy" else name) for name in EMOTIONS]
    common = dict(init=str(trained_run), val=str(pattern_data / "val"), epochs=1, out=str(tmp_path / "run"))
    with pytest.raises(FerkitError, match="the folder happy is close to the class hapy: is one of them misspelt"):
        train(TrainConfig(data=str(mine), classes=misspelt, **common), verbose=0)
    with pytest.raises(FerkitError, match=r"holds no faces of contempt, so the model cannot learn it$"):
        train(TrainConfig(data=str(mine), classes=[*EMOTIONS, "contempt"], **common), verbose=0)
    with pytest.raises(FerkitError, match="looks like the folder of one class \\(happy\\)"):
        (mine / "happy" / "more").mkdir()
        train(TrainConfig(data=str(mine / "happy"), **common), verbose=0)
    assert not (tmp_path / "run").exists()


def test_the_hint_to_train_more_classes_says_which_are_new_to_the_model(trained_run, pattern_data, tmp_path):
    mine = write_pattern_dataset(tmp_path / "mine", 6, seed=4)
    (mine / "contempt").mkdir()
    Image.fromarray(_contempt_face(np.random.default_rng(0))).save(mine / "contempt" / "c.png")
    config = TrainConfig(init=str(trained_run), data=str(mine), classes=["happy", "sad", "surprise"], epochs=1,
                         out=str(tmp_path / "run"))
    with pytest.raises(FerkitError) as refused:
        train(config, verbose=0)
    assert str(refused.value).endswith("trains angry, contempt, disgust, fear, neutral too (contempt new to the model, "
                                       "from fresh weights)")


def test_a_run_from_init_says_what_its_model_scored_before_training(trained_run, pattern_data, tmp_path, caplog):
    val = load_dataset(pattern_data / "val")
    from ferkit.runtime import load_classifier

    before = evaluate(load_classifier(trained_run).with_tta("none"), val).accuracy  # one view, as validation scores
    config = TrainConfig(init=str(trained_run), data=str(pattern_data / "train"), val=str(pattern_data / "val"),
                         epochs=1, learning_rate=1e-4, out=str(tmp_path / "run"))
    with caplog.at_level("INFO", logger="ferkit"):
        train(config, verbose=0)
    assert f"before training, the --init network (best.keras) scores {before:.4f} on the {len(val)} validation faces" in caplog.text


def test_a_run_from_init_resumes_once_its_init_model_is_gone(trained_run, pattern_data, tmp_path):
    import shutil

    start = shutil.copy(trained_run / "best.keras", tmp_path / "start.keras")
    config = TrainConfig(init=str(start), data=str(pattern_data / "train"), val=str(pattern_data / "val"),
                         epochs=1, learning_rate=1e-4, out=str(tmp_path / "run"))
    run = train(config, verbose=0)
    Path(start).unlink()  # a run moved to another machine: it goes on from its checkpoint, not from --init
    resumed = TrainConfig.load(run / "config.json")
    resumed.epochs = 2
    train(resumed, resume=True, verbose=0)
    assert read_history(run / "history.csv")["epoch"] == [1, 2]


def test_without_init_an_unknown_folder_is_named_and_missing_emotions_are_only_warned_of(pattern_data, tmp_path, caplog):
    odd = write_pattern_dataset(tmp_path / "odd", 6, folder_names=["happy", "sad"])
    (odd / "contempt").mkdir()
    Image.fromarray(_contempt_face(np.random.default_rng(0))).save(odd / "contempt" / "c.png")
    with pytest.raises(FerkitError, match="match no class: contempt .*--classes keeps others"):
        train(TrainConfig(data=str(odd), epochs=1, out=str(tmp_path / "a")), verbose=0)
    (odd / "happy" / "more").mkdir()
    with pytest.raises(FerkitError, match="looks like the folder of one class \\(happy\\)"):
        train(TrainConfig(data=str(odd / "happy"), epochs=1, out=str(tmp_path / "b")), verbose=0)
    two = write_pattern_dataset(tmp_path / "two", 6, folder_names=["happy", "sad"])
    with caplog.at_level("WARNING", logger="ferkit"):
        train(TrainConfig(data=str(two), val=str(pattern_data / "val"), epochs=1, out=str(tmp_path / "c")), verbose=0)
    assert "no training faces of angry, disgust, fear, neutral, surprise" in caplog.text


def test_a_run_stopped_in_its_first_epoch_keeps_its_figure_to_beat_when_resumed(trained_run, pattern_data, tmp_path):
    import os
    import signal

    import keras

    from ferkit.training import TrainingInterrupted

    class KillInFirstEpoch(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            os.kill(os.getpid(), signal.SIGTERM)

    config = TrainConfig(init=str(trained_run), data=str(pattern_data / "train"), val=str(pattern_data / "val"),
                         epochs=1, learning_rate=0.5, batch_size=16, out=str(tmp_path / "run"))
    with pytest.raises(TrainingInterrupted, match="interrupted before the first of 1 epochs ended"):
        train(config, verbose=0, callbacks=[KillInFirstEpoch()])
    before = RunState.load(tmp_path / "run").start_val_accuracy
    assert before is not None
    train(config, resume=True, verbose=0)
    state = RunState.load(tmp_path / "run")
    assert state.epochs_done == 1 and state.start_val_accuracy == before and state.start_model is not None
