"""Distributed AdaLoRA training scenarios, one per process.

    python tests/distributed_scenarios.py SCENARIO

Simulated device counts must be set before the backend initialises, so each
scenario runs in a fresh process (`tests/test_distribution.py` launches them)
that sets its own `KERAS_BACKEND`. A scenario trains the same adapted MLP
twice with `RankBudgetCallback`, on one device and distributed, from the
same initial weights on the same global batches, and prints one line,
`RESULT <json>`, with what the test checks:

- the masks after every step of both runs, and whether they are equal;
- the largest weight and score differences between the runs;
- whether every replica held the same masks and scores after every step
  (TensorFlow: `strategy.experimental_local_results`; JAX: the addressable
  shards of each array, grouped by the slice they hold);
- for `ModelParallel`, the layouts the adapters and score buffers got;
- for `MirroredStrategy`, the same replica checks under `mixed_float16`.

Scenarios:
    tf_mirrored: `tf.distribute.MirroredStrategy` on 2 logical CPU devices.
    jax_data_parallel: `keras.distribution.DataParallel` on 4 CPU devices.
    jax_model_parallel: `keras.distribution.ModelParallel` on a 2x2
        ("batch", "model") mesh of 4 CPU devices.
    torch_ddp: what the README tells torch users to do, Keras having no
        distribution API there: a torch loop with `DistributedDataParallel`
        (2 CPU processes, gloo), `AdaLoRAOptimizer` and `RankAllocator`,
        against the same loop on one process. Its worker processes run
        this script as `torch_ddp_worker RANK WORLD PORT DIR`.
"""

import json
import os
import sys
import time

SCENARIOS = {
    "tf_mirrored": ("tensorflow", 2),
    "jax_data_parallel": ("jax", 4),
    "jax_model_parallel": ("jax", 4),
    "torch_ddp": ("torch", 2),
}

INPUT_DIM, HIDDEN, OUTPUTS = 16, 32, 4
SAMPLES, GLOBAL_BATCH, EPOCHS = 128, 16, 5  # 8 steps an epoch, 40 in all
INIT_RANK, TARGET_RANK = 4, 2
SCHEDULE = dict(tinit=4, tfinal=36, delta_t=4)


def configure_devices(backend, devices):
    """Sets the backend and the number of simulated CPU devices; must run
    before Keras (and the backend) is imported."""
    os.environ["KERAS_BACKEND"] = backend
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if backend == "torch":
        return
    if backend == "jax":
        flag = f"--xla_force_host_platform_device_count={devices}"
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flag}"
    else:
        import tensorflow as tf

        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * devices
        )


def regression_data():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(SAMPLES, INPUT_DIM)).astype("float32")
    w = rng.normal(size=(INPUT_DIM, OUTPUTS)).astype("float32")
    y = np.tanh(x @ w) + 0.5 * np.sin(x[:, :OUTPUTS])
    return x, y.astype("float32")


def build_model():
    """A three-layer MLP, every Dense adapted at rank 4 (budget 12 -> 6)."""
    import keras

    from keras_adalora import apply_adalora

    keras.utils.set_random_seed(0)
    inputs = keras.Input((INPUT_DIM,))
    x = keras.layers.Dense(HIDDEN, activation="relu", name="hidden")(inputs)
    x = keras.layers.Dense(HIDDEN, activation="relu", name="hidden_2")(x)
    outputs = keras.layers.Dense(OUTPUTS, name="head")(x)
    model = keras.Model(inputs, outputs, name="mlp")
    return apply_adalora(model, init_rank=INIT_RANK)


def compile_model(model):
    import keras

    # Adam's default epsilon (1e-7) turns gradients at float-noise level
    # (those of A and B while lam is still ~0) into full-size steps, so a
    # different summation order (a sharded matmul) moves those entries by
    # up to ~lr: measured 0.03 under ModelParallel with identical masks.
    # A larger epsilon keeps the runs comparable to float tolerance.
    optimizer = keras.optimizers.Adam(0.01, epsilon=1e-4)
    model.compile(optimizer=optimizer, loss="mse")
    return model


def tf_replica_copies(variable):
    """Every replica's value of a (mirrored) variable, as one group."""
    import numpy as np
    import tensorflow as tf

    strategy = tf.distribute.get_strategy()
    value = variable.value
    if isinstance(value, tf.distribute.DistributedValues):
        # Outside the scope, ask the variable's own strategy.
        strategy = value._distribute_strategy
    return [
        [np.asarray(v) for v in strategy.experimental_local_results(value)]
    ]


def jax_replica_copies(variable):
    """The device copies of a JAX array, grouped by the slice they hold:
    all of them for a replicated array, one group per shard otherwise."""
    import numpy as np

    groups = {}
    for shard in variable.value.addressable_shards:
        key = repr(shard.index)
        groups.setdefault(key, []).append(np.asarray(shard.data))
    return list(groups.values())


def make_recorder(replica_copies):
    """A callback recording the masks after every step and checking that
    every replica holds the same masks and scores."""
    import keras
    import numpy as np

    from keras_adalora.targets import adapted_layers

    class Recorder(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.masks = []
            self.copies = 0
            self.masks_identical = True
            self.scores_identical = True

        def _identical(self, variable):
            groups = replica_copies(variable)
            self.copies = max(self.copies, max(len(g) for g in groups))
            return all(
                np.array_equal(copy, group[0])
                for group in groups
                for copy in group
            )

        def on_train_batch_end(self, batch, logs=None):
            model = self.model  # syncs the JAX state
            layers = adapted_layers(model)
            self.masks.append(
                np.concatenate(
                    [keras.ops.convert_to_numpy(l.rank_mask) for l in layers]
                ).astype(int).tolist()
            )
            for layer in layers:
                self.masks_identical &= self._identical(layer.rank_mask)
            optimizer = model.optimizer
            if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
                optimizer = optimizer.inner_optimizer
            for buffer in optimizer._score_state:
                self.scores_identical &= self._identical(buffer)

    return Recorder()


def train(model, replica_copies, fit_kwargs=None):
    """Fits with `RankBudgetCallback`; returns the recorder and callback."""
    from keras_adalora import RankBudgetCallback

    callback = RankBudgetCallback(target_rank=TARGET_RANK, **SCHEDULE)
    recorder = make_recorder(replica_copies)
    model.fit(
        *regression_data(),
        batch_size=GLOBAL_BATCH,
        epochs=EPOCHS,
        shuffle=False,
        verbose=0,
        callbacks=[callback, recorder],
        **(fit_kwargs or {}),
    )
    return recorder, callback


def component_scores(model):
    """Every adapted layer's component scores, concatenated."""
    import numpy as np

    optimizer = model.optimizer
    components, _ = optimizer.scores_on_host(optimizer.adapter_layer_paths)
    return np.concatenate(components)


def single_device_reference(replica_copies):
    """Trains on one device; returns (initial weights, model, recorder)."""
    model = compile_model(build_model())
    initial = model.get_weights()
    recorder, _ = train(model, replica_copies)
    return initial, model, recorder


def compare(reference, distributed, recorder_ref, recorder_dist, callback):
    """The measurements both scenario kinds report."""
    import numpy as np

    from keras_adalora import get_rank_pattern

    weight_diff = max(
        float(np.max(np.abs(a - b)))
        for a, b in zip(reference.get_weights(), distributed.get_weights())
    )
    ref_scores = component_scores(reference)
    dist_scores = component_scores(distributed)
    score_diff = float(
        np.max(np.abs(ref_scores - dist_scores))
        / max(float(np.max(np.abs(ref_scores))), 1e-30)
    )
    changes = [
        step + 1
        for step in range(1, len(recorder_dist.masks))
        if recorder_dist.masks[step] != recorder_dist.masks[step - 1]
    ]
    return {
        "steps": len(recorder_dist.masks),
        "mask_steps": changes,
        "masks_equal_every_step": recorder_ref.masks == recorder_dist.masks,
        "rank_pattern": get_rank_pattern(distributed),
        "reference_rank_pattern": get_rank_pattern(reference),
        "final_rank": int(sum(recorder_dist.masks[-1])),
        "target_budget": callback._allocator.target_budget,
        "max_weight_diff": weight_diff,
        "max_score_rel_diff": score_diff,
        "replica_copies": recorder_dist.copies,
        "replica_masks_identical": recorder_dist.masks_identical,
        "replica_scores_identical": recorder_dist.scores_identical,
    }


def run_tf_mirrored(devices):
    import keras
    import tensorflow as tf

    initial, reference, recorder_ref = single_device_reference(
        tf_replica_copies
    )
    strategy = tf.distribute.MirroredStrategy(
        [f"/cpu:{i}" for i in range(devices)]
    )
    with strategy.scope():
        model = compile_model(build_model())
        model.set_weights(initial)
    # fit (and so the callback's setup) outside the scope, as users do.
    recorder, callback = train(model, tf_replica_copies)
    result = compare(reference, model, recorder_ref, recorder, callback)
    result["replicas"] = strategy.num_replicas_in_sync
    # mixed_float16 puts a LossScaleOptimizer around the wrapper, which
    # hands it the gradients through a merge_call: replicas must still agree.
    keras.config.set_dtype_policy("mixed_float16")
    with strategy.scope():
        model = compile_model(build_model())
    recorder, callback = train(model, tf_replica_copies)
    keras.config.set_dtype_policy("float32")
    result["mixed_float16"] = {
        "optimizer": type(model.optimizer).__name__,
        "final_rank": int(sum(recorder.masks[-1])),
        "replica_masks_identical": recorder.masks_identical,
        "replica_scores_identical": recorder.scores_identical,
    }
    return result


def run_jax(devices, model_parallel):
    import keras

    from keras_adalora import _distribution

    initial, reference, recorder_ref = single_device_reference(
        jax_replica_copies
    )
    all_devices = keras.distribution.list_devices()
    if model_parallel:
        mesh = keras.distribution.DeviceMesh(
            (2, devices // 2), ["batch", "model"], all_devices
        )
        layout_map = keras.distribution.LayoutMap(mesh)
        # Megatron-style: the first kernel split by columns, the second by
        # rows; the adapters follow by themselves. One LayoutMap key names
        # an adapter variable directly, which wins over following.
        layout_map[".*hidden/kernel"] = (None, "model")
        layout_map[".*hidden_2/kernel"] = ("model", None)
        layout_map[".*head/adalora_A"] = ("model", None)
        distribution = keras.distribution.ModelParallel(
            layout_map=layout_map, batch_dim_name="batch"
        )
    else:
        distribution = keras.distribution.DataParallel(devices=all_devices)
    keras.distribution.set_distribution(distribution)
    model = compile_model(build_model())
    model.set_weights(initial)
    recorder, callback = train(model, jax_replica_copies)
    result = compare(reference, model, recorder_ref, recorder, callback)
    result["replicas"] = len(all_devices)
    result["layouts"] = {
        v.path: list(_distribution.variable_layout(v).axes)
        for v in model.weights
        if _distribution.is_sharded(v)
    }
    result["score_buffer_layouts"] = {
        v.path: list(v.value.sharding.spec)
        for v in model.optimizer._score_state
    }
    result["score_buffers"] = len(model.optimizer._score_state)
    return result


def torch_loop(model, rank=0, world=1):
    """Trains `model` with a hand-written torch loop, AdaLoRAOptimizer and
    RankAllocator; under DDP when `world > 1`, each rank taking its slice
    of every global batch. Returns the masks after every step."""
    import keras
    import numpy as np
    import torch

    from keras_adalora import AdaLoRAOptimizer
    from keras_adalora import RankAllocator
    from keras_adalora.targets import adapted_layers

    optimizer = AdaLoRAOptimizer(keras.optimizers.Adam(0.01, epsilon=1e-4))
    optimizer.watch(model)
    variables = model.trainable_variables
    optimizer.build(variables)
    steps_per_epoch = SAMPLES // GLOBAL_BATCH
    total_steps = EPOCHS * steps_per_epoch
    allocator = RankAllocator(
        model,
        optimizer,
        target_rank=TARGET_RANK,
        total_steps=total_steps,
        **SCHEDULE,
    )
    module = model
    if world > 1:
        # DDP averages the gradients over ranks during backward().
        module = torch.nn.parallel.DistributedDataParallel(model)
    x, y = regression_data()
    local = GLOBAL_BATCH // world
    masks = []
    for step in range(1, total_steps + 1):
        start = ((step - 1) % steps_per_epoch) * GLOBAL_BATCH + rank * local
        xb = torch.as_tensor(x[start : start + local])
        yb = torch.as_tensor(y[start : start + local])
        for variable in variables:
            variable.value.grad = None
        pred = module(xb, training=True)
        loss = torch.mean(torch.square(pred - yb)) + sum(model.losses)
        loss.backward()
        with torch.no_grad():
            optimizer.apply([v.value.grad for v in variables], variables)
        allocator.update(step)
        masks.append(
            np.concatenate(
                [keras.ops.convert_to_numpy(l.rank_mask) for l in adapted_layers(model)]
            ).astype(int).tolist()
        )
    return masks, allocator


def torch_ddp_worker(rank, world, port, workdir):
    """One DDP rank: trains and saves its masks, weights and scores."""
    import numpy as np
    import torch.distributed as dist

    from keras_adalora import get_rank_pattern

    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = build_model()
    with np.load(os.path.join(workdir, "initial.npz")) as initial:
        model.set_weights([initial[f"w{i}"] for i in range(len(initial.files))])
    masks, allocator = torch_loop(model, rank, world)
    np.savez(
        os.path.join(workdir, f"rank{rank}.npz"),
        scores=component_scores_of(allocator.optimizer),
        **{f"w{i}": w for i, w in enumerate(model.get_weights())},
    )
    with open(os.path.join(workdir, f"rank{rank}.json"), "w") as f:
        json.dump({"masks": masks, "pattern": get_rank_pattern(model)}, f)
    dist.destroy_process_group()


def component_scores_of(optimizer):
    import numpy as np

    components, _ = optimizer.scores_on_host(optimizer.adapter_layer_paths)
    return np.concatenate(components)


def run_torch_ddp(world):
    import socket
    import subprocess
    import tempfile

    import numpy as np

    from keras_adalora import get_rank_pattern

    reference = build_model()
    initial = reference.get_weights()
    reference_masks, allocator = torch_loop(reference)
    with tempfile.TemporaryDirectory() as workdir:
        np.savez(
            os.path.join(workdir, "initial.npz"),
            **{f"w{i}": w for i, w in enumerate(initial)},
        )
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        workers = [
            subprocess.Popen(
                [sys.executable, os.path.abspath(__file__), "torch_ddp_worker",
                 str(rank), str(world), str(port), workdir]
            )
            for rank in range(world)
        ]
        codes = [worker.wait(timeout=300) for worker in workers]
        if any(codes):
            raise RuntimeError(f"DDP workers exited with {codes}")
        masks, patterns, weights, scores = [], [], [], []
        for rank in range(world):
            with open(os.path.join(workdir, f"rank{rank}.json")) as f:
                saved = json.load(f)
            masks.append(saved["masks"])
            patterns.append(saved["pattern"])
            with np.load(os.path.join(workdir, f"rank{rank}.npz")) as saved:
                scores.append(saved["scores"])
                weights.append(
                    [saved[f"w{i}"] for i in range(len(initial))]
                )
    reference_scores = component_scores_of(allocator.optimizer)
    final = masks[0][-1]
    return {
        "replicas": world,
        "steps": len(masks[0]),
        "mask_steps": [
            step + 1
            for step in range(1, len(masks[0]))
            if masks[0][step] != masks[0][step - 1]
        ],
        "masks_equal_every_step": masks[0] == reference_masks,
        "rank_pattern": patterns[0],
        "reference_rank_pattern": get_rank_pattern(reference),
        "final_rank": int(sum(final)),
        "target_budget": allocator.target_budget,
        "max_weight_diff": max(
            float(np.max(np.abs(a - b)))
            for a, b in zip(reference.get_weights(), weights[0])
        ),
        "max_score_rel_diff": float(
            np.max(np.abs(reference_scores - scores[0]))
            / max(float(np.max(np.abs(reference_scores))), 1e-30)
        ),
        "replica_copies": world,
        "replica_masks_identical": all(m == masks[0] for m in masks)
        and all(p == patterns[0] for p in patterns),
        "replica_scores_identical": all(
            np.array_equal(s, scores[0]) for s in scores
        ),
        "replica_weights_identical": all(
            all(np.array_equal(a, b) for a, b in zip(w, weights[0]))
            for w in weights
        ),
    }


def main(argv):
    if len(argv) == 6 and argv[1] == "torch_ddp_worker":
        configure_devices("torch", 1)
        rank, world, port = (int(a) for a in argv[2:5])
        return torch_ddp_worker(rank, world, port, argv[5])
    if len(argv) != 2 or argv[1] not in SCENARIOS:
        sys.exit(f"usage: {argv[0]} {{{','.join(SCENARIOS)}}}")
    name = argv[1]
    backend, devices = SCENARIOS[name]
    start = time.time()
    configure_devices(backend, devices)
    if name == "tf_mirrored":
        result = run_tf_mirrored(devices)
    elif name == "torch_ddp":
        result = run_torch_ddp(devices)
    else:
        result = run_jax(devices, model_parallel=name == "jax_model_parallel")
    result["seconds"] = round(time.time() - start, 1)
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(sys.argv)
