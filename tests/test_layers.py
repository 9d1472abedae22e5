"""The adapted layers on their own: maths, freezing, config, precision."""

import re

import keras
import numpy as np
import pytest
from helpers import to_numpy

from keras_adalora import AdaLoRADense
from keras_adalora import AdaLoRAEinsumDense
from keras_adalora import AdaLoRAEmbedding
from keras_adalora import AdaLoRAPositionEmbedding
from keras_adalora.layers.einsum_dense import EinsumMatrixView
from keras_adalora.regularizers import orthogonality_penalty
from keras_adalora.targets import adapter_classes

try:
    import keras_hub
except ImportError:  # an optional dependency: its layer's cases drop out
    keras_hub = None

RNG = np.random.default_rng(0)

# (plain layer factory, input) for each adapted kind; the einsum equations
# are those of Keras/KerasHub attention and feed-forward projections.
CASES = {
    "dense": (lambda: keras.layers.Dense(12), RNG.normal(size=(3, 10))),
    "einsum_query": (
        lambda: keras.layers.EinsumDense(
            "abc,cde->abde", output_shape=(None, 4, 6), bias_axes="de"
        ),
        RNG.normal(size=(2, 5, 24)),
    ),
    "einsum_output": (
        lambda: keras.layers.EinsumDense(
            "btnh,nhd->btd", output_shape=(None, 24), bias_axes="d"
        ),
        RNG.normal(size=(2, 5, 4, 6)),
    ),
    "einsum_ffn": (
        lambda: keras.layers.EinsumDense("btd,df->btf", output_shape=(None, 32)),
        RNG.normal(size=(2, 5, 24)),
    ),
    "einsum_ellipsis": (
        lambda: keras.layers.EinsumDense("...b,bc->...c", output_shape=8),
        RNG.normal(size=(2, 3, 6)),
    ),
    "einsum_gqa_key": (
        lambda: keras.layers.EinsumDense("bsd,kdh->bskh", output_shape=(None, 2, 4)),
        RNG.normal(size=(2, 5, 12)),
    ),
    "embedding": (
        lambda: keras.layers.Embedding(50, 12),
        RNG.integers(0, 50, size=(3, 7)),
    ),
    "conv1d_causal": (
        lambda: keras.layers.Conv1D(6, 3, padding="causal", dilation_rate=2),
        RNG.normal(size=(2, 9, 4)),
    ),
    "conv2d": (
        lambda: keras.layers.Conv2D(6, 3, strides=2, padding="same"),
        RNG.normal(size=(2, 7, 7, 4)),
    ),
    "conv2d_grouped": (
        lambda: keras.layers.Conv2D(6, (3, 2), groups=2, dilation_rate=2),
        RNG.normal(size=(2, 8, 8, 4)),
    ),
    "conv2d_channels_first": (
        lambda: keras.layers.Conv2D(6, 2, data_format="channels_first"),
        RNG.normal(size=(2, 4, 6, 6)),
    ),
    "conv3d": (
        lambda: keras.layers.Conv3D(4, 2, strides=(1, 2, 1), groups=2),
        RNG.normal(size=(1, 4, 5, 4, 6)),
    ),
}
if keras_hub is not None:
    CASES["position_embedding"] = (
        lambda: keras_hub.layers.PositionEmbedding(sequence_length=9),
        RNG.normal(size=(2, 7, 12)),
    )


def built_pair(case, init_rank=3, **adapter_args):
    factory, x = CASES[case]
    x = x.astype("float32") if x.dtype.kind == "f" else x.astype("int32")
    base = factory()
    try:
        base(x)
    except Exception as error:  # noqa: BLE001 - only the platform's refusal skips
        if type(error).__name__ != "UnimplementedError":
            raise
        # TensorFlow's CPU Conv2D runs channels_first only with the oneDNN
        # kernels of some processors: the plain layer itself cannot run here.
        reason = re.search(r"The \w+ op [^\[]+", str(error))
        pytest.skip(f"Keras's own {type(base).__name__} cannot run here: "
                    f"{reason.group(0).strip() if reason else type(error).__name__}")
    adapted = adapter_classes()[type(base)].from_layer(
        base, init_rank=init_rank, **adapter_args
    )
    return base, adapted, x


def plain_call(layer, kernel, x):
    """The plain Keras computation with an explicit kernel."""
    if isinstance(layer, keras.layers.Embedding):
        return to_numpy(kernel)[x]
    if isinstance(layer, AdaLoRAPositionEmbedding):
        return np.broadcast_to(to_numpy(kernel)[: x.shape[-2]], x.shape)
    if isinstance(
        layer, keras.layers.Conv1D | keras.layers.Conv2D | keras.layers.Conv3D
    ):
        # Keras's own layer with the same configuration, holding `kernel`.
        config = layer.get_config()
        for key in layer._adapter_config():
            config.pop(key)
        plain = layer.wrapped_class.from_config(config)
        plain.build(x.shape)
        plain.kernel.assign(kernel)
        plain.bias.assign(layer.bias)
        return to_numpy(plain(x))
    if isinstance(layer, keras.layers.EinsumDense):
        y = np.einsum(layer.equation, x, to_numpy(kernel))
    else:
        y = x @ to_numpy(kernel)
    if layer.bias is not None:
        y = y + to_numpy(layer.bias)
    return y


@pytest.mark.parametrize("case", sorted(CASES))
def test_freshly_adapted_layer_computes_what_the_plain_layer_did(case):
    base, adapted, x = built_pair(case)
    np.testing.assert_array_equal(to_numpy(adapted(x)), to_numpy(base(x)))


@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_pass_equals_the_merged_kernel_formula(case):
    base, adapted, x = built_pair(case)
    adapted.adalora_lam.assign(RNG.normal(size=(3,)).astype("float32"))
    adapted.rank_mask.assign(np.array([1.0, 0.0, 1.0], "float32"))
    a, lam, b = (to_numpy(v) for v in (adapted.adalora_a, adapted.adalora_lam, adapted.adalora_b))
    mask = to_numpy(adapted.rank_mask)
    delta = (adapted.alpha / adapted.init_rank) * (a * (lam * mask)) @ b
    np.testing.assert_allclose(to_numpy(adapted.delta_matrix()), delta, rtol=1e-5, atol=1e-6)
    expected = plain_call(adapted, adapted.merged_kernel(), x)
    np.testing.assert_allclose(to_numpy(adapted(x)), expected, rtol=1e-4, atol=1e-4)
    # The pruned component really is gone: lam[1] no longer matters.
    before = to_numpy(adapted(x))
    adapted.adalora_lam.assign(lam + np.array([0.0, 5.0, 0.0], "float32"))
    np.testing.assert_allclose(to_numpy(adapted(x)), before, rtol=1e-6, atol=1e-6)


def test_only_the_adapter_is_trainable_and_the_mask_is_not():
    layer = AdaLoRADense(16, init_rank=4)
    layer.build((None, 8))
    assert [v.name for v in layer.trainable_weights] == [
        "adalora_A",
        "adalora_lam",
        "adalora_B",
    ]
    assert {v.name for v in layer.non_trainable_weights} == {
        "kernel",
        "bias",
        "rank_mask",
    }
    assert layer.init_rank == 4 and layer.active_rank == 4
    assert layer.adalora_a.shape == (8, 4) and layer.adalora_b.shape == (4, 16)
    np.testing.assert_array_equal(to_numpy(layer.adalora_lam), np.zeros(4))


def test_toggling_trainable_never_unfreezes_the_base_kernel():
    model = keras.Sequential([keras.Input((8,)), AdaLoRADense(16, init_rank=4)])
    model.trainable = False
    assert model.trainable_weights == []
    model.trainable = True
    model.layers[0].trainable = True
    names = [v.name for v in model.trainable_weights]
    assert names == ["adalora_A", "adalora_lam", "adalora_B"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_orthogonal_factors_start_orthonormal_so_the_penalty_starts_at_zero(case):
    _, adapted, _ = built_pair(case, factor_init="orthogonal", orth_penalty="squared")
    a, b = to_numpy(adapted.adalora_a), to_numpy(adapted.adalora_b)
    np.testing.assert_allclose(a.T @ a, np.eye(3), atol=1e-5)
    np.testing.assert_allclose(b @ b.T, np.eye(3), atol=1e-5)
    assert float(to_numpy(adapted.orthogonality_penalty())) < 1e-8
    # Random, not a fixed basis: two layers start differently.
    _, other, _ = built_pair(case, factor_init="orthogonal")
    assert not np.allclose(a, to_numpy(other.adalora_a))


@pytest.mark.parametrize("case", sorted(CASES))
def test_factors_start_small_and_random_by_default(case):
    _, adapted, _ = built_pair(case)
    assert (adapted.factor_init, adapted.orth_penalty) == ("normal", "norm")
    assert adapted.scale == 1.0
    a, b = to_numpy(adapted.adalora_a), to_numpy(adapted.adalora_b)
    entries = np.concatenate([a.ravel(), b.ravel()])
    assert abs(entries.mean()) < 0.01 and 0.012 < entries.std() < 0.028
    assert np.all(to_numpy(adapted.adalora_lam) == 0.0)
    _, other, _ = built_pair(case)
    assert not np.allclose(a, to_numpy(other.adalora_a))


def test_attention_output_adapter_spans_all_heads():
    """`btnh,nhd->btd` reads as an (n*h) x d matrix, so the adapter's rank can
    exceed the number of heads n; Keras's `enable_lora` factors (n, h, r) x
    (r, d) and is also limited to r, but its delta is built per first axis."""
    heads, head_dim, dim = 4, 8, 32
    layer = AdaLoRAEinsumDense(
        "btnh,nhd->btd", output_shape=(None, dim), init_rank=16
    )
    layer.build((None, 5, heads, head_dim))
    assert layer.adalora_a.shape == (heads * head_dim, 16)
    layer.adalora_lam.assign(np.linspace(1.0, 2.0, 16).astype("float32"))
    delta = to_numpy(layer.delta_kernel())
    assert delta.shape == (heads, head_dim, dim)
    rank = np.linalg.matrix_rank(delta.reshape(heads * head_dim, dim))
    assert rank == 16 > heads


def test_matrix_view_round_trips_the_kernel_layout():
    view = EinsumMatrixView("bsd,kdh->bskh", (3, 12, 4))
    assert view.matrix_shape == (12, 12)
    kernel = np.arange(3 * 12 * 4, dtype="float32").reshape(3, 12, 4)
    matrix = np.transpose(kernel, (1, 0, 2)).reshape(12, 12)
    np.testing.assert_array_equal(to_numpy(view.kernel_from_matrix(matrix)), kernel)


@pytest.mark.parametrize(
    "equation, shape, message",
    [
        ("eti,eih->eth", (2, 6, 4), "batch of separate matrices"),
        ("btd,dfk->btf", (6, 4, 3), "summed away"),
    ],
)
def test_equations_that_are_not_one_linear_map_are_refused(equation, shape, message):
    with pytest.raises(ValueError, match=message):
        EinsumMatrixView(equation, shape)


def test_orthogonality_penalty_on_hand_computed_factors():
    assert float(orthogonality_penalty(np.eye(4, 2), np.eye(2, 3))) == 0.0
    a = np.array([[2.0, 0.0], [0.0, 1.0]], "float32")  # A^T A - I = diag(3, 0)
    b = np.array([[1.0, 1.0]], "float32")  # B B^T - I = [[1]]
    np.testing.assert_allclose(float(orthogonality_penalty(a, np.eye(2))), 9.0)
    np.testing.assert_allclose(float(orthogonality_penalty(np.eye(2, 1), b)), 1.0)
    # PEFT's form: the norms themselves, ||diag(3, 0)|| + ||diag(0, 8)|| = 3 + 8.
    c = np.array([[1.0, 0.0, 0.0], [0.0, 3.0, 0.0]], "float32")  # C C^T - I = diag(0, 8)
    np.testing.assert_allclose(
        float(orthogonality_penalty(a, c, squared=False)), 11.0, rtol=1e-6)
    np.testing.assert_allclose(float(orthogonality_penalty(a, c)), 9.0 + 64.0, rtol=1e-6)


def penalty_and_gradients(a, b, squared):
    """The penalty and its gradients w.r.t. `a` and `b` by the backend's own
    differentiation."""
    import keras

    a, b = np.asarray(a, "float32"), np.asarray(b, "float32")
    if keras.backend.backend() == "jax":
        import jax

        value, grads = jax.value_and_grad(
            lambda a_, b_: orthogonality_penalty(a_, b_, squared=squared),
            argnums=(0, 1))(a, b)
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        ta, tb = tf.constant(a), tf.constant(b)
        with tf.GradientTape() as tape:
            tape.watch([ta, tb])
            value = orthogonality_penalty(ta, tb, squared=squared)
        grads = tape.gradient(value, [ta, tb])
    else:
        import torch

        ta = torch.tensor(a, requires_grad=True)
        tb = torch.tensor(b, requires_grad=True)
        value = orthogonality_penalty(ta, tb, squared=squared)
        value.backward()
        grads = (ta.grad, tb.grad)
    return float(to_numpy(value)), [to_numpy(g) for g in grads]


def test_the_unsquared_penalty_has_a_finite_gradient_at_orthonormal_factors():
    _, grads = penalty_and_gradients(np.eye(3, 2), np.eye(2, 4), squared=False)
    for grad in grads:
        assert np.all(np.isfinite(grad)) and np.all(grad == 0.0)


@pytest.mark.parametrize("squared", [True, False])
def test_the_penalty_gradient_equals_finite_differences(squared):
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(3, 4))

    def penalty(a_, b_):  # float64, from the definition
        ga = np.linalg.norm(a_.T @ a_ - np.eye(3))
        gb = np.linalg.norm(b_ @ b_.T - np.eye(3))
        return ga**2 + gb**2 if squared else ga + gb

    value, (grad_a, grad_b) = penalty_and_gradients(a, b, squared)
    np.testing.assert_allclose(value, penalty(a, b), rtol=1e-5)
    for x, grad in ((a, grad_a), (b, grad_b)):
        numeric = np.zeros_like(x)
        for index in np.ndindex(*x.shape):
            step = np.zeros_like(x)
            step[index] = 1e-6
            plus = penalty(a + step, b) if x is a else penalty(a, b + step)
            minus = penalty(a - step, b) if x is a else penalty(a, b - step)
            numeric[index] = (plus - minus) / 2e-6
        np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("form", ["norm", "squared"])
def test_penalty_is_added_to_losses_in_training_only(form):
    layer = AdaLoRADense(6, init_rank=3, orth_reg_weight=0.5, orth_penalty=form)
    x = np.ones((2, 5), "float32")
    layer(x, training=False)
    assert layer.losses == []
    layer(x, training=True)
    assert len(layer.losses) == 1
    a, b = to_numpy(layer.adalora_a), to_numpy(layer.adalora_b)
    gram_a = np.linalg.norm(a.T @ a - np.eye(3))
    gram_b = np.linalg.norm(b @ b.T - np.eye(3))
    if form == "norm":  # the mean of the two norms
        expected = 0.5 * (gram_a + gram_b) / 2
    else:  # the sum of their squares
        expected = 0.5 * (gram_a**2 + gram_b**2)
    np.testing.assert_allclose(float(to_numpy(layer.losses[0])), expected, rtol=1e-5)
    silent = AdaLoRADense(6, init_rank=3, orth_reg_weight=0.0)
    silent(x, training=True)
    assert silent.losses == []


@pytest.mark.parametrize(
    "case",
    ["dense", "einsum_output", "embedding", "conv1d_causal", "conv2d_grouped"]
    + (["position_embedding"] if keras_hub is not None else []),
)
def test_config_round_trip_rebuilds_the_same_layer(case):
    _, adapted, x = built_pair(case)
    config = adapted.get_config()
    assert config["init_rank"] == 3 and config["adapter_rank"] == 3
    clone = type(adapted).from_config(config)
    clone(x)
    assert clone.get_config() == config
    assert [v.shape for v in clone.weights] == [v.shape for v in adapted.weights]


@pytest.mark.parametrize(
    "kwargs, argument",
    [
        ({"init_rank": 0}, "init_rank"),
        ({"init_rank": 2.5}, "init_rank"),
        ({"alpha": -1.0}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"orth_reg_weight": -0.1}, "orth_reg_weight"),
        ({"adapter_rank": 9}, "adapter_rank"),
    ],
)
def test_bad_constructor_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        AdaLoRADense(8, **{"init_rank": 4, **kwargs})


def test_init_rank_above_the_kernel_rank_is_refused_at_build():
    layer = AdaLoRADense(4, init_rank=5)
    with pytest.raises(ValueError, match="init_rank.*at most 4"):
        layer.build((None, 10))


def test_embedding_refuses_dropout():
    with pytest.raises(ValueError, match="dropout"):
        AdaLoRAEmbedding(10, 4, init_rank=2, dropout=0.1)


@pytest.mark.skipif(keras_hub is None, reason="needs keras-hub")
def test_position_embedding_follows_start_index_and_positions_and_refuses_dropout():
    """KerasHub's call arguments (`start_index` in cached decoding, explicit
    `positions`) pick the adapter's rows as they pick the table's."""
    base, adapted, x = built_pair("position_embedding")
    adapted.adalora_lam.assign(np.array([0.5, -1.0, 2.0], "float32"))
    merged = keras_hub.layers.PositionEmbedding(sequence_length=9)
    merged(x)
    merged.position_embeddings.assign(adapted.merged_kernel())
    for kwargs in (
        {"start_index": 2},
        {"positions": np.array([4, 0, 8, 1, 1, 3, 2], "int32")},
        {"positions": np.array([[0, 1, 2, 3, 4, 5, 6], [2, 3, 4, 5, 6, 7, 8]], "int32")},
    ):
        np.testing.assert_allclose(
            to_numpy(adapted(x, **kwargs)), to_numpy(merged(x, **kwargs)), atol=1e-6
        )
    assert not np.allclose(to_numpy(adapted(x)), to_numpy(base(x)))
    with pytest.raises(ValueError, match="dropout"):
        AdaLoRAPositionEmbedding(9, init_rank=2, dropout=0.1)
    with pytest.raises(ValueError, match="sequence_length"):
        AdaLoRAPositionEmbedding(None, init_rank=2)


def test_adapter_dropout_only_acts_in_training():
    layer = AdaLoRADense(8, init_rank=4, dropout=0.5)
    x = np.ones((4, 6), "float32")
    layer(x)
    layer.adalora_lam.assign(np.ones(4, "float32"))
    np.testing.assert_array_equal(to_numpy(layer(x)), to_numpy(layer(x)))
    assert not np.allclose(to_numpy(layer(x, training=True)), to_numpy(layer(x)))


def test_mixed_bfloat16_keeps_adapter_weights_in_float32_and_trains():
    keras.config.set_dtype_policy("mixed_bfloat16")
    model = keras.Sequential(
        [keras.Input((8,)), AdaLoRADense(16, init_rank=4), keras.layers.Dense(2)]
    )
    layer = model.layers[0]
    assert layer.compute_dtype == "bfloat16"
    assert {v.dtype for v in (layer.adalora_a, layer.adalora_lam, layer.adalora_b, layer.rank_mask)} == {"float32"}
    x = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
    assert keras.backend.standardize_dtype(model(x).dtype) == "bfloat16"
    model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
    model.fit(x, np.ones((16, 2), "float32"), epochs=2, verbose=0)
    assert np.all(to_numpy(layer.adalora_lam) != 0)


@pytest.mark.parametrize("init_rank", [2, 3, 12, 24])
def test_default_scale_is_one_with_normal_factors_and_rank_free_with_orthogonal(init_rank):
    # Normal factors: alpha = init_rank, a scale of 1. Orthonormal factors:
    # a scale of sqrt(d_in * d_out) / 12 that does not grow as the rank
    # shrinks. An explicit alpha is kept, and the resolved default is what
    # the config (so a saved model) holds.
    dense = keras.layers.Dense(48)
    dense.build((None, 27))
    normal = AdaLoRADense.from_layer(dense, init_rank=init_rank)
    assert normal.scale == 1.0 and normal.get_config()["alpha"] == init_rank
    adapted = AdaLoRADense.from_layer(dense, init_rank=init_rank, factor_init="orthogonal")
    assert adapted.scale == pytest.approx(np.sqrt(27 * 48) / 12)
    assert adapted.get_config()["alpha"] == pytest.approx(init_rank * np.sqrt(27 * 48) / 12)
    explicit = AdaLoRADense.from_layer(dense, init_rank=init_rank, alpha=5.0)
    assert explicit.scale == pytest.approx(5.0 / init_rank)
    for layer in (normal, adapted):
        rebuilt = AdaLoRADense.from_config(layer.get_config())
        rebuilt.build((None, 27))
        assert rebuilt.scale == pytest.approx(layer.scale)
        assert rebuilt.factor_init == layer.factor_init


@pytest.mark.parametrize("tie_weights", [True, False])
def test_reversible_embedding_logits_use_the_adapted_table_when_tied(tie_weights):
    base = keras.layers.ReversibleEmbedding(30, 8, tie_weights=tie_weights, logit_soft_cap=5.0)
    ids = RNG.integers(0, 30, size=(2, 4)).astype("int32")
    hidden = RNG.normal(size=(2, 4, 8)).astype("float32")
    base(ids)
    before = to_numpy(base(hidden, reverse=True))
    adapted = adapter_classes()[type(base)].from_layer(base, init_rank=3)
    np.testing.assert_allclose(to_numpy(adapted(hidden, reverse=True)), before, atol=1e-6)
    adapted.adalora_lam.assign(RNG.normal(size=(3,)).astype("float32"))
    table = to_numpy(adapted.merged_kernel())
    np.testing.assert_allclose(to_numpy(adapted(ids)), table[ids], atol=1e-5)
    reverse = table.T if tie_weights else to_numpy(adapted.reverse_embeddings)
    expected = 5.0 * np.tanh(hidden @ reverse / 5.0)
    np.testing.assert_allclose(to_numpy(adapted(hidden, reverse=True)), expected, atol=1e-5)
    if not tie_weights:
        # The separate output projection is frozen, as merging leaves it.
        assert not adapted.reverse_embeddings.trainable


@pytest.mark.parametrize("case", ["dense", "einsum_output", "einsum_query"])
def test_on_jax_a_float32_adapter_runs_folded_into_its_kernel_with_the_same_outputs(
    case, monkeypatch
):
    _, adapted, x = built_pair(case)
    adapted.adalora_lam.assign(RNG.normal(size=3).astype("float32"))
    assert adapted._runs_folded() == (keras.backend.backend() == "jax")
    folded = to_numpy(adapted(x, training=True))
    penalty = float(to_numpy(adapted.losses[0]))
    monkeypatch.setattr(type(adapted), "folds_into_kernel", False)
    assert not adapted._runs_folded()
    unfolded = to_numpy(adapted(x, training=True))
    np.testing.assert_allclose(folded, unfolded, rtol=1e-5, atol=1e-5)
    assert float(to_numpy(adapted.losses[0])) == pytest.approx(penalty)
    monkeypatch.undo()
    # A lower-precision policy or adapter dropout keep the adapter's own term.
    mixed = AdaLoRADense(8, init_rank=2, dtype="mixed_bfloat16")
    mixed.build((None, 6))
    dropped = AdaLoRADense(8, init_rank=2, dropout=0.1)
    dropped.build((None, 6))
    assert not mixed._runs_folded() and not dropped._runs_folded()
