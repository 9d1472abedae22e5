"""`disable_adapter`: run an adapted model as its frozen base model."""

import contextlib

from keras_adalora.targets import require_adapted_layers

# The models inside a `disable_adapter` block (entered count), so that
# `fit` can refuse to train there.
_DISABLED = {}


@contextlib.contextmanager
def disable_adapter(model):
    """Within the block, every adapter of `model` is switched off.

    The adapted layers then compute exactly what their frozen base layers
    compute (`x @ W + b`, the tables' rows, the tied logits), in eager
    calls, `predict`, `evaluate` and inside a compiled custom `train_step`
    (for a frozen reference output next to the adapted one). No variable
    is written: leaving the block gives the adapters back bit for bit.
    Blocks may nest. `fit` is refused inside the block, where it would
    train none of the adapters.

    Args:
        model: a model holding AdaLoRA layers (not merged).

    Raises:
        ValueError: when `model` holds no AdaLoRA layer (never adapted, or
            merged with `merge_adalora`), before anything changes.

    Example:

    >>> model = keras.Sequential(
    ...     [keras.Input((4,)), keras.layers.Dense(3, name="hidden")])
    >>> base = model.predict(np.ones((2, 4)), verbose=0)
    >>> model = apply_adalora(model, init_rank=2)
    >>> _ = model.get_layer("hidden").adalora_lam.assign([1.0, -1.0])
    >>> with keras_adalora.disable_adapter(model):
    ...     same = model.predict(np.ones((2, 4)), verbose=0)
    >>> adapted = model.predict(np.ones((2, 4)), verbose=0)
    >>> bool((same == base).all()), bool((adapted == base).all())
    (True, False)
    """
    layers = require_adapted_layers(model, "disable_adapter")
    before = [layer.adapter_disabled for layer in layers]
    _set(model, layers, [True] * len(layers))
    _DISABLED[model] = _DISABLED.get(model, 0) + 1
    try:
        yield model
    finally:
        _DISABLED[model] -= 1
        if not _DISABLED[model]:
            del _DISABLED[model]
        _set(model, layers, before)


def is_disabled(model):
    """Whether `model` is inside a `disable_adapter` block."""
    return model in _DISABLED


def _set(model, layers, flags):
    for layer, flag in zip(layers, flags):
        layer.adapter_disabled = flag
    # `predict` and `evaluate` keep the function they traced; the next call
    # traces again with the adapters as they are now. The train function
    # stays: a custom `train_step` may open the block while it is traced.
    model.predict_function = None
    model.test_function = None
