"""Read, shrink and fold the adapters of an adapted model."""

import warnings

from keras_adalora import _keras
from keras_adalora._backend import refresh_tracked_parameters
from keras_adalora._backend import reset_compiled_state
from keras_adalora._backend import unwrapped_optimizer
from keras_adalora.adapted_model import unmark_adapted
from keras_adalora.targets import mark_merged
from keras_adalora.targets import adapted_layers
from keras_adalora.targets import require_adapted_layers
from keras_adalora.targets import model_path


def _warn_requantization(report):
    worst = max(report, key=report.get)
    errors = sorted(report.values())
    median = errors[len(errors) // 2]
    warnings.warn(
        f"merge_adalora re-quantized {len(report)} quantized layer(s) "
        "holding W + delta_W: the re-quantization error is "
        f"{median:.1%} of the median layer's update norm ||delta_W|| "
        f"({report[worst]:.1%} for '{worst}', the largest). To "
        "keep the update exact, deploy the adapted model unmerged, or merge "
        "the adapter into the float base (`load_adapter` onto it, then "
        "`merge_adalora`).",
        stacklevel=3,
    )


def get_rank_pattern(model):
    """The active rank of every adapted layer.

    Args:
        model: a model adapted with `apply_adalora` (or holding AdaLoRA
            layers).

    Returns:
        A dict `{path: active_rank}` in model order, where `active_rank` is
        the number of alive rank-1 components and `path` is the layer's
        `path` without the model's name in front (which Keras gives the
        layers of a `Sequential` model, and not after a reload), so that the
        keys survive `model.save` and `keras.saving.load_model`.

    Example:

    >>> model = keras.Sequential(
    ...     [keras.Input((8,)), keras.layers.Dense(4, name="hidden")], name="mlp")
    >>> get_rank_pattern(apply_adalora(model, init_rank=2))
    {'hidden': 2}
    """
    return {
        model_path(model, layer): layer.active_rank
        for layer in adapted_layers(model)
    }


def compact_adalora(model):
    """Slices every adapter down to its alive components, in place.

    The pruned components (`rank_mask == 0`) contribute nothing to the
    outputs, so the model computes exactly what it did; its adapter weights
    shrink to `active_rank` columns of `A`, entries of `lam` and rows of `B`
    per layer, and so does what `model.save` writes. A compacted layer
    reloads compacted. The adapter scale `alpha / init_rank` is unchanged.

    A compacted model can train further (the adapter keeps its learned
    components, with fewer parameters and less compute). In a compiled
    model, the optimizer is rebuilt for the new variables: its step counter,
    the AdaLoRA schedule and the state of the weights that did not change
    (a head's moments) carry over; the adapters' moment estimates and
    scores restart.

    Args:
        model: a model holding AdaLoRA layers.

    Returns:
        `model`, compacted in place.

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model = apply_adalora(model, init_rank=3)
    >>> layer = model.layers[0]
    >>> _ = layer.rank_mask.assign([1.0, 0.0, 1.0])
    >>> tuple(compact_adalora(model).layers[0].adalora_lam.shape)
    (2,)
    """
    layers = require_adapted_layers(model, "compact_adalora")
    removed = sum(layer._compact_adapter() for layer in layers)
    if removed:
        refresh_tracked_parameters(model)
        reset_compiled_state(model)
    return model


def merge_adalora(model):
    """Folds every adapter into its kernel, leaving a plain Keras model.

    Each adapted layer becomes the plain `Dense`, `EinsumDense` or
    `Embedding` it was, with kernel `W + delta_W` in the kernel's dtype, and
    the model gets its own class back. The model computes the same outputs
    (up to float rounding), runs at the cost of the original model, and
    saves as a `.keras` file that loads without keras_adalora, is no larger
    than the base model's, and loads without warnings (a KerasHub task
    loads as Keras loads any KerasHub task: pass `compile=False` to
    `load_model` to skip its note that KerasHub's `compile` is custom).

    Merging ends training. The merged model is a deployment artifact:

    - it is frozen (`model.trainable = False`): set `trainable = True` on
      the model or on some layers to train it further, as on any Keras
      model;
    - a compiled model keeps the optimizer you compiled with (inside its
      `LossScaleOptimizer` if any), reset as after `compile`: the same
      configuration, without the AdaLoRA wrapper, its scores and schedule,
      or any moment estimates (what a frozen model's file would hold).

    A layer quantized to int8 or int4 (`model.quantize` before
    `apply_adalora`) stays quantized: `W + delta_W` is re-quantized in the
    layer's mode, block size and configuration, exactly as `model.quantize`
    would quantize the merged float layer. That rounds the update to the
    quantization grid, so a `UserWarning` reports the error it makes,
    relative to each layer's update
    (`||Q(W + delta_W) - (W + delta_W)|| / ||delta_W||`, dequantized). Where
    it is large (int4 grids are coarse), deploy the adapted model itself,
    which computes `Q(W) x + delta_W x` at the quantized model's cost, or
    load the adapter onto the float base and merge there.

    The adapters are gone: save them first (`save_adapter`, or `model.save`
    of the adapted model) if you may want them back.

    Args:
        model: a model holding AdaLoRA layers.

    Returns:
        `model`, merged in place.

    Example:

    >>> model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    >>> model = merge_adalora(apply_adalora(model, init_rank=2))
    >>> type(model.layers[0]).__name__, model.trainable
    ('Dense', False)
    """
    layers = require_adapted_layers(model, "merge_adalora")
    disabled = [layer.path or layer.name for layer in layers if layer.adapter_disabled]
    if disabled:
        raise ValueError(
            "`merge_adalora` was called inside `disable_adapter`, where the "
            f"adapters of {disabled[:3]}{' ...' if len(disabled) > 3 else ''} "
            "are switched off: merging would fold nothing into the kernels "
            "and lose them. Merge outside the block."
        )
    report = {}
    for layer in layers:
        layer.revert_in_place(report=report)
    if report:
        _warn_requantization(report)
    for obj in _keras.sublayers(model, include_self=True):
        unmark_adapted(obj)
    model.trainable = False
    refresh_tracked_parameters(model)
    optimizer = getattr(model, "optimizer", None)
    if getattr(model, "compiled", False) and optimizer is not None:
        reset_compiled_state(model, optimizer=unwrapped_optimizer(optimizer))
    else:
        reset_compiled_state(model)  # a traced `predict` of the adapters
    mark_merged(model)
    return model
