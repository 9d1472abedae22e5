"""PEFT adapters: AdaLoRA adapters out to Hugging Face, PEFT adapters in.

A compacted AdaLoRA adapter is a LoRA adapter with a rank per layer:

    delta_W = A @ diag(c) @ B,   c = (alpha / init_rank) * lam * rank_mask

over the alive components is `(lora_B @ lora_A).T` with
`lora_A = diag(sqrt|c|) A.T` and `lora_B = B.T diag(sign(c) sqrt|c|)` at
PEFT scaling 1 (`lora_alpha = r` per module). `export_peft` writes that as
the two files of a PEFT LoRA adapter (`adapter_config.json`,
`adapter_model.safetensors`) under the Hugging Face module names of the
model's family (`keras_adalora.hf_families`); `import_peft` reads a PEFT
LoRA or AdaLoRA adapter back onto a KerasHub model.
"""

import hashlib
import json
import os
import re
import warnings

import keras
import numpy as np

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
from keras_adalora.adapter import layer_orth_reg_weight
from keras_adalora.adapter import LookupTableMixin
from keras_adalora.apply import freeze_all_but
from keras_adalora.hf_families import identify
from keras_adalora.quantization import kernel_shape
from keras_adalora.saving import _plan_adapter
from keras_adalora.saving import _trained_layers
from keras_adalora.saving import _weighted_layers
from keras_adalora.targets import adapter_classes
from keras_adalora.targets import adapted_layers
from keras_adalora.targets import layer_path
from keras_adalora.targets import require_adapted_layers

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_KEY_PREFIX = "base_model.model."
# The safetensors metadata entry where `export_peft` records each tensor's
# SHA-256 (the format has no checksum of its own); PEFT ignores it.
_CHECKSUMS = "keras_adalora_sha256"
_FIX = (
    "Import an undamaged copy of the folder PEFT's `save_pretrained` (or "
    "`export_peft`) wrote."
)
# PEFT's AdaLoRA divides by `ranknum + 1e-5`.
_ADALORA_EPS = 1e-5
# PEFT options whose adapters are not `x @ (lora_B @ lora_A).T * scaling`.
_REFUSED_OPTIONS = {
    "use_dora": "DoRA rescales the merged weight by a learned magnitude",
    "lora_bias": "lora_bias adds a trained bias to lora_B",
    "use_qalora": "QALoRA pools the inputs of lora_A",
    "layer_replication": "layer_replication duplicates decoder layers",
    "target_parameters": "target_parameters adapts raw parameters, not modules",
    "trainable_token_indices": "trainable_token_indices trains embedding rows",
}


def export_peft(model, directory, base_model_name_or_path=None, overwrite=True):
    """Writes the AdaLoRA adapters of a KerasHub model as a PEFT LoRA adapter.

    The directory gets PEFT's two files: `adapter_config.json` (a
    `LoraConfig`: `target_modules`, `r`, `lora_alpha`, a `rank_pattern` and
    `alpha_pattern` per module, `task_type` for a task) and
    `adapter_model.safetensors` (`lora_A.weight (r, in)` and
    `lora_B.weight (out, r)` per module, `lora_embedding_A/B` for an
    embedding), under the Hugging Face module names of the model's
    `transformers` twin, so that

        model = transformers.AutoModelForCausalLM.from_pretrained(base)
        model = peft.PeftModel.from_pretrained(model, directory)

    computes what the Keras model computes (the safetensors metadata also
    records each tensor's SHA-256, which `import_peft` checks). Each
    module's rank is its
    active rank; pruned components and layers pruned to rank 0 are left out.
    GPT-2's query, key and value adapters go into its fused `c_attn` (rank
    the sum of theirs). A task's trained head goes as `modules_to_save`
    where Hugging Face has a layer of the same shape
    (`BertTextClassifier`'s `logits` as `classifier`: load the Hugging Face
    model with `num_labels=num_classes`). Other layers trained fully (e.g.
    with `keep_trainable`) have no place in a LoRA adapter: they are left
    out, with a warning naming them.

    Families (`keras_adalora.hf_families`): BERT (`BertBackbone`,
    `BertTextClassifier` as `BertForSequenceClassification`), GPT-2
    (`GPT2CausalLM` as `GPT2LMHeadModel`), Llama and Llama 3
    (`LlamaCausalLM` as `LlamaForCausalLM`), Mistral and Gemma (their
    `...CausalLM` as `...ForCausalLM`); a backbone alone exports for the
    Hugging Face base model (`LlamaModel`, ...).

    The Keras model is not changed. The numbers are float32.

    Args:
        model: a KerasHub backbone or task adapted with `apply_adalora`.
        directory: the folder to write (created if needed).
        base_model_name_or_path: recorded in the config for PEFT to find the
            base model (a Hugging Face id or folder), e.g.
            `"meta-llama/Llama-3.2-1B"`.
        overwrite: whether to replace an adapter already in `directory`.

    Returns:
        The adapter configuration written, as a dict.

    Raises:
        ValueError: before writing anything, for a model of a family
            without a table, or an adapted layer that has no Hugging Face
            module in it (named).

    Example:

    >>> import tempfile
    >>> def gpt2():
    ...     return keras_hub.models.GPT2Backbone(
    ...         vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=8,
    ...         intermediate_dim=16, max_sequence_length=8)
    >>> backbone = apply_adalora(gpt2(), init_rank=2, target="all")
    >>> config = export_peft(backbone, tempfile.mkdtemp())
    >>> config["rank_pattern"]  # query, key and value fused in c_attn
    {'h.0.mlp.c_proj': 2, 'h.0.mlp.c_fc': 2, 'h.0.attn.c_proj': 2, 'h.0.attn.c_attn': 6}
    """
    layers = require_adapted_layers(model, "export_peft")
    family, task = identify(model, "export_peft")
    prefix = task.prefix if task is not None else ""
    directory = os.fspath(directory)
    if not overwrite:
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            path = os.path.join(directory, name)
            if os.path.exists(path):
                raise FileExistsError(
                    f"{path!r} exists and overwrite=False. Pass "
                    "overwrite=True to replace it, or another directory."
                )
    save_file = _safetensors("export_peft").numpy.save_file

    modules = {}
    unmapped = []
    for layer in layers:
        hit = family.hf_module(layer_path(layer))
        if hit is None:
            unmapped.append(layer_path(layer))
            continue
        module, part, parts = hit
        modules.setdefault(module, {"parts": parts, "layers": {}})
        modules[module]["layers"][part] = layer
    if unmapped:
        raise ValueError(
            f"`export_peft` has no Hugging Face module for the adapted "
            f"layers {unmapped} of {family.name} model '{model.name}' (see "
            "`keras_adalora.hf_families` for the layers it maps). Adapt "
            "only mapped layers (e.g. target='all'), or keep this adapter "
            "in Keras with `keras_adalora.save_adapter`."
        )

    tensors = {}
    ranks = {}
    target_modules = []
    for module, entry in modules.items():
        factors = _lora_factors(entry["layers"], entry["parts"])
        rank = factors[0].shape[0]
        if rank == 0:
            continue
        name = prefix + module
        embedding = isinstance(
            next(iter(entry["layers"].values())), LookupTableMixin
        )
        a_key, b_key = (
            ("lora_embedding_A", "lora_embedding_B")
            if embedding
            else ("lora_A.weight", "lora_B.weight")
        )
        tensors[f"{_KEY_PREFIX}{name}.{a_key}"] = factors[0]
        tensors[f"{_KEY_PREFIX}{name}.{b_key}"] = factors[1]
        ranks[name] = rank
        target_modules.append(name)

    heads = task.heads if task is not None else {}
    saved_heads = []
    left_out = []
    for layer in _trained_layers(_weighted_layers(model)):
        path = layer_path(layer)
        head = next((m for p, m in heads.items() if _path_is(path, p)), None)
        if head is None or not _is_dense_head(layer):
            left_out.append(path)
            continue
        kernel = to_numpy(layer.kernel)
        tensors[f"{_KEY_PREFIX}{head}.weight"] = np.ascontiguousarray(kernel.T)
        if layer.bias is not None:
            tensors[f"{_KEY_PREFIX}{head}.bias"] = to_numpy(layer.bias)
        saved_heads.append(head)
    if left_out:
        warnings.warn(
            f"`export_peft` leaves out the fully trained layers {left_out}: "
            f"a PEFT LoRA adapter of {family.name} has no place for them, so "
            "the exported adapter computes like the Keras model with those "
            "layers as they were before training. Keep them with "
            "`keras_adalora.save_adapter`, or train them as adapted layers.",
            stacklevel=2,
        )

    r = max(ranks.values(), default=0)
    dropouts = [layer.dropout for layer in layers]
    config = {
        "peft_type": "LORA",
        "task_type": task.task_type if task is not None else None,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": r,
        "lora_alpha": r,
        "lora_dropout": max(dropouts),
        "target_modules": target_modules,
        "rank_pattern": dict(ranks),
        "alpha_pattern": dict(ranks),
        "modules_to_save": saved_heads or None,
        "fan_in_fan_out": family.fan_in_fan_out,
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
    }
    tensors = {
        key: np.ascontiguousarray(value, dtype="float32")
        for key, value in tensors.items()
    }
    checksums = {key: _sha256(value) for key, value in tensors.items()}
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    save_file(
        tensors,
        os.path.join(directory, WEIGHTS_NAME),
        metadata={"format": "pt", _CHECKSUMS: json.dumps(checksums)},
    )
    return config


def _sha256(value):
    return hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()


def _lora_factors(parts_layers, parts):
    """`(lora_A (r, in), lora_B (out, r))` of one Hugging Face module from
    the adapters of its `parts` output slices (absent slices are zero)."""
    a_blocks, b_blocks = [], []
    width = None
    for part in range(parts):
        layer = parts_layers.get(part)
        if layer is None:
            a_blocks.append(None)
            b_blocks.append(None)
            continue
        a = to_numpy(layer.adalora_a).astype("float64")
        b = to_numpy(layer.adalora_b).astype("float64")
        c = layer.scale * to_numpy(layer.adalora_lam).astype("float64")
        alive = to_numpy(layer.rank_mask) > 0.5
        a, b, c = a[:, alive], b[alive, :], c[alive]
        root = np.sqrt(np.abs(c))
        a_blocks.append((a * root).T)
        b_blocks.append(b.T * (np.sign(c) * root))
        width = b.shape[1]
    d_in = next(block.shape[1] for block in a_blocks if block is not None)
    rank = sum(block.shape[0] for block in a_blocks if block is not None)
    lora_a = np.zeros((rank, d_in))
    lora_b = np.zeros((width * parts, rank))
    start = 0
    for part, (a, b) in enumerate(zip(a_blocks, b_blocks)):
        if a is None:
            continue
        stop = start + a.shape[0]
        lora_a[start:stop] = a
        lora_b[part * width : (part + 1) * width, start:stop] = b
        start = stop
    return lora_a.astype("float32"), lora_b.astype("float32")


def import_peft(model, directory):
    """Applies a PEFT LoRA or AdaLoRA adapter to a KerasHub model, in place.

    `model` is a fresh KerasHub backbone or task loaded from the same base
    model the adapter was trained on (`from_preset` on the Hugging Face
    folder or `hf://` id, no AdaLoRA layer yet). Each module of the adapter
    becomes an AdaLoRA adapter on its KerasHub layer, computing exactly what
    PEFT computes:

    - a LoRA module of rank r (`delta_W = scaling * lora_B @ lora_A`) is
      rewritten in AdaLoRA's SVD form, exactly: orthonormal `A` and `B`, its
      singular values in `lam`, all components alive, `alpha` =
      `sqrt(d_in * d_out)`, the penalty of `factor_init="orthogonal"`,
      and `init_rank` its rank: `r`, or less where the matrix holds less
      (`min(d_in, d_out)`, or a slice of GPT-2's fused `c_attn` exported
      from Keras, whose components beyond its own rank are below float32
      resolution and dropped);
    - an AdaLoRA module maps as it is: `lora_A` and `lora_B` (transposed)
      onto `A` and `B`, `lora_E` onto `lam`, its `rank_pattern` onto the
      mask (`init_rank = init_r`, the pruned components already removed, as
      `compact_adalora` leaves them), with PEFT's penalty
      (`orth_penalty="norm"`, its `orth_reg_weight` shared among the layers
      as `apply_adalora` shares it);
    - `modules_to_save` heads (`classifier` of a `BertTextClassifier`) give
      their weights to the task's head.

    Everything else is frozen as `apply_adalora` leaves it, so the model can
    train on with `RankBudgetCallback` (AdaLoRA pruning a LoRA adapter), be
    saved, compacted, merged or exported again. Everything is checked before
    the model changes: a module the family's table does not know, a shape
    that differs from the model's layer, or a PEFT option that is not plain
    LoRA (DoRA, ...) raises an error naming it, and leaves `model` untouched.
    So does a damaged or hostile folder: a file that cannot be read, a
    config entry of the wrong type or range, a tensor that is not float,
    holds NaN or infinite values, or differs from the SHA-256 that
    `export_peft` recorded, a missing tensor, and any tensor `import_peft`
    does not know (refused, not ignored); the error names the file.

    Args:
        model: a KerasHub backbone or task of a family `export_peft`
            supports, without AdaLoRA layers.
        directory: a folder holding `adapter_config.json` and
            `adapter_model.safetensors` (what PEFT's `save_pretrained`
            writes).

    Returns:
        `model`, adapted in place.

    Example:

    >>> import tempfile
    >>> def gpt2():
    ...     return keras_hub.models.GPT2Backbone(
    ...         vocabulary_size=50, num_layers=1, num_heads=2, hidden_dim=8,
    ...         intermediate_dim=16, max_sequence_length=8)
    >>> trained = apply_adalora(gpt2(), init_rank=2, target="all")
    >>> for layer in keras_adalora.targets.adapted_layers(trained):
    ...     _ = layer.adalora_lam.assign([0.5, -0.25])  # as if trained
    >>> directory = tempfile.mkdtemp()
    >>> _ = keras_adalora.export_peft(trained, directory)
    >>> fresh = import_peft(gpt2(), directory)
    >>> get_rank_pattern(fresh) == get_rank_pattern(trained)
    True
    """
    directory = os.fspath(directory)
    paths = [
        os.path.join(directory, name) for name in (CONFIG_NAME, WEIGHTS_NAME)
    ]
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(
                f"`import_peft` found no {os.path.basename(path)} in "
                f"{directory!r}. Pass the folder PEFT's `save_pretrained` "
                "wrote (an `adapter_model.bin` adapter can be re-saved with "
                "`safe_serialization=True`)."
            )
    existing = adapted_layers(model)
    if existing:
        raise ValueError(
            f"Model '{model.name}' already holds AdaLoRA layers (e.g. "
            f"'{layer_path(existing[0])}'); `import_peft` applies an adapter "
            "to the base model. Pass a fresh copy of the base model."
        )
    family, task = identify(model, "import_peft")
    settings = _read_config(paths[0])
    weights = Source(f"PEFT adapter weights {paths[1]!r}", _FIX)
    by_module = _group_by_module(_read_tensors(paths[1], weights), weights)

    weighted = _weighted_layers(model)
    plans = []
    heads = []
    trained = []
    for module, values in by_module.items():
        if "weight" in values or "bias" in values:
            layer = _find_head(model, weighted, family, task, module, paths[1])
            _check_head(layer, module, values, paths[1])
            heads.append((layer, values))
            trained.append(layer)
            continue
        found = _find_parts(weighted, family, task, module, paths[1])
        for path, part, parts, layer in found:
            plan = _plan_module(
                settings, module, values, layer, path, part, parts, paths[1]
            )
            if plan is not None:
                plans.append(plan)
                trained.append(layer)
    seen = set()
    for layer in trained:
        if id(layer) in seen:
            raise weights.damaged(
                f"two of its modules belong on layer '{layer_path(layer)}' "
                "(the same module under two names?)"
            )
        seen.add(id(layer))

    for cls, layer, kwargs in plans:
        kwargs["orth_reg_weight"] = layer_orth_reg_weight(
            kwargs["orth_reg_weight"], kwargs["orth_penalty"], len(plans)
        )
        cls.adapt_in_place(layer, **kwargs)
    for layer, values in heads:
        layer.kernel.assign(values["weight"].T.astype("float32"))
        if layer.bias is not None:
            layer.bias.assign(values["bias"].astype("float32"))
    freeze_all_but(model, trained)
    refresh_tracked_parameters(model)
    reset_compiled_state(model)
    return mark_adapted(model)


def _read_config(path):
    """The settings `import_peft` uses from a PEFT `adapter_config.json`
    (and its `path`), each checked, with PEFT's defaults where absent.
    Refuses adapters that are not plain LoRA or AdaLoRA."""
    source = Source(f"PEFT adapter config {path!r}", _FIX)
    try:
        with open(path, "rb") as f:
            text = f.read()
    except OSError as error:
        raise source.unreadable(error) from None
    config = source.mapping(source.parse_json(text, "its text"), "the config")
    peft_type = config.get("peft_type")
    if peft_type not in ("LORA", "ADALORA"):
        raise ValueError(
            f"`import_peft` reads LoRA and AdaLoRA adapters; {path!r} "
            f"is a {short(peft_type)} adapter."
        )
    for option, why in _REFUSED_OPTIONS.items():
        if config.get(option):
            raise ValueError(
                f"The adapter of {path!r} sets {option}="
                f"{short(config[option])}: {why}, which an AdaLoRA layer "
                "cannot express. Import a plain LoRA or AdaLoRA adapter."
            )
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"The adapter of {path!r} trained biases (bias="
            f"{short(config['bias'])}); AdaLoRA layers keep biases frozen. "
            "Import an adapter trained with bias='none'."
        )

    def patterns(check):
        """A `rank_pattern`/`alpha_pattern` check: regular expressions
        (PEFT's keys) to values that pass `check`."""

        def table(value, where):
            if value is None:
                return {}
            source.mapping(value, where)
            for key, entry in value.items():
                try:
                    re.compile(key)
                except re.error as error:
                    raise source.damaged(
                        f"{where} has the key {key!r}, which is not a "
                        f"regular expression ({error})"
                    ) from None
                check(entry, f"{where}[{key!r}]")
            return value

        return table

    def flags(value, where):
        for k, flag in enumerate(source.sequence(value, where)):
            source.flag(flag, f"{where}[{k}]")

    get = source.get
    if peft_type == "ADALORA":
        rank_pattern = patterns(flags)
        lora_alpha = get(
            config, "lora_alpha", "config", source.number, None, optional=True
        )
        if lora_alpha is not None and lora_alpha < 0:
            raise source.damaged(
                f"config['lora_alpha'] must be a number >= 0 (0 or null: "
                f"init_r); it is {lora_alpha}"
            )
    else:
        rank_pattern = patterns(
            lambda value, where: source.integer(value, where, minimum=1)
        )
        lora_alpha = get(config, "lora_alpha", "config", source.number, 8)
    dropout = get(
        config, "lora_dropout", "config", source.number, None, optional=True
    )
    if dropout is not None and not 0 <= dropout < 1:
        raise source.damaged(
            f"config['lora_dropout'] must be a rate in [0, 1); it is {dropout}"
        )
    orth_reg_weight = get(
        config, "orth_reg_weight", "config", source.number, 0.5
    )
    if orth_reg_weight < 0:
        raise source.damaged(
            "config['orth_reg_weight'] must be a number >= 0; it is "
            f"{orth_reg_weight}"
        )
    return {
        "path": path,
        "peft_type": peft_type,
        "lora_dropout": dropout or 0.0,
        "lora_alpha": lora_alpha,
        "rank_pattern": get(
            config, "rank_pattern", "config", rank_pattern, None
        ),
        "alpha_pattern": get(
            config, "alpha_pattern", "config", patterns(source.number), None
        ),
        # LoRA only (0 where `export_peft` had no module to write).
        "r": get(config, "r", "config", source.integer, 8),
        "use_rslora": get(config, "use_rslora", "config", source.flag, False),
        # AdaLoRA only.
        "init_r": get(
            config, "init_r", "config", source.integer, 12, minimum=1
        ),
        "orth_reg_weight": orth_reg_weight,
    }


def _read_tensors(path, source):
    """`{key: array}` of a safetensors file, each of floats, all finite;
    checked against the SHA-256 that `export_peft` records, where present."""
    safetensors = _safetensors("import_peft")
    try:
        with safetensors.safe_open(path, framework="np") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except TypeError as error:  # a dtype NumPy lacks
        raise ValueError(
            f"{source.name} holds tensors NumPy cannot read ({error}). Save "
            "the adapter in float32 (in PEFT, `model.float()` before "
            "`save_pretrained`)."
        ) from None
    except (safetensors.SafetensorError, OSError, ValueError) as error:
        raise source.unreadable(error) from None
    if _CHECKSUMS in metadata:
        where = f"its metadata entry '{_CHECKSUMS}'"
        checksums = source.mapping(
            source.parse_json(metadata[_CHECKSUMS], where), where
        )
        lacking = sorted(set(checksums) - set(tensors))
        if lacking:
            raise source.damaged(f"it lacks the tensors {lacking[:4]}")
        unknown = sorted(set(tensors) - set(checksums))
        if unknown:
            raise source.damaged(
                f"it holds tensors {unknown[:4]} that it was not written "
                "with (tensors `import_peft` does not know are refused)"
            )
        for key, value in tensors.items():
            if _sha256(value) != checksums[key]:
                raise source.damaged(
                    f"tensor '{key}' differs from what was written (its "
                    "SHA-256 does not match)"
                )
    for key, value in tensors.items():
        source.tensor(value, f"tensor '{key}'")
    return tensors


def _group_by_module(tensors, source):
    """`{module: {kind: float64 array}}`; a tensor `import_peft` does not
    know is refused, not ignored."""
    by_module = {}
    for key, value in tensors.items():
        name = key[len(_KEY_PREFIX) :] if key.startswith(_KEY_PREFIX) else key
        match = re.fullmatch(
            r"(.+?)\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|"
            r"lora_embedding_B|lora_A|lora_B|lora_E|weight|bias)",
            name,
        )
        if match is None:
            raise ValueError(
                f"{source.name} holds the tensor {key!r}, which `import_peft` "
                "does not know: it reads LoRA and AdaLoRA factors and a "
                "head's weight and bias, and refuses any other tensor rather "
                "than drop it. Import a plain LoRA or AdaLoRA adapter."
            )
        module, kind = match.groups()
        kind = kind.split(".")[0]
        values = by_module.setdefault(module, {})
        if kind in values:
            raise source.damaged(
                f"it holds module '{module}''s {kind} twice (as {key!r} too)"
            )
        values[kind] = np.asarray(value, dtype="float64")
    return by_module


def _find_parts(weighted, family, task, module, filepath):
    """The KerasHub layers of one adapter module: `[(path, part, parts,
    layer)]`."""
    prefixes = [task.prefix] if task is not None else []
    prefixes += [p for p in family.prefixes() if p not in prefixes]
    for prefix in prefixes:
        if not module.startswith(prefix):
            continue
        base = module[len(prefix) :]
        entries = family.keras_paths(base)
        if entries:
            break
    else:
        raise ValueError(
            f"`import_peft`: the adapter in {filepath!r} adapts module "
            f"'{module}', which the {family.name} table "
            "(`keras_adalora.hf_families`) does not map onto a KerasHub "
            "layer. Import an adapter of the same family, trained on the "
            "modules the table lists."
        )
    found = []
    for path, part, parts in entries:
        layer = next(
            (l for l in weighted if _path_is(layer_path(l), path)), None
        )
        if layer is None:
            raise ValueError(
                f"`import_peft`: module '{module}' of the adapter in "
                f"{filepath!r} belongs on layer '{path}', which model has "
                "none of (fewer blocks?). Import the adapter into a model of "
                "the base it was trained on."
            )
        found.append((path, part, parts, layer))
    return found


def _find_head(model, weighted, family, task, module, filepath):
    if task is None or not task.heads:
        where = "a backbone" if task is None else type(model).__name__
        raise ValueError(
            f"`import_peft`: the adapter in {filepath!r} holds the trained "
            f"head '{module}' (modules_to_save), which {where} has no "
            "place for. Import it into the task model, e.g. a "
            f"{next(iter(family.tasks))}."
        )
    for path, head in task.heads.items():
        if module == head or module.endswith("." + head):
            layer = next(
                (l for l in weighted if _path_is(layer_path(l), path)), None
            )
            if layer is not None and _is_dense_head(layer):
                return layer
    raise ValueError(
        f"`import_peft`: the adapter in {filepath!r} holds module "
        f"'{module}' (modules_to_save), which {type(model).__name__} has no "
        f"head for (it maps {sorted(task.heads.values())})."
    )


def _check_head(layer, module, values, filepath):
    expected = {"weight": tuple(layer.kernel.shape)[::-1]}
    if layer.bias is not None:
        expected["bias"] = tuple(layer.bias.shape)
    if set(values) != set(expected):
        raise ValueError(
            f"`import_peft`: head '{module}' in {filepath!r} holds "
            f"{sorted(values)}, but layer '{layer_path(layer)}' has "
            f"{sorted(expected)}. The file is damaged or was edited, or the "
            "head differs from the adapter's (a bias or none)."
        )
    got = {kind: tuple(value.shape) for kind, value in values.items()}
    if got != expected:
        raise ValueError(
            f"`import_peft`: head '{module}' in {filepath!r} has weights "
            f"{got}, but layer '{layer_path(layer)}' needs {expected}. Build "
            "the task with the same number of classes as the adapter's "
            "(`num_classes` = Hugging Face `num_labels`)."
        )


def _plan_module(
    settings, module, values, layer, path, part, parts, filepath
):
    """Checks one module's factors against its layer (slice `part` of
    `parts`); returns what `adapt_in_place` needs. `settings` is the
    checked config (`_read_config`)."""
    where = f"`import_peft`: module '{module}' of the adapter in {filepath!r}"
    cls = adapter_classes().get(type(layer))
    if cls is None:
        raise ValueError(
            f"{where} belongs on layer '{path}', a {type(layer).__name__}, "
            "which AdaLoRA does not adapt."
        )
    peft_type = settings["peft_type"]
    embedding = "lora_embedding_A" in values
    if peft_type == "ADALORA":
        needed = ("lora_A", "lora_B", "lora_E")
    elif embedding:
        needed = ("lora_embedding_A", "lora_embedding_B")
    else:
        needed = ("lora_A", "lora_B")
    missing = [name for name in needed if name not in values]
    if missing:
        raise ValueError(
            f"{where} lacks {missing} (it holds {sorted(values)}). The file "
            "is damaged or was edited."
        )
    left, right = (values[needed[0]], values[needed[1]])
    d_in, d_out = cls._adapter_matrix_shape(layer)
    rank = left.shape[0] if left.ndim else 0
    if (
        left.ndim != 2
        or right.ndim != 2
        or left.shape[1] != d_in
        or right.shape != (d_out * parts, rank)
    ):
        raise ValueError(
            f"{where} has factors of shapes {left.shape} and {right.shape}; "
            f"layer '{path}' reads as a {d_in} x {d_out} matrix"
            + (f" ({part + 1} of {parts} slices)" if parts > 1 else "")
            + f", which needs ({rank}, {d_in}) and ({d_out * parts}, "
            f"{rank}). Import the adapter into a model of the base it was "
            "trained on."
        )
    whole = right
    right = right[part * d_out : (part + 1) * d_out]
    if parts > 1 and not np.any(right) and np.any(whole):
        # A slice of a trained fused module that computes nothing (what
        # `export_peft` writes for GPT-2's query pruned to rank 0).
        return None
    dropout = settings["lora_dropout"] if cls.supports_dropout else 0.0
    if peft_type == "ADALORA":
        pattern = _pattern(settings["rank_pattern"], module, suffix=".lora_E")
        init_rank = len(pattern) if pattern is not None else settings["init_r"]
        kept = int(sum(pattern)) if pattern is not None else init_rank
        lam = values["lora_E"].reshape(-1)
        if kept != rank or lam.shape != (rank,):
            raise ValueError(
                f"{where} holds {rank} components (lora_E "
                f"{values['lora_E'].shape}) where the rank_pattern of "
                f"{settings['path']!r} keeps {kept}. The files are damaged or "
                "were edited."
            )
        lora_alpha = settings["lora_alpha"] or float(init_rank)
        scale = lora_alpha / (init_rank + _ADALORA_EPS)
        alpha = scale * init_rank
        a, b = left.T, right.T
        # PEFT's penalty: `import_peft` shares its weight among the layers.
        orth, factor_init, orth_penalty = (
            settings["orth_reg_weight"], "normal", "norm"
        )
    else:
        r = _pattern(settings["rank_pattern"], module) or settings["r"]
        lora_alpha = (
            _pattern(settings["alpha_pattern"], module)
            or settings["lora_alpha"]
        )
        if r != rank:
            raise ValueError(
                f"{where} has rank {rank} where {settings['path']!r} says "
                f"r={r}. The files are damaged or were edited."
            )
        scaling = lora_alpha / (np.sqrt(r) if settings["use_rslora"] else r)
        with np.errstate(over="ignore", invalid="ignore"):
            try:
                a, lam, b = _svd_form(scaling * left.T, right.T)
            except np.linalg.LinAlgError:  # an overflow to inf
                a = lam = b = np.array([np.nan])
        _check_finite(where, {"A": a, "lam": lam, "B": b}, lora_alpha, settings)
        if lam.size and lam[0] > 0:
            # Components below float32 resolution are not there (a slice of
            # a fused module has its own, smaller rank); an untrained
            # adapter (all zero) keeps them all, to train.
            keep = lam > lam[0] * (max(d_in, d_out) * np.finfo("float32").eps)
            a, lam, b = a[:, keep], lam[keep], b[keep]
        init_rank = kept = lam.shape[0]
        alpha = float(np.sqrt(float(d_in) * float(d_out)))
        lam = lam * init_rank / alpha
        # Orthonormal factors, as `factor_init="orthogonal"` draws them.
        orth, factor_init, orth_penalty = 0.1, "orthogonal", "squared"
    with np.errstate(over="ignore"):  # float32 overflows to inf: refused
        initial = {
            A_NAME: a.astype("float32"),
            LAM_NAME: lam.astype("float32"),
            B_NAME: b.astype("float32"),
            MASK_NAME: np.ones((kept,), "float32"),
        }
    _check_finite(where, initial, lora_alpha, settings)
    record = {
        "path": path,
        "base_class": cls.wrapped_class.__name__,
        "kernel_shape": list(kernel_shape(layer)),
        "init_rank": init_rank,
        "alpha": alpha,
        "dropout": dropout,
        "orth_reg_weight": orth,
        "factor_init": factor_init,
        "orth_penalty": orth_penalty,
        "adapter_rank": kept,
    }
    return _plan_adapter(record, layer, initial, where)


def _check_finite(where, values, lora_alpha, settings):
    """Raises if an adapter computed from finite factors is not finite (a
    huge `lora_alpha` overflows)."""
    for name, value in values.items():
        if not np.all(np.isfinite(value)):
            raise ValueError(
                f"{where} gives its adapter NaN or infinite values (its "
                f"'{name}', with lora_alpha={lora_alpha} from "
                f"{settings['path']!r}). The files are damaged or were edited."
            )


def _svd_form(left, right):
    """`(A, s, B)` with `left @ right = A @ diag(s) @ B`, orthonormal columns
    of `A (in, k)` and rows of `B (k, out)`, `s >= 0`, for `left (in, r)`,
    `right (r, out)` and `k = min(in, r, out)` (the product's rank is at
    most that)."""
    q_a, r_a = np.linalg.qr(left)
    q_b, r_b = np.linalg.qr(right.T)
    u, s, vt = np.linalg.svd(r_a @ r_b.T, full_matrices=False)
    return q_a @ u, s, (q_b @ vt.T).T


def _pattern(pattern, module, suffix=""):
    """The value PEFT reads for `module` from a rank/alpha pattern (its
    keys are regular expressions matched at the end of the module name)."""
    for key, value in (pattern or {}).items():
        if suffix and key.endswith(suffix):
            key = key[: -len(suffix)]
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def _path_is(path, template_path):
    return path == template_path or path.endswith("/" + template_path)


def _is_dense_head(layer):
    return type(layer) is keras.layers.Dense



def _safetensors(caller):
    try:
        import safetensors
        import safetensors.numpy
    except ImportError:
        raise ImportError(
            f"`{caller}` reads and writes PEFT's safetensors files: install "
            "`safetensors` (`pip install safetensors`, or keras-adalora's "
            "`keras-hub` extra)."
        ) from None
    return safetensors
