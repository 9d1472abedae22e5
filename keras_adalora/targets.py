"""Which layers of a model `apply_adalora` adapts or keeps trainable."""

import re

import keras

from keras_adalora.adapter import AdaLoRAAdapter
from keras_adalora.layers import AdaLoRADense
from keras_adalora.layers import AdaLoRAEinsumDense
from keras_adalora.layers import AdaLoRAEmbedding

# The adapted class for each plain Keras layer class.
ADAPTER_FOR = {
    keras.layers.Dense: AdaLoRADense,
    keras.layers.EinsumDense: AdaLoRAEinsumDense,
    keras.layers.Embedding: AdaLoRAEmbedding,
}
# What `target=None` adapts (SPEC.md section 6).
DEFAULT_KINDS = (keras.layers.Dense, keras.layers.EinsumDense)


def layer_path(layer):
    return layer.path or layer.name


def all_layers(model):
    """Every layer below `model` once, parents before children."""
    return list(model._flatten_layers(include_self=False))


def adapted_layers(model):
    """The AdaLoRA layers of `model`, in model order."""
    return [
        layer
        for layer in model._flatten_layers(include_self=True)
        if isinstance(layer, AdaLoRAAdapter)
    ]


def require_adapted_layers(model, caller):
    """`adapted_layers(model)`, or a `ValueError` naming `caller` if none."""
    layers = adapted_layers(model)
    if not layers:
        raise ValueError(
            f"`{caller}` found no AdaLoRA layer in model '{model.name}'. "
            "Adapt it first with `keras_adalora.apply_adalora(model, ...)`."
        )
    return layers


def _as_predicate(spec, argument):
    """A `layer -> bool` from None, a regex, a list of regexes or a callable."""
    if callable(spec):
        return spec
    if isinstance(spec, str):
        spec = [spec]
    if not isinstance(spec, (list, tuple)) or not all(
        isinstance(p, str) for p in spec
    ):
        raise ValueError(
            f"`{argument}` must be None, a regular expression, a list of "
            "regular expressions (searched in `layer.path`) or a callable "
            f"`layer -> bool`. Received: {argument}={spec!r}"
        )
    try:
        patterns = [re.compile(p) for p in spec]
    except re.error as error:
        raise ValueError(
            f"`{argument}` holds an invalid regular expression: {error}. "
            f"Received: {argument}={spec!r}"
        ) from None
    return lambda layer: any(p.search(layer_path(layer)) for p in patterns)


def select_layers(model, target, keep_trainable=None):
    """Resolves `target` and `keep_trainable` into lists of layers.

    Returns:
        `(to_adapt, to_keep)`: the layers to adapt (checked: each is a plain
        Dense, EinsumDense or Embedding that can be adapted), and the layers
        to keep fully trainable.

    Raises:
        ValueError: when nothing matches `target`, or a matched layer cannot
            be adapted (already adapted, unsupported kind, ...).
    """
    layers = all_layers(model)
    if keep_trainable is None:
        to_keep = []
    else:
        keep = _as_predicate(keep_trainable, "keep_trainable")
        to_keep = [layer for layer in layers if keep(layer)]
        if not to_keep:
            raise ValueError(
                "No layer matched `keep_trainable`="
                f"{keep_trainable!r}. Layer paths look like: "
                f"{_sample_paths(layers)}."
            )
    kept = set()
    for layer in to_keep:
        kept.update(id(sub) for sub in layer._flatten_layers(include_self=True))

    if target is None:
        # Plain Dense/EinsumDense, plus already adapted ones so that a second
        # `apply_adalora` call is reported rather than silently a no-op.
        def matches(layer):
            return type(layer) in DEFAULT_KINDS or isinstance(
                layer, AdaLoRAAdapter
            )

        explicit = False
    else:
        predicate = _as_predicate(target, "target")
        explicit = callable(target)

        def matches(layer):
            if not explicit and not isinstance(layer, tuple(ADAPTER_FOR)):
                # Regexes pick among the layer kinds AdaLoRA adapts, so that
                # "attention" does not also select the attention block's
                # LayerNormalization.
                return False
            return bool(predicate(layer))

    to_adapt = [
        layer for layer in layers if id(layer) not in kept and matches(layer)
    ]
    if not to_adapt:
        raise ValueError(
            f"No layer matched `target`={target!r} (layers matched by "
            "`keep_trainable` are never adapted). Adaptable layers in this "
            f"model: {_sample_paths(l for l in layers if isinstance(l, tuple(ADAPTER_FOR)))}."
        )
    return to_adapt, to_keep


def adapter_class_for(layer):
    """The AdaLoRA class that adapts `layer`, or a `ValueError` saying why
    there is none."""
    if isinstance(layer, AdaLoRAAdapter):
        type(layer).check_wrappable(layer, layer.init_rank)  # raises
    cls = ADAPTER_FOR.get(type(layer))
    if cls is None:
        kinds = ", ".join(k.__name__ for k in ADAPTER_FOR)
        raise ValueError(
            f"Layer '{layer_path(layer)}' is a {type(layer).__name__}; "
            f"AdaLoRA adapts plain {kinds} layers. Leave it out of `target`."
        )
    return cls


def _sample_paths(layers, limit=8):
    paths = [layer_path(layer) for layer in layers]
    if not paths:
        return "(none)"
    more = f", ... ({len(paths) - limit} more)" if len(paths) > limit else ""
    return ", ".join(repr(p) for p in paths[:limit]) + more
