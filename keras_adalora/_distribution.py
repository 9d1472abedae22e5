"""What AdaLoRA needs from `tf.distribute` and `keras.distribution`.

The rest of the library is written against `keras.ops` and never asks how
training is distributed. Distribution shows up in exactly four places, all
here:

- where the optimizer wrapper creates its variables (a TensorFlow strategy's
  scope, so that they are mirrored like the model's);
- the gradients it scores (all-reduced across TensorFlow replicas, so every
  replica computes the same scores and hence the same masks);
- the layouts of adapter variables and score buffers under a sharding
  `keras.distribution` (JAX), which follow the kernel they adapt;
- which TensorFlow strategies are supported at all.

On torch Keras has no distribution API; nothing here applies there.
"""

import contextlib

import keras

from keras_adalora import _keras

# The tf.distribute strategies AdaLoRA supports (checked by class name so
# that this module never imports TensorFlow on the other backends).
# Mirrored-family strategies keep one copy of every variable per replica
# and run the train step in replica context, which is what the scoring
# all-reduce and the host-side mask writes assume.
SUPPORTED_TF_STRATEGIES = (
    "MirroredStrategy",
    "MultiWorkerMirroredStrategy",
    "CollectiveAllReduceStrategy",
    "OneDeviceStrategy",
    "_DefaultDistributionStrategy",
)


def _tf():
    import tensorflow as tf

    return tf


def check_tf_strategy(strategy, var_list=()):
    """Raises `ValueError` unless an optimizer can score under `strategy`.

    AdaLoRA supports the mirrored `tf.distribute` strategies (and none);
    parameter-server, central-storage and TPU strategies are refused. An
    optimizer created outside the strategy of the variables it trains would
    keep one unmirrored copy of its scores that every replica writes:
    refused too.

    Args:
        strategy: the strategy the optimizer was created under (TensorFlow),
            or None.
        var_list: the variables the optimizer is being built for.
    """
    if strategy is None or keras.backend.backend() != "tensorflow":
        return
    names = {cls.__name__ for cls in type(strategy).__mro__}
    if names.isdisjoint(SUPPORTED_TF_STRATEGIES):
        raise ValueError(
            "AdaLoRA supports `tf.distribute.MirroredStrategy`, "
            "`MultiWorkerMirroredStrategy` and `OneDeviceStrategy`; this "
            f"model's `distribute_strategy` is a {type(strategy).__name__}. "
            "Build and compile the model inside the scope() of one of those "
            "strategies, or train without a strategy."
        )
    distributed = _tf().distribute.DistributedValues
    mirrored = any(
        isinstance(getattr(v, "value", v), distributed) for v in var_list
    )
    if mirrored and "_DefaultDistributionStrategy" in names:
        raise ValueError(
            "The model's variables are mirrored by a tf.distribute strategy, "
            "but this AdaLoRAOptimizer was created outside its scope. Create "
            "and build it inside `strategy.scope()` (RankBudgetCallback does "
            "this by itself)."
        )


def optimizer_scope(model):
    """The context in which to create an optimizer for `model`.

    Under `tf.distribute` the optimizer's variables must be created in the
    strategy's scope (mirrored on every replica) and the optimizer must be
    constructed there to capture the strategy. `fit` usually runs outside
    the scope, so the callback re-enters the one the model was compiled in.
    Elsewhere this is a no-op: JAX variables take their layout from the
    `keras.distribution` in effect, as Keras's own optimizer variables do.
    """
    if keras.backend.backend() != "tensorflow":
        return contextlib.nullcontext()
    strategy = getattr(model, "distribute_strategy", None)
    if strategy is None:
        return contextlib.nullcontext()
    return strategy.scope()


def current_tf_strategy():
    """The `tf.distribute` strategy in scope (TensorFlow), else None."""
    if keras.backend.backend() != "tensorflow":
        return None
    return _tf().distribute.get_strategy()


# Score variables are written in replica context from all-reduced, hence
# identical, values; "only_first_replica" makes TensorFlow copy the first
# replica's write to all of them (as Keras does for `iterations`) instead of
# keeping a per-replica value. Other backends ignore it.
REPLICATED_AGGREGATION = "only_first_replica"


def global_gradients(grads):
    """The gradients of the whole global batch, as every replica sees them.

    Under `tf.distribute` the optimizer receives each replica's own
    gradients (the loss is already divided by the number of replicas) and
    all-reduces them only when it applies them; scores computed from the
    local gradients would differ between replicas, and so would the masks.
    Their sum over replicas is the single-device gradient of the global
    batch. Under JAX's `keras.distribution`, the jitted step's gradients are
    already global (SPMD); on torch and on one device there is nothing to do.

    Args:
        grads: list of gradient tensors.

    Returns:
        The list of global gradients.
    """
    if keras.backend.backend() != "tensorflow" or not grads:
        return grads
    tf = _tf()
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return grads
    return context.all_reduce(tf.distribute.ReduceOp.SUM, list(grads))


def replica_share():
    """The share of a loss term each replica adds to its gradients:
    `1 / num_replicas` inside a `tf.distribute` replica context (the
    optimizer sums the replicas' gradients, as Keras divides the loss),
    1 everywhere else."""
    if keras.backend.backend() != "tensorflow":
        return 1.0
    context = _tf().distribute.get_replica_context()
    if context is None:
        return 1.0
    return 1.0 / context.num_replicas_in_sync


# Layouts (JAX keras.distribution) ---------------------------------------------


variable_layout = _keras.variable_layout


def is_sharded(variable):
    """Whether `variable` is split across devices (not merely replicated)."""
    layout = variable_layout(variable)
    if layout is None:
        return False
    axes = getattr(layout, "axes", None)
    if axes is not None:  # keras.distribution.TensorLayout
        return any(axis is not None for axis in axes)
    return not getattr(layout, "is_fully_replicated", True)  # a jax Sharding


def _matrix_axis(kernel_axes, axes):
    """The mesh axis sharding one side of the kernel's matrix view.

    `axes` are the kernel axes that, flattened in order, make the rows (or
    columns) of the matrix. Sharding the leading one of them in blocks is
    the same as sharding the flattened side in blocks; a sharded later axis
    interleaves and has no matrix-side equivalent, so that side replicates.
    """
    mesh_axes = [kernel_axes[i] for i in axes]
    if mesh_axes and all(axis is None for axis in mesh_axes[1:]):
        return mesh_axes[0]
    return None


def shard_adapter_like_kernel(layer):
    """Gives a layer's `A` and `B` the sharding of the kernel they adapt.

    Under a `keras.distribution.ModelParallel` whose `LayoutMap` shards the
    frozen kernel `W (d_in, d_out)` as `(r_axis, c_axis)`, `A (d_in, r)` is
    laid out `(r_axis, None)` and `B (r, d_out)` `(None, c_axis)`, so that
    `x @ A` and `h @ B` split like `x @ W`; `lam` and `rank_mask` stay
    replicated. A `LayoutMap` key that matches the adapter variable itself
    (e.g. `".*hidden/adalora_A"`) wins. No-op without a sharding
    distribution, or on TensorFlow and torch.

    Args:
        layer: an adapted layer, its adapter just created.
    """
    if keras.backend.backend() != "jax":
        return
    distribution = keras.distribution.distribution()
    if distribution is None or layer.quantization_mode == "int4":
        # An int4 kernel is stored packed, in a shape whose axes are not
        # the float kernel's: its layout says nothing about the adapter's.
        return
    kernel_layout = variable_layout(layer._base_kernel_variable())
    if kernel_layout is None or not is_sharded(layer._base_kernel_variable()):
        return
    kernel_axes = getattr(kernel_layout, "axes", None)
    if kernel_axes is None:  # a raw jax Sharding: not ours to translate
        return
    rows, columns = layer._kernel_matrix_axes()
    wanted = (
        (layer.adalora_a, (_matrix_axis(kernel_axes, rows), None)),
        (layer.adalora_b, (None, _matrix_axis(kernel_axes, columns))),
    )
    for variable, axes in wanted:
        if _keras.layout_map_entry(distribution, variable.path) is not None:
            continue  # the user's LayoutMap key for the adapter wins
        if all(axis is None for axis in axes):
            continue
        # Re-places the (replicated) initial value with the new layout.
        _keras.relayout_variable(
            variable,
            keras.distribution.TensorLayout(axes, kernel_layout.device_mesh),
        )
