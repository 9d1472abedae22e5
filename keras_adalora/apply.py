"""`apply_adalora`: adapt the layers of an existing model in place."""

from keras_adalora import _keras
from keras_adalora._backend import refresh_tracked_parameters
from keras_adalora._backend import reset_compiled_state
from keras_adalora.adapted_model import mark_adapted
from keras_adalora.adapter import layer_orth_reg_weight
from keras_adalora.adapter import validate_adapter_args
from keras_adalora.targets import adapter_class_for
from keras_adalora.targets import adapter_classes
from keras_adalora.targets import select_layers


def apply_adalora(
    model,
    init_rank=12,
    alpha=None,
    target=None,
    orth_reg_weight=None,
    dropout=0.0,
    keep_trainable=None,
    factor_init="normal",
    orth_penalty="norm",
):
    """Adapts the layers of `model` with AdaLoRA, in place.

    Each matched `Dense`, `EinsumDense` or `Embedding` layer becomes its
    AdaLoRA counterpart (`AdaLoRADense`, ...) without being replaced: it keeps
    its name, path, weights and place in the model, so this works the same
    for Sequential, functional and subclassed models and for layers nested
    inside other layers (a KerasHub `TransformerEncoder`'s attention and
    feed-forward projections). The adapters start at `lam = 0`, so the
    model's outputs are unchanged right after the call.

    What trains afterwards:
    - adapted layers: only their adapter (`A`, `lam`, `B`); their kernel and
      bias are frozen for good (even `model.trainable = True` keeps them so);
    - layers matched by `keep_trainable`: all their weights, as before (use
      it for a freshly initialised task head; such layers are never adapted);
    - every other weight of the model is frozen (`layer.trainable = False`),
      as in PEFT. Unfreeze a layer afterwards with `layer.trainable = True`.

    The model remembers how it was adapted: `model.save` / `load_model`
    (with keras_adalora imported) restore the adapters, their ranks and
    what is frozen, for any model, KerasHub models included.

    Best called before `model.compile()`. On a model already compiled and
    trained, the optimizer is rebuilt for the new trainable variables (its
    step counter continues, and the state of the weights that still train,
    a head's moments, is kept); a `RankBudgetCallback` schedule then counts
    from the step where AdaLoRA training starts.

    Args:
        model: a built Keras model (or layer).
        init_rank: number of rank-1 components each adapter starts with.
        alpha: scale numerator; each adapter is multiplied by
            `alpha / init_rank`. Defaults to `init_rank`, a scale of 1
            (with `factor_init="orthogonal"`:
            `init_rank * sqrt(d_in * d_out) / 12` of each layer's kernel
            read as a matrix, a scale of `sqrt(d_in * d_out) / 12`).
        target: which layers to adapt. `None`: every plain `Dense` and
            `EinsumDense` whose kernel can hold `init_rank` components (a
            layer smaller than that, such as a head with few classes, is
            not adapted; with `keep_trainable=None` it trains fully, which
            costs fewer parameters than a full-rank adapter).
            `"attention"`: the query, key, value and output projections of
            every attention layer; `"ffn"`: the feed-forward projections of
            every transformer block; `"all"`: both; `"embeddings"`: the
            token embeddings (a KerasHub backbone's `token_embedding`, tied
            to the logits or not; in a model without one, every
            `Embedding`); `"position_embeddings"` (opt-in): the learned
            positions, every KerasHub `PositionEmbedding`. These names find
            the layers from the model's structure, so they work on any
            KerasHub transformer, and mix: `target=["all", "embeddings"]`
            shares one budget between all three. A regular expression or a
            list of them (named sets may be mixed in): the layers of an
            adaptable kind (`Dense`, `EinsumDense`, `Embedding`,
            `ReversibleEmbedding`, KerasHub's `PositionEmbedding`,
            `Conv1D`, `Conv2D`, `Conv3D`) whose `layer.path` contains a match
            (`re.search`), so KerasHub's `enable_lora` names work too:
            `target=backbone.default_lora_layer_names()`. A callable
            `layer -> bool`: the layers of an adaptable kind it accepts (it
            is only called on those).
        orth_reg_weight: weight of the orthogonality penalty that keeps
            `A`'s columns and `B`'s rows orthonormal, added to the model's
            losses during training; `0` disables it. With
            `orth_penalty="norm"` (default 0.5) it weighs the mean of the
            adapted layers' penalties, so each of `n` layers gets
            `orth_reg_weight / n`; with `"squared"` (default 0.1) every
            layer gets all of it.
        dropout: dropout rate on the adapters' inputs (not applied to
            `Embedding` layers, whose inputs are token ids).
        keep_trainable: layers that keep training fully instead of being
            frozen or adapted, chosen like `target` (regexes, named sets or
            a callable, called on the layers that own weights). `None` (the
            default) keeps a KerasHub task's head trainable (its layers with
            weights outside the backbone, such as `BertTextClassifier`'s
            `logits`) and, with `target=None`, the layers too small to
            adapt; `[]` keeps nothing.
        factor_init: how each adapter's `A` and `B` start: `"normal"`
            (entries drawn from N(0, 0.02^2)) or `"orthogonal"` (random
            orthonormal factors). `lam` starts at 0 either way.
        orth_penalty: the penalty's form per layer: `"norm"`,
            `(||A^T A - I||_F + ||B B^T - I||_F) / 2`, or `"squared"`,
            `||A^T A - I||_F^2 + ||B B^T - I||_F^2`.

    Returns:
        `model`, adapted in place.

    Raises:
        ValueError: before anything changes, when no layer matches `target`,
            a matched layer is already adapted, is of a kind or quantization
            mode AdaLoRA cannot adapt, is not built, or when `init_rank`
            exceeds a layer's `min(d_in, d_out)`.

    Example:

    >>> model = keras.Sequential([
    ...     keras.Input((16,)),
    ...     keras.layers.Dense(32, activation="relu", name="hidden"),
    ...     keras.layers.Dense(3, name="head"),
    ... ], name="mlp")
    >>> model = apply_adalora(model, init_rank=4, keep_trainable=["head"])
    >>> get_rank_pattern(model)
    {'hidden': 4}

    On a KerasHub model, adapt the transformer blocks by role; the task
    head stays trainable:

    >>> backbone = keras_hub.models.BertBackbone(
    ...     vocabulary_size=100, num_layers=2, num_heads=2, hidden_dim=16,
    ...     intermediate_dim=32, max_sequence_length=8)
    >>> classifier = keras_hub.models.BertTextClassifier(
    ...     backbone, num_classes=2, preprocessor=None)
    >>> classifier = apply_adalora(
    ...     classifier, init_rank=4, target="all")
    >>> len(get_rank_pattern(classifier))
    12
    """
    _, alpha, dropout, orth_reg_weight, _, _ = validate_adapter_args(
        init_rank, alpha, dropout, orth_reg_weight, factor_init, orth_penalty
    )
    check_container(model)
    to_adapt, to_keep = select_layers(
        model, target, keep_trainable, init_rank=init_rank
    )
    classes = []
    for layer in to_adapt:
        cls = adapter_class_for(layer)
        cls.check_wrappable(layer, init_rank)
        classes.append(cls)

    orth_reg_weight = layer_orth_reg_weight(
        orth_reg_weight, orth_penalty, len(to_adapt)
    )
    for layer, cls in zip(to_adapt, classes):
        layer_dropout = dropout if cls.supports_dropout else 0.0
        cls.adapt_in_place(
            layer,
            init_rank=init_rank,
            alpha=alpha,
            dropout=layer_dropout,
            orth_reg_weight=orth_reg_weight,
            factor_init=factor_init,
            orth_penalty=orth_penalty,
        )
    freeze_all_but(model, to_adapt + to_keep)
    refresh_tracked_parameters(model)
    reset_compiled_state(model)
    return mark_adapted(model)


def check_container(model):
    """Raises unless `model` is a model (or a layer holding others): a
    layer of an adaptable kind passed on its own names its adapted class."""
    cls = adapter_classes().get(type(model))
    if cls is not None:
        raise ValueError(
            "`apply_adalora` adapts the layers inside a model; it received a "
            f"{type(model).__name__} layer ('{model.name}') itself. Pass the "
            "model that holds it, or make an adapted copy of this one layer "
            f"with `keras_adalora.{cls.__name__}.from_layer(layer, "
            "init_rank=...)`."
        )


def freeze_all_but(model, trainable_layers):
    """Freezes every weight of `model` outside `trainable_layers`.

    A layer that contains none of them is frozen as a whole
    (`layer.trainable = False`); a layer above one of them stays trainable as
    a container (so Keras still collects the trainable weights below it) but
    its own weights are frozen. A frozen layer that a kept one also holds (a
    masked LM head holding the backbone's token embedding) stays frozen, in
    whichever order the two are reached.
    """
    keep = {id(layer) for layer in trainable_layers}
    above = set()
    for layer in _keras.sublayers(model, include_self=True):
        if any(
            id(sub) in keep for sub in _keras.sublayers(layer, include_self=False)
        ):
            above.add(id(layer))

    frozen = []

    def visit(layer):
        if id(layer) in keep:
            layer.trainable = True
        elif id(layer) not in above:
            layer.trainable = False
            frozen.append(layer)
        else:
            layer.trainable = True
            for variable in _keras.own_variables(layer)[0]:
                variable.trainable = False
            for sub in _keras.child_layers(layer):
                visit(sub)

    visit(model)
    # Setting a kept layer trainable also set the layers it holds.
    for layer in frozen:
        layer.trainable = False
