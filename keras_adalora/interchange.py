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

import json
import os
import re
import warnings

import keras
import numpy as np

from keras_adalora._arrays import to_numpy
from keras_adalora._backend import refresh_tracked_parameters
from keras_adalora._backend import reset_compiled_state
from keras_adalora.adapted_model import mark_adapted
from keras_adalora.adapter import A_NAME
from keras_adalora.adapter import B_NAME
from keras_adalora.adapter import LAM_NAME
from keras_adalora.adapter import MASK_NAME
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

    computes what the Keras model computes. Each module's rank is its
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
    save_file = _safetensors("export_peft").save_file

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
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2)
    save_file(
        {
            key: np.ascontiguousarray(value, dtype="float32")
            for key, value in tensors.items()
        },
        os.path.join(directory, WEIGHTS_NAME),
        metadata={"format": "pt"},
    )
    return config


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
      singular values in `lam`, all components alive, the default `alpha`,
      and `init_rank` its rank: `r`, or less where the matrix holds less
      (`min(d_in, d_out)`, or a slice of GPT-2's fused `c_attn` exported
      from Keras, whose components beyond its own rank are below float32
      resolution and dropped);
    - an AdaLoRA module maps as it is: `lora_A` and `lora_B` (transposed)
      onto `A` and `B`, `lora_E` onto `lam`, its `rank_pattern` onto the
      mask (`init_rank = init_r`, the pruned components already removed, as
      `compact_adalora` leaves them);
    - `modules_to_save` heads (`classifier` of a `BertTextClassifier`) give
      their weights to the task's head.

    Everything else is frozen as `apply_adalora` leaves it, so the model can
    train on with `RankBudgetCallback` (AdaLoRA pruning a LoRA adapter), be
    saved, compacted, merged or exported again. Everything is checked before
    the model changes: a module the family's table does not know, a shape
    that differs from the model's layer, or a PEFT option that is not plain
    LoRA (DoRA, ...) raises an error naming it, and leaves `model` untouched.

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
    with open(paths[0]) as f:
        config = json.load(f)
    peft_type = config.get("peft_type")
    if peft_type not in ("LORA", "ADALORA"):
        raise ValueError(
            f"`import_peft` reads LoRA and AdaLoRA adapters; {paths[0]!r} "
            f"is a {peft_type!r} adapter."
        )
    for option, why in _REFUSED_OPTIONS.items():
        if config.get(option):
            raise ValueError(
                f"The adapter in {directory!r} sets {option}="
                f"{config[option]!r}: {why}, which an AdaLoRA layer cannot "
                "express. Import a plain LoRA or AdaLoRA adapter."
            )
    if config.get("bias", "none") != "none":
        raise ValueError(
            f"The adapter in {directory!r} trained biases (bias="
            f"{config['bias']!r}); AdaLoRA layers keep biases frozen. "
            "Import an adapter trained with bias='none'."
        )
    tensors = _safetensors("import_peft").load_file(paths[1])

    # Group the file's tensors by module.
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
                f"`import_peft` does not know the tensor {key!r} in "
                f"{paths[1]!r}: expected LoRA or AdaLoRA factors, or a "
                "head's weight or bias."
            )
        module, kind = match.groups()
        by_module.setdefault(module, {})[kind.split(".")[0]] = np.asarray(
            value, dtype="float64"
        )

    weighted = _weighted_layers(model)
    plans = []
    heads = []
    trained = []
    for module, values in by_module.items():
        if "weight" in values or "bias" in values:
            layer = _find_head(model, weighted, family, task, module, directory)
            _check_head(layer, module, values, directory)
            heads.append((layer, values))
            trained.append(layer)
            continue
        found = _find_parts(weighted, family, task, module, directory)
        for path, part, parts, layer in found:
            plan = _plan_module(
                config,
                peft_type,
                module,
                values,
                layer,
                path,
                part,
                parts,
                directory,
            )
            if plan is not None:
                plans.append(plan)
                trained.append(layer)

    for cls, layer, kwargs in plans:
        cls.adapt_in_place(layer, **kwargs)
    for layer, values in heads:
        layer.kernel.assign(values["weight"].T.astype("float32"))
        if layer.bias is not None:
            layer.bias.assign(values["bias"].astype("float32"))
    freeze_all_but(model, trained)
    refresh_tracked_parameters(model)
    reset_compiled_state(model)
    return mark_adapted(model)


def _find_parts(weighted, family, task, module, directory):
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
            f"`import_peft`: the adapter in {directory!r} adapts module "
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
                f"{directory!r} belongs on layer '{path}', which model has "
                "none of (fewer blocks?). Import the adapter into a model of "
                "the base it was trained on."
            )
        found.append((path, part, parts, layer))
    return found


def _find_head(model, weighted, family, task, module, directory):
    if task is None or not task.heads:
        where = "a backbone" if task is None else type(model).__name__
        raise ValueError(
            f"`import_peft`: the adapter in {directory!r} holds the trained "
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
        f"`import_peft`: the adapter in {directory!r} holds module "
        f"'{module}' (modules_to_save), which {type(model).__name__} has no "
        f"head for (it maps {sorted(task.heads.values())})."
    )


def _check_head(layer, module, values, directory):
    expected = {"weight": tuple(layer.kernel.shape)[::-1]}
    if layer.bias is not None:
        expected["bias"] = tuple(layer.bias.shape)
    got = {kind: tuple(value.shape) for kind, value in values.items()}
    if got != expected:
        raise ValueError(
            f"`import_peft`: head '{module}' in {directory!r} has weights "
            f"{got}, but layer '{layer_path(layer)}' needs {expected}. Build "
            "the task with the same number of classes as the adapter's "
            "(`num_classes` = Hugging Face `num_labels`)."
        )


def _plan_module(
    config, peft_type, module, values, layer, path, part, parts, directory
):
    """Checks one module's factors against its layer (slice `part` of
    `parts`); returns what `adapt_in_place` needs."""
    where = f"`import_peft`: module '{module}' of the adapter in {directory!r}"
    cls = adapter_classes().get(type(layer))
    if cls is None:
        raise ValueError(
            f"{where} belongs on layer '{path}', a {type(layer).__name__}, "
            "which AdaLoRA does not adapt."
        )
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
            f"{where} lacks {missing} (it holds {sorted(values)})."
        )
    left, right = (values[needed[0]], values[needed[1]])
    d_in, d_out = cls._adapter_matrix_shape(layer)
    rank = left.shape[0]
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
    dropout = (
        float(config.get("lora_dropout") or 0.0)
        if cls.supports_dropout
        else 0.0
    )
    if peft_type == "ADALORA":
        pattern = _pattern(config.get("rank_pattern"), module, suffix=".lora_E")
        init_rank = (
            len(pattern) if pattern is not None else int(config["init_r"])
        )
        kept = int(sum(pattern)) if pattern is not None else init_rank
        lam = values["lora_E"].reshape(-1)
        if kept != rank or lam.shape != (rank,):
            raise ValueError(
                f"{where} holds {rank} components (lora_E {values['lora_E'].shape}) "
                f"where its rank_pattern keeps {kept}."
            )
        lora_alpha = float(config.get("lora_alpha") or 0) or float(init_rank)
        scale = lora_alpha / (init_rank + _ADALORA_EPS)
        alpha = scale * init_rank
        a, b = left.T, right.T
        orth = float(config.get("orth_reg_weight", 0.1))
    else:
        r = int(_pattern(config.get("rank_pattern"), module) or config.get("r"))
        lora_alpha = float(
            _pattern(config.get("alpha_pattern"), module)
            or config["lora_alpha"]
        )
        if r != rank:
            raise ValueError(
                f"{where} has rank {rank} where its config says r={r}."
            )
        scaling = lora_alpha / (np.sqrt(r) if config.get("use_rslora") else r)
        a, lam, b = _svd_form(scaling * left.T, right.T)
        if lam.size and lam[0] > 0:
            # Components below float32 resolution are not there (a slice of
            # a fused module has its own, smaller rank); an untrained
            # adapter (all zero) keeps them all, to train.
            keep = lam > lam[0] * max(d_in, d_out) * np.finfo("float32").eps
            a, lam, b = a[:, keep], lam[keep], b[keep]
        init_rank = kept = lam.shape[0]
        alpha = float(np.sqrt(float(d_in) * float(d_out)))
        lam = lam * init_rank / alpha
        orth = 0.1
    initial = {
        A_NAME: a.astype("float32"),
        LAM_NAME: lam.astype("float32"),
        B_NAME: b.astype("float32"),
        MASK_NAME: np.ones((kept,), "float32"),
    }
    record = {
        "path": path,
        "base_class": cls.wrapped_class.__name__,
        "kernel_shape": list(kernel_shape(layer)),
        "init_rank": init_rank,
        "alpha": alpha,
        "dropout": dropout,
        "orth_reg_weight": orth,
        "adapter_rank": kept,
    }
    return _plan_adapter(record, layer, initial)


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
        import safetensors.numpy
    except ImportError:
        raise ImportError(
            f"`{caller}` reads and writes PEFT's safetensors files: install "
            "`safetensors` (`pip install safetensors`, or keras-adalora's "
            "`keras-hub` extra)."
        ) from None
    return safetensors.numpy
