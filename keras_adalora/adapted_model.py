"""Adapted models remember how they were adapted, so that they reload.

`model.save` writes a model's config, and `keras.saving.load_model` rebuilds
the model from it before loading the weights. For a Sequential or functional
model the config lists every layer, AdaLoRA layers included, but many models
build their sublayers in code: a KerasHub backbone creates its attention and
feed-forward projections in its constructor, a subclassed model in its
`__init__`. Rebuilt from their config, those come back as plain `Dense` and
`EinsumDense` layers, with nowhere to load the adapters into; which layers
were frozen is lost too.

So `apply_adalora` (and `load_adapter`) also give the model itself an
adapted class: a subclass of its own class, of the same name, made once per
class, whose config is the original config plus an *adaptation record*:
which layers are adapted, with what settings (compacted ranks included), and
which layers and variables are trainable. Loading rebuilds the model from
the original config, adapts and freezes it again from the record, then lets
Keras load the weights and optimizer state into it. The adapted class also
compiles the reloaded model from its saved compile config even when the
model's class overrides `compile` (KerasHub tasks, whose optimizer state
Keras would otherwise drop with a warning), and, at the end of `fit`, has
`RankBudgetCallback` check that the adapters hold the ranks it reported
(`EarlyStopping(restore_best_weights=True)` restores its snapshot after the
callbacks that come before it have finished).

`merge_adalora` gives the model its own class back: a merged model is a
plain Keras model that loads without keras_adalora.
"""

import weakref

import keras

from keras_adalora import _keras
from keras_adalora._backend import refresh_tracked_parameters
from keras_adalora._untrusted import Source
from keras_adalora._untrusted import short
from keras_adalora.adapter import SETTINGS
from keras_adalora.adapter import read_settings_since_0_2
from keras_adalora.adapter import AdaLoRAAdapter
from keras_adalora.disabling import is_disabled

# Version 2 records each adapter's `factor_init` and `orth_penalty` (a
# version 1 record's adapters have their 0.1 values).
RECORD_VERSION = 2
_REGISTERED_NAME = ("keras_adalora", "AdaptedModel")
# The adapted class made for each original class.
_ADAPTED_CLASSES = {}
# The RankBudgetCallbacks that take part in a `fit` of an adapted model.
_FITTING = weakref.WeakKeyDictionary()


class _AdaptedLayer:
    """Mixin of the adapted class of a layer or model (see module doc)."""

    # The class the object had before it was adapted.
    original_class = None

    def get_config(self):
        original = self.original_class
        base = {
            "module": original.__module__,
            "class_name": original.__name__,
            "registered_name": keras.saving.get_registered_name(original),
            "config": super().get_config(),
        }
        build_config = self.get_build_config()
        if build_config is not None:
            base["build_config"] = build_config
        return {"base": base, "adaptation": adaptation_record(self)}

    @classmethod
    def from_config(cls, config):
        for key in ("base", "adaptation"):
            if not isinstance(config, dict) or key not in config:
                keys = sorted(config) if isinstance(config, dict) else config
                raise ValueError(
                    "This config was not written for an AdaLoRA-adapted model "
                    f"(it has no '{key}' entry). Received: config keys "
                    f"{short(keys)}"
                )
            if not isinstance(config[key], dict):
                raise ValueError(
                    f"The '{key}' entry of this AdaLoRA-adapted model's config "
                    "must be a JSON object; it is a "
                    f"{type(config[key]).__name__}. The file is damaged or "
                    "was edited: load an undamaged copy."
                )
        # Under the caller's safe mode (Keras's scope): a `Lambda` in the
        # base model is refused as in a plain model.
        obj = keras.saving.deserialize_keras_object(config["base"])
        restore_adaptation(obj, config["adaptation"])
        return obj


class _AdaptedModel(_AdaptedLayer):
    """Mixin of the adapted class of a model (see module doc)."""

    def compile_from_config(self, config):
        # As Keras's own, without its refusal for classes that override
        # `compile`: KerasHub tasks do, taking the same arguments (their own
        # extras, such as a causal LM's `sampler`, keep their defaults).
        config = keras.saving.deserialize_keras_object(config)
        self.compile(**config)
        if getattr(self, "optimizer", None) is not None and self.built:
            self.optimizer.build(self.trainable_variables)

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        # Refused here, before Keras reaches any layer: quantizing the frozen
        # kernel under a live adapter is not supported yet.
        raise ValueError(
            f"Model '{self.name}' holds AdaLoRA adapters, which cannot be "
            f"quantized (mode={mode!r}). Merge them first "
            "(`keras_adalora.merge_adalora(model)`, then `model.quantize(...)` "
            "on the plain model), or keep the adapted model in float."
        )

    def fit(self, *args, **kwargs):
        if is_disabled(self):
            raise ValueError(
                f"`fit` was called on model '{self.name}' inside "
                "`disable_adapter(model)`, where its adapters are switched "
                "off: it would train none of them (and the optimizer would "
                "still decay them). Call `fit` outside the block."
            )
        _FITTING[self] = []
        try:
            history = super().fit(*args, **kwargs)
        finally:
            callbacks = _FITTING.pop(self, [])
        for callback in callbacks:
            callback.check_final_ranks()
        return history


# The key the adapted classes are saved under: `from_config` does not depend
# on which adapted class the registry holds, so one key serves them all.
keras.saving.register_keras_serializable(*_REGISTERED_NAME)(_AdaptedLayer)


def adapted_class(cls):
    """The adapted class of `cls` (made once; `cls` if already adapted)."""
    if issubclass(cls, _AdaptedLayer):
        return cls
    adapted = _ADAPTED_CLASSES.get(cls)
    if adapted is None:
        mixin = _AdaptedModel if issubclass(cls, keras.Model) else _AdaptedLayer
        adapted = type(
            cls.__name__,
            (mixin, cls),
            {
                "original_class": cls,
                "__module__": __name__,
                "__qualname__": cls.__qualname__,
                "__doc__": cls.__doc__,
            },
        )
        keras.saving.register_keras_serializable(*_REGISTERED_NAME)(adapted)
        _ADAPTED_CLASSES[cls] = adapted
    return adapted


def mark_adapted(obj):
    """Gives `obj` (the model `apply_adalora` adapted) its adapted class."""
    _keras.swap_class(obj, adapted_class(type(obj)))
    return obj


def unmark_adapted(obj):
    """Gives `obj` its original class back (after merging)."""
    if isinstance(obj, _AdaptedLayer):
        _keras.swap_class(obj, obj.original_class)
    return obj


def join_fit(model, callback):
    """Has `callback.check_final_ranks()` called when the `fit` of `model`
    returns (if `model` has its adapted class)."""
    if model in _FITTING:
        _FITTING[model].append(callback)


# The adaptation record -------------------------------------------------------


def recorded_layers(obj):
    """The layers of `obj` (itself first) in the order the record lists
    them: `_flatten_layers` order, only those that hold weights (whether
    anything else trains does not matter, and layers without weights may be
    created lazily, such as a KerasHub preprocessor's packer), and without
    the adapters' own sublayers (their input dropout), which a plain model
    rebuilt from its config lacks.
    """
    layers = list(_keras.sublayers(obj, include_self=True))
    internal = {
        id(layer.adapter_dropout)
        for layer in layers
        if isinstance(layer, AdaLoRAAdapter) and layer.adapter_dropout is not None
    }
    return [
        layer
        for layer in layers
        if id(layer) not in internal and (layer is obj or layer.weights)
    ]


def _plain_class_name(layer):
    if isinstance(layer, AdaLoRAAdapter):
        return layer.wrapped_class.__name__
    if isinstance(layer, _AdaptedLayer):
        return layer.original_class.__name__
    return type(layer).__name__


def adaptation_record(obj):
    """What `restore_adaptation` needs to adapt and freeze a rebuilt copy of
    `obj` as `obj` is now: a JSON-compatible dict.

    - `layers`: for every layer (`recorded_layers` order), its path, its
      plain class name, its `trainable` flag and the names of its own
      trainable-store variables that are frozen one by one;
    - `adapters`: for every adapted layer, its position in `layers`, its
      AdaLoRA class and its adapter configuration (compacted ranks
      included).
    """
    layers = recorded_layers(obj)
    entries, adapters = [], []
    for index, layer in enumerate(layers):
        frozen = sorted(
            v.name for v in _keras.own_variables(layer)[0] if not v.trainable
        )
        entries.append(
            {
                "path": layer.path or layer.name,
                "class": _plain_class_name(layer),
                "trainable": bool(layer.trainable),
                "frozen_variables": frozen,
            }
        )
        if isinstance(layer, AdaLoRAAdapter):
            adapters.append(
                {
                    "index": index,
                    "class": type(layer).__name__,
                    **layer._adapter_config(),
                }
            )
    return {"version": RECORD_VERSION, "layers": entries, "adapters": adapters}


def restore_adaptation(obj, record):
    """Adapts and freezes `obj`, freshly rebuilt from its original config,
    as the record says; gives it its adapted class.

    Layers that the config already rebuilt as AdaLoRA layers (Sequential and
    functional models list them) are checked against the record; plain
    ones are adapted in place. The adapter weights get placeholder values:
    loading fills them.

    Raises:
        ValueError: if the rebuilt model does not have the recorded layers
            (the code that builds it changed since the file was saved), the
            record was written by a newer keras-adalora, or it is damaged
            (an entry of the wrong type, an index out of range, settings no
            adapter can have): all checked before any layer is adapted.
    """
    from keras_adalora.layers import ADAPTED_CLASSES

    source = Source(
        f"The AdaLoRA adaptation record in the saved config of '{obj.name}'",
        "Load an undamaged copy of the file the model was saved to, or save "
        "the model again.",
    )
    source.mapping(record, "record")
    version = source.get(record, "version", "record", source.integer, 0)
    if version > RECORD_VERSION:
        raise ValueError(
            f"This model was saved by a newer keras-adalora (adaptation "
            f"record version {version}; this one reads {RECORD_VERSION}). "
            "Upgrade keras-adalora."
        )
    record = _check_record(record, source)
    layers = recorded_layers(obj)
    entries = record["layers"]
    found = [_plain_class_name(layer) for layer in layers]
    wanted = [entry["class"] for entry in entries]
    if found != wanted:
        where = next(
            (i for i, (f, w) in enumerate(zip(found, wanted)) if f != w),
            min(len(found), len(wanted)),
        )
        saved = entries[where]["path"] if where < len(entries) else "(none)"
        rebuilt = layers[where].path if where < len(layers) else "(none)"
        raise ValueError(
            f"Cannot restore the AdaLoRA adapters of '{obj.name}': rebuilt "
            f"from its config it has {len(found)} layers where the saved "
            f"model had {len(wanted)}, and they differ first at position "
            f"{where} (saved: '{saved}', rebuilt: '{rebuilt}'). The code "
            "that builds this model changed since it was saved; load it "
            "with the version of that code it was saved with."
        )
    by_name = {cls.__name__: cls for cls in ADAPTED_CLASSES}
    # Check every adapter before adapting any.
    plans = []
    adapted = set()
    for k, adapter in enumerate(record["adapters"]):
        where = f"record['adapters'][{k}]"
        index = adapter["index"]
        if index >= len(layers):
            raise source.damaged(
                f"{where} adapts the layer at index {index}, of a model of "
                f"{len(layers)} recorded layers"
            )
        if index in adapted:
            raise source.damaged(
                f"{where} adapts the layer at index {index}, which an "
                "earlier entry adapts too"
            )
        adapted.add(index)
        cls = by_name.get(adapter["class"])
        if cls is None:
            raise source.damaged(
                f"{where} names the class {short(adapter['class'])}, which is "
                f"not an AdaLoRA layer (those are {sorted(by_name)})"
            )
        layer = layers[index]
        settings = {key: adapter[key] for key in SETTINGS}
        if isinstance(layer, AdaLoRAAdapter):
            if layer._adapter_config() != settings:
                raise ValueError(
                    f"Layer '{layer.path}' was rebuilt with adapter settings "
                    f"{layer._adapter_config()}, but the saved model's were "
                    f"{settings}. The file is damaged or was edited."
                )
            continue
        try:
            cls.validate_args(**settings)
            cls.check_wrappable(layer, settings["init_rank"])
        except ValueError as error:
            raise source.damaged(
                f"{where} cannot adapt layer '{layer.path}' ({error})"
            ) from None
        plans.append((cls, layer, settings))
    for cls, layer, settings in plans:
        cls.adapt_in_place(layer, **settings)
    for layer, entry in zip(layers, entries):
        layer.trainable = entry["trainable"]
    for layer, entry in zip(layers, entries):
        frozen = set(entry["frozen_variables"])
        for variable in _keras.own_variables(layer)[0]:
            if variable.name in frozen:
                variable.trainable = False
    refresh_tracked_parameters(obj)
    return mark_adapted(obj)


def _check_record(record, source):
    """The adaptation record read from a saved config (a JSON object), every
    entry's type checked (the settings' values are the adapter's own to
    check)."""
    get = source.get
    layers = []
    for k, entry in enumerate(get(record, "layers", "record", source.sequence)):
        where = f"record['layers'][{k}]"
        source.mapping(entry, where)
        frozen = get(entry, "frozen_variables", where, source.sequence)
        for j, name in enumerate(frozen):
            source.text(name, f"{where}['frozen_variables'][{j}]")
        layers.append(
            {
                "path": get(entry, "path", where, source.text),
                "class": get(entry, "class", where, source.text),
                "trainable": get(entry, "trainable", where, source.flag),
                "frozen_variables": frozen,
            }
        )
    adapters = []
    for k, entry in enumerate(
        get(record, "adapters", "record", source.sequence)
    ):
        where = f"record['adapters'][{k}]"
        source.mapping(entry, where)
        adapters.append(
            {
                "index": get(entry, "index", where, source.integer),
                "class": get(entry, "class", where, source.text),
                "init_rank": get(entry, "init_rank", where, source.integer),
                "alpha": get(
                    entry, "alpha", where, source.number, optional=True
                ),
                "dropout": get(entry, "dropout", where, source.number),
                "orth_reg_weight": get(
                    entry, "orth_reg_weight", where, source.number
                ),
                **read_settings_since_0_2(entry, where, source),
                "adapter_rank": get(
                    entry, "adapter_rank", where, source.integer
                ),
            }
        )
    return {"layers": layers, "adapters": adapters}
