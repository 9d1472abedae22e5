"""Adapter files: `save_adapter` / `load_adapter`."""

import json

import h5py
import keras
import numpy as np
import pytest
from helpers import embedding_mlp
from helpers import inputs
from helpers import pruned_model
from helpers import run_in_fresh_process
from helpers import to_numpy

from keras_adalora import apply_adalora
from keras_adalora import compact_adalora
from keras_adalora import get_rank_pattern
from keras_adalora import load_adapter
from keras_adalora import save_adapter
from keras_adalora.targets import adapted_layers

BACKENDS = ("tensorflow", "jax", "torch")


def trained_pair():
    """A base model's weights, and the model adapted from it with a trained
    head (so the file must carry the head too)."""
    model = embedding_mlp()
    weights = [to_numpy(w) for w in model.weights]
    pruned_model(model, keep_trainable=["head"])
    head = model.get_layer("head")
    head.kernel.assign(head.kernel + 0.5)
    return model, weights


def fresh_base(weights, build=embedding_mlp):
    model = build()
    for variable, value in zip(model.weights, weights):
        variable.assign(value)
    return model


def snapshot(model):
    return [to_numpy(w).copy() for w in model.weights]


def test_round_trip_reproduces_outputs_masks_and_trainability(tmp_path):
    model, weights = trained_pair()
    path = tmp_path / "model.adalora.h5"
    save_adapter(model, path)
    restored = load_adapter(fresh_base(weights), path)
    x = inputs()
    np.testing.assert_allclose(to_numpy(restored(x)), to_numpy(model(x)), atol=1e-6)
    assert get_rank_pattern(restored) == {"embed": 3, "hidden": 1, "mix": 0}
    # Same split of trainable and frozen weights, so training can go on.
    assert sorted(v.path for v in restored.trainable_weights) == sorted(
        v.path for v in model.trainable_weights
    )
    assert "head/kernel" in {v.path for v in restored.trainable_weights}
    restored.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    restored.fit(x, np.zeros(6), epochs=1, verbose=0)


def test_file_holds_the_adapter_only_and_documents_it(tmp_path):
    model, _ = trained_pair()
    path = tmp_path / "model.adalora.h5"
    save_adapter(model, path)
    with h5py.File(path, "r") as f:
        metadata = json.loads(f.attrs["metadata"])
        datasets = []
        f.visititems(
            lambda name, item: datasets.append(name)
            if isinstance(item, h5py.Dataset)
            else None
        )
    assert metadata["format"] == "keras-adalora-adapter"
    assert metadata["rank_pattern"] == {"embed": 3, "hidden": 1, "mix": 0}
    assert [a["path"] for a in metadata["adapters"]] == ["embed", "hidden", "mix"]
    hidden = metadata["adapters"][1]
    assert hidden["base_class"] == "Dense"
    assert hidden["kernel_shape"] == [16, 32]
    assert hidden["init_rank"] == hidden["adapter_rank"] == 4
    assert [t["path"] for t in metadata["trained"]] == ["head"]
    # Adapters and the trained head; no frozen pretrained weight.
    assert sorted(datasets) == sorted(
        [f"adapters/{k}/{n}" for k in range(3) for n in ("adalora_A", "adalora_lam", "adalora_B", "rank_mask")]
        + ["trained/0/kernel", "trained/0/bias"]
    )


def test_a_compacted_adapter_saves_compacted(tmp_path):
    model, weights = trained_pair()
    save_adapter(model, tmp_path / "full.adalora.h5")
    compact_adalora(model)
    save_adapter(model, tmp_path / "compact.adalora.h5")
    assert (tmp_path / "compact.adalora.h5").stat().st_size < (
        tmp_path / "full.adalora.h5"
    ).stat().st_size
    restored = load_adapter(fresh_base(weights), tmp_path / "compact.adalora.h5")
    assert [layer.adapter_rank for layer in adapted_layers(restored)] == [3, 1, 0]
    x = inputs()
    np.testing.assert_allclose(to_numpy(restored(x)), to_numpy(model(x)), atol=1e-6)


def test_automatic_layer_names_load_by_position(tmp_path):
    def sequential():  # auto-named layers: new names on every build
        return keras.Sequential(
            [keras.Input((8,)), keras.layers.Dense(8), keras.layers.Dense(2)]
        )

    model = sequential()
    weights = [to_numpy(w) for w in model.weights]
    apply_adalora(model, init_rank=2)
    for layer in adapted_layers(model):
        layer.adalora_lam.assign([0.5, -1.0])
    save_adapter(model, tmp_path / "seq.adalora.h5")
    fresh = fresh_base(weights, sequential)
    assert set(get_rank_pattern(model)).isdisjoint(
        layer.path for layer in fresh.layers
    )
    load_adapter(fresh, tmp_path / "seq.adalora.h5")
    x = np.ones((2, 8), "float32")
    np.testing.assert_allclose(to_numpy(fresh(x)), to_numpy(model(x)), atol=1e-6)


def no_mix():  # `mix` and the embedding branch are missing
    features = keras.Input((16,), name="features")
    x = keras.layers.Dense(32, activation="relu", name="hidden")(features)
    return keras.Model(features, keras.layers.Dense(3, name="head")(x))


MISMATCHED_BASES = [
    (lambda: embedding_mlp(hidden=40), "'hidden'.*kernel of shape \\(16, 32\\)"),
    (no_mix, "no layer 'embed'"),
    (lambda: embedding_mlp(classes=5), "'head'.*kernel.*num_classes"),
    (lambda: embedding_mlp(head_bias=False), "'head'.*weight 'bias'"),
]


@pytest.mark.parametrize("build, message", MISMATCHED_BASES)
def test_a_mismatched_base_is_refused_untouched(tmp_path, build, message):
    model, _ = trained_pair()
    save_adapter(model, tmp_path / "model.adalora.h5")
    base = build()
    before = snapshot(base)
    trainable = [v.path for v in base.trainable_weights]
    with pytest.raises(ValueError, match=message):
        load_adapter(base, tmp_path / "model.adalora.h5")
    assert not adapted_layers(base)
    for old, new in zip(before, snapshot(base)):
        np.testing.assert_array_equal(old, new)
    assert [v.path for v in base.trainable_weights] == trainable


def test_bad_arguments(tmp_path):
    model, weights = trained_pair()
    with pytest.raises(ValueError, match="'.adalora.h5'"):
        save_adapter(model, tmp_path / "model.keras")
    path = tmp_path / "model.adalora.h5"
    save_adapter(model, path)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_adapter(model, path, overwrite=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_adapter(fresh_base(weights), tmp_path / "other.adalora.h5")
    with pytest.raises(ValueError, match="already holds AdaLoRA layers"):
        load_adapter(model, path)
    with pytest.raises(ValueError, match="no AdaLoRA layer"):
        save_adapter(embedding_mlp(), tmp_path / "plain.adalora.h5")
    with h5py.File(path, "r+") as f:
        metadata = json.loads(f.attrs["metadata"])
        metadata["format_version"] = 99
        f.attrs["metadata"] = json.dumps(metadata)
    with pytest.raises(ValueError, match="newer keras-adalora"):
        load_adapter(fresh_base(weights), path)


@pytest.mark.parametrize(
    "other", [b for b in BACKENDS if b != keras.backend.backend()][:1]
)
def test_an_adapter_saved_here_loads_under_another_backend(tmp_path, other):
    model, weights = trained_pair()
    save_adapter(model, tmp_path / "model.adalora.h5")
    np.savez(tmp_path / "base.npz", *weights)
    x = inputs()
    np.save(tmp_path / "tokens.npy", x[0])
    np.save(tmp_path / "features.npy", x[1])
    run_in_fresh_process(
        other,
        f"""
        import sys, numpy as np
        sys.path.insert(0, {str(__file__.rsplit("/", 1)[0])!r})
        from helpers import embedding_mlp
        import keras, keras_adalora
        base = embedding_mlp()
        saved = np.load({str(tmp_path / "base.npz")!r})
        for i, variable in enumerate(base.weights):
            variable.assign(saved[f"arr_{{i}}"])
        keras_adalora.load_adapter(base, {str(tmp_path / "model.adalora.h5")!r})
        x = [np.load({str(tmp_path / "tokens.npy")!r}), np.load({str(tmp_path / "features.npy")!r})]
        np.save({str(tmp_path / "out.npy")!r}, keras.ops.convert_to_numpy(base(x)))
        """,
    )
    np.testing.assert_allclose(
        np.load(tmp_path / "out.npy"), to_numpy(model(x)), rtol=1e-5, atol=1e-6
    )


def test_a_base_layer_with_weights_the_file_lacks_is_refused(tmp_path):
    model = pruned_model(embedding_mlp(head_bias=False), keep_trainable=["head"])
    save_adapter(model, tmp_path / "model.adalora.h5")
    base = embedding_mlp()  # its head has a bias the file does not hold
    with pytest.raises(ValueError, match="'head'.*\\['bias'\\].*does not hold"):
        load_adapter(base, tmp_path / "model.adalora.h5")
    assert not adapted_layers(base)
