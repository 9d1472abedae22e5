"""The one door to Keras internals.

Every use of a private Keras attribute in keras_adalora goes through a
function here, each with the reason no public API does the job, so that a
Keras upgrade is this file to read (and the nightly test pass,
`tests/run_nightly.sh`, shows what moved). Supported: Keras 3.15 and the
3.16 nightlies.

Why the in-place class swap (`swap_class`) stays: `apply_adalora` must
adapt layers where they sit, and a KerasHub backbone or a subclassed model
builds its layers in code and holds them in Python attributes (plus, for a
functional model, in its graph): replacing the layer objects would mean
rewriting every reference and the graph. Giving the existing object a
subclass keeps its name, path, weights, graph nodes and references, which
is what Keras's own `enable_lora` achieves by mutating the layer too.
"""

import types

from keras.src.utils import tracking

# Keras decorator: lets `build` create the optimizer's lists of score
# variables without Keras's automatic tracking wrapping them (the way Keras's
# own optimizers build theirs).
no_automatic_dependency_tracking = tracking.no_automatic_dependency_tracking


# Layers ----------------------------------------------------------------------


def sublayers(layer, include_self=False, recursive=True):
    """Every layer below `layer` once, parents first. Keras has `Model.layers`
    (direct children, models only) but no public recursive walk."""
    return list(
        layer._flatten_layers(include_self=include_self, recursive=recursive)
    )


def child_layers(layer):
    """The layers `layer` tracks directly (its attributes, in order); no
    public equivalent for a plain `Layer`."""
    return list(layer._layers)


def own_variables(layer):
    """`(trainable, non_trainable)` variables `layer` itself owns, without
    its sublayers' (`layer.weights` includes them)."""
    return list(layer._trainable_variables), list(
        layer._non_trainable_variables
    )


def kernel_variable(layer):
    """The variable behind a `Dense`/`EinsumDense` kernel or an `Embedding`
    table: their public `kernel`/`embeddings` are properties that an adapted
    layer overrides with the merged value (Keras's LoRA does the same); a
    KerasHub `PositionEmbedding` keeps its table in `position_embeddings`."""
    if hasattr(layer, "_embeddings"):
        return layer._embeddings
    if hasattr(layer, "position_embeddings"):
        return layer.position_embeddings
    return layer._kernel


def set_keras_mask(tensor, mask):
    """Attaches a padding mask to a layer's output from inside `call`, as
    Keras's `ReversibleEmbedding` does for its lookups (its `compute_mask`
    returns None so that reverse projections carry none); no public API."""
    from keras.src.backend import set_keras_mask as set_mask

    set_mask(tensor, mask)


class unlocked_tracker:
    """Context: lets a built layer gain or lose variables and sublayers.
    Keras locks a layer's tracker after `build`; `enable_lora` unlocks it
    the same way to add its weights."""

    def __init__(self, layer):
        self.layer = layer

    def __enter__(self):
        self.locked = self.layer._tracker.locked
        self.layer._tracker.unlock()
        return self.layer

    def __exit__(self, *exc):
        if self.locked:
            self.layer._tracker.lock()


def untrack_variable(layer, variable):
    """Removes a variable from a layer (compaction, merging); Keras has no
    public way to delete a weight."""
    layer._untrack_variable(variable)


def untrack_layer(layer, sublayer):
    """Removes a sublayer from `layer`'s tracking (the adapter's dropout)."""
    layer._tracker.untrack(sublayer)


def refile_variable(layer, variable, trainable):
    """Moves a tracked variable to the trainable or non-trainable store.
    Setting `variable.trainable` alone leaves it in the trainable store,
    and `model.trainable = True` would then unfreeze a pretrained kernel."""
    with unlocked_tracker(layer):
        layer._tracker.untrack(variable)
        variable.trainable = trainable
        store = (
            "trainable_variables" if trainable else "non_trainable_variables"
        )
        layer._tracker.add_to_store(store, variable)


def swap_class(obj, cls):
    """Gives a built Keras object another class, in place (see the module
    docstring for why).

    `Layer.__new__` binds wrappers of `build` and `quantize` to the instance
    when it is created, and they keep calling the methods of the class it
    had then. `build` never runs again on a built layer. Where the new class
    overrides `quantize` (the adapted model, which refuses), the instance's
    `quantize` is bound to it, and the original wrapper comes back when the
    class is swapped back.
    """
    if type(obj) is cls:
        return obj
    saved = obj.__dict__.pop("_keras_adalora_quantize", None)
    if saved is not None:
        obj.__dict__["quantize"] = saved
    elif "quantize" in obj.__dict__ and cls.quantize is not type(obj).quantize:
        obj.__dict__["_keras_adalora_quantize"] = obj.__dict__["quantize"]
        obj.__dict__["quantize"] = types.MethodType(cls.quantize, obj)
    obj.__class__ = cls
    return obj


def variable_path_layer(variable):
    """The path of the layer that owns `variable` (`"model/dense"`): Keras
    names a layer's variable `<layer path>/<name>`; there is no public link
    from a variable to its layer."""
    return variable.path.rsplit("/", 1)[0]


def refresh_torch_parameters(layer):
    """Re-registers a torch-backed layer's variables with torch after it
    gained or lost some: Keras snapshots them into a `ParameterDict` at
    build time and has no public re-sync."""
    if hasattr(layer, "_torch_params"):
        layer._track_variables()


# Models ----------------------------------------------------------------------


def record_trainable_state(model):
    """Re-records which layers are trainable for the compiled train step
    (Keras records it at `compile` and restores it at `fit`), after layers
    were frozen or unfrozen by surgery on a compiled model."""
    model._compiled_trainable_state = {
        layer: layer.trainable for layer in sublayers(model)
    }


def compile_config(model):
    """The configuration `compile` recorded (what `model.save` writes and
    `load_model` compiles from), or None: no public accessor."""
    return getattr(model, "_compile_config", None)


# Optimizers ------------------------------------------------------------------


def optimizer_own_variables(optimizer):
    """The variables an optimizer created itself (a wrapper's, without those
    of the optimizer it wraps, which `optimizer.variables` adds)."""
    return optimizer._variables


def optimizer_trainable_variables(optimizer):
    """The variables an optimizer was built for (no public accessor)."""
    return optimizer._trainable_variables


def applied_batches(optimizer):
    """Gradients applied so far, counting every micro-batch of gradient
    accumulation; the public `iterations` counts updates only."""
    return optimizer._iterations


def accumulated_gradient(optimizer, variable):
    """The gradient accumulated so far for `variable` under
    `gradient_accumulation_steps` (no public accessor)."""
    return optimizer._accumulated_gradients[
        optimizer._get_variable_index(variable)
    ]


def distribution_strategy(optimizer):
    """The `tf.distribute` strategy an optimizer was created under, or None."""
    return getattr(optimizer, "_distribution_strategy", None)


def weight_decay_exclusions(optimizer):
    """The ids of the variables excluded from weight decay by `var_list`
    (`exclude_from_weight_decay(var_list=...)` has no getter)."""
    return getattr(optimizer, "_exclude_from_weight_decay", None)


def copy_weight_decay_pattern(source, target):
    """Copies the names excluded from weight decay
    (`exclude_from_weight_decay(var_names=...)`, not in the config)."""
    pattern = getattr(source, "_exclude_from_weight_decay_pattern", None)
    if pattern is not None:
        target._exclude_from_weight_decay_pattern = pattern


def set_weight_decay_exclusions(optimizer, ids):
    optimizer._exclude_from_weight_decay = set(ids)
    optimizer._exclude_from_weight_decay_cache = {}


# Distribution ----------------------------------------------------------------


def layout_map_entry(distribution, path):
    """The user's `LayoutMap` entry for `path`, or None: a distribution's
    layout map is not public."""
    layout_map = getattr(distribution, "_layout_map", None)
    return None if layout_map is None else layout_map[path]


def variable_layout(variable):
    """The sharding layout a variable was created with (None if it has
    none); Keras keeps it private."""
    return getattr(variable, "_layout", None)


def relayout_variable(variable, layout):
    """Gives a created variable a new layout and re-places its value there;
    Keras assigns layouts only when it creates variables."""
    variable._layout = layout
    variable._direct_assign(variable.value)
