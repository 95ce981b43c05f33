import numpy as np
import pytest

from ferkit.errors import FerkitError
from ferkit.models import create_model, get_model_spec, list_models


@pytest.mark.parametrize("name", list_models())
def test_every_model_builds_and_gives_probabilities(name):
    spec = get_model_spec(name)
    model = create_model(name, weights="none" if spec.pretrained else None)
    batch = np.random.default_rng(0).uniform(0, 255, (2, *spec.input_size, spec.channels)).astype("float32")
    out = np.asarray(model(batch, training=False))
    assert out.shape == (2, 7)
    assert np.isfinite(out).all() and np.allclose(out.sum(axis=1), 1.0, atol=1e-5)


def test_seed_cnn_has_the_study_parameter_counts():
    # The founding study's model, as specified in issue 2: per-layer and total parameter counts.
    model = create_model("seed-cnn")
    counts = [layer.count_params() for layer in model.layers if layer.count_params()]
    assert counts == [416, 4128, 4128, 410112, 3591]
    assert model.count_params() == 422375


def test_the_head_follows_the_class_count():
    assert create_model("seed-cnn", num_classes=8).output_shape == (None, 8)


def test_listing_filters_and_unknown_names_fail():
    assert "seed-cnn" in list_models("seed-*")
    assert list_models("no-such-*") == []
    with pytest.raises(FerkitError, match="unknown model"):
        create_model("no-such-model")


@pytest.mark.parametrize("name", [n for n in list_models() if get_model_spec(n).crop])
def test_cropping_models_see_only_the_central_crop(name):
    spec = get_model_spec(name)
    model = create_model(name)
    rng = np.random.default_rng(1)
    faces = rng.uniform(0, 255, (2, *spec.input_size, spec.channels)).astype("float32")
    border = faces.copy()
    start = (spec.input_size[0] - spec.crop) // 2
    inside = border[:, start:start + spec.crop, start:start + spec.crop].copy()
    border[:] = rng.uniform(0, 255, border.shape)
    border[:, start:start + spec.crop, start:start + spec.crop] = inside
    assert np.allclose(model(faces, training=False), model(border, training=False), atol=1e-6)
    one_pixel = faces.copy()
    one_pixel[:, start, start] += 100  # the crop's corner pixel is seen
    # seen: the probabilities move, if only a little in a random network (by 5e-7 with ferkit-net-l's)
    assert not np.array_equal(model(faces, training=False), model(one_pixel, training=False))


def test_a_model_of_ones_own_registers_without_a_docstring(monkeypatch):
    from ferkit.models import registry

    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # the shipped registry, left as it was
    registry.register_model("mine")(lambda *, num_classes, input_shape: None)
    assert get_model_spec("mine").description == "" and "mine" in list_models()
