"""Convolutions (Conv1D, Conv2D, Conv3D) through a user's whole workflow.

One model holds every convolution kind (causal, strided, grouped,
channels-first): it is adapted, fitted with the callback to its exact budget
and checkpointed; the checkpoint reloads in a fresh process and trains on;
the adapter file loads onto a fresh base in a fresh process of another
backend; the compacted, merged model loads where keras_adalora is not.
"""

import keras
import numpy as np
import pytest
from helpers import fresh_process
from helpers import to_numpy

from keras_adalora import AdaLoRAConv2D
from keras_adalora import RankBudgetCallback
from keras_adalora import apply_adalora
from keras_adalora import compact_adalora
from keras_adalora import get_rank_pattern
from keras_adalora import merge_adalora
from keras_adalora import save_adapter
from keras_adalora.targets import adapted_layers

BACKENDS = ("tensorflow", "jax", "torch")
CONVS = ("image_conv", "image_grouped_conv", "sequence_conv", "volume_conv")


def conv_model():
    """A "pretrained" model with a convolution of every kind."""
    image = keras.Input((8, 8, 2), name="image")
    sequence = keras.Input((10, 3), name="sequence")
    volume = keras.Input((1, 4, 4, 4), name="volume")
    a = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="image_conv")(
        image
    )
    a = keras.layers.Conv2D(8, 3, strides=2, groups=2, name="image_grouped_conv")(a)
    a = keras.layers.GlobalAveragePooling2D()(a)
    b = keras.layers.Conv1D(
        6, 3, padding="causal", dilation_rate=2, name="sequence_conv"
    )(sequence)
    b = keras.layers.GlobalAveragePooling1D()(b)
    c = keras.layers.Conv3D(4, 2, data_format="channels_first", name="volume_conv")(
        volume
    )
    c = keras.layers.GlobalAveragePooling3D(data_format="channels_first")(c)
    logits = keras.layers.Dense(3, name="head")(keras.layers.Concatenate()([a, b, c]))
    return keras.Model([image, sequence, volume], logits)


def conv_data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    x = [
        rng.normal(size=(n, 8, 8, 2)).astype("float32"),
        rng.normal(size=(n, 10, 3)).astype("float32"),
        rng.normal(size=(n, 1, 4, 4, 4)).astype("float32"),
    ]
    return x, rng.integers(0, 3, size=(n,))


def test_a_cnn_adapts_trains_to_its_budget_reloads_merges_and_deploys(tmp_path):
    x, y = conv_data()
    model = conv_model()
    model.save(tmp_path / "base.keras")
    before = to_numpy(model.predict(x, verbose=0))
    kernels = {name: to_numpy(model.get_layer(name).kernel).copy() for name in CONVS}

    apply_adalora(model, init_rank=3, target=["_conv$"], keep_trainable=["head"])
    assert get_rank_pattern(model) == {name: 3 for name in CONVS}
    np.testing.assert_allclose(to_numpy(model.predict(x, verbose=0)), before, atol=1e-6)
    # Only the adapters (and the head the user kept) train.
    trainable = {v.path for v in model.trainable_weights}
    expected = {f"{n}/adalora_{w}" for n in CONVS for w in ("A", "lam", "B")}
    assert trainable == expected | {"head/kernel", "head/bias"}

    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    callback = RankBudgetCallback(target_rank=1, tinit=0.1, tfinal=0.6, delta_t=2)
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "trained.keras"))
    history = model.fit(
        x, y, batch_size=4, epochs=2, verbose=0, callbacks=[callback, checkpoint]
    )
    # The exact budget: one component per layer on average, four in all.
    assert history.history["adalora_rank"][-1] == callback.target_budget == 4
    pattern = get_rank_pattern(model)
    assert sum(pattern.values()) == 4
    for name in CONVS:  # the pretrained kernels never moved
        np.testing.assert_array_equal(
            to_numpy(model.get_layer(name)._kernel), kernels[name]
        )
    trained = to_numpy(model.predict(x, verbose=0))
    assert not np.allclose(trained, before, atol=1e-3)
    save_adapter(model, tmp_path / "cnn.adalora.h5")
    np.save(tmp_path / "trained.npy", trained)
    for k, part in enumerate(x):
        np.save(tmp_path / f"x{k}.npy", part)
    np.save(tmp_path / "y.npy", y)

    # The checkpoint reloads in a fresh process and trains on.
    resumed = fresh_process(f"""
        import keras
        import keras_adalora
        from helpers import to_numpy
        folder = {str(tmp_path)!r}
        x = [np.load(f"{{folder}}/x{{k}}.npy") for k in range(3)]
        y = np.load(folder + "/y.npy")
        with warnings.catch_warnings(record=True) as caught:
            model = keras.saving.load_model(folder + "/trained.keras")
        gap = np.abs(model.predict(x, verbose=0) - np.load(folder + "/trained.npy")).max()
        kinds = sorted({{type(l).__name__ for l in model.layers if "conv" in l.name}})
        history = model.fit(
            x, y, batch_size=4, epochs=1, verbose=0,
            callbacks=[keras_adalora.RankBudgetCallback(
                target_rank=1, tinit=0.1, tfinal=0.6, delta_t=2)],
        )
        report(
            warnings=[str(w.message) for w in caught],
            gap=float(gap),
            kinds=kinds,
            pattern=keras_adalora.get_rank_pattern(model),
            rank=history.history["adalora_rank"][-1],
        )
        """)
    assert resumed["keras_adalora_imported"]
    assert resumed["warnings"] == []
    assert resumed["gap"] < 1e-5
    assert resumed["kinds"] == ["AdaLoRAConv1D", "AdaLoRAConv2D", "AdaLoRAConv3D"]
    assert resumed["pattern"] == pattern and resumed["rank"] == 4

    # The adapter file onto a fresh base, under another backend; compact,
    # merge and save there.
    other = BACKENDS[(BACKENDS.index(keras.backend.backend()) + 1) % 3]
    loaded = fresh_process(
        f"""
        import keras
        import keras_adalora
        folder = {str(tmp_path)!r}
        x = [np.load(f"{{folder}}/x{{k}}.npy") for k in range(3)]
        base = keras.saving.load_model(folder + "/base.keras")
        model = keras_adalora.load_adapter(base, folder + "/cnn.adalora.h5")
        adapted = keras.ops.convert_to_numpy(model.predict(x, verbose=0))
        pattern = keras_adalora.get_rank_pattern(model)
        keras_adalora.compact_adalora(model)
        compacted = model.predict(x, verbose=0)
        keras_adalora.merge_adalora(model)
        merged = model.predict(x, verbose=0)
        model.save(folder + "/merged.keras")
        np.save(folder + "/merged.npy", merged)
        trained = np.load(folder + "/trained.npy")
        report(
            pattern=pattern,
            adapted_gap=float(np.abs(adapted - trained).max()),
            compacted_gap=float(np.abs(compacted - trained).max()),
            merged_gap=float(np.abs(merged - trained).max()),
            kinds=sorted({{type(l).__name__ for l in model.layers if "conv" in l.name}}),
        )
        """,
        backend=other,
    )
    assert loaded["pattern"] == pattern
    assert loaded["adapted_gap"] < 1e-5 and loaded["compacted_gap"] < 1e-5
    assert loaded["merged_gap"] < 1e-4
    assert loaded["kinds"] == ["Conv1D", "Conv2D", "Conv3D"]

    deployed = fresh_process(f"""
        import keras
        folder = {str(tmp_path)!r}
        x = [np.load(f"{{folder}}/x{{k}}.npy") for k in range(3)]
        with warnings.catch_warnings(record=True) as caught:
            model = keras.saving.load_model(folder + "/merged.keras", compile=False)
        out = model.predict(x, verbose=0)
        report(
            warnings=[str(w.message) for w in caught],
            gap=float(np.abs(out - np.load(folder + "/merged.npy")).max()),
        )
        """)
    assert not deployed["keras_adalora_imported"]
    assert deployed["warnings"] == []
    assert deployed["gap"] < 1e-5


def test_compacting_and_merging_in_process_keep_the_outputs():
    x, y = conv_data(n=8)
    model = conv_model()
    apply_adalora(model, init_rank=3, target=["_conv$"])
    rng = np.random.default_rng(1)
    for layer in adapted_layers(model):
        layer.adalora_lam.assign(rng.normal(size=(3,)).astype("float32"))
        layer.rank_mask.assign(np.array([1.0, 0.0, 1.0], "float32"))
    # A layer left with no component at all.
    model.get_layer("volume_conv").rank_mask.assign(np.zeros(3, "float32"))
    adapted = to_numpy(model.predict(x, verbose=0))
    compact_adalora(model)
    ranks = {layer.name: layer.adalora_a.shape[-1] for layer in adapted_layers(model)}
    assert ranks == {**{name: 2 for name in CONVS}, "volume_conv": 0}
    np.testing.assert_allclose(
        to_numpy(model.predict(x, verbose=0)), adapted, atol=1e-5
    )
    merge_adalora(model)
    assert adapted_layers(model) == []
    np.testing.assert_allclose(
        to_numpy(model.predict(x, verbose=0)), adapted, atol=1e-4
    )


def test_a_conv_adapter_rank_is_bounded_by_the_kernel_matrix():
    layer = keras.layers.Conv2D(4, 1)
    layer.build((None, 5, 5, 3))
    # A 1x1 convolution from 3 channels is a 3 x 4 matrix: rank at most 3.
    with pytest.raises(ValueError, match=r"3 x 4 matrix.*init_rank <= 3"):
        AdaLoRAConv2D.from_layer(layer, init_rank=4)
    assert AdaLoRAConv2D.from_layer(layer, init_rank=3).init_rank == 3
