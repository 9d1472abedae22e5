import keras
import numpy as np
import pytest
from keras import ops

from keras_adalora.importance import Importance
from keras_adalora.importance import StateSpec
from keras_adalora.importance import component_scores
from keras_adalora.importance import element_score
from keras_adalora.importance import frobenius_component_scores
from keras_adalora.importance import frobenius_update
from keras_adalora.importance import is_finite
from keras_adalora.importance import sensitivity_update
from keras_adalora.importance import validate_betas

BACKEND = keras.backend.backend()


def numpy_of(x):
    return ops.convert_to_numpy(x)


def reference_sensitivity(param, grad, ipt_bar, unc_bar, beta1, beta2):
    sensitivity = np.abs(param * grad)
    ipt_bar = beta1 * ipt_bar + (1 - beta1) * sensitivity
    unc_bar = beta2 * unc_bar + (1 - beta2) * np.abs(sensitivity - ipt_bar)
    return ipt_bar, unc_bar


def random_steps(steps=5, shape=(3, 4), seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        yield (
            rng.normal(size=shape).astype("float32"),
            rng.normal(size=shape).astype("float32"),
        )


# sensitivity_update -----------------------------------------------------------


def test_sensitivity_update_on_a_hand_computed_example():
    # I = |2 * -3| = 6; I_bar = 0.5 * 0 + 0.5 * 6 = 3; U_bar = 0.5 * |6 - 3|.
    ipt, unc = sensitivity_update(
        np.array([2.0]), np.array([-3.0]), np.zeros(1), np.zeros(1), 0.5, 0.5
    )
    np.testing.assert_allclose(numpy_of(ipt), [3.0])
    np.testing.assert_allclose(numpy_of(unc), [1.5])


def test_uncertainty_is_measured_against_the_updated_importance():
    # With the old I_bar (4) U_bar would be 0.25 * |6 - 4| = 0.5; with the
    # updated one (0.25 * 4 + 0.75 * 6 = 5.5) it is 0.25 * 0.5.
    ipt, unc = sensitivity_update(
        np.array([2.0]), np.array([3.0]), np.array([4.0]), np.zeros(1), 0.25, 0.75
    )
    np.testing.assert_allclose(numpy_of(ipt), [5.5])
    np.testing.assert_allclose(numpy_of(unc), [0.125])


def test_sensitivity_update_matches_numpy_over_several_steps():
    ipt, unc = np.zeros((3, 4), "float32"), np.zeros((3, 4), "float32")
    want_ipt, want_unc = ipt, unc
    for param, grad in random_steps():
        ipt, unc = sensitivity_update(param, grad, ipt, unc, 0.85, 0.7)
        want_ipt, want_unc = reference_sensitivity(
            param, grad, want_ipt, want_unc, 0.85, 0.7
        )
    np.testing.assert_allclose(numpy_of(ipt), want_ipt, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(numpy_of(unc), want_unc, rtol=1e-5, atol=1e-7)


def test_sensitivity_update_accepts_keras_variables():
    param = keras.Variable(np.array([[1.0, -2.0]]), dtype="float32")
    ipt_bar = keras.Variable(np.array([[1.0, 1.0]]), dtype="float32")
    unc_bar = keras.Variable(np.zeros((1, 2)), dtype="float32")
    ipt, unc = sensitivity_update(
        param, np.array([[4.0, 1.0]]), ipt_bar, unc_bar, 0.5, 0.5
    )
    np.testing.assert_allclose(numpy_of(ipt), [[2.5, 1.5]])
    np.testing.assert_allclose(numpy_of(unc), [[0.75, 0.25]])
    # The results can be written back to the state variables.
    ipt_bar.assign(ops.where(is_finite(ipt), ipt, ipt_bar.value))
    np.testing.assert_allclose(numpy_of(ipt_bar), [[2.5, 1.5]])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_parameters_give_float32_scores(dtype):
    param, grad = next(random_steps(1))
    ipt, unc = sensitivity_update(
        ops.cast(param, dtype), ops.cast(grad, dtype),
        np.zeros_like(param), np.zeros_like(param), 0.85, 0.85,
    )
    assert keras.backend.standardize_dtype(ipt.dtype) == "float32"
    assert keras.backend.standardize_dtype(unc.dtype) == "float32"
    rounded = [numpy_of(ops.cast(ops.cast(x, dtype), "float32")) for x in (param, grad)]
    want_ipt, want_unc = reference_sensitivity(*rounded, 0.0, 0.0, 0.85, 0.85)
    np.testing.assert_allclose(numpy_of(ipt), want_ipt, rtol=1e-6)
    np.testing.assert_allclose(numpy_of(unc), want_unc, rtol=1e-6)


@pytest.mark.skipif(BACKEND != "jax", reason="jax.jit needs the JAX backend")
def test_sensitivity_update_runs_inside_jax_jit():
    import jax

    @jax.jit
    def step(param, grad, ipt_bar, unc_bar):
        ipt, unc = sensitivity_update(param, grad, ipt_bar, unc_bar, 0.85, 0.85)
        finite = is_finite(grad)
        return ops.where(finite, ipt, ipt_bar), ops.where(finite, unc, unc_bar)

    param, grad = next(random_steps(1))
    zeros = np.zeros_like(param)
    ipt, unc = step(param, grad, zeros, zeros)
    want_ipt, want_unc = reference_sensitivity(param, grad, zeros, zeros, 0.85, 0.85)
    np.testing.assert_allclose(numpy_of(ipt), want_ipt, rtol=1e-5)
    np.testing.assert_allclose(numpy_of(unc), want_unc, rtol=1e-5)
    bad_grad = grad.copy()
    bad_grad[0, 0] = np.nan
    ipt, unc = step(param.astype("bfloat16"), bad_grad, ipt, unc)
    np.testing.assert_allclose(numpy_of(ipt), want_ipt, rtol=1e-5)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.function needs TensorFlow")
def test_sensitivity_update_runs_inside_tf_function():
    import tensorflow as tf

    step = tf.function(
        lambda p, g, i, u: sensitivity_update(p, g, i, u, 0.85, 0.85),
        jit_compile=True,
    )
    param, grad = next(random_steps(1))
    zeros = np.zeros_like(param)
    ipt, unc = step(param, grad, zeros, zeros)
    want_ipt, want_unc = reference_sensitivity(param, grad, zeros, zeros, 0.85, 0.85)
    np.testing.assert_allclose(numpy_of(ipt), want_ipt, rtol=1e-5)
    np.testing.assert_allclose(numpy_of(unc), want_unc, rtol=1e-5)


# Scores -----------------------------------------------------------------------


def test_element_score_is_importance_times_uncertainty():
    score = element_score(np.array([[2.0, 3.0]]), np.array([[0.5, 0.0]]))
    np.testing.assert_allclose(numpy_of(score), [[1.0, 0.0]])


def test_component_score_adds_lam_and_the_means_of_its_a_column_and_b_row():
    score_a = np.array([[1.0, 0.0], [3.0, 6.0], [2.0, 0.0]])  # (d_in=3, r=2)
    score_lam = np.array([10.0, 20.0])
    score_b = np.array([[1.0, 1.0, 1.0, 5.0], [0.0, 0.0, 0.0, 4.0]])  # (r, d_out=4)
    scores = component_scores(score_a, score_lam, score_b)
    assert tuple(scores.shape) == (2,)
    np.testing.assert_allclose(numpy_of(scores), [10 + 2 + 2, 20 + 2 + 1])


def test_a_layer_with_no_components_has_an_empty_score_vector():
    scores = component_scores(np.zeros((3, 0)), np.zeros((0,)), np.zeros((0, 4)))
    assert tuple(scores.shape) == (0,)


def test_frobenius_update_smooths_the_norm():
    np.testing.assert_allclose(numpy_of(frobenius_update(4.0, 2.0, 0.75)), 2.5)
    np.testing.assert_allclose(numpy_of(frobenius_update(4.0, 2.0, 0.0)), 4.0)


def test_frobenius_ranks_components_by_absolute_singular_value():
    lam = keras.Variable(np.array([-2.0, 0.5, 0.0]), dtype="float32")
    np.testing.assert_allclose(numpy_of(frobenius_component_scores(lam)), [2.0, 0.5, 0.0])


# is_finite ----------------------------------------------------------------------


def test_is_finite_is_true_when_every_entry_is_finite():
    assert bool(numpy_of(is_finite(np.ones((2, 3)), np.zeros(4, "float32"))))
    assert bool(numpy_of(is_finite()))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_is_finite_is_false_when_any_tensor_has_a_non_finite_entry(bad):
    broken = np.ones(4, "float32")
    broken[2] = bad
    finite = is_finite(np.ones((2, 3), "float32"), broken)
    assert tuple(finite.shape) == ()
    assert not bool(numpy_of(finite))


def test_is_finite_lets_a_caller_keep_the_old_state_without_branching():
    old, new = np.ones(3, "float32"), np.array([2.0, np.nan, 2.0], "float32")
    kept = ops.where(is_finite(new), new, old)
    np.testing.assert_allclose(numpy_of(kept), old)


# validate_betas -------------------------------------------------------------------


def test_betas_in_zero_one_are_accepted():
    validate_betas(0.0, 0.999)
    validate_betas(np.float32(0.85), 0)


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, float("nan"), True, "0.85", None])
@pytest.mark.parametrize("name", ["beta1", "beta2"])
def test_a_bad_beta_is_refused_by_name(bad, name):
    betas = {"beta1": 0.85, "beta2": 0.85, name: bad}
    with pytest.raises(ValueError, match=rf"{name}.*\[0, 1\).*{name}="):
        validate_betas(**betas)


# A kind of one's own ----------------------------------------------------------


@keras.saving.register_keras_serializable(package="test_importance")
class SmoothedMagnitude(Importance):
    """A third kind, as a user writes one: components score a smoothed
    `|lam|`, layers the sum of their alive components."""

    name = "smoothed_magnitude"

    def init(self, layers):
        return [StateSpec("magnitude", (sum(int(l.lam.shape[0]) for l in layers),))]

    def update(self, state, layers, grads):
        lam = ops.concatenate([ops.abs(ops.convert_to_tensor(l.lam)) for l in layers])
        return [self.beta1 * state[0] + (1 - self.beta1) * lam]

    def scores(self, state, layers, alive):
        components, offset = [], 0
        for layer in layers:
            size = int(layer.lam.shape[0])
            components.append(np.asarray(state[0][offset : offset + size]))
            offset += size
        return components, [float(c[m].sum()) for c, m in zip(components, alive)]


def test_a_kind_of_ones_own_trains_to_the_budget_and_saves(tmp_path):
    from helpers import data
    from helpers import mlp

    from keras_adalora import RankBudgetCallback
    from keras_adalora import apply_adalora
    from keras_adalora import get_rank_pattern

    model = mlp()
    apply_adalora(model, init_rank=4, keep_trainable=["head"])
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="sparse_categorical_crossentropy")
    kind = SmoothedMagnitude(beta1=0.5)
    callback = RankBudgetCallback(target_rank=2, tinit=2, tfinal=6, delta_t=2, importance=kind)
    model.fit(*data(), batch_size=4, epochs=1, verbose=0, callbacks=[callback])
    assert sum(get_rank_pattern(model).values()) == callback.target_budget == 4
    optimizer = model.optimizer
    assert optimizer.kind == kind and not optimizer.scoring
    (state,) = optimizer._score_state
    assert float(ops.convert_to_numpy(ops.sum(state))) > 0  # it was updated
    model.save(tmp_path / "m.keras")
    again = keras.saving.load_model(tmp_path / "m.keras")
    assert again.optimizer.kind == kind
    np.testing.assert_allclose(
        ops.convert_to_numpy(again.optimizer._score_state[0]), ops.convert_to_numpy(state)
    )
