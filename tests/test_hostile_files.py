"""Hostile and broken files: adapter files (`load_adapter`), PEFT adapter
folders (`import_peft`) and `.keras` files of adapted models
(`keras.saving.load_model`), each damaged one way at a time.

A damaged adapter file or PEFT folder is refused with a `ValueError` that
names the file and what is wrong, before the model changes: its
fingerprint (every weight's bytes, every layer's class, every variable's
trainable flag) is the same before and after. A `.keras` file is opened by
Keras, which hands keras_adalora its config without the file's name: those
errors name the entry at fault (and there is no model to leave untouched).
The damage is deterministic: fixed bytes at fixed offsets, fixed values.
"""

import hashlib
import io
import json
import re
import shutil
import struct
import zipfile

import h5py
import hub_models
import keras
import numpy as np
import pytest
from helpers import embedding_mlp
from helpers import pruned_model
from helpers import randomize_adapters
from helpers import to_numpy

from keras_adalora import _keras
from keras_adalora import apply_adalora
from keras_adalora import export_peft
from keras_adalora import get_rank_pattern
from keras_adalora import import_peft
from keras_adalora import load_adapter
from keras_adalora import save_adapter
from keras_adalora.targets import adapted_layers

# A declared size no loader may try to allocate: 2**40 rows of 4 floats is
# 16 TiB, so a loader that did would fail at once rather than exhaust memory.
HUGE = 2**40


def fingerprint(model):
    """A hash of every layer's path, class and `trainable` flag, and of every
    variable's path, `trainable` flag, dtype, shape and bytes."""
    digest = hashlib.sha256()
    for layer in _keras.sublayers(model, include_self=True):
        kind = f"{type(layer).__module__}.{type(layer).__qualname__}"
        digest.update(f"{layer.path}|{kind}|{layer.trainable};".encode())
    for variable in model.variables:
        digest.update(
            f"{variable.path}|{variable.trainable}|{variable.dtype}|"
            f"{tuple(variable.shape)};".encode()
        )
        digest.update(np.ascontiguousarray(to_numpy(variable)).tobytes())
    return digest.hexdigest()


def assert_refused(load, model, damaged, message):
    """`load(model)` raises a `ValueError` (or an `OSError`) whose message
    names `damaged` (a file) and matches `message`; `model` is untouched."""
    before = fingerprint(model)
    with pytest.raises((ValueError, OSError)) as info:
        load(model)
    text = str(info.value)
    assert str(damaged) in text, text
    assert re.search(message, text, re.DOTALL), text
    assert fingerprint(model) == before
    assert not adapted_layers(model)


# Byte-level damage ------------------------------------------------------------


def truncate(path):
    """Keeps the first half of the file."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def flip(path, start):
    """Inverts the 8 bytes from `start` on."""
    data = bytearray(path.read_bytes())
    for i in range(start, start + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def flip_middle(path):
    """Inverts the 8 bytes in the middle of the file."""
    flip(path, path.stat().st_size // 2)


# Adapter files ----------------------------------------------------------------


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory):
    """An adapter file of `embedding_mlp` with three adapters (`embed`,
    `hidden`, `mix`, the last pruned to rank 0) and a trained head."""
    model = pruned_model(embedding_mlp(), keep_trainable=["head"])
    head = model.get_layer("head")
    head.kernel.assign(head.kernel + 0.5)
    path = tmp_path_factory.mktemp("adapter") / "model.adalora.h5"
    save_adapter(model, path)
    return path


def edit_metadata(change):
    def damage(path):
        with h5py.File(path, "r+") as f:
            metadata = json.loads(f.attrs["metadata"])
            metadata = change(metadata) or metadata
            f.attrs["metadata"] = np.bytes_(json.dumps(metadata).encode())

    return damage


def set_adapter(k, **entries):
    def change(metadata):
        metadata["adapters"][k].update(entries)

    return edit_metadata(change)


def set_attribute(value):
    def damage(path):
        with h5py.File(path, "r+") as f:
            f.attrs["metadata"] = value

    return damage


def replace_dataset(name, make):
    """Replaces dataset `name` with `make(old value)` (an array), or, if
    `make` returns a dict, with `create_dataset(**that dict)`."""

    def damage(path):
        with h5py.File(path, "r+") as f:
            old = f[name][()]
            del f[name]
            new = make(old)
            if isinstance(new, dict):
                f.create_dataset(name, **new)
            else:
                f.create_dataset(name, data=new)

    return damage


def poke(name, value):
    """Sets the first number of dataset `name` to `value`."""

    def make(old):
        old = old.copy()
        old.flat[0] = value
        return old

    return replace_dataset(name, make)


def delete(name):
    def damage(path):
        with h5py.File(path, "r+") as f:
            del f[name]

    return damage


def add_dataset(name):
    def damage(path):
        with h5py.File(path, "r+") as f:
            f.create_dataset(name, data=np.zeros((2,), "float32"))

    return damage


def link_elsewhere(name):
    """Makes `name` an external link into another adapter file."""

    def damage(path):
        other = str(path) + ".other.adalora.h5"
        shutil.copy(path, other)
        with h5py.File(path, "r+") as f:
            del f[name]
            f[name] = h5py.ExternalLink(other, "/" + name)

    return damage


def soft_link(name, target):
    def damage(path):
        with h5py.File(path, "r+") as f:
            del f[name]
            f[name] = h5py.SoftLink(target)

    return damage


def hard_link(name, target):
    """Adds a second hard link to group `target`, at `name` (below it: a
    cycle)."""

    def damage(path):
        with h5py.File(path, "r+") as f:
            f[name] = f[target]

    return damage


def layer_twice(path):
    """Lists the `hidden` adapter twice, each with its datasets."""
    with h5py.File(path, "r+") as f:
        metadata = json.loads(f.attrs["metadata"])
        metadata["adapters"].append(dict(metadata["adapters"][1]))
        f.copy("adapters/1", "adapters/3")
        f.attrs["metadata"] = np.bytes_(json.dumps(metadata).encode())


def unknown_layer_at(index):
    def change(metadata):
        metadata["adapters"][1].update(path="nowhere", index=index)

    return edit_metadata(change)


A, LAM, B, MASK = "adalora_A", "adalora_lam", "adalora_B", "rank_mask"
ADAPTER_DAMAGE = {
    "truncated": (truncate, "could not be read.*truncated"),
    "flipped-bytes": (flip_middle, "could not be read|cannot be read"),
    "metadata-malformed-json": (
        set_attribute(np.bytes_(b'{"format": "keras-')),
        "metadata is not valid JSON",
    ),
    "metadata-nested-20000-deep": (
        set_attribute(np.bytes_(b"[" * 20_000)),
        "metadata is not valid JSON",
    ),
    "metadata-not-text": (
        set_attribute(np.arange(3)),
        "'metadata' attribute must be JSON text",
    ),
    "metadata-list-for-object": (
        edit_metadata(lambda m: [m]),
        "metadata must be a JSON object",
    ),
    "adapter-list-for-object": (
        edit_metadata(
            lambda m: m["adapters"].__setitem__(1, list(m["adapters"][1]))
        ),
        r"metadata\['adapters'\]\[1\] must be a JSON object",
    ),
    "adapters-object-for-list": (
        edit_metadata(lambda m: m.update(adapters={"0": m["adapters"][0]})),
        r"metadata\['adapters'\] must be a list",
    ),
    "rank-is-string": (
        set_adapter(1, init_rank="4"),
        r"metadata\['adapters'\]\[1\]\['init_rank'\] must be an integer",
    ),
    "kernel-shape-is-string": (
        set_adapter(1, kernel_shape="16x32"),
        r"\['kernel_shape'\] must be a list",
    ),
    "rank-negative": (
        set_adapter(1, adapter_rank=-1),
        r"\['adapter_rank'\] must be an integer >= 0; it is -1",
    ),
    # The last adapter: the others fit, and must not be applied.
    "alpha-negative-last-adapter": (
        set_adapter(2, alpha=-1.0),
        "'mix'.*settings no adapter can have.*alpha",
    ),
    "dropout-out-of-range-last-adapter": (
        set_adapter(2, dropout=1.5),
        "'mix'.*settings no adapter can have.*dropout",
    ),
    "alpha-infinite": (
        set_adapter(2, alpha=float("inf")),
        r"\['alpha'\] must be a finite number",
    ),
    "factor-init-unknown": (
        set_adapter(2, factor_init="he_normal"),
        r"\['factor_init'\] must be one of \['normal', 'orthogonal'\]",
    ),
    "orth-penalty-not-text": (
        set_adapter(1, orth_penalty=["norm"]),
        r"\['orth_penalty'\] must be one of \['norm', 'squared'\]",
    ),
    "rank-huge": (
        set_adapter(1, init_rank=10**9, adapter_rank=10**9),
        "'hidden'.*init_rank=1000000000, more components",
    ),
    "number-too-large-for-a-float": (
        set_adapter(1, orth_reg_weight=10**400),
        r"\['orth_reg_weight'\] must be a finite number",
    ),
    "dataset-huge-declared-shape": (
        replace_dataset(
            f"adapters/1/{A}",
            lambda old: dict(shape=(HUGE, 4), chunks=(1024, 4), dtype="f4"),
        ),
        rf"'hidden'.*'{A}' has shape \({HUGE}, 4\), expected \(16, 4\)",
    ),
    "dataset-wrong-shape": (
        replace_dataset(f"adapters/1/{B}", lambda old: old[:, :-1]),
        rf"'hidden'.*'{B}' has shape \(4, 31\), expected \(4, 32\)",
    ),
    "trained-dataset-wrong-shape": (
        replace_dataset("trained/0/kernel", lambda old: old[:, :-1]),
        r"'head'.*weight 'kernel' has shape \(24, 2\).*says \(24, 3\)",
    ),
    "dataset-of-integers": (
        replace_dataset(f"adapters/1/{MASK}", lambda old: old.astype("i4")),
        f"'adapters/1/{MASK}' holds int32 values",
    ),
    "trained-dataset-of-integers": (
        replace_dataset("trained/0/kernel", lambda old: old.astype("i4")),
        "'head'.*'kernel' holds int32 values, where the layer's weight is "
        "float32",
    ),
    "dataset-nan": (
        poke(f"adapters/1/{LAM}", np.nan),
        f"'adapters/1/{LAM}' holds 1 NaN or infinite",
    ),
    "trained-dataset-inf": (
        poke("trained/0/kernel", np.inf),
        "'trained/0/kernel' holds 1 NaN or infinite",
    ),
    "dataset-missing": (
        delete(f"adapters/1/{LAM}"),
        f"lacks the dataset 'adapters/1/{LAM}'",
    ),
    "trained-dataset-missing": (
        delete("trained/0/bias"),
        "lacks the dataset 'trained/0/bias'",
    ),
    # Unknown entries are refused, not ignored.
    "dataset-unknown-in-adapter": (
        add_dataset("adapters/1/extra"),
        r"holds \['adapters/1/extra'\], which `load_adapter` does not read",
    ),
    "dataset-unknown-elsewhere": (
        add_dataset("notes/extra"),
        r"holds \['notes', 'notes/extra'\]",
    ),
    "dataset-external-link": (
        link_elsewhere(f"adapters/1/{LAM}"),
        rf"holds links \['adapters/1/{LAM}'\] to other objects or files",
    ),
    "dataset-soft-link": (
        soft_link(f"adapters/1/{LAM}", f"/adapters/0/{LAM}"),
        rf"holds links \['adapters/1/{LAM}'\]",
    ),
    "group-linked-into-itself": (
        hard_link("adapters/1/loop", "adapters"),
        r"holds links \['adapters/1/loop'\]",
    ),
    "layer-twice": (layer_twice, "names layer 'hidden' twice"),
    "layer-index-out-of-range": (
        unknown_layer_at(99),
        "layer 'nowhere' is at index 99",
    ),
    "layer-index-negative": (
        unknown_layer_at(-1),
        r"\['index'\] must be an integer >= 0; it is -1",
    ),
}


@pytest.mark.parametrize(
    "damage, message", ADAPTER_DAMAGE.values(), ids=ADAPTER_DAMAGE
)
def test_a_damaged_adapter_file_is_refused(
    adapter_file, tmp_path, damage, message
):
    path = tmp_path / "model.adalora.h5"
    shutil.copy(adapter_file, path)
    damage(path)
    assert_refused(
        lambda model: load_adapter(model, path), embedding_mlp(), path, message
    )


def test_the_undamaged_adapter_file_loads(adapter_file):
    # The damaged copies above fail for their damage alone.
    assert get_rank_pattern(load_adapter(embedding_mlp(), adapter_file)) == {
        "embed": 3,
        "hidden": 1,
        "mix": 0,
    }


# PEFT adapter folders ---------------------------------------------------------

QUERY = "bert.encoder.layer.0.attention.self.query"
PREFIX = "base_model.model."
QUERY_B = f"{PREFIX}{QUERY}.lora_B.weight"
CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def peft_folders(tmp_path_factory):
    """`{"lora": folder, "adalora": folder}`: a BERT classifier's adapters
    and head as `export_peft` writes them, and the same adapters as a PEFT
    AdaLoRA adapter (as PEFT writes one: no checksums)."""
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file

    task = hub_models.bert()
    apply_adalora(task, init_rank=2, target="all")
    randomize_adapters(task)
    lora = tmp_path_factory.mktemp("lora")
    config = export_peft(task, lora)
    assert config["modules_to_save"] == ["classifier"]

    adalora = tmp_path_factory.mktemp("adalora")
    tensors = {}
    for key, value in load_file(str(lora / WEIGHTS)).items():
        if key.endswith("lora_A.weight"):
            module = key[: -len(".lora_A.weight")]
            rank = value.shape[0]
            tensors[module + ".lora_A"] = value
            tensors[module + ".lora_E"] = np.ones((rank, 1), "float32")
        elif key.endswith("lora_B.weight"):
            tensors[key[: -len(".weight")]] = value
        elif not key.endswith(("lora_embedding_A", "lora_embedding_B")):
            tensors[key] = value  # the head
    save_file(tensors, str(adalora / WEIGHTS), metadata={"format": "pt"})
    modules = [
        key[len(PREFIX) : -len(".lora_E")] for key in tensors if "lora_E" in key
    ]
    with open(adalora / CONFIG, "w") as f:
        json.dump(
            {
                "peft_type": "ADALORA",
                "init_r": 2,
                "lora_alpha": 4,
                "rank_pattern": {m + ".lora_E": [True, True] for m in modules},
                "modules_to_save": ["classifier"],
            },
            f,
        )
    return {"lora": lora, "adalora": adalora}


def edit_config(change):
    def damage(folder):
        path = folder / CONFIG
        config = json.loads(path.read_text())
        config = change(config) or config
        path.write_text(json.dumps(config))
        return path

    return damage


def config_bytes(damage):
    def apply(folder):
        damage(folder / CONFIG)
        return folder / CONFIG

    return apply


def weights_bytes(damage):
    def apply(folder):
        damage(folder / WEIGHTS)
        return folder / WEIGHTS

    return apply


def edit_tensors(change):
    """Rewrites the weights file with `change(tensors)` applied, and its
    checksums (where it has them) recomputed, as a deliberate edit would."""

    def damage(folder):
        import safetensors
        from safetensors.numpy import save_file

        path = folder / WEIGHTS
        with safetensors.safe_open(str(path), framework="np") as f:
            metadata = f.metadata()
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        changed = change(tensors)
        if isinstance(changed, dict):
            tensors = changed
        # (safetensors writes a non-contiguous array's buffer as it lies.)
        tensors = {k: np.ascontiguousarray(v) for k, v in tensors.items()}
        if "keras_adalora_sha256" in metadata:
            metadata["keras_adalora_sha256"] = json.dumps(
                {
                    key: hashlib.sha256(
                        np.ascontiguousarray(value).tobytes()
                    ).hexdigest()
                    for key, value in tensors.items()
                }
            )
        save_file(tensors, str(path), metadata=metadata)
        return path

    return damage


def poke_tensor(key, value):
    def change(tensors):
        tensors[key] = tensors[key].copy()
        tensors[key].flat[0] = value

    return edit_tensors(change)


def flip_data(folder):
    """Inverts the 8 bytes in the middle of the tensors' data (after the
    header), where a flip changes numbers and nothing else."""
    path = folder / WEIGHTS
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    flip(path, (8 + size + len(data)) // 2)
    return path


def declare_shape(key, shape):
    """Rewrites the shape the safetensors header declares for `key`."""

    def damage(folder):
        path = folder / WEIGHTS
        data = path.read_bytes()
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8 : 8 + size])
        header[key]["shape"] = list(shape)
        text = json.dumps(header).encode()
        path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size :])
        return path

    return damage


def set_pattern(value):
    return edit_config(lambda c: c["rank_pattern"].__setitem__(QUERY, value))


def add_module_twice(tensors):
    # The same module again under a name without the task's prefix.
    for kind in ("lora_A.weight", "lora_B.weight"):
        key = f"{PREFIX}{QUERY}.{kind}"
        tensors[key.replace("bert.encoder", "encoder")] = tensors[key]


LORA_DAMAGE = {
    "config-truncated": (config_bytes(truncate), "its text is not valid JSON"),
    "config-flipped-bytes": (
        config_bytes(flip_middle),
        "its text is not valid JSON",
    ),
    "config-malformed-json": (
        config_bytes(
            lambda path: path.write_text(path.read_text().replace(":", "=", 1))
        ),
        "its text is not valid JSON",
    ),
    "config-list-for-object": (
        edit_config(lambda c: [c]),
        "the config must be a JSON object",
    ),
    "rank-pattern-list-for-object": (
        edit_config(lambda c: c.update(rank_pattern=list(c["rank_pattern"]))),
        r"config\['rank_pattern'\] must be a JSON object",
    ),
    "rank-is-string": (
        set_pattern("2"),
        rf"config\['rank_pattern'\]\['{QUERY}'\] must be an integer >= 1; "
        "it is '2'",
    ),
    "rank-negative": (set_pattern(-2), "must be an integer >= 1; it is -2"),
    "rank-huge": (
        set_pattern(10**9),
        f"{QUERY}'.*has rank 2 where .*{CONFIG}' says r=1000000000",
    ),
    "rank-pattern-key-not-a-regex": (
        edit_config(lambda c: c["rank_pattern"].update({"query(": 2})),
        "'query\\(', which is not a regular expression",
    ),
    "dropout-negative": (
        edit_config(lambda c: c.update(lora_dropout=-0.5)),
        r"config\['lora_dropout'\] must be a rate in \[0, 1\); it is -0.5",
    ),
    "alpha-infinite": (
        edit_config(lambda c: c["alpha_pattern"].__setitem__(QUERY, 1e400)),
        "must be a finite number; it is inf",
    ),
    "alpha-huge": (
        edit_config(lambda c: c["alpha_pattern"].__setitem__(QUERY, 1e308)),
        f"{QUERY}'.*NaN or infinite values.*lora_alpha=1e\\+308 "
        f"from .*{CONFIG}'",
    ),
    "weights-truncated": (weights_bytes(truncate), "could not be read"),
    "weights-flipped-bytes": (
        weights_bytes(flip_middle),
        "SHA-256 does not match|could not be read",
    ),
    "weights-flipped-bytes-in-data": (
        flip_data,
        "tensor '.*' differs from what was written .*SHA-256 does not match",
    ),
    "tensor-huge-declared-shape": (
        declare_shape(f"{PREFIX}{QUERY}.lora_A.weight", (HUGE, 16)),
        "could not be read",
    ),
    "tensor-wrong-shape": (
        edit_tensors(lambda t: t.update({QUERY_B: t[QUERY_B][:, :1]})),
        rf"module '{QUERY}'.*factors of shapes \(2, 16\) and \(16, 1\)",
    ),
    "tensor-nan": (
        poke_tensor(f"{PREFIX}{QUERY}.lora_A.weight", np.nan),
        "lora_A.weight' holds 1 NaN or infinite",
    ),
    "head-tensor-inf": (
        poke_tensor(f"{PREFIX}classifier.weight", -np.inf),
        "classifier.weight' holds 1 NaN or infinite",
    ),
    "tensor-missing": (
        edit_tensors(lambda t: t.pop(QUERY_B)),
        rf"module '{QUERY}'.*lacks \['lora_B'\]",
    ),
    "tensor-missing-from-its-checksums": (
        # Deleted, the checksums left as they were.
        lambda folder: _drop_tensor(folder, QUERY_B),
        "lacks the tensors",
    ),
    "head-tensor-missing": (
        edit_tensors(lambda t: t.pop(f"{PREFIX}classifier.bias")),
        r"head 'classifier'.*holds \['weight'\], but layer 'logits' has",
    ),
    # Unknown tensors are refused, not ignored.
    "tensor-unknown": (
        edit_tensors(
            lambda t: t.update({f"{PREFIX}{QUERY}.lora_magnitude": t[QUERY_B]})
        ),
        "holds the tensor .*lora_magnitude', which `import_peft` does not "
        "know.*refuses any other tensor",
    ),
    "module-twice": (
        edit_tensors(add_module_twice),
        "two of its modules belong on layer",
    ),
}


def _drop_tensor(folder, key):
    import safetensors
    from safetensors.numpy import save_file

    path = folder / WEIGHTS
    with safetensors.safe_open(str(path), framework="np") as f:
        metadata = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != key}
    save_file(tensors, str(path), metadata=metadata)
    return path


ADALORA_QUERY = f"{PREFIX}{QUERY}"
ADALORA_DAMAGE = {
    "rank-pattern-not-flags": (
        edit_config(
            lambda c: c["rank_pattern"].__setitem__(QUERY + ".lora_E", "all")
        ),
        rf"config\['rank_pattern'\]\['{QUERY}.lora_E'\] must be a list",
    ),
    "init-r-is-string": (
        edit_config(lambda c: c.update(init_r="2", rank_pattern=None)),
        r"config\['init_r'\] must be an integer >= 1; it is '2'",
    ),
    "orth-reg-weight-negative": (
        edit_config(lambda c: c.update(orth_reg_weight=-1)),
        r"config\['orth_reg_weight'\] must be a number >= 0; it is -1",
    ),
    "lora-e-nan": (
        poke_tensor(f"{ADALORA_QUERY}.lora_E", np.nan),
        "lora_E' holds 1 NaN or infinite",
    ),
    "lora-e-wrong-shape": (
        edit_tensors(
            lambda t: t.update(
                {f"{ADALORA_QUERY}.lora_E": np.ones((3, 1), "float32")}
            )
        ),
        r"holds 2 components \(lora_E \(3, 1\)\) where the rank_pattern of "
        f".*{CONFIG}' keeps 2",
    ),
}
PEFT_DAMAGE = [
    pytest.param("lora", damage, message, id=f"lora-{name}")
    for name, (damage, message) in LORA_DAMAGE.items()
] + [
    pytest.param("adalora", damage, message, id=f"adalora-{name}")
    for name, (damage, message) in ADALORA_DAMAGE.items()
]


@pytest.mark.parametrize("kind, damage, message", PEFT_DAMAGE)
def test_a_damaged_peft_adapter_is_refused(
    peft_folders, tmp_path, kind, damage, message
):
    folder = tmp_path / "adapter"
    shutil.copytree(peft_folders[kind], folder)
    damaged = damage(folder)
    assert_refused(
        lambda model: import_peft(model, folder),
        hub_models.bert(),
        damaged,
        message,
    )


@pytest.mark.parametrize("kind", ["lora", "adalora"])
def test_the_undamaged_peft_adapters_load(peft_folders, kind):
    task = import_peft(hub_models.bert(), peft_folders[kind])
    assert len(adapted_layers(task)) == 12


# `.keras` files ---------------------------------------------------------------


@pytest.fixture(scope="module")
def keras_files(tmp_path_factory):
    """`{"functional": path, "hub": path}`: `.keras` files of an adapted
    functional model (its config lists the AdaLoRA layers) and of an adapted
    KerasHub BERT classifier (its layers are adapted from the adaptation
    record on loading)."""
    folder = tmp_path_factory.mktemp("keras")
    functional = pruned_model(embedding_mlp(), keep_trainable=["head"])
    functional.save(folder / "functional.keras")
    task = hub_models.bert()
    apply_adalora(task, init_rank=2, target="all")
    randomize_adapters(task)
    task.save(folder / "hub.keras")
    return {kind: folder / f"{kind}.keras" for kind in ("functional", "hub")}


def rewrite_archive(path, config=None, weights=None):
    """Rewrites a `.keras` file with `config(dict)` applied to its config and
    `weights(h5py.File)` to its weights."""
    with zipfile.ZipFile(path) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    if config is not None:
        data = json.loads(members["config.json"])
        data = config(data) or data
        members["config.json"] = json.dumps(data).encode()
    if weights is not None:
        buffer = io.BytesIO(members["model.weights.h5"])
        with h5py.File(buffer, "r+") as f:
            weights(f)
        members["model.weights.h5"] = buffer.getvalue()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)


def edit_record(change):
    def damage(path):
        def apply(config):
            result = change(config["config"]["adaptation"])
            if result is not None:
                config["config"]["adaptation"] = result

        rewrite_archive(path, config=apply)

    return damage


def set_record_adapter(**entries):
    return edit_record(lambda record: record["adapters"][0].update(entries))


def adapter_dataset(f, name):
    """The first adapted layer's dataset `name` in a `.keras` weights file."""
    found = []
    f.visit(lambda n: found.append(n) if n.endswith(f"/vars/{name}") else None)
    return sorted(found)[0]


def edit_weights(change):
    def damage(path):
        rewrite_archive(path, weights=change)

    return damage


def shrink(f):
    name = adapter_dataset(f, B)
    value = f[name][()]
    del f[name]
    f[name] = value[:, :-1]


def declare_huge(f):
    name = adapter_dataset(f, A)
    del f[name]
    f.create_dataset(name, shape=(HUGE, 4), chunks=(1024, 4), dtype="f4")


def add_weight(f):
    name = adapter_dataset(f, A)
    f[name.rsplit("/", 1)[0] + "/extra"] = np.zeros((2,), "float32")


RECORD = "The AdaLoRA adaptation record in the saved config of"
KERAS_DAMAGE = {
    # Keras reads the archive and hands its config to keras_adalora
    # without the file's name: the errors name the entry.
    "record-list-for-object": (
        "hub",
        edit_record(lambda record: [record]),
        "'adaptation' entry of this AdaLoRA-adapted model's config must be a "
        "JSON object",
    ),
    "record-layers-object-for-list": (
        "hub",
        edit_record(lambda record: record.update(layers={})),
        rf"{RECORD}.*record\['layers'\] must be a list",
    ),
    "record-version-is-string": (
        "hub",
        edit_record(lambda record: record.update(version="1")),
        r"record\['version'\] must be an integer >= 0; it is '1'",
    ),
    "record-rank-is-string": (
        "hub",
        set_record_adapter(init_rank="2"),
        rf"{RECORD}.*\['init_rank'\] must be an integer >= 0; it is '2'",
    ),
    "record-penalty-unknown": (
        "hub",
        set_record_adapter(orth_penalty="cubed"),
        rf"{RECORD}.*\['orth_penalty'\] must be one of \['norm', 'squared'\]; "
        "it is 'cubed'",
    ),
    "record-rank-negative": (
        "hub",
        set_record_adapter(adapter_rank=-1),
        r"\['adapter_rank'\] must be an integer >= 0; it is -1",
    ),
    "record-rank-huge": (
        "hub",
        set_record_adapter(init_rank=10**9, adapter_rank=10**9),
        rf"{RECORD}.*cannot adapt layer .*`init_rank`=1000000000 is too large",
    ),
    "record-alpha-infinite": (
        "hub",
        set_record_adapter(alpha=float("inf")),
        r"\['alpha'\] must be a finite number or null; it is inf",
    ),
    "record-index-negative": (
        "hub",
        set_record_adapter(index=-1),
        r"\['index'\] must be an integer >= 0; it is -1",
    ),
    "record-index-out-of-range": (
        "hub",
        set_record_adapter(index=10**6),
        r"record\['adapters'\]\[0\] adapts the layer at index 1000000",
    ),
    "record-index-twice": (
        "hub",
        edit_record(
            lambda record: record["adapters"][1].update(
                index=record["adapters"][0]["index"]
            )
        ),
        "which an earlier entry adapts too",
    ),
    "record-class-unknown": (
        "hub",
        set_record_adapter(**{"class": "Evil"}),
        "names the class 'Evil', which is not an AdaLoRA layer",
    ),
    "record-trainable-not-a-flag": (
        "hub",
        edit_record(lambda record: record["layers"][1].update(trainable="no")),
        r"record\['layers'\]\[1\]\['trainable'\] must be true or false",
    ),
    "record-settings-edited": (
        "functional",
        set_record_adapter(orth_reg_weight=0.5),
        "rebuilt with adapter settings .* The file is damaged or was edited",
    ),
    # The weights: Keras wraps each layer's error in its own.
    "weights-wrong-shape": (
        "functional",
        edit_weights(shrink),
        f"saved weight '{B}' has shape",
    ),
    "weights-missing": (
        "functional",
        edit_weights(lambda f: f.__delitem__(adapter_dataset(f, LAM))),
        f"lacks \\['{LAM}'\\]",
    ),
    "weights-huge-declared-shape": (
        "functional",
        edit_weights(declare_huge),
        "refusing to load a potential decompression/shape bomb",
    ),
    "truncated": (
        "functional",
        truncate,
        "is an accessible `.keras` zip file",
    ),
}


@pytest.mark.parametrize(
    "kind, damage, message",
    KERAS_DAMAGE.values(),
    ids=[f"{kind}-{name}" for name, (kind, _, _) in KERAS_DAMAGE.items()],
)
def test_a_damaged_keras_file_is_refused(
    keras_files, tmp_path, kind, damage, message
):
    path = tmp_path / "model.keras"
    shutil.copy(keras_files[kind], path)
    damage(path)
    with pytest.raises(ValueError) as info:
        keras.saving.load_model(path)
    assert re.search(message, str(info.value), re.DOTALL), str(info.value)


@pytest.mark.parametrize("kind", ["functional", "hub"])
def test_the_undamaged_keras_files_load(keras_files, kind):
    model = keras.saving.load_model(keras_files[kind])
    assert adapted_layers(model)


def test_a_keras_file_with_flipped_bytes_is_refused_by_its_zip_checksum(
    keras_files, tmp_path
):
    # Keras's own reading: zip's CRC-32 catches the damage, though the
    # error (`zipfile.BadZipFile`) names the archive member, not the file.
    path = tmp_path / "model.keras"
    shutil.copy(keras_files["functional"], path)
    flip_middle(path)
    with pytest.raises(zipfile.BadZipFile, match="Bad CRC-32"):
        keras.saving.load_model(path)


def test_a_keras_file_with_an_unknown_adapter_weight_is_refused(
    keras_files, tmp_path
):
    path = tmp_path / "model.keras"
    shutil.copy(keras_files["functional"], path)
    edit_weights(add_weight)(path)
    with pytest.raises(ValueError, match="extra"):
        keras.saving.load_model(path)


def test_a_keras_file_with_nan_loads_as_keras_loads_any_model(
    keras_files, tmp_path
):
    # Deliberately not refused: a `.keras` file is a whole model, nothing of
    # the user's is mixed with it, and Keras loads NaN weights in every
    # model (a diverged run's checkpoint stays open to inspection).
    path = tmp_path / "model.keras"
    shutil.copy(keras_files["functional"], path)

    def nan(f):
        name = adapter_dataset(f, LAM)
        value = f[name][()]
        value[0] = np.nan
        f[name][...] = value

    edit_weights(nan)(path)
    model = keras.saving.load_model(path)
    lams = [to_numpy(layer.adalora_lam) for layer in adapted_layers(model)]
    assert any(np.isnan(lam).any() for lam in lams)


def lambda_model():
    inputs = keras.Input((8,))
    x = keras.layers.Dense(8, name="hidden")(inputs)
    x = keras.layers.Lambda(lambda t: t * 2.0, name="double")(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))


def test_a_keras_file_with_a_lambda_is_refused_in_safe_mode_as_keras_refuses_it(
    tmp_path,
):
    plain = lambda_model()
    adapted = apply_adalora(lambda_model(), init_rank=2)
    plain.save(tmp_path / "plain.keras")
    adapted.save(tmp_path / "adapted.keras")
    with pytest.raises(ValueError, match="safe_mode") as refused_plain:
        keras.saving.load_model(tmp_path / "plain.keras")
    with pytest.raises(ValueError, match="safe_mode") as refused_adapted:
        keras.saving.load_model(tmp_path / "adapted.keras")
    assert str(refused_adapted.value) == str(refused_plain.value)
    # And loads, as the plain model does, where the caller trusts the file.
    restored = keras.saving.load_model(
        tmp_path / "adapted.keras", safe_mode=False
    )
    assert get_rank_pattern(restored) == get_rank_pattern(adapted)
    x = np.ones((2, 8), "float32")
    np.testing.assert_allclose(
        to_numpy(restored(x)), to_numpy(adapted(x)), atol=1e-6
    )
