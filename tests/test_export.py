"""Saving, compaction and merging of adapted models."""

import json
import keras
import numpy as np
import pytest
from helpers import data
from helpers import inputs
from helpers import mlp
from helpers import pruned_model
from helpers import run_in_fresh_process
from helpers import to_numpy

from keras_adalora import AdaLoRAEmbedding
from keras_adalora import apply_adalora
from keras_adalora import compact_adalora
from keras_adalora import get_rank_pattern
from keras_adalora import merge_adalora
from keras_adalora.targets import adapted_layers

BACKENDS = ("tensorflow", "jax", "torch")


def test_keras_file_round_trip_keeps_masks_and_outputs(tmp_path):
    model = pruned_model()
    path = tmp_path / "adapted.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert get_rank_pattern(loaded) == {"embed": 3, "hidden": 1, "mix": 0}
    np.testing.assert_array_equal(to_numpy(loaded(inputs())), to_numpy(model(inputs())))
    assert isinstance(loaded.get_layer("embed"), AdaLoRAEmbedding)
    # Adapters train; everything else (head included) stays frozen.
    assert [v.path for v in loaded.trainable_weights] == [
        v.path for v in model.trainable_weights
    ]
    assert len(model.trainable_weights) == 9


def test_a_compiled_model_round_trips_with_its_optimizer(tmp_path):
    model = mlp()
    apply_adalora(model, init_rank=2, keep_trainable=["head"])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(*data(), epochs=1, batch_size=8, verbose=0)
    model.save(tmp_path / "trained.keras")
    loaded = keras.saving.load_model(tmp_path / "trained.keras")
    x, _ = data()
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(model(x)), rtol=1e-6, atol=1e-6)
    assert int(to_numpy(loaded.optimizer.iterations)) == 4
    loaded.fit(*data(), epochs=1, verbose=0)


def test_compaction_keeps_outputs_and_drops_pruned_parameters(tmp_path):
    model = pruned_model()
    x = inputs()
    before = to_numpy(model(x))
    count_before = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    compact_adalora(model)
    np.testing.assert_allclose(to_numpy(model(x)), before, rtol=1e-5, atol=1e-6)
    # Per layer, a component costs d_in + 1 + d_out trainable numbers.
    removed = 1 * (40 + 1 + 16) + 3 * (16 + 1 + 32) + 4 * (48 + 1 + 24)
    count_after = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    assert count_before - count_after == removed
    assert [l.adapter_rank for l in adapted_layers(model)] == [3, 1, 0]
    assert get_rank_pattern(model) == {"embed": 3, "hidden": 1, "mix": 0}

    model.save(tmp_path / "compact.keras")
    loaded = keras.saving.load_model(tmp_path / "compact.keras")
    assert [l.adapter_rank for l in adapted_layers(loaded)] == [3, 1, 0]
    np.testing.assert_allclose(to_numpy(loaded(x)), before, rtol=1e-5, atol=1e-6)


def test_a_trained_model_compacts_trains_on_and_saves(tmp_path):
    model = mlp()
    apply_adalora(model, init_rank=4, keep_trainable=["head"])
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(*data(), epochs=1, batch_size=8, verbose=0)
    model.get_layer("hidden").rank_mask.assign(np.array([1, 1, 0, 0], "float32"))
    compact_adalora(model)
    assert model.get_layer("hidden").adalora_a.shape == (16, 2)
    model.fit(*data(), epochs=1, batch_size=8, verbose=0)
    assert int(to_numpy(model.optimizer.iterations)) == 8
    model.save(tmp_path / "compact_trained.keras")
    loaded = keras.saving.load_model(tmp_path / "compact_trained.keras")
    x, _ = data()
    np.testing.assert_allclose(to_numpy(loaded(x)), to_numpy(model(x)), rtol=1e-6, atol=1e-6)


def test_merge_gives_plain_layers_with_the_same_outputs():
    model = pruned_model()
    x = inputs()
    before = to_numpy(model(x))
    merge_adalora(model)
    assert adapted_layers(model) == []
    for name, cls in [
        ("embed", keras.layers.Embedding),
        ("hidden", keras.layers.Dense),
        ("mix", keras.layers.EinsumDense),
    ]:
        layer = model.get_layer(name)
        assert type(layer) is cls
        assert [v.name for v in layer.weights] in (
            ["kernel", "bias"],
            ["embeddings"],
            ["kernel"],
        )
    np.testing.assert_allclose(to_numpy(model(x)), before, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no AdaLoRA layer"):
        merge_adalora(model)


def test_predict_before_compacting_or_merging_an_uncompiled_model_is_not_reused():
    """`predict` traces (and keeps) its function without `compile`; on
    TensorFlow a kept one computed the adapters that merging removed."""
    model = pruned_model()
    x = inputs()
    adapted = to_numpy(model.predict(x, verbose=0))
    compact_adalora(model)
    np.testing.assert_allclose(model.predict(x, verbose=0), adapted, atol=1e-5)
    merge_adalora(model)
    np.testing.assert_allclose(model.predict(x, verbose=0), adapted, atol=1e-5)
    # And adapting a plain model that has predicted: its adapters count.
    model = mlp()
    model.predict(x[1], verbose=0)
    apply_adalora(model, init_rank=2)
    for layer in adapted_layers(model):
        layer.adalora_lam.assign(np.ones(2, "float32"))
    np.testing.assert_allclose(
        model.predict(x[1], verbose=0), to_numpy(model(x[1])), atol=1e-5
    )


def test_merged_model_loads_without_keras_adalora(tmp_path):
    model = merge_adalora(pruned_model())
    model.save(tmp_path / "merged.keras")
    x = inputs()
    np.save(tmp_path / "tokens.npy", x[0])
    np.save(tmp_path / "features.npy", x[1])
    out = run_in_fresh_process(
        keras.backend.backend(),
        f"""
        import sys, numpy as np, keras
        model = keras.saving.load_model({str(tmp_path / "merged.keras")!r})
        x = [np.load({str(tmp_path / "tokens.npy")!r}), np.load({str(tmp_path / "features.npy")!r})]
        np.save({str(tmp_path / "out.npy")!r}, keras.ops.convert_to_numpy(model(x)))
        print("keras_adalora" in sys.modules)
        """,
    )
    assert out.strip() == "False"
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), to_numpy(model(x)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "other", [b for b in BACKENDS if b != keras.backend.backend()]
)
def test_a_model_saved_here_loads_under_another_backend(tmp_path, other):
    model = pruned_model()
    model.save(tmp_path / "adapted.keras")
    x = inputs()
    np.save(tmp_path / "tokens.npy", x[0])
    np.save(tmp_path / "features.npy", x[1])
    out = run_in_fresh_process(
        other,
        f"""
        import json, numpy as np, keras, keras_adalora
        model = keras.saving.load_model({str(tmp_path / "adapted.keras")!r})
        x = [np.load({str(tmp_path / "tokens.npy")!r}), np.load({str(tmp_path / "features.npy")!r})]
        np.save({str(tmp_path / "out.npy")!r}, keras.ops.convert_to_numpy(model(x)))
        print(json.dumps(keras_adalora.get_rank_pattern(model)))
        """,
    )
    assert json.loads(out.strip().splitlines()[-1]) == get_rank_pattern(model)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), to_numpy(model(x)), rtol=1e-5, atol=1e-5)
