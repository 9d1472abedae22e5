"""Adapter files: save what AdaLoRA added to a model, apply it to another copy.

`save_adapter(model, "name.adalora.h5")` writes a small HDF5 file (readable
with `h5py` alone, no Keras needed) that holds only what fine-tuning
produced on top of the pretrained base model:

- root attribute `metadata`: a JSON object with
  - `format` (`"keras-adalora-adapter"`) and `format_version` (1),
  - `keras_adalora_version`, `keras_version`, `backend` (of the saving run),
  - `rank_pattern`: `{layer path: active rank}`,
  - `num_weighted_layers`: how many layers of the model own weights,
  - `adapters`: one entry per adapted layer, in model order: its `path`, its
    `index` among the model's layers that own weights, `base_class`
    (`Dense`, `EinsumDense` or `Embedding`), `kernel_shape`, `init_rank`,
    `alpha`, `dropout`, `orth_reg_weight`, `adapter_rank` (smaller than
    `init_rank` once compacted) and `active_rank`;
  - `trained`: the other layers that were trained (a KerasHub task's head,
    layers kept trainable with `keep_trainable`): `path`, `index`, `class`,
    and each weight's `name` and `shape`;
- datasets `adapters/<k>/adalora_A`, `adalora_lam`, `adalora_B`,
  `rank_mask` (float32) for the k-th adapted layer;
- datasets `trained/<k>/<weight name>` for the k-th trained layer.

The frozen pretrained weights are not in the file: `load_adapter` applies
it to a fresh copy of the same base model.
"""

import json
import os

import keras
import numpy as np

from keras_adalora._arrays import to_numpy
from keras_adalora import _keras
from keras_adalora._backend import refresh_tracked_parameters
from keras_adalora._backend import reset_compiled_state
from keras_adalora.adapted_model import mark_adapted
from keras_adalora.adapter import A_NAME
from keras_adalora.adapter import B_NAME
from keras_adalora.adapter import LAM_NAME
from keras_adalora.adapter import MASK_NAME
from keras_adalora.adapter import AdaLoRAAdapter
from keras_adalora.apply import freeze_all_but
from keras_adalora.quantization import kernel_shape
from keras_adalora.targets import adaptable_kinds
from keras_adalora.targets import adapter_classes
from keras_adalora.targets import adapted_layers
from keras_adalora.targets import layer_path
from keras_adalora.targets import require_adapted_layers

FORMAT = "keras-adalora-adapter"
FORMAT_VERSION = 1
SUFFIX = ".adalora.h5"
_ADAPTER_WEIGHTS = (A_NAME, LAM_NAME, B_NAME, MASK_NAME)


def save_adapter(model, filepath, overwrite=True):
    """Saves the AdaLoRA adapters of `model`, and nothing of its base, to a file.

    The file holds each adapted layer's `A`, `lam`, `B` and rank mask, its
    configuration and the base layer's name and kernel shape, the rank
    pattern, and the weights of the layers that trained fully (a KerasHub
    task's head, `keep_trainable` layers). It is a few hundred kB for a
    BERT-sized model where `model.save` writes the whole model. A compacted
    model (`compact_adalora`) saves compacted. The layout is documented in
    `keras_adalora.saving`.

    Args:
        model: a model adapted with `apply_adalora`.
        filepath: where to write; must end in `.adalora.h5`.
        overwrite: whether to replace an existing file.

    Example:

    >>> import os, tempfile
    >>> def base():
    ...     return keras.Sequential([
    ...         keras.Input((8,)), keras.layers.Dense(4, name="hidden")])
    >>> model = apply_adalora(base(), init_rank=2)
    >>> path = os.path.join(tempfile.mkdtemp(), "mlp.adalora.h5")
    >>> keras_adalora.save_adapter(model, path)
    >>> fresh = keras_adalora.load_adapter(base(), path)
    >>> list(get_rank_pattern(fresh).values())
    [2]
    """
    layers = require_adapted_layers(model, "save_adapter")
    filepath = _check_filepath(filepath, "save_adapter")
    if not overwrite and os.path.exists(filepath):
        raise FileExistsError(
            f"`filepath`={filepath!r} exists and overwrite=False. Pass "
            "overwrite=True to replace it, or another path."
        )
    import h5py

    weighted = _weighted_layers(model)
    index = {id(layer): i for i, layer in enumerate(weighted)}
    adapters = []
    for layer in layers:
        adapters.append(
            {
                "path": layer_path(layer),
                "index": index[id(layer)],
                "base_class": layer.wrapped_class.__name__,
                "kernel_shape": list(kernel_shape(layer)),
                "init_rank": layer.init_rank,
                "alpha": layer.alpha,
                "dropout": layer.dropout,
                "orth_reg_weight": layer.orth_reg_weight,
                "adapter_rank": layer.adapter_rank,
                "active_rank": layer.active_rank,
            }
        )
    trained_layers = _trained_layers(weighted)
    trained = []
    for layer in trained_layers:
        trained.append(
            {
                "path": layer_path(layer),
                "index": index[id(layer)],
                "class": type(layer).__name__,
                "weights": [
                    {"name": name, "shape": list(variable.shape)}
                    for name, variable in _own_weights(layer)
                ],
            }
        )
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "keras_adalora_version": _version(),
        "keras_version": keras.__version__,
        "backend": keras.backend.backend(),
        "rank_pattern": {a["path"]: a["active_rank"] for a in adapters},
        "num_weighted_layers": len(weighted),
        "adapters": adapters,
        "trained": trained,
    }
    with h5py.File(filepath, "w") as f:
        f.attrs["metadata"] = json.dumps(metadata)
        for k, layer in enumerate(layers):
            group = f.create_group(f"adapters/{k}")
            for name, variable in layer._adapter_variables().items():
                group.create_dataset(name, data=to_numpy(variable))
        for k, layer in enumerate(trained_layers):
            group = f.create_group(f"trained/{k}")
            for name, variable in _own_weights(layer):
                group.create_dataset(name, data=to_numpy(variable))


def load_adapter(model, filepath):
    """Applies an adapter file written by `save_adapter` to a base model.

    `model` must be a fresh copy of the base model the adapter was trained
    on (same architecture and pretrained weights, no AdaLoRA layer yet),
    e.g. `keras_hub.models.BertTextClassifier.from_preset(..., num_classes=2)`
    again. The layers named in the file are adapted with the saved
    configuration and weights (compacted ones stay compacted), the trained
    layers (a task head) get their saved weights, and everything else is
    frozen as `apply_adalora` leaves it: the model computes what the saved
    one did, and can train on.

    Layers are found by path; if some path is missing (a model built with
    automatic layer names in another order), by their position among the
    layers that own weights. Everything is checked before the model
    changes: a missing layer, another kind of layer or another kernel shape
    raises an error naming the layer, and leaves `model` untouched.

    Args:
        model: the base model, built.
        filepath: an `.adalora.h5` file written by `save_adapter`.

    Returns:
        `model`, adapted in place.
    """
    filepath = _check_filepath(filepath, "load_adapter")
    if not os.path.exists(filepath):
        raise FileNotFoundError(
            f"`filepath`={filepath!r} does not exist. Pass the path that "
            "`save_adapter` wrote."
        )
    existing = adapted_layers(model)
    if existing:
        raise ValueError(
            f"Model '{model.name}' already holds AdaLoRA layers (e.g. "
            f"'{layer_path(existing[0])}'); `load_adapter` applies an adapter "
            "to the base model. Pass a fresh copy of the base model, or "
            "`merge_adalora(model)` first to fold the current adapters in."
        )
    metadata, adapter_values, trained_values = _read(filepath)
    weighted = _weighted_layers(model)
    records = metadata["adapters"] + metadata["trained"]
    targets = _match_layers(model, weighted, records, metadata, filepath)
    n_adapters = len(metadata["adapters"])

    # Check everything before changing anything.
    plans = []
    for record, layer, values in zip(
        metadata["adapters"], targets[:n_adapters], adapter_values
    ):
        plans.append(_plan_adapter(record, layer, values))
    trained_targets = targets[n_adapters:]
    for record, layer, values in zip(
        metadata["trained"], trained_targets, trained_values
    ):
        _check_trained(record, layer, values)

    for cls, layer, kwargs in plans:
        cls.adapt_in_place(layer, **kwargs)
    for layer, values in zip(trained_targets, trained_values):
        for name, variable in _own_weights(layer):
            variable.assign(values[name])
    freeze_all_but(model, targets)
    refresh_tracked_parameters(model)
    reset_compiled_state(model)
    return mark_adapted(model)


def _check_filepath(filepath, caller):
    filepath = os.fspath(filepath)
    if not str(filepath).endswith(SUFFIX):
        raise ValueError(
            f"`{caller}` reads and writes adapter files whose name ends in "
            f"'{SUFFIX}'. Received: filepath={filepath!r}"
        )
    return filepath


def _version():
    from keras_adalora import __version__

    return __version__



def _weighted_layers(model):
    """The layers below `model` (or `model` itself) that own variables, in
    model order: the positions `save_adapter` records."""
    return [
        layer
        for layer in _keras.sublayers(model, include_self=True)
        if any(_keras.own_variables(layer))
    ]


def _own_weights(layer):
    """`(name, variable)` pairs of the variables `layer` itself owns."""
    named = []
    seen = {}
    for variable in sum(_keras.own_variables(layer), []):
        name = variable.name
        if name in seen:
            seen[name] += 1
            name = f"{name}_{seen[name]}"
        else:
            seen[name] = 0
        named.append((name, variable))
    return named


def _trained_layers(weighted):
    """The layers, other than adapted ones, that own a trainable variable."""
    return [
        layer
        for layer in weighted
        if not isinstance(layer, AdaLoRAAdapter)
        and layer.trainable
        and any(v.trainable for v in _keras.own_variables(layer)[0])
    ]


def _read(filepath):
    import h5py

    with h5py.File(filepath, "r") as f:
        if "metadata" not in f.attrs:
            raise ValueError(
                f"{filepath!r} is not an adapter file written by "
                "`keras_adalora.save_adapter` (it has no 'metadata')."
            )
        metadata = json.loads(f.attrs["metadata"])
        if metadata.get("format") != FORMAT:
            raise ValueError(
                f"{filepath!r} is not a keras-adalora adapter file "
                f"(format={metadata.get('format')!r})."
            )
        if metadata.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(
                f"{filepath!r} was written by a newer keras-adalora "
                f"({metadata.get('keras_adalora_version')}, format version "
                f"{metadata['format_version']}); this one reads format "
                f"version {FORMAT_VERSION}. Upgrade keras-adalora."
            )
        adapters = [
            {name: np.asarray(f[f"adapters/{k}/{name}"]) for name in _ADAPTER_WEIGHTS}
            for k in range(len(metadata["adapters"]))
        ]
        trained = [
            {
                w["name"]: np.asarray(f[f"trained/{k}/{w['name']}"])
                for w in record["weights"]
            }
            for k, record in enumerate(metadata["trained"])
        ]
    return metadata, adapters, trained


def _match_layers(model, weighted, records, metadata, filepath):
    """The model's layer for each record: by path, else by position."""
    by_path = {}
    for layer in weighted:
        by_path.setdefault(layer_path(layer), layer)
    if all(record["path"] in by_path for record in records):
        return [by_path[record["path"]] for record in records]
    saved = metadata["num_weighted_layers"]
    if len(weighted) != saved:
        missing = next(r["path"] for r in records if r["path"] not in by_path)
        raise ValueError(
            f"The adapter in {filepath!r} does not fit model '{model.name}': "
            f"it has no layer '{missing}', and it has {len(weighted)} layers "
            f"with weights where the adapter's base model had {saved}. Load "
            "the adapter into a copy of the base model it was trained on."
        )
    return [weighted[record["index"]] for record in records]


def _describe(layer):
    adaptable = isinstance(layer, adaptable_kinds()) and layer.built
    shape = f" with kernel {kernel_shape(layer)}" if adaptable else ""
    return f"'{layer_path(layer)}' ({type(layer).__name__}{shape})"


def _plan_adapter(record, layer, values):
    """Checks that `layer` can take the saved adapter; returns what
    `adapt_in_place` needs."""
    where = f"Adapter for layer '{record['path']}'"
    cls = adapter_classes().get(type(layer))
    if cls is None or cls.wrapped_class.__name__ != record["base_class"]:
        raise ValueError(
            f"{where} (a {record['base_class']} with kernel "
            f"{tuple(record['kernel_shape'])}) does not fit this model: its "
            f"layer there is {_describe(layer)}. Load the adapter into a "
            "copy of the base model it was trained on."
        )
    if kernel_shape(layer) != tuple(record["kernel_shape"]):
        raise ValueError(
            f"{where} was trained on a kernel of shape "
            f"{tuple(record['kernel_shape'])}, but this model's layer "
            f"{_describe(layer)} differs. Load the adapter into a copy of the "
            "base model it was trained on."
        )
    try:
        cls.check_wrappable(layer, record["init_rank"])
    except ValueError as error:
        raise ValueError(f"{where} cannot be applied: {error}") from None
    d_in, d_out = cls._adapter_matrix_shape(layer)
    rank = record["adapter_rank"]
    expected = {
        A_NAME: (d_in, rank),
        LAM_NAME: (rank,),
        B_NAME: (rank, d_out),
        MASK_NAME: (rank,),
    }
    for name, shape in expected.items():
        if tuple(values[name].shape) != shape:
            raise ValueError(
                f"{where}: the file's '{name}' has shape "
                f"{tuple(values[name].shape)}, expected {shape}. The file is "
                "damaged or was edited."
            )
    kwargs = {
        key: record[key]
        for key in ("init_rank", "alpha", "dropout", "orth_reg_weight")
    }
    kwargs.update(adapter_rank=rank, initial_values=values)
    return cls, layer, kwargs


def _check_trained(record, layer, values):
    where = f"Trained layer '{record['path']}'"
    if type(layer).__name__ != record["class"]:
        raise ValueError(
            f"{where} (a {record['class']}) does not fit this model: its "
            f"layer there is {_describe(layer)}. Load the adapter into a "
            "copy of the base model it was trained on."
        )
    own = dict(_own_weights(layer))
    extra = sorted(set(own) - {weight["name"] for weight in record["weights"]})
    if extra:
        raise ValueError(
            f"{where}: this model's layer {_describe(layer)} has weights "
            f"{extra} that the file does not hold. Load the adapter into a "
            "copy of the base model it was trained on."
        )
    for weight in record["weights"]:
        variable = own.get(weight["name"])
        if variable is None or tuple(variable.shape) != tuple(weight["shape"]):
            found = "none" if variable is None else tuple(variable.shape)
            raise ValueError(
                f"{where}: the file holds weight '{weight['name']}' of shape "
                f"{tuple(weight['shape'])}, this model's layer "
                f"{_describe(layer)} has {found}. Load the adapter into a "
                "copy of the base model it was trained on (with the same "
                "head, e.g. the same `num_classes`)."
            )
