"""`apply_adalora` on every way of writing a Keras model."""

import keras
import numpy as np
import pytest
from helpers import data
from helpers import mlp
from helpers import randomize_adapters
from helpers import to_numpy

import keras_adalora
from keras_adalora import AdaLoRADense
from keras_adalora import AdaLoRAEinsumDense
from keras_adalora import apply_adalora
from keras_adalora import get_rank_pattern
from keras_adalora import merge_adalora
from keras_adalora.targets import adapted_layers


class Block(keras.layers.Layer):
    """A layer that owns Dense layers (as KerasHub blocks do)."""

    def __init__(self, units, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(units, activation="relu", name="inner")
        self.outer = keras.layers.Dense(units, name="outer")
        self.scale = None

    def build(self, input_shape):
        self.scale = self.add_weight(shape=(), initializer="ones", name="scale")
        self.inner.build(input_shape)
        self.outer.build(self.inner.compute_output_shape(input_shape))

    def call(self, x):
        return self.outer(self.inner(x)) * self.scale


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.block = Block(16, name="block")
        self.head = keras.layers.Dense(3, name="head")

    def call(self, x):
        return self.head(self.block(x))


def sequential():
    return keras.Sequential(
        [
            keras.Input((16,)),
            keras.layers.Dense(32, activation="relu", name="hidden"),
            keras.layers.Dense(3, name="head"),
        ]
    )


def subclassed():
    model = Subclassed()
    model(np.zeros((1, 16), "float32"))
    return model


def transformer():
    """A KerasHub TransformerEncoder: attention EinsumDense + FFN Dense."""
    keras_hub = pytest.importorskip("keras_hub")
    inputs = keras.Input((6, 16))
    x = keras_hub.layers.TransformerEncoder(
        intermediate_dim=32, num_heads=4, name="encoder"
    )(inputs)
    outputs = keras.layers.Dense(3, name="head")(x[:, 0])
    return keras.Model(inputs, outputs)


BUILDERS = {
    "sequential": (sequential, (8, 16), 2),
    "functional": (mlp, (8, 16), 3),
    "subclassed": (subclassed, (8, 16), 3),
    "keras_hub_encoder": (transformer, (8, 6, 16), 7),
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_outputs_are_unchanged_right_after_adapting(kind):
    build, shape, n_dense = BUILDERS[kind]
    model = build()
    x = np.random.default_rng(0).normal(size=shape).astype("float32")
    before = to_numpy(model(x))
    assert apply_adalora(model, init_rank=2) is model
    assert len(adapted_layers(model)) == n_dense
    np.testing.assert_array_equal(to_numpy(model(x)), before)
    randomize_adapters(model)
    assert not np.allclose(to_numpy(model(x)), before)


def test_keras_hub_attention_projections_are_adapted_across_all_heads():
    model = transformer()
    apply_adalora(model, init_rank=4, target=["attention"])
    pattern = get_rank_pattern(model)
    names = sorted(path.rsplit("/", 1)[-1] for path in pattern)
    assert names == ["attention_output", "key", "query", "value"]
    output = next(l for l in adapted_layers(model) if l.name == "attention_output")
    assert isinstance(output, AdaLoRAEinsumDense)
    # (heads * head_dim) x hidden = (4 * 4) x 16
    assert output.adalora_a.shape == (16, 4)


def test_only_adapters_and_kept_layers_train():
    model = mlp()
    apply_adalora(model, init_rank=4, target=["hidden"], keep_trainable=["head"])
    trainable = [v.path for v in model.trainable_variables]
    assert trainable == [
        "hidden/adalora_A",
        "hidden/adalora_lam",
        "hidden/adalora_B",
        "hidden_2/adalora_A",
        "hidden_2/adalora_lam",
        "hidden_2/adalora_B",
        "head/kernel",
        "head/bias",
    ]
    snapshot = {v.path: to_numpy(v).copy() for v in model.weights}
    model.compile(
        optimizer=keras.optimizers.Adam(0.01),
        loss="sparse_categorical_crossentropy",
    )
    model.fit(*data(), epochs=2, batch_size=8, verbose=0)
    for variable in model.weights:
        changed = not np.array_equal(to_numpy(variable), snapshot[variable.path])
        # Frozen weights (base kernels and biases, masks) are bit-identical.
        assert changed == (variable.path in trainable), variable.path


def test_other_layers_are_frozen_and_nested_weights_too():
    model = subclassed()
    apply_adalora(model, init_rank=2, target=["inner"])
    paths = [v.path for v in model.trainable_variables]
    assert len(paths) == 3 and all("inner/adalora" in p for p in paths)
    # The block's own weight is frozen; the block stays a trainable container.
    assert model.block.trainable and not model.block.scale.trainable
    assert not model.head.trainable


def test_callable_target_and_regex_list():
    model = mlp()
    apply_adalora(model, init_rank=2, target=lambda layer: layer.name == "hidden_2")
    assert list(get_rank_pattern(model)) == ["hidden_2"]
    other = mlp()
    apply_adalora(other, init_rank=2, target=["hidden$", "head"])
    assert list(get_rank_pattern(other)) == ["hidden", "head"]


def test_keep_trainable_layers_are_never_adapted():
    model = mlp()
    apply_adalora(model, init_rank=2, keep_trainable="head")
    assert list(get_rank_pattern(model)) == ["hidden", "hidden_2"]
    assert type(model.get_layer("head")) is keras.layers.Dense


def test_a_compiled_and_trained_model_can_be_adapted_and_trained_again():
    model = mlp()
    model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
    model.fit(*data(), epochs=1, verbose=0)
    steps = int(to_numpy(model.optimizer.iterations))
    apply_adalora(model, init_rank=2, keep_trainable=["head"])
    model.fit(*data(), epochs=1, verbose=0)
    assert int(to_numpy(model.optimizer.iterations)) == steps + 1
    assert np.all(to_numpy(model.get_layer("hidden").adalora_lam) != 0)


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="torch only")
def test_torch_parameters_include_the_adapters():
    model = mlp()
    apply_adalora(model, init_rank=2)
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_parameters()}
    assert {"hidden/adalora_A", "hidden/adalora_lam"} <= names
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == 9


# Bad input: a clear ValueError naming the problem, and nothing changed.


def assert_untouched(model, weights_before):
    assert adapted_layers(model) == []
    assert len(model.weights) == weights_before


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target": ["no_such_layer"]}, "No layer matched `target`"),
        ({"target": 5}, "`target` must be"),
        ({"target": ["("]}, "invalid regular expression"),
        ({"keep_trainable": ["nope"]}, "No layer matched `keep_trainable`"),
        ({"init_rank": 0}, "init_rank"),
        (
            {"init_rank": 4, "target": ["hidden", "head"]},
            "init_rank`=4 is too large for layer 'head'",
        ),
        ({"alpha": 0}, "alpha"),
        ({"dropout": -0.5}, "dropout"),
        ({"orth_reg_weight": -1}, "orth_reg_weight"),
        ({"target": lambda layer: layer.name == "nope"}, "No layer matched"),
    ],
)
def test_bad_arguments_raise_before_anything_changes(kwargs, message):
    model = mlp(outputs=3)
    weights = len(model.weights)
    with pytest.raises(ValueError, match=message):
        apply_adalora(model, **{"init_rank": 2, **kwargs})
    assert_untouched(model, weights)


def test_an_init_rank_no_layer_can_hold_names_init_rank_and_the_largest_that_fits():
    model = mlp(input_dim=16, hidden=32, outputs=3)
    weights = len(model.weights)
    with pytest.raises(ValueError, match=r"No layer of this model can hold `init_rank`=100 "
                       r"components.*largest rank any of them can hold is 32.*"
                       r"init_rank <= 32"):
        apply_adalora(model, init_rank=100)
    assert_untouched(model, weights)


def test_a_single_layer_is_refused_with_the_way_to_adapt_it():
    layer = keras.layers.Dense(8, name="alone")
    layer.build((None, 4))
    with pytest.raises(ValueError, match=r"adapts the layers inside a model.*Dense layer "
                       r"\('alone'\).*AdaLoRADense.from_layer"):
        apply_adalora(layer, init_rank=2)
    assert type(layer) is keras.layers.Dense and len(layer.trainable_weights) == 2


def test_adapting_twice_is_refused():
    model = mlp()
    apply_adalora(model, init_rank=2)
    with pytest.raises(ValueError, match="already adapted"):
        apply_adalora(model, init_rank=2)
    with pytest.raises(ValueError, match="already adapted"):
        AdaLoRADense.from_layer(model.get_layer("hidden"))


def test_unbuilt_layers_are_refused():
    model = keras.Sequential([keras.layers.Dense(4), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="not built"):
        apply_adalora(model, init_rank=2)


def test_layers_quantized_in_a_mode_keras_cannot_train_are_refused():
    model = mlp()
    model.quantize("float8")
    weights = len(model.weights)
    with pytest.raises(ValueError, match="quantized with mode 'float8'"):
        apply_adalora(model, init_rank=2)
    assert_untouched(model, weights)


def test_an_adapted_model_refuses_quantize_before_changing_a_layer():
    model = apply_adalora(mlp(), init_rank=2, keep_trainable=["head"])
    before = [to_numpy(w).copy() for w in model.weights]
    with pytest.raises(ValueError, match=r"merge_adalora\(model\)"):
        model.quantize("int8")
    assert all(layer.quantization_mode is None for layer in model.layers)
    assert all(np.array_equal(b, to_numpy(w)) for b, w in zip(before, model.weights))
    # Merged, it is a plain model again, and quantizes.
    merge_adalora(model)
    model.quantize("int8")
    assert model.get_layer("hidden").quantization_mode == "int8"


def test_keras_lora_layers_are_refused():
    model = mlp()
    model.get_layer("hidden_2").enable_lora(2)
    weights = len(model.weights)
    with pytest.raises(ValueError, match="built-in LoRA"):
        apply_adalora(model, init_rank=2)
    assert_untouched(model, weights)


def test_subclasses_of_supported_layers_are_refused_when_targeted():
    class MyDense(keras.layers.Dense):
        pass

    model = keras.Sequential([keras.Input((4,)), MyDense(4, name="mine")])
    with pytest.raises(ValueError, match="MyDense"):
        apply_adalora(model, init_rank=2, target=["mine"])


def test_public_api_matches_the_spec():
    for name in [
        "AdaLoRADense",
        "AdaLoRAEinsumDense",
        "AdaLoRAEmbedding",
        "apply_adalora",
        "get_rank_pattern",
        "compact_adalora",
        "merge_adalora",
    ]:
        assert hasattr(keras_adalora, name)


@keras.saving.register_keras_serializable(package="keras_adalora_tests")
class TinyTransformerBlock(keras.layers.Layer):
    """A transformer block written with Keras's own MultiHeadAttention."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.attention = keras.layers.MultiHeadAttention(2, 4, name="attention")
        self.ffn_in = keras.layers.Dense(16, activation="relu", name="ffn_in")
        self.ffn_out = keras.layers.Dense(8, name="ffn_out")

    def build(self, input_shape):
        self.attention.build(input_shape, input_shape)
        self.ffn_in.build(input_shape)
        self.ffn_out.build(tuple(input_shape[:-1]) + (16,))

    def call(self, x):
        x = x + self.attention(x, x)
        return x + self.ffn_out(self.ffn_in(x))


def tiny_transformer():
    inputs = keras.Input((5, 8))
    x = TinyTransformerBlock(name="block_0")(inputs)
    x = TinyTransformerBlock(name="block_1")(x)
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x), name="tiny")


@pytest.mark.parametrize(
    "target, names",
    [
        ("attention", {"query", "key", "value", "attention_output"}),
        ("ffn", {"ffn_in", "ffn_out"}),
        ("all", {"query", "key", "value", "attention_output", "ffn_in", "ffn_out"}),
        (["ffn", "head"], {"ffn_in", "ffn_out", "head"}),
    ],
)
def test_named_targets_follow_the_model_structure(target, names):
    model = apply_adalora(tiny_transformer(), init_rank=2, target=target)
    paths = list(get_rank_pattern(model))
    assert {p.split("/")[-1] for p in paths} == names
    blocks = 1 if target == "head" else 2
    assert len(paths) == len(names) * blocks - (1 if "head" in names else 0)


def test_a_named_target_that_matches_nothing_says_what_it_selects():
    with pytest.raises(ValueError, match="'ffn' selects the feed-forward"):
        apply_adalora(mlp(), init_rank=2, target="ffn")
