"""AdaLoRA on bases Keras quantized to int8 or int4 (QLoRA-style).

A "pretrained" model's token embedding (a tied `ReversibleEmbedding`, read
both ways), Dense and EinsumDense layers are quantized with
`model.quantize`, then adapted. The whole workflow runs per mode: unchanged
at the start, only the adapters and the head train, the quantized kernels
and scales never move, the callback reaches its exact budget, a checkpoint
reloads in a fresh process and trains on, the adapter file loads onto a
freshly quantized base under another backend, and the merged model stays
quantized and loads where keras_adalora is not imported.
"""

import contextlib
import types
import warnings

import keras
import numpy as np
import pytest
from helpers import fresh_process
from helpers import to_numpy

from keras_adalora import AdaLoRADense
from keras_adalora import AdaLoRAEinsumDense
from keras_adalora import AdaLoRAReversibleEmbedding
from keras_adalora import RankBudgetCallback
from keras_adalora import apply_adalora
from keras_adalora import compact_adalora
from keras_adalora import get_rank_pattern
from keras_adalora import merge_adalora
from keras_adalora import save_adapter
from keras_adalora import _keras
from keras_adalora import quantization
from keras_adalora.targets import adapted_layers

BACKENDS = ("tensorflow", "jax", "torch")
PROJECTIONS = ("tok", "up", "qkv", "out")
# `model.quantize` arguments of each mode under test.
MODES = {
    "int8": ("int8", None),
    "int4": ("int4", "Int4QuantizationConfig(block_size=-1)"),  # per channel
    "int4-grouped": ("int4", "Int4QuantizationConfig(block_size=16)"),
}


def base_model():
    """A small "pretrained" transformer-like stack: a token embedding tied
    with the logits' projection, a Dense with an activation, an
    attention-style EinsumDense pair, a float head on the pooled logits."""
    tokens = keras.Input((6,), dtype="int32", name="tokens")
    embedding = keras.layers.ReversibleEmbedding(
        40, 32, tie_weights=True, logit_soft_cap=8.0, name="tok"
    )
    x = keras.layers.Dense(64, activation="gelu", name="up")(embedding(tokens))
    x = keras.layers.EinsumDense(
        "btd,dnh->btnh", output_shape=(None, 4, 16), bias_axes="nh", name="qkv"
    )(x)
    x = keras.layers.EinsumDense("btnh,nhd->btd", output_shape=(None, 32), name="out")(
        x
    )
    x = keras.layers.GlobalAveragePooling1D()(embedding(x, reverse=True))
    return keras.Model(tokens, keras.layers.Dense(3, name="head")(x))


def quantize(model, mode):
    """`model.quantize(...)` for a mode of `MODES`, the head left float."""
    name, config = MODES[mode]
    if config is not None:
        config = eval(f"keras.quantizers.{config}")
    with quiet():
        model.quantize(name, config=config, filters=lambda layer: layer.name != "head")
    return model


@contextlib.contextmanager
def quiet():
    # Keras warns for every layer without a `quantize` (Input, pooling).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def data(n=32, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 40, (n, 6)).astype("int32"), rng.integers(0, 3, (n,))


def frozen_state(model):
    return {
        f"{name}/{weight}": to_numpy(variable).copy()
        for name in PROJECTIONS
        for weight, variable in quantization.quantized_weights(model.get_layer(name))
        + (("kernel", _keras.kernel_variable(model.get_layer(name))),)
    }


@pytest.mark.parametrize("mode", sorted(MODES))
def test_a_quantized_model_adapts_trains_reloads_and_merges_quantized(tmp_path, mode):
    keras.utils.set_random_seed(0)
    x, y = data()
    model = base_model()
    model.save(tmp_path / "base.keras")
    quantize(model, mode)
    before = to_numpy(model.predict(x, verbose=0))
    frozen = frozen_state(model)

    apply_adalora(model, init_rank=4, target=list(PROJECTIONS), keep_trainable=["head"])
    assert {l.name: l.quantization_mode for l in adapted_layers(model)} == {
        name: MODES[mode][0] for name in PROJECTIONS
    }
    np.testing.assert_array_equal(to_numpy(model.predict(x, verbose=0)), before)
    trainable = {v.path for v in model.trainable_weights}
    expected = {f"{n}/adalora_{w}" for n in PROJECTIONS for w in ("A", "lam", "B")}
    assert trainable == expected | {"head/kernel", "head/bias"}

    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    callback = RankBudgetCallback(target_rank=2, tinit=0.1, tfinal=0.6, delta_t=2)
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "trained.keras"))
    history = model.fit(
        x, y, batch_size=4, epochs=2, verbose=0, callbacks=[callback, checkpoint]
    )
    assert history.history["adalora_rank"][-1] == callback.target_budget == 8
    pattern = get_rank_pattern(model)
    assert sum(pattern.values()) == 8
    # The quantized kernels and their scales never moved.
    for key, value in frozen_state(model).items():
        np.testing.assert_array_equal(value, frozen[key], err_msg=key)
    trained = to_numpy(model.predict(x, verbose=0))
    moved = np.abs(trained - before).max()
    assert moved > 1e-2
    save_adapter(model, tmp_path / "adapter.adalora.h5")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y)
    np.save(tmp_path / "trained.npy", trained)

    # The checkpoint reloads quantized in a fresh process, and trains on.
    resumed = fresh_process(f"""
        import keras
        import keras_adalora
        folder = {str(tmp_path)!r}
        x, y = np.load(folder + "/x.npy"), np.load(folder + "/y.npy")
        with warnings.catch_warnings(record=True) as caught:
            model = keras.saving.load_model(folder + "/trained.keras")
        gap = np.abs(model.predict(x, verbose=0) - np.load(folder + "/trained.npy")).max()
        layers = {{n: model.get_layer(n) for n in {list(PROJECTIONS)!r}}}
        history = model.fit(
            x, y, batch_size=4, epochs=1, verbose=0,
            callbacks=[keras_adalora.RankBudgetCallback(
                target_rank=2, tinit=0.1, tfinal=0.6, delta_t=2)],
        )
        report(
            warnings=[str(w.message) for w in caught],
            gap=float(gap),
            kinds={{n: [type(l).__name__, l.quantization_mode] for n, l in layers.items()}},
            pattern=keras_adalora.get_rank_pattern(model),
            rank=history.history["adalora_rank"][-1],
        )
        """)
    assert resumed["keras_adalora_imported"]
    assert resumed["warnings"] == []
    assert resumed["gap"] < 1e-5
    quantized = MODES[mode][0]
    assert resumed["kinds"] == {
        "tok": ["AdaLoRAReversibleEmbedding", quantized],
        "up": ["AdaLoRADense", quantized],
        "qkv": ["AdaLoRAEinsumDense", quantized],
        "out": ["AdaLoRAEinsumDense", quantized],
    }
    assert resumed["pattern"] == pattern and resumed["rank"] == 8

    # The adapter file onto the float base quantized afresh, under another
    # backend; compact, merge (staying quantized) and save there.
    other = BACKENDS[(BACKENDS.index(keras.backend.backend()) + 1) % 3]
    name, config = MODES[mode]
    config = "None" if config is None else f"keras.quantizers.{config}"
    loaded = fresh_process(
        f"""
        import keras
        import keras_adalora
        folder = {str(tmp_path)!r}
        x = np.load(folder + "/x.npy")
        trained = np.load(folder + "/trained.npy")
        base = keras.saving.load_model(folder + "/base.keras")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            base.quantize({name!r}, config={config},
                          filters=lambda layer: layer.name != "head")
        base.get_layer("head").set_weights(
            keras.saving.load_model(folder + "/trained.keras").get_layer("head").get_weights())
        model = keras_adalora.load_adapter(base, folder + "/adapter.adalora.h5")
        adapted = model.predict(x, verbose=0)
        keras_adalora.compact_adalora(model)
        compacted = model.predict(x, verbose=0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            keras_adalora.merge_adalora(model)
        merged = model.predict(x, verbose=0)
        model.save(folder + "/merged.keras")
        np.save(folder + "/merged.npy", merged)
        report(
            pattern=keras_adalora.get_rank_pattern(
                keras_adalora.load_adapter(
                    keras.saving.load_model(folder + "/base.keras"),
                    folder + "/adapter.adalora.h5")),
            adapted_gap=float(np.abs(adapted - trained).max()),
            compacted_gap=float(np.abs(compacted - trained).max()),
            merged_gap=float(np.abs(merged - trained).max()),
            warnings=[str(w.message) for w in caught
                      if issubclass(w.category, UserWarning)],
            kinds=sorted({{(type(l).__name__, l.quantization_mode) for l in model.layers
                           if l.name in {list(PROJECTIONS)!r}}}),
        )
        """,
        backend=other,
    )
    # (The same adapter also loads onto the float base: `pattern`.)
    assert loaded["pattern"] == pattern
    assert loaded["adapted_gap"] < 1e-4 and loaded["compacted_gap"] < 1e-4
    assert loaded["kinds"] == [
        ["Dense", quantized],
        ["EinsumDense", quantized],
        ["ReversibleEmbedding", quantized],
    ]
    # Re-quantizing W + delta_W rounds the update to the grid: the merged
    # model keeps most of what training moved, and the warning says how much
    # re-quantization changed.
    assert loaded["merged_gap"] < 0.25 * moved
    assert len(loaded["warnings"]) == 1, loaded["warnings"]
    assert "re-quantized 4 quantized layer(s)" in loaded["warnings"][0]

    deployed = fresh_process(f"""
        import keras
        folder = {str(tmp_path)!r}
        with warnings.catch_warnings(record=True) as caught:
            model = keras.saving.load_model(folder + "/merged.keras", compile=False)
        out = model.predict(np.load(folder + "/x.npy"), verbose=0)
        report(
            warnings=[str(w.message) for w in caught],
            modes=[model.get_layer(n).quantization_mode for n in {list(PROJECTIONS)!r}],
            gap=float(np.abs(out - np.load(folder + "/merged.npy")).max()),
        )
        """)
    assert not deployed["keras_adalora_imported"]
    assert deployed["warnings"] == []
    assert deployed["modes"] == [quantized] * 4
    assert deployed["gap"] < 1e-5


@pytest.mark.parametrize("mode", sorted(MODES))
def test_the_dequantized_kernel_is_what_the_quantized_layer_computes(mode):
    model = quantize(base_model(), mode)
    x = np.random.default_rng(0).normal(size=(2, 6, 32)).astype("float32")
    layer = model.get_layer("up")
    kernel = to_numpy(quantization.float_kernel(layer))
    assert kernel.shape == quantization.kernel_shape(layer) == (32, 64)
    expected = to_numpy(
        quantization.frozen_output(layer, keras.ops.convert_to_tensor(x))
    )
    # int8 also quantizes the inputs on the fly, int4 is weight-only.
    atol = 0.05 if mode == "int8" else 1e-4
    np.testing.assert_allclose(x @ kernel, expected, atol=atol)
    qkv = model.get_layer("qkv")
    assert to_numpy(quantization.float_kernel(qkv)).shape == (64, 4, 16)
    # The table: every token's row as the quantized lookup gives it.
    table = model.get_layer("tok")
    ids = keras.ops.arange(40, dtype="int32")
    np.testing.assert_allclose(
        to_numpy(quantization.float_kernel(table)),
        to_numpy(quantization.frozen_output(table, ids)),
        atol=1e-6,
    )
    assert quantization.kernel_shape(table) == (40, 32)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_merging_an_untrained_adapter_gives_back_the_quantized_kernels(mode):
    model = quantize(base_model(), mode)
    frozen = frozen_state(model)
    apply_adalora(model, init_rank=4, target=list(PROJECTIONS))
    with pytest.warns(UserWarning, match=r"error is 0\.0%"):
        merge_adalora(model)
    # The same integers; scales recomputed from the dequantized kernel
    # differ by float32 round-off.
    for key, value in frozen_state(model).items():
        if value.dtype == np.int8:
            np.testing.assert_array_equal(value, frozen[key], err_msg=key)
        else:
            np.testing.assert_allclose(value, frozen[key], rtol=1e-5, err_msg=key)
    # As in a plain quantized layer: only the bias trains.
    model.trainable = True
    assert {v.path for v in model.get_layer("up").trainable_weights} == {"up/bias"}


def test_compacting_a_quantized_adapter_keeps_the_outputs():
    x, _ = data(n=8)
    model = quantize(base_model(), "int4-grouped")
    apply_adalora(model, init_rank=4, target=list(PROJECTIONS))
    rng = np.random.default_rng(1)
    for layer in adapted_layers(model):
        layer.adalora_lam.assign(rng.normal(size=(4,)).astype("float32") * 0.1)
        layer.rank_mask.assign(np.array([1.0, 0.0, 1.0, 0.0], "float32"))
    adapted = to_numpy(model.predict(x, verbose=0))
    compact_adalora(model)
    assert {l.name: l.adapter_rank for l in adapted_layers(model)} == {
        name: 2 for name in PROJECTIONS
    }
    np.testing.assert_allclose(to_numpy(model.predict(x, verbose=0)), adapted, atol=1e-5)


@pytest.mark.parametrize("mode", ["gptq", "awq", "float8"])
def test_modes_keras_cannot_train_through_are_refused_by_name(mode):
    layer = types.SimpleNamespace(quantization_mode=mode)
    with pytest.raises(ValueError, match=rf"quantized with mode '{mode}'.*int8"):
        quantization.check_mode(layer, "block/dense")


def test_a_float8_model_is_refused_before_anything_changes():
    model = base_model()
    with quiet():
        model.quantize("float8", filters=lambda layer: layer.name != "head")
    weights = len(model.weights)
    with pytest.raises(ValueError, match="mode 'float8'"):
        apply_adalora(model, init_rank=2, target=list(PROJECTIONS))
    assert len(model.weights) == weights
    assert adapted_layers(model) == []


def token_model(tie_weights):
    """Two quantizable tables: a plain `Embedding` and a `ReversibleEmbedding`
    whose reverse projection gives the logits (from its own table when
    untied), a Dense between them."""
    tokens = keras.Input((6,), dtype="int32")
    reversible = keras.layers.ReversibleEmbedding(
        40, 16, tie_weights=tie_weights, logit_soft_cap=5.0, name="tok"
    )
    plain = keras.layers.Embedding(40, 16, name="plain")
    x = keras.layers.Add()([reversible(tokens), plain(tokens)])
    x = keras.layers.Dense(16, name="mid")(x)
    return keras.Model(tokens, reversible(x, reverse=True))


# Each mode once, tied and untied both covered (the whole-workflow test runs
# a tied table in every mode).
@pytest.mark.parametrize(
    "mode, tie_weights",
    [("int8", False), ("int4", True), ("int4-grouped", False)],
    ids=["int8-untied", "int4-tied", "int4-grouped-untied"],
)
def test_quantized_tables_adapt_both_ways_train_compact_merge_and_reload(
    tmp_path, mode, tie_weights
):
    keras.utils.set_random_seed(0)
    x, _ = data(n=8)
    y = np.random.default_rng(1).integers(0, 40, (8, 6))
    model = quantize(token_model(tie_weights), mode)
    tables = ("tok", "plain")
    # The quantized tables and their scales (an untied layer's reverse
    # table's too).
    frozen = {
        v.path: to_numpy(v).copy() for n in tables for v in model.get_layer(n).weights
    }
    before = to_numpy(model.predict(x, verbose=0))

    # Orthonormal factors at their larger scale: three epochs move the
    # outputs well above float32 and int4 round-off.
    apply_adalora(model, init_rank=4, target=[*tables, "mid"], factor_init="orthogonal")
    np.testing.assert_allclose(to_numpy(model.predict(x, verbose=0)), before, atol=1e-6)
    expected = {f"{n}/adalora_{w}" for n in (*tables, "mid") for w in ("A", "lam", "B")}
    assert {v.path for v in model.trainable_weights} == expected
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    callback = RankBudgetCallback(target_rank=2, tinit=0.1, tfinal=0.6, delta_t=2)
    history = model.fit(x, y, batch_size=2, epochs=3, verbose=0, callbacks=[callback])
    assert history.history["adalora_rank"][-1] == sum(get_rank_pattern(model).values()) == 6
    state = {v.path: to_numpy(v) for n in tables for v in model.get_layer(n).weights}
    for path, value in frozen.items():
        np.testing.assert_array_equal(state[path], value, err_msg=path)
    trained = to_numpy(model.predict(x, verbose=0))
    assert np.abs(trained - before).max() > 1e-3

    model.save(tmp_path / "adapted.keras")
    reloaded = keras.saving.load_model(tmp_path / "adapted.keras")
    np.testing.assert_allclose(to_numpy(reloaded.predict(x, verbose=0)), trained, atol=1e-6)
    compact_adalora(model)
    np.testing.assert_allclose(to_numpy(model.predict(x, verbose=0)), trained, atol=1e-5)
    with pytest.warns(UserWarning, match="re-quantized 3 quantized layer"):
        merge_adalora(model)
    # Both tables stay quantized; an untied layer's reverse table is as it
    # was (the adapter acts on the lookup table only).
    assert [model.get_layer(n).quantization_mode for n in tables] == [MODES[mode][0]] * 2
    if not tie_weights:
        layer = model.get_layer("tok")
        for v in layer.weights:
            if v.path.startswith("tok/reverse_embeddings"):
                np.testing.assert_array_equal(to_numpy(v), frozen[v.path])
    merged = to_numpy(model.predict(x, verbose=0))
    assert np.abs(merged - trained).max() < 0.5 * np.abs(trained - before).max()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_from_layer_copies_a_quantized_layer(mode):
    model = quantize(base_model(), mode)
    x = np.random.default_rng(0).normal(size=(2, 6, 32)).astype("float32")
    up, qkv, tok = (model.get_layer(n) for n in ("up", "qkv", "tok"))
    cases = (
        (up, AdaLoRADense, x),
        (qkv, AdaLoRAEinsumDense, up(x)),
        (tok, AdaLoRAReversibleEmbedding, np.array([[1, 2, 3]], "int32")),
    )
    for layer, cls, inputs in cases:
        copy = cls.from_layer(layer, init_rank=4)
        assert copy.quantization_mode == layer.quantization_mode
        np.testing.assert_array_equal(to_numpy(copy(inputs)), to_numpy(layer(inputs)))
        assert layer.quantization_mode is not None and not hasattr(layer, "adalora_a")
    hidden = np.random.default_rng(1).normal(size=(2, 6, 32)).astype("float32")
    np.testing.assert_array_equal(
        to_numpy(copy(hidden, reverse=True)), to_numpy(tok(hidden, reverse=True))
    )
