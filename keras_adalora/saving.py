"""Adapter files: save what AdaLoRA added to a model, apply it to another copy.

`save_adapter(model, "name.adalora.h5")` writes a small HDF5 file (readable
with `h5py` alone, no Keras needed) that holds only what fine-tuning
produced on top of the pretrained base model:

- root attribute `metadata`: a JSON object (UTF-8 bytes) with
  - `format` (`"keras-adalora-adapter"`) and `format_version` (2),
  - `keras_adalora_version`, `keras_version`, `backend` (of the saving run),
  - `rank_pattern`: `{layer path: active rank}`,
  - `num_weighted_layers`: how many layers of the model own weights,
  - `adapters`: one entry per adapted layer, in model order: its `path`, its
    `index` among the model's layers that own weights, `base_class`
    (`Dense`, `EinsumDense` or `Embedding`), `kernel_shape`, `init_rank`,
    `alpha`, `dropout`, `orth_reg_weight`, `factor_init`, `orth_penalty`
    (absent in format version 1: `"orthogonal"` and `"squared"`),
    `adapter_rank` (smaller than
    `init_rank` once compacted) and `active_rank`;
  - `trained`: the other layers that were trained (a KerasHub task's head,
    layers kept trainable with `keep_trainable`): `path`, `index`, `class`,
    and each weight's `name` and `shape`;
- datasets `adapters/<k>/adalora_A`, `adalora_lam`, `adalora_B`,
  `rank_mask` (float32) for the k-th adapted layer;
- datasets `trained/<k>/<weight name>` for the k-th trained layer.

The frozen pretrained weights are not in the file: `load_adapter` applies
it to a fresh copy of the same base model.

The file is written in HDF5 1.10's format, whose structures (object
headers, where the metadata lives, and indexes) carry checksums, and every
non-empty dataset carries a Fletcher-32 checksum: a damaged byte fails to
read instead of changing a number. `load_adapter` reads a file as coming
from anyone: it checks every metadata entry's type, every dataset's dtype
and declared shape (against the model, before reading it) and its values
(finite), refuses datasets, groups or links it does not read, and changes
the model only once everything is checked.
"""

import json
import os

import keras
import numpy as np

from keras_adalora import _keras
from keras_adalora._arrays import to_numpy
from keras_adalora._backend import refresh_tracked_parameters
from keras_adalora._backend import reset_compiled_state
from keras_adalora._untrusted import Source
from keras_adalora._untrusted import short
from keras_adalora.adapted_model import mark_adapted
from keras_adalora.adapter import A_NAME
from keras_adalora.adapter import B_NAME
from keras_adalora.adapter import LAM_NAME
from keras_adalora.adapter import MASK_NAME
from keras_adalora.adapter import SETTINGS
from keras_adalora.adapter import read_settings_since_0_2
from keras_adalora.adapter import AdaLoRAAdapter
from keras_adalora.apply import freeze_all_but
from keras_adalora.quantization import kernel_shape
from keras_adalora.targets import adaptable_kinds
from keras_adalora.targets import adapter_classes
from keras_adalora.targets import adapted_layers
from keras_adalora.targets import layer_path
from keras_adalora.targets import require_adapted_layers

FORMAT = "keras-adalora-adapter"
FORMAT_VERSION = 2
SUFFIX = ".adalora.h5"
_ADAPTER_WEIGHTS = (A_NAME, LAM_NAME, B_NAME, MASK_NAME)
# The oldest HDF5 whose formats checksum every structure (see module doc);
# every h5py 3 wheel ships a newer one.
_HDF5_FORMAT = "v110"
# NumPy's dtype kinds of the weights a file may hold: floats, and integers
# and booleans in a quantized trained layer.
_NUMBERS = "fiub"
_FIX = (
    "Load an undamaged copy of the file, or save the adapter again with "
    "`keras_adalora.save_adapter`."
)


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
                **layer._adapter_config(),
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
    with h5py.File(filepath, "w", libver=_HDF5_FORMAT) as f:
        # Fixed-length bytes: a variable-length string would live in HDF5's
        # global heap, which has no checksum.
        f.attrs["metadata"] = np.bytes_(json.dumps(metadata).encode("utf-8"))
        for k, layer in enumerate(layers):
            group = f.create_group(f"adapters/{k}")
            for name, variable in layer._adapter_variables().items():
                _write_dataset(group, name, to_numpy(variable))
        for k, layer in enumerate(trained_layers):
            group = f.create_group(f"trained/{k}")
            for name, variable in _own_weights(layer):
                _write_dataset(group, name, to_numpy(variable))


def _write_dataset(group, name, value):
    # Fletcher-32 needs chunked storage, which an empty or scalar dataset
    # cannot have; its shape alone, in the checksummed header, is all it holds.
    checked = value.ndim > 0 and value.size > 0
    group.create_dataset(name, data=value, fletcher32=checked)


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

    The file may come from anyone: a truncated or damaged file, a metadata
    entry of the wrong type or size, a dataset of another dtype or shape, or
    holding NaN or infinite values, a missing dataset, and any dataset, group
    or link the file should not hold (unknown entries are refused, not
    ignored) raise a `ValueError` naming the file and the entry, and leave
    `model` untouched.

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
    source = Source(f"Adapter file {filepath!r}", _FIX)
    with _open(filepath, source) as f:
        metadata = _read_metadata(f, source)
        datasets = _find_datasets(f, metadata, source)
        weighted = _weighted_layers(model)
        records = metadata["adapters"] + metadata["trained"]
        targets = _match_layers(
            model, weighted, records, metadata, filepath, source
        )
        n_adapters = len(metadata["adapters"])

        # Check everything before changing anything; the datasets' declared
        # shapes before reading them (a damaged file may declare billions).
        plans = []
        for record, layer, values in zip(
            metadata["adapters"], targets[:n_adapters], datasets["adapters"]
        ):
            where = f"The adapter for layer '{record['path']}' in {filepath!r}"
            plans.append(_plan_adapter(record, layer, values, where))
        trained_targets = targets[n_adapters:]
        for record, layer, values in zip(
            metadata["trained"], trained_targets, datasets["trained"]
        ):
            _check_trained(record, layer, values, filepath)
        # Everything fits: read the numbers (each checked finite).
        for _, _, kwargs in plans:
            kwargs["initial_values"] = _read_values(
                kwargs["initial_values"], source
            )
        trained_values = [
            _read_values(values, source) for values in datasets["trained"]
        ]

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


def _open(filepath, source):
    import h5py

    try:
        return h5py.File(filepath, "r")
    except OSError as error:
        raise source.unreadable(error) from None


def _read_metadata(f, source):
    """The file's metadata, every entry that `load_adapter` uses checked.
    Informational entries (`rank_pattern`, versions, `backend`,
    `active_rank`) are not read."""
    try:
        text = f.attrs["metadata"]
    except KeyError:
        raise ValueError(
            f"{source.name} is not an adapter file written by "
            "`keras_adalora.save_adapter` (it has no 'metadata'). Pass a "
            "file that `save_adapter` wrote."
        ) from None
    except OSError as error:
        raise source.unreadable(error) from None
    if not isinstance(text, (str, bytes)):  # written as str before bytes
        raise source.damaged(
            f"its 'metadata' attribute must be JSON text; it is a "
            f"{type(text).__name__}"
        )
    metadata = source.mapping(source.parse_json(text, "metadata"), "metadata")
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"{source.name} is not a keras-adalora adapter file "
            f"(format={short(metadata.get('format'))}). Pass a file that "
            "`keras_adalora.save_adapter` wrote."
        )
    version = source.get(
        metadata, "format_version", "metadata", source.integer, default=0
    )
    if version > FORMAT_VERSION:
        raise ValueError(
            f"{source.name} was written by a newer keras-adalora "
            f"({short(metadata.get('keras_adalora_version'))}, format version "
            f"{version}); this one reads format version {FORMAT_VERSION}. "
            "Upgrade keras-adalora."
        )
    adapters = source.get(metadata, "adapters", "metadata", source.sequence)
    trained = source.get(metadata, "trained", "metadata", source.sequence)
    return {
        "adapters": [
            _adapter_record(entry, f"metadata['adapters'][{k}]", source)
            for k, entry in enumerate(adapters)
        ],
        "trained": [
            _trained_record(entry, f"metadata['trained'][{k}]", source)
            for k, entry in enumerate(trained)
        ],
        "num_weighted_layers": source.get(
            metadata, "num_weighted_layers", "metadata", source.integer
        ),
    }


def _adapter_record(entry, where, source):
    """One `adapters` entry, its types checked (its values are checked
    against the layer by `_plan_adapter`)."""
    source.mapping(entry, where)
    get = source.get
    return {
        "path": get(entry, "path", where, source.text),
        "index": get(entry, "index", where, source.integer),
        "base_class": get(entry, "base_class", where, source.text),
        "kernel_shape": get(entry, "kernel_shape", where, source.shape),
        "init_rank": get(entry, "init_rank", where, source.integer),
        "alpha": get(entry, "alpha", where, source.number, optional=True),
        "dropout": get(entry, "dropout", where, source.number),
        "orth_reg_weight": get(entry, "orth_reg_weight", where, source.number),
        **read_settings_since_0_2(entry, where, source),
        "adapter_rank": get(entry, "adapter_rank", where, source.integer),
    }


def _trained_record(entry, where, source):
    source.mapping(entry, where)
    weights = []
    names = set()
    for k, weight in enumerate(
        source.get(entry, "weights", where, source.sequence)
    ):
        at = f"{where}['weights'][{k}]"
        source.mapping(weight, at)
        name = source.get(weight, "name", at, source.text)
        if name in names:
            raise source.damaged(f"{where} lists weight '{name}' twice")
        names.add(name)
        shape = source.get(weight, "shape", at, source.shape)
        weights.append({"name": name, "shape": shape})
    return {
        "path": source.get(entry, "path", where, source.text),
        "index": source.get(entry, "index", where, source.integer),
        "class": source.get(entry, "class", where, source.text),
        "weights": weights,
    }


def _find_datasets(f, metadata, source):
    """`{"adapters": [{name: dataset}], "trained": [...]}`, the datasets the
    metadata calls for, unread. Raises if one is missing, a link, or not a
    plain dataset of numbers stored in the file, or if the file holds
    anything else."""
    import h5py

    wanted = {"adapters": [], "trained": []}
    for k in range(len(metadata["adapters"])):
        wanted["adapters"].append(
            {name: f"adapters/{k}/{name}" for name in _ADAPTER_WEIGHTS}
        )
    for k, record in enumerate(metadata["trained"]):
        wanted["trained"].append(
            {w["name"]: f"trained/{k}/{w['name']}" for w in record["weights"]}
        )
    paths = {
        path
        for group in wanted.values()
        for names in group
        for path in names.values()
    }
    groups = {path.rsplit("/", 1)[0] for path in paths}
    groups |= {group.split("/")[0] for group in groups}

    # Every object reached by hard links, each once (a group linked into
    # itself too); links elsewhere are not followed. Any other name in a
    # group is a link (soft, external, or a second name): listed, never
    # resolved (it may point anywhere).
    objects, links = [], []
    try:
        f.visit(objects.append)
        names = set(objects)
        for group in ["/"] + objects:
            if isinstance(f[group], h5py.Group):
                for key in f[group].keys():
                    name = f"{group}/{key}".lstrip("/")
                    if name not in names:
                        links.append(name)
    except (OSError, RuntimeError) as error:
        raise source.unreadable(error) from None
    if links:
        raise source.damaged(
            f"it holds links {links[:4]} to other objects or files, which "
            "`save_adapter` never writes"
        )
    unknown = [name for name in objects if name not in paths | groups]
    if unknown:
        raise source.damaged(
            f"it holds {unknown[:4]}, which `load_adapter` does not read "
            "(an adapter file with entries it does not know is refused: "
            "they may be something this version would drop)"
        )
    missing = sorted(paths - names)
    if missing:
        raise source.damaged(f"it lacks the dataset '{missing[0]}'")

    found = {}
    for path in sorted(paths):
        try:
            dataset = f[path]
        except (OSError, KeyError) as error:
            raise source.unreadable(error) from None
        if (
            not isinstance(dataset, h5py.Dataset)
            or dataset.is_virtual
            or dataset.external
            or dataset.shape is None
        ):
            raise source.damaged(
                f"'{path}' is not a dataset stored in the file"
            )
        # Adapters are float32; a trained layer may be quantized (integer
        # weights), its dtypes checked against the layer's by `_check_trained`.
        kinds = "f" if path.startswith("adapters/") else _NUMBERS
        if dataset.dtype.kind not in kinds:
            raise source.damaged(
                f"dataset '{path}' holds {dataset.dtype} values, where a "
                "weight holds "
                + ("floating-point numbers" if kinds == "f" else "numbers")
            )
        found[path] = dataset
    return {
        key: [
            {name: found[path] for name, path in names.items()}
            for names in group
        ]
        for key, group in wanted.items()
    }


def _read_values(datasets, source):
    """`{name: array}` read from `{name: dataset}`, each checked finite."""
    values = {}
    for name, dataset in datasets.items():
        where = f"dataset '{dataset.name.lstrip('/')}'"
        try:
            value = dataset[()]
        except OSError as error:  # e.g. its checksum fails
            raise source.damaged(f"{where} cannot be read ({error})") from None
        values[name] = source.tensor(value, where, kinds=_NUMBERS)
    return values


def _match_layers(model, weighted, records, metadata, filepath, source):
    """The model's layer for each record: by path, else by position. No
    layer twice."""
    by_path = {}
    for layer in weighted:
        by_path.setdefault(layer_path(layer), layer)
    if all(record["path"] in by_path for record in records):
        targets = [by_path[record["path"]] for record in records]
    else:
        saved = metadata["num_weighted_layers"]
        if len(weighted) != saved:
            missing = next(
                r["path"] for r in records if r["path"] not in by_path
            )
            raise ValueError(
                f"The adapter in {filepath!r} does not fit model "
                f"'{model.name}': it has no layer '{missing}', "
                f"and it has {len(weighted)} layers with weights where the "
                f"adapter's base model had {saved}. Load the adapter into a "
                "copy of the base model it was trained on."
            )
        for record in records:
            if record["index"] >= saved:
                raise source.damaged(
                    f"layer '{record['path']}' is at index {record['index']} "
                    f"of its model's {saved} layers with weights"
                )
        targets = [weighted[record["index"]] for record in records]
    seen = set()
    for record, layer in zip(records, targets):
        if id(layer) in seen:
            raise source.damaged(
                f"it names layer '{layer_path(layer)}' twice (as "
                f"'{record['path']}' the second time)"
            )
        seen.add(id(layer))
    return targets


def _describe(layer):
    adaptable = isinstance(layer, adaptable_kinds()) and layer.built
    shape = f" with kernel {kernel_shape(layer)}" if adaptable else ""
    return f"'{layer_path(layer)}' ({type(layer).__name__}{shape})"


def _plan_adapter(record, layer, values, where):
    """Checks that `layer` can take the saved adapter (`record`, the
    adapter's settings and base layer; `values`, its weights or anything
    with their `shape`); returns what `adapt_in_place` needs. `where`
    names the adapter and the file it comes from."""
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
    settings = {key: record[key] for key in SETTINGS}
    try:
        cls.validate_args(**settings)
    except ValueError as error:
        raise ValueError(
            f"{where} has settings no adapter can have ({error}). The file "
            "is damaged or was edited."
        ) from None
    d_in, d_out = cls._adapter_matrix_shape(layer)
    if settings["init_rank"] > min(d_in, d_out):
        raise ValueError(
            f"{where} has init_rank={settings['init_rank']}, more components "
            f"than its layer's {d_in} x {d_out} kernel holds. The file is "
            "damaged or was edited."
        )
    try:
        cls.check_wrappable(layer, settings["init_rank"])
    except ValueError as error:
        raise ValueError(f"{where} cannot be applied: {error}") from None
    rank = settings["adapter_rank"]
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
    return cls, layer, {**settings, "initial_values": values}


def _check_trained(record, layer, values, filepath):
    where = f"Trained layer '{record['path']}' in {filepath!r}"
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
        if variable is None or tuple(variable.shape) != weight["shape"]:
            found = "none" if variable is None else tuple(variable.shape)
            raise ValueError(
                f"{where}: the file holds weight '{weight['name']}' of shape "
                f"{weight['shape']}, this model's layer "
                f"{_describe(layer)} has {found}. Load the adapter into a "
                "copy of the base model it was trained on (with the same "
                "head, e.g. the same `num_classes`)."
            )
        dataset = values[weight["name"]]
        if tuple(dataset.shape) != weight["shape"]:
            raise ValueError(
                f"{where}: the file's dataset for weight '{weight['name']}' "
                f"has shape {tuple(dataset.shape)} where its metadata says "
                f"{weight['shape']}. The file is damaged or was edited."
            )
        dtype = keras.backend.standardize_dtype(variable.dtype)
        kind = "f" if "float" in dtype else np.dtype(dtype).kind
        if dataset.dtype.kind != kind:
            raise ValueError(
                f"{where}: the file's dataset for weight '{weight['name']}' "
                f"holds {dataset.dtype} values, where the layer's weight is "
                f"{dtype}. The file is damaged or was edited."
            )
