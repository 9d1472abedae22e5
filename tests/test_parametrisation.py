"""How adapters start and what keeps them orthogonal: `factor_init`,
`orth_penalty`, the default `alpha` and `orth_reg_weight`, and adapters
saved by keras-adalora 0.1 (orthonormal factors, the squared penalty), which
load with the settings they were trained with."""

import json
import zipfile

import keras
import numpy as np
import pytest
from helpers import to_numpy

from keras_adalora import AdaLoRADense
from keras_adalora import apply_adalora
from keras_adalora import load_adapter
from keras_adalora import save_adapter
from keras_adalora.targets import adapted_layers


def penalties(layers):
    """Each layer's `(||A^T A - I||_F, ||B B^T - I||_F)`, in NumPy."""
    out = []
    for layer in layers:
        a, b = to_numpy(layer.adalora_a), to_numpy(layer.adalora_b)
        rank = a.shape[1]
        out.append(
            (
                np.linalg.norm(a.T @ a - np.eye(rank)),
                np.linalg.norm(b @ b.T - np.eye(rank)),
            )
        )
    return out


def training_losses(model):
    """The model's added losses after one training call."""
    model(np.ones((2, 16), "float32"), training=True)
    return float(sum(to_numpy(loss) for loss in model.losses))


def test_defaults_are_small_random_factors_a_unit_scale_and_peft_penalty():
    model = keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(32, name="hidden"),
            keras.layers.Dense(3, name="head"),
        ]
    )
    model = apply_adalora(model, init_rank=4, keep_trainable=["head"])
    layers = adapted_layers(model)
    assert [layer.name for layer in layers] == ["hidden"]
    layer = layers[0]
    assert (layer.factor_init, layer.orth_penalty) == ("normal", "norm")
    assert layer.alpha == 4.0 and layer.scale == 1.0
    a = to_numpy(layer.adalora_a)
    assert 0.012 < a.std() < 0.028
    # One layer: it carries the whole weight, 0.5, on the mean of its norms.
    assert layer.orth_reg_weight == 0.5
    (norm_a, norm_b), = penalties(layers)
    np.testing.assert_allclose(
        training_losses(model), 0.5 * (norm_a + norm_b) / 2, rtol=1e-5
    )


def two_layer_mlp():
    return keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(24, activation="relu", name="first"),
            keras.layers.Dense(20, activation="relu", name="second"),
            keras.layers.Dense(3, name="head"),
        ]
    )


def test_the_norm_penalty_weighs_the_mean_over_the_adapted_layers():
    # PEFT's regulariser: weight * the mean over every A and B of
    # ||A^T A - I||_F or ||B B^T - I||_F.
    model = apply_adalora(
        two_layer_mlp(), init_rank=4, orth_reg_weight=0.3, keep_trainable=["head"]
    )
    layers = adapted_layers(model)
    assert [layer.orth_reg_weight for layer in layers] == [0.15, 0.15]
    norms = [n for pair in penalties(layers) for n in pair]
    np.testing.assert_allclose(training_losses(model), 0.3 * np.mean(norms), rtol=1e-5)


def test_the_squared_penalty_gives_every_layer_the_whole_weight():
    model = apply_adalora(
        two_layer_mlp(), init_rank=4, orth_penalty="squared", keep_trainable=["head"]
    )
    layers = adapted_layers(model)
    assert [layer.orth_reg_weight for layer in layers] == [0.1, 0.1]
    squares = [n**2 for pair in penalties(layers) for n in pair]
    np.testing.assert_allclose(training_losses(model), 0.1 * np.sum(squares), rtol=1e-5)


def test_orthogonal_factors_keep_the_scale_of_their_norms():
    model = apply_adalora(
        two_layer_mlp(), init_rank=4, factor_init="orthogonal", keep_trainable=["head"]
    )
    first, second = adapted_layers(model)
    np.testing.assert_allclose(first.scale, np.sqrt(16 * 24) / 12, rtol=1e-6)
    np.testing.assert_allclose(second.scale, np.sqrt(24 * 20) / 12, rtol=1e-6)
    a = to_numpy(first.adalora_a)
    np.testing.assert_allclose(a.T @ a, np.eye(4), atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"factor_init": "he_normal"}, "`factor_init` must be one of"),
        ({"orth_penalty": "l1"}, "`orth_penalty` must be one of"),
        ({"orth_reg_weight": float("inf")}, "`orth_reg_weight` must be a finite"),
        ({"alpha": float("inf")}, "`alpha` must be a positive finite"),
    ],
)
def test_bad_parametrisation_is_refused_before_anything_changes(kwargs, message):
    model = two_layer_mlp()
    with pytest.raises(ValueError, match=message):
        apply_adalora(model, init_rank=4, **kwargs)
    assert not adapted_layers(model)
    with pytest.raises(ValueError, match=message):
        AdaLoRADense(8, init_rank=2, **kwargs)


# Adapters saved by keras-adalora 0.1 ------------------------------------------

OLD = {"factor_init": "orthogonal", "orth_penalty": "squared"}


def trained_as_in_0_1():
    """A model adapted as 0.1 adapted it, its adapters moved."""
    model = apply_adalora(two_layer_mlp(), init_rank=4, keep_trainable=["head"], **OLD)
    for layer in adapted_layers(model):
        layer.adalora_lam.assign(np.linspace(0.5, 1.0, 4).astype("float32"))
    return model


def without_new_settings(config):
    """`config` (any JSON value) without the settings 0.1 did not write."""
    if isinstance(config, dict):
        return {
            key: without_new_settings(value)
            for key, value in config.items()
            if key not in OLD
        }
    if isinstance(config, list):
        return [without_new_settings(value) for value in config]
    return config


def test_a_layer_config_written_by_0_1_rebuilds_its_adapter():
    layer = AdaLoRADense(8, init_rank=3, **OLD)
    layer.build((None, 6))
    config = without_new_settings(layer.get_config())
    rebuilt = AdaLoRADense.from_config(config)
    rebuilt.build((None, 6))
    assert (rebuilt.factor_init, rebuilt.orth_penalty) == ("orthogonal", "squared")
    assert rebuilt.alpha == layer.alpha and rebuilt.orth_reg_weight == 0.1
    a = to_numpy(rebuilt.adalora_a)
    np.testing.assert_allclose(a.T @ a, np.eye(3), atol=1e-5)


def test_a_keras_file_written_by_0_1_loads_with_its_settings(tmp_path):
    model = trained_as_in_0_1()
    x = np.random.default_rng(0).normal(size=(4, 16)).astype("float32")
    expected = to_numpy(model(x))
    saved = tmp_path / "new.keras"
    model.save(saved)
    # The same file as 0.1 wrote it: no new settings, record version 1.
    old = tmp_path / "old.keras"
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(old, "w") as target:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename == "config.json":
                config = without_new_settings(json.loads(data))
                assert config["config"]["adaptation"]["version"] == 2
                config["config"]["adaptation"]["version"] = 1
                data = json.dumps(config).encode()
            target.writestr(item, data)
    loaded = keras.saving.load_model(old)
    for layer in adapted_layers(loaded):
        assert (layer.factor_init, layer.orth_penalty) == ("orthogonal", "squared")
        assert layer.orth_reg_weight == 0.1
    np.testing.assert_allclose(to_numpy(loaded(x)), expected, atol=1e-6)
    assert training_losses(loaded) == pytest.approx(training_losses(model), rel=1e-5)


def test_an_adapter_file_written_by_0_1_loads_with_its_settings(tmp_path):
    import h5py

    model = trained_as_in_0_1()
    path = tmp_path / "model.adalora.h5"
    save_adapter(model, path)
    with h5py.File(path, "r+") as f:
        metadata = json.loads(f.attrs["metadata"])
        assert metadata["format_version"] == 2
        metadata = without_new_settings(metadata)
        metadata["format_version"] = 1
        f.attrs["metadata"] = np.bytes_(json.dumps(metadata).encode())
    loaded = load_adapter(two_layer_mlp(), path)
    for layer in adapted_layers(loaded):
        assert (layer.factor_init, layer.orth_penalty) == ("orthogonal", "squared")
    assert training_losses(loaded) == pytest.approx(training_losses(model), rel=1e-5)


def test_a_new_adapter_file_keeps_the_new_settings(tmp_path):
    model = apply_adalora(two_layer_mlp(), init_rank=4, keep_trainable=["head"])
    path = tmp_path / "model.adalora.h5"
    save_adapter(model, path)
    loaded = load_adapter(two_layer_mlp(), path)
    for layer in adapted_layers(loaded):
        assert (layer.factor_init, layer.orth_penalty) == ("normal", "norm")
        assert layer.orth_reg_weight == 0.25
