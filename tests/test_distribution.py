"""AdaLoRA under Keras's distribution engines (README: "Distributed training").

Each multi-device scenario runs in its own process
(`tests/distributed_scenarios.py`), because the number of simulated CPU
devices must be set before the backend starts. A scenario runs in the suite
pass of its backend only: TensorFlow's `MirroredStrategy` in the tensorflow
pass, `keras.distribution` in the jax pass. Keras has no distribution API on
torch: the torch pass runs the recipe the README gives instead, a
`DistributedDataParallel` loop with `AdaLoRAOptimizer` and `RankAllocator`.
"""

import json
import os
import subprocess
import sys

import keras
import pytest

from keras_adalora import AdaLoRAOptimizer
from keras_adalora import _distribution
from keras_adalora.layers.einsum_dense import EinsumMatrixView

BACKEND = keras.backend.backend()
SCRIPT = os.path.join(os.path.dirname(__file__), "distributed_scenarios.py")


def in_pass(backend, what):
    """Runs a scenario test only in the suite pass of `backend`."""
    if BACKEND == "torch" and backend != "torch":
        reason = "Keras has no distribution API on torch (README: Distributed training)"
    else:
        reason = f"{what}: runs in the {backend} pass of the suite"
    return pytest.mark.skipif(BACKEND != backend, reason=reason)


def run_scenario(name):
    """Runs one scenario in a fresh process; returns its measurements."""
    env = dict(os.environ)
    env.pop("KERAS_BACKEND", None)  # the scenario picks its own
    done = subprocess.run(
        [sys.executable, SCRIPT, name],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")]
    assert done.returncode == 0 and lines, (
        f"scenario {name} failed (exit {done.returncode}):\n"
        f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}"
    )
    return json.loads(lines[-1][len("RESULT ") :])


def assert_matches_single_device(result, replicas):
    """The distributed run trained like one device on the same global
    batches, and no replica ever held different masks or scores."""
    assert result["replicas"] == replicas
    # The schedule really pruned, in several mask updates, to the budget.
    assert len(result["mask_steps"]) >= 3, result["mask_steps"]
    assert result["final_rank"] == result["target_budget"]
    # Same masks as on one device after every step, same final pattern.
    assert result["masks_equal_every_step"]
    assert result["rank_pattern"] == result["reference_rank_pattern"]
    # Same weights and scores, up to float summation order.
    assert result["max_weight_diff"] < 1e-5, result["max_weight_diff"]
    assert result["max_score_rel_diff"] < 1e-4, result["max_score_rel_diff"]
    # Every device copy of every mask and score buffer agreed at every step.
    assert result["replica_copies"] == replicas
    assert result["replica_masks_identical"]
    assert result["replica_scores_identical"]


@in_pass("tensorflow", "tf.distribute scenario")
def test_mirrored_strategy_trains_like_one_device_with_identical_masks():
    result = run_scenario("tf_mirrored")
    assert_matches_single_device(result, replicas=2)
    mixed = result["mixed_float16"]  # behind a LossScaleOptimizer
    assert mixed["optimizer"] == "LossScaleOptimizer"
    assert mixed["final_rank"] == result["target_budget"]
    assert mixed["replica_masks_identical"] and mixed["replica_scores_identical"]


@in_pass("jax", "keras.distribution scenario")
def test_data_parallel_trains_like_one_device_with_identical_masks():
    result = run_scenario("jax_data_parallel")
    assert_matches_single_device(result, replicas=4)
    assert result["layouts"] == {}  # everything replicated
    assert result["score_buffers"] == 2  # one flat I_bar/U_bar pair


@in_pass("jax", "keras.distribution scenario")
def test_model_parallel_shards_adapters_like_their_kernels_and_hits_the_budget():
    result = run_scenario("jax_model_parallel")
    assert_matches_single_device(result, replicas=4)
    layouts = result["layouts"]
    # A follows the kernel's rows, B its columns; a LayoutMap key naming an
    # adapter variable (head/adalora_A) wins; nothing else is sharded.
    assert layouts == {
        "hidden/kernel": [None, "model"],
        "hidden/adalora_B": [None, "model"],
        "hidden_2/kernel": ["model", None],
        "hidden_2/adalora_A": ["model", None],
        "head/adalora_A": ["model", None],
    }
    # Score buffers follow their parameters, one pair per adapter variable.
    buffers = result["score_buffer_layouts"]
    assert result["score_buffers"] == 2 * 3 * 3
    for name, want in (
        ("hidden_adalora_B", [None, "model"]),
        ("hidden_2_adalora_A", ["model", None]),
        ("head_adalora_A", ["model", None]),
        ("hidden_adalora_A", [None, None]),
        ("head_adalora_lam", [None]),
    ):
        for kind in ("ipt_bar", "unc_bar"):
            (spec,) = [v for k, v in buffers.items() if k.endswith(f"/{name}_{kind}")]
            assert spec == want, (name, kind, spec)


@in_pass("torch", "torch DistributedDataParallel loop")
def test_a_ddp_torch_loop_trains_like_one_process_with_identical_masks():
    result = run_scenario("torch_ddp")
    assert_matches_single_device(result, replicas=2)
    assert result["replica_weights_identical"]


def test_an_einsum_adapter_shards_along_the_leading_axis_of_each_side():
    # Attention output projection: kernel (n, h, d) reads as (n*h) x d.
    view = EinsumMatrixView("btnh,nhd->btd", (4, 8, 16))
    assert (view.row_axes, view.column_axes) == ((0, 1), (2,))
    matrix_axis = _distribution._matrix_axis
    assert matrix_axis(("model", None, None), view.row_axes) == "model"
    # A sharded inner axis interleaves the flattened rows: A stays replicated.
    assert matrix_axis((None, "model", None), view.row_axes) is None
    assert matrix_axis((None, None, "model"), view.column_axes) == "model"


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute check")
def test_an_unsupported_strategy_is_refused_with_the_fix():
    import tensorflow as tf

    strategy = tf.distribute.experimental.CentralStorageStrategy()
    with pytest.raises(ValueError, match="CentralStorageStrategy.*scope"):
        _distribution.check_tf_strategy(strategy)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute check")
def test_an_optimizer_created_outside_the_model_strategy_is_refused():
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
        from keras_adalora import apply_adalora

        apply_adalora(model, init_rank=2)
    optimizer = AdaLoRAOptimizer(keras.optimizers.Adam())
    with pytest.raises(ValueError, match="inside `strategy.scope\\(\\)`"):
        optimizer.build(model.trainable_variables)
