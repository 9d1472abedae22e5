"""Which layers of a model `apply_adalora` adapts or keeps trainable."""

import re
import weakref

import keras

from keras_adalora import _keras
from keras_adalora.adapter import AdaLoRAAdapter
from keras_adalora.layers import ADAPTED_CLASSES
from keras_adalora.layers import AdaLoRAPositionEmbedding


def adapter_classes():
    """`{plain layer class: adapted class}` for every kind AdaLoRA adapts
    (KerasHub's `PositionEmbedding` once keras_hub is imported)."""
    mapping = {}
    for cls in ADAPTED_CLASSES:
        plain = cls.plain_class()
        if plain is not None:
            mapping[plain] = cls
    return mapping


def adaptable_kinds():
    """The plain layer classes AdaLoRA adapts, for `isinstance`."""
    return tuple(adapter_classes())


# What `target=None` adapts (SPEC.md section 6).
DEFAULT_KINDS = (keras.layers.Dense, keras.layers.EinsumDense)
# Names `target` understands besides regular expressions (see
# `select_layers`): the projections of transformer blocks, found from the
# model's structure, so they work for every KerasHub family.
NAMED_TARGETS = {
    "attention": "the query, key, value and output projections inside "
    "attention layers",
    "ffn": "the feed-forward projections of transformer blocks (the Dense "
    "and EinsumDense layers beside an attention layer)",
    "all": "'attention' and 'ffn' together",
    "embeddings": "the token embeddings (a KerasHub backbone's "
    "`token_embedding`; in a model without one, every Embedding layer)",
    "position_embeddings": "the learned position embeddings (KerasHub "
    "`PositionEmbedding` layers: GPT-2's, BERT's, ...)",
}


def layer_path(layer):
    return layer.path or layer.name


def model_path(model, layer):
    """`layer`'s path within `model`, the same before `model.save` and after
    `load_model`: Keras puts the model's own name in front of the paths of
    a `Sequential` model's layers (`"mlp/hidden"`) and not after a reload
    (`"hidden"`); this path leaves it out."""
    path = layer_path(layer)
    prefix = f"{model.name}/"
    return path[len(prefix):] if path.startswith(prefix) else path


def all_layers(model):
    """Every layer below `model` once, parents before children."""
    return list(_keras.sublayers(model, include_self=False))


def adapted_layers(model):
    """The AdaLoRA layers of `model`, in model order."""
    return [
        layer
        for layer in _keras.sublayers(model, include_self=True)
        if isinstance(layer, AdaLoRAAdapter)
    ]


# Models whose adapters `merge_adalora` folded into their kernels, so that
# a later call can say so rather than ask to adapt them.
_MERGED = weakref.WeakSet()


def mark_merged(model):
    _MERGED.add(model)


def require_adapted_layers(model, caller):
    """`adapted_layers(model)`, or a `ValueError` naming `caller` if none."""
    layers = adapted_layers(model)
    if not layers:
        if model in _MERGED:
            raise ValueError(
                f"`{caller}` found no AdaLoRA layer in model '{model.name}': "
                "it was merged with `merge_adalora`, which folded its "
                "adapters into the kernels. Train, summarise, plot or save "
                "the adapter before merging, or adapt the merged model "
                "anew with `keras_adalora.apply_adalora(model, ...)`."
            )
        raise ValueError(
            f"`{caller}` found no AdaLoRA layer in model '{model.name}'. "
            "Adapt it first with `keras_adalora.apply_adalora(model, ...)`."
        )
    return layers


def is_attention_layer(layer):
    """Whether `layer` is an attention layer: a `MultiHeadAttention` (KerasHub
    BERT, GPT-2, ...) or a layer class named `...Attention` (KerasHub's Gemma,
    Llama, Mistral, ... attention layers)."""
    return isinstance(layer, keras.layers.MultiHeadAttention) or (
        type(layer).__name__.endswith("Attention")
    )


def projection_roles(model):
    """`{id(layer): "attention" | "ffn"}` for the transformer projections.

    A projection is a `Dense`, `EinsumDense` or `Embedding` layer (any
    subclass). It is an attention projection when some layer above it is an
    attention layer (`is_attention_layer`), a feed-forward projection when
    it is not but its direct parent also holds an attention layer (the
    block's MLP). Other layers (embeddings, poolers, heads) get no role.
    """
    roles = {}
    kinds = adaptable_kinds()

    def visit(layer, in_attention):
        children = list(_keras.sublayers(layer, include_self=False, recursive=False))
        block = any(is_attention_layer(child) for child in children)
        for child in children:
            if isinstance(child, kinds):
                if in_attention:
                    roles[id(child)] = "attention"
                elif block:
                    roles[id(child)] = "ffn"
            visit(child, in_attention or is_attention_layer(child))

    visit(model, is_attention_layer(model))
    return roles


def token_embeddings(model):
    """The token embedding layers of `model`: what KerasHub backbones hold
    as `token_embedding` (a `ReversibleEmbedding`, tied or not to the
    logits), or, in a model with none, every `Embedding` layer (a
    `ReversibleEmbedding` included). Position embeddings are not included."""
    layers = _keras.sublayers(model, include_self=True)
    held = []
    for layer in layers:
        embedding = getattr(layer, "token_embedding", None)
        if isinstance(embedding, keras.layers.Embedding) and all(
            embedding is not other for other in held
        ):
            held.append(embedding)
    if held:
        return held
    return [layer for layer in layers if isinstance(layer, keras.layers.Embedding)]


def position_embeddings(model):
    """The learned position embeddings of `model`: its KerasHub
    `PositionEmbedding` layers, adapted or not."""
    kinds = (AdaLoRAPositionEmbedding,)
    plain = AdaLoRAPositionEmbedding.plain_class()
    if plain is not None:
        kinds += (plain,)
    return [
        layer
        for layer in _keras.sublayers(model, include_self=True)
        if type(layer) in kinds
    ]


def layer_roles(model):
    """`{id(layer): "embeddings" | "position_embeddings" | "attention" |
    "ffn"}`: the named target each layer of `model` belongs to
    (`token_embeddings`, `position_embeddings` and `projection_roles`)."""
    roles = projection_roles(model)
    for layer in token_embeddings(model):
        roles[id(layer)] = "embeddings"
    for layer in position_embeddings(model):
        roles[id(layer)] = "position_embeddings"
    return roles


def _as_predicate(spec, argument, model=None):
    """A `layer -> bool` from a regex, a named target, a list of those, or a
    callable."""
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
    named = [p for p in spec if model is not None and p in NAMED_TARGETS]
    try:
        patterns = [re.compile(p) for p in spec if p not in named]
    except re.error as error:
        raise ValueError(
            f"`{argument}` holds an invalid regular expression: {error}. "
            f"Received: {argument}={spec!r}"
        ) from None
    roles = {}
    if named:
        wanted = set()
        for name in named:
            wanted.update(("attention", "ffn") if name == "all" else (name,))
        roles = {
            key: role for key, role in layer_roles(model).items() if role in wanted
        }
    return lambda layer: id(layer) in roles or any(
        p.search(layer_path(layer)) for p in patterns
    )


def task_head_layers(model):
    """The layers of a KerasHub task outside its backbone and preprocessor
    that hold weights (a classifier's `logits` Dense, ...); `[]` for other
    models."""
    backbone = getattr(model, "backbone", None)
    if not isinstance(backbone, keras.layers.Layer) or backbone is model:
        return []
    # Below the backbone or preprocessor: a causal LM's functional graph
    # calls `backbone.token_embedding` directly, but it belongs to the base.
    inside = set()
    for part in (backbone, getattr(model, "preprocessor", None)):
        if isinstance(part, keras.layers.Layer):
            inside.update(
                id(layer) for layer in _keras.sublayers(part, include_self=True)
            )
    return [
        layer
        for layer in _keras.sublayers(model, include_self=False, recursive=False)
        if id(layer) not in inside and layer.weights
    ]


def _largest_rank(layer):
    """The largest rank `layer`'s kernel, read as a matrix, can hold."""
    return min(adapter_classes()[type(layer)]._adapter_matrix_shape(layer))


def _holds_rank(layer, init_rank):
    """Whether `layer`'s kernel, read as a matrix, has rank >= `init_rank`
    (an unbuilt layer is left to `check_wrappable` to refuse)."""
    return not layer.built or init_rank <= _largest_rank(layer)


def select_layers(model, target, keep_trainable=None, init_rank=None):
    """Resolves `target` and `keep_trainable` into lists of layers.

    With `target=None` and an `init_rank`, the Dense and EinsumDense layers
    too small to hold an adapter of that rank are left out of `to_adapt`
    (and kept trainable when `keep_trainable` is None).

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
        to_keep = task_head_layers(model)
    elif isinstance(keep_trainable, (list, tuple)) and not keep_trainable:
        to_keep = []
    else:
        keep = _as_predicate(keep_trainable, "keep_trainable", model)
        # Only layers that own weights can train (a callable is never handed
        # an InputLayer or a Dropout, whose `path` may be None).
        to_keep = [layer for layer in layers if layer.weights and keep(layer)]
        if not to_keep:
            raise ValueError(
                "No layer matched `keep_trainable`="
                f"{keep_trainable!r}. Layer paths look like: "
                f"{_sample_paths(layers)}."
            )
    kept = set()
    for layer in to_keep:
        kept.update(id(sub) for sub in _keras.sublayers(layer, include_self=True))

    too_small = []
    if target is None:
        # Plain Dense/EinsumDense, plus already adapted ones so that a second
        # `apply_adalora` call is reported rather than silently a no-op.
        def matches(layer):
            return type(layer) in DEFAULT_KINDS or isinstance(
                layer, AdaLoRAAdapter
            )

        candidates = [
            layer for layer in layers if id(layer) not in kept and matches(layer)
        ]
        # A layer whose matrix cannot hold `init_rank` components (a
        # classifier head with few classes) is not adapted: training it
        # fully costs fewer parameters than a full-rank adapter and needs
        # no pruning. It stays trainable if `keep_trainable` is left None.
        if init_rank is not None:
            too_small = [
                layer
                for layer in candidates
                if not isinstance(layer, AdaLoRAAdapter)
                and not _holds_rank(layer, init_rank)
            ]
        small = {id(layer) for layer in too_small}
        to_adapt = [layer for layer in candidates if id(layer) not in small]
        if keep_trainable is None:
            to_keep = to_keep + too_small
    else:
        predicate = _as_predicate(target, "target", model)
        # Adapted layers too (an `AdaLoRAPositionEmbedding` is no subclass
        # of KerasHub's layer), so that adapting one again is reported.
        kinds = adaptable_kinds() + (AdaLoRAAdapter,)

        def matches(layer):
            if not isinstance(layer, kinds):
                # Targets pick among the layer kinds AdaLoRA adapts, so that
                # "attention" does not also select the attention block's
                # LayerNormalization, and a callable only sees layers it
                # could adapt.
                return False
            return bool(predicate(layer))

        to_adapt = [
            layer for layer in layers if id(layer) not in kept and matches(layer)
        ]
    if not to_adapt and too_small:
        largest = max(_largest_rank(layer) for layer in too_small)
        raise ValueError(
            f"No layer of this model can hold `init_rank`={init_rank} "
            f"components: {len(too_small)} Dense/EinsumDense layers exist "
            f"({_sample_paths(too_small)}), but the largest rank any of "
            f"them can hold is {largest} (the smaller side of its kernel). "
            f"Pass init_rank <= {largest}."
        )
    if not to_adapt:
        names = [target] if isinstance(target, str) else target
        if not isinstance(names, (list, tuple)):
            names = []
        hint = "".join(
            f" '{n}' selects {NAMED_TARGETS[n]}."
            for n in names
            if isinstance(n, str) and n in NAMED_TARGETS
        )
        raise ValueError(
            f"No layer matched `target`={target!r} (layers matched by "
            f"`keep_trainable` are never adapted).{hint} Adaptable layers in "
            f"this model: {_sample_paths(l for l in layers if isinstance(l, adaptable_kinds()))}."
        )
    return to_adapt, to_keep


def adapter_class_for(layer):
    """The AdaLoRA class that adapts `layer`, or a `ValueError` saying why
    there is none."""
    if isinstance(layer, AdaLoRAAdapter):
        type(layer).check_wrappable(layer, layer.init_rank)  # raises
    cls = adapter_classes().get(type(layer))
    if cls is None:
        kinds = ", ".join(k.__name__ for k in adaptable_kinds())
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
