"""AdaLoRA adapters out to PEFT and PEFT adapters in (`export_peft`,
`import_peft`).

The comparisons with transformers + PEFT run in the torch pass of the suite
(they need torch, as transformers does); the workflow and the errors run on
every backend, where the files are written and read without torch.
"""

import json
import os

import hf_models
import hub_models
import keras
import keras_hub
import numpy as np
import pytest
from helpers import fresh_process
from helpers import to_numpy

from keras_adalora import RankBudgetCallback
from keras_adalora import apply_adalora
from keras_adalora import export_peft
from keras_adalora import get_rank_pattern
from keras_adalora import import_peft
from keras_adalora.hf_families import identify
from keras_adalora.targets import adapted_layers

needs_torch = pytest.mark.skipif(
    keras.backend.backend() != "torch",
    reason="compared with transformers + PEFT in the torch pass",
)
# KerasHub's own Mistral port differs from transformers' by ~1e-3 in hidden
# states before any adapter, so Mistral is compared weight by weight only.
HIDDEN_EXACT = ("bert", "gpt2", "llama", "gemma")


def train_with_callback(task, family, epochs=3):
    x, y, _ = hf_models.train_batch(family)
    task.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    callback = RankBudgetCallback(target_rank=2, tinit=2, tfinal=6, delta_t=1)
    task.fit(x, y, batch_size=4, epochs=epochs, callbacks=[callback], verbose=0)
    return callback


def hf_deltas(peft_model, base_model):
    """`{hf module: delta weight}` of the PEFT model, merged, against its
    base, in the Hugging Face weight's own orientation."""
    merged = peft_model.merge_and_unload()
    base = dict(base_model.named_parameters())
    return {
        name[: -len(".weight")]: (
            param.detach().numpy() - base[name].detach().numpy()
        )
        for name, param in merged.named_parameters()
        if name.endswith(".weight") and name in base
    }


def keras_deltas(task):
    """The Hugging Face modules' deltas implied by the Keras adapters."""
    fam, task_info = identify(task, "test")
    prefix = task_info.prefix
    deltas = {}
    for layer in adapted_layers(task):
        module, part, parts = fam.hf_module(layer.path)
        matrix = to_numpy(layer.delta_matrix())
        deltas.setdefault(prefix + module, {})[part] = (matrix, parts)
    out = {}
    for module, pieces in deltas.items():
        parts = next(iter(pieces.values()))[1]
        width = next(iter(pieces.values()))[0].shape[1]
        d_in = next(iter(pieces.values()))[0].shape[0]
        full = np.zeros((d_in, width * parts))
        for part, (matrix, _) in pieces.items():
            full[:, part * width : (part + 1) * width] = matrix
        # GPT-2's Conv1D stores (in, out); Linear (out, in); Embedding (V, D).
        embedding = "embeddings" in module
        out[module] = full if (fam.fan_in_fan_out or embedding) else full.T
    return out


def assert_deltas_match(peft_model, family, checkpoint, task):
    """PEFT's merged weights minus the base are the Keras adapters'
    delta_W, module by module (atol 1e-5)."""
    deltas = hf_deltas(peft_model, hf_models.load_hf(family, checkpoint))
    for module, delta in keras_deltas(task).items():
        np.testing.assert_allclose(
            deltas[module], delta, atol=1e-5, err_msg=module
        )


@needs_torch
@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_export_loads_in_peft_and_computes_the_same(family, tmp_path):
    import peft

    checkpoint = hf_models.save_checkpoint(family, str(tmp_path / "base"))
    task = hf_models.keras_task(family, checkpoint)
    # BERT's and GPT-2's learned positions go to their nn.Embedding too.
    learned = family in ("bert", "gpt2")
    target = ["all"] + (["position_embeddings"] if learned else [])
    # Orthonormal factors at their larger scale: three epochs move the
    # hidden states far above the 1e-4 the comparison with PEFT allows.
    apply_adalora(task, init_rank=3, target=target, factor_init="orthogonal")
    train_with_callback(task, family)
    ranks = get_rank_pattern(task)
    assert 0 < sum(ranks.values()) < 3 * len(ranks)  # pruned, not all gone
    assert ("position_embedding" in ranks) == learned

    config = export_peft(
        task, tmp_path / "adapter", base_model_name_or_path=checkpoint
    )
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        assert json.load(f) == config
    fam, info = identify(task, "test")
    expected = {
        info.prefix + fam.hf_module(path)[0]: rank
        for path, rank in ranks.items()
    }
    if family == "gpt2":  # q, k and v go into one c_attn
        fused = {}
        for path, rank in ranks.items():
            name = info.prefix + fam.hf_module(path)[0]
            fused[name] = fused.get(name, 0) + rank
        expected = fused
    expected = {name: rank for name, rank in expected.items() if rank}
    assert config["rank_pattern"] == expected
    assert sorted(config["target_modules"]) == sorted(expected)
    assert config["task_type"] == info.task_type
    assert config["modules_to_save"] == (
        ["classifier"] if family == "bert" else None
    )

    peft_model = peft.PeftModel.from_pretrained(
        hf_models.load_hf(family, checkpoint), str(tmp_path / "adapter")
    ).eval()
    ids = hf_models.tokens()
    keras_hidden, keras_out = hf_models.keras_outputs(task, family, ids)
    hf_hidden, hf_logits = hf_models.hf_outputs(peft_model, ids)
    base_hidden, _ = hf_models.hf_outputs(
        hf_models.load_hf(family, checkpoint), ids
    )
    assert (
        np.abs(keras_hidden - base_hidden).max() > 1e-2
    )  # the adapter matters
    if family in HIDDEN_EXACT:
        np.testing.assert_allclose(keras_hidden, hf_hidden, atol=1e-4)
        np.testing.assert_allclose(keras_out, hf_logits, atol=1e-4)

    # Weight by weight.
    assert_deltas_match(peft_model, family, checkpoint, task)


def peft_train(model, family, steps=6, allocate=None):
    """A few AdamW steps of `model` (a PEFT model) on random tokens."""
    import torch

    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=1e-2
    )
    for step in range(steps):
        ids = torch.tensor(hf_models.tokens(4, seed=step), dtype=torch.long)
        if family == "bert":
            out = model(input_ids=ids, labels=torch.tensor([0, 1, 2, 0]))
        else:
            out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        optimizer.step()
        if allocate is not None:
            allocate(step)
        optimizer.zero_grad()
    return model.eval()


LORA_TARGETS = {
    "bert": [
        "query",
        "value",
        "intermediate.dense",
        "token_type_embeddings",
        "position_embeddings",
    ],
    "gpt2": ["c_attn", "mlp.c_proj", "wpe"],
    "llama": ["q_proj", "v_proj", "down_proj"],
    "mistral": ["k_proj", "o_proj", "gate_proj"],
    "gemma": ["q_proj", "up_proj"],
}


@needs_torch
@pytest.mark.parametrize("family", hf_models.FAMILIES)
def test_import_of_a_peft_lora_adapter_trained_in_torch(family, tmp_path):
    import peft

    checkpoint = hf_models.save_checkpoint(family, str(tmp_path / "base"))
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=LORA_TARGETS[family],
        rank_pattern=(
            {"layers.1.self_attn.q_proj": 2} if family == "llama" else {}
        ),
        modules_to_save=["classifier"] if family == "bert" else None,
        fan_in_fan_out=family == "gpt2",  # GPT-2's Conv1D
        task_type="SEQ_CLS" if family == "bert" else "CAUSAL_LM",
    )
    model = peft.get_peft_model(hf_models.load_hf(family, checkpoint), config)
    peft_train(model, family)
    model.save_pretrained(str(tmp_path / "lora"))

    task = hf_models.keras_task(family, checkpoint)
    import_peft(task, tmp_path / "lora")
    ranks = get_rank_pattern(task)
    if family == "llama":
        assert ranks["transformer_layer_1/self_attention/query"] == 2
        assert ranks["transformer_layer_0/self_attention/query"] == 4
    for path, rank in ranks.items():
        if path == "segment_embedding":  # segment 1 never seen: row 1 untrained
            assert 1 <= rank <= 2
        elif path != "transformer_layer_1/self_attention/query":
            assert rank == 4, path
    for layer in adapted_layers(task):  # SVD form: orthonormal factors
        a = to_numpy(layer.adalora_a)
        np.testing.assert_allclose(a.T @ a, np.eye(a.shape[1]), atol=1e-5)
    trainable = {v.path for v in task.trainable_variables}
    assert all(
        "adalora" in path or path.startswith("logits") for path in trainable
    ), trainable

    ids = hf_models.tokens()
    keras_hidden, keras_out = hf_models.keras_outputs(task, family, ids)
    hf_hidden, hf_logits = hf_models.hf_outputs(model, ids)
    if family in HIDDEN_EXACT:
        np.testing.assert_allclose(keras_hidden, hf_hidden, atol=1e-4)
        np.testing.assert_allclose(keras_out, hf_logits, atol=1e-4)
    assert_deltas_match(model, family, checkpoint, task)

    # AdaLoRA then prunes the imported LoRA adapter to a budget.
    callback = train_with_callback(task, family, epochs=2)
    assert sum(get_rank_pattern(task).values()) == callback.target_budget


@needs_torch
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_import_of_a_peft_adalora_adapter_after_its_pruning(family, tmp_path):
    import peft

    checkpoint = hf_models.save_checkpoint(family, str(tmp_path / "base"))
    targets = (
        ["c_attn", "c_proj"]
        if family == "gpt2"
        else ["q_proj", "v_proj", "up_proj"]
    )
    config = peft.AdaLoraConfig(
        init_r=4,
        target_r=2,
        lora_alpha=8,
        target_modules=targets,
        total_step=12,
        tinit=2,
        tfinal=4,
        deltaT=1,
        fan_in_fan_out=family == "gpt2",  # GPT-2's Conv1D
        task_type="CAUSAL_LM",
    )
    model = peft.get_peft_model(hf_models.load_hf(family, checkpoint), config)
    peft_train(
        model, family, steps=12, allocate=model.base_model.update_and_allocate
    )
    model.save_pretrained(str(tmp_path / "adalora"))
    with open(tmp_path / "adalora" / "adapter_config.json") as f:
        saved = json.load(f)
    patterns = saved["rank_pattern"]
    assert patterns and any(not all(p) for p in patterns.values())

    task = hf_models.keras_task(family, checkpoint)
    import_peft(task, tmp_path / "adalora")
    fam, info = identify(task, "test")
    for layer in adapted_layers(task):
        module = info.prefix + fam.hf_module(layer.path)[0]
        assert layer.init_rank == 4
        assert layer.active_rank == sum(patterns[module + ".lora_E"])

    ids = hf_models.tokens()
    keras_hidden, keras_out = hf_models.keras_outputs(task, family, ids)
    hf_hidden, hf_logits = hf_models.hf_outputs(model, ids)
    np.testing.assert_allclose(keras_hidden, hf_hidden, atol=1e-4)
    np.testing.assert_allclose(keras_out, hf_logits, atol=1e-4)
    assert_deltas_match(model, family, checkpoint, task)


# Every backend: the files alone, without torch.


def exported_gpt2(tmp_path, **apply_kwargs):
    task = hub_models.gpt2()
    task.save(tmp_path / "base.keras")
    apply_adalora(task, init_rank=3, target="all", **apply_kwargs)
    x, y, w = hub_models.batch("gpt2")
    task.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    callback = RankBudgetCallback(target_rank=2, tinit=2, tfinal=6, delta_t=1)
    task.fit(
        x,
        y,
        sample_weight=w,
        batch_size=4,
        epochs=3,
        callbacks=[callback],
        verbose=0,
    )
    return task


def test_export_then_import_in_a_fresh_process_without_torch(tmp_path):
    task = exported_gpt2(tmp_path)
    export_peft(task, tmp_path / "adapter")
    x, _, _ = hub_models.batch("gpt2")
    np.save(tmp_path / "expected.npy", to_numpy(task.predict(x, verbose=0)))
    ranks = {p: r for p, r in get_rank_pattern(task).items() if r}

    result = fresh_process(f"""
        import keras, keras_hub, hub_models
        import keras_adalora
        task = keras.saving.load_model({str(tmp_path / "base.keras")!r})
        keras_adalora.import_peft(task, {str(tmp_path / "adapter")!r})
        imported = keras_adalora.get_rank_pattern(task)
        x, y, w = hub_models.batch("gpt2")
        expected = np.load({str(tmp_path / "expected.npy")!r})
        diff = float(np.abs(task.predict(x, verbose=0) - expected).max())
        # Train on with the callback, save, reload, merge.
        task.compile(optimizer=keras.optimizers.Adam(1e-2),
                     loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        callback = keras_adalora.RankBudgetCallback(target_rank=1, tinit=1, tfinal=2, delta_t=1)
        task.fit(x, y, sample_weight=w, batch_size=4, epochs=2, callbacks=[callback], verbose=0)
        task.save({str(tmp_path / "trained.keras")!r})
        again = keras.saving.load_model({str(tmp_path / "trained.keras")!r})
        reload_diff = float(np.abs(again.predict(x, verbose=0) - task.predict(x, verbose=0)).max())
        before = task.predict(x, verbose=0)
        keras_adalora.merge_adalora(task)
        merge_diff = float(np.abs(task.predict(x, verbose=0) - before).max())
        report(
            diff=diff,
            imported=imported,
            ranks={{k: v for k, v in keras_adalora.get_rank_pattern(again).items()}},
            budget=int(callback.target_budget),
            reload_diff=reload_diff,
            merge_diff=merge_diff,
            torch_imported=any(m.split(".")[0] in ("torch", "transformers", "peft") for m in sys.modules),
        )
        """)
    assert result["diff"] < 1e-5
    assert result["imported"] == ranks  # exported ranks, c_attn split again
    assert set(result["ranks"]) == set(ranks)
    assert sum(result["ranks"].values()) == result["budget"]
    assert result["reload_diff"] < 1e-5
    assert result["merge_diff"] < 1e-4
    if keras.backend.backend() != "torch":
        assert not result["torch_imported"]


def test_export_leaves_the_model_unchanged_and_refuses_to_overwrite(tmp_path):
    task = exported_gpt2(tmp_path)
    before = {v.path: to_numpy(v).copy() for v in task.weights}
    export_peft(task, tmp_path / "adapter")
    assert all(
        np.array_equal(before[v.path], to_numpy(v)) for v in task.weights
    )
    with pytest.raises(FileExistsError, match="overwrite=False"):
        export_peft(task, tmp_path / "adapter", overwrite=False)


def test_export_warns_about_trained_layers_peft_cannot_hold(tmp_path):
    task = exported_gpt2(tmp_path, keep_trainable=["layer_norm"])
    with pytest.warns(UserWarning, match="leaves out the fully trained layers"):
        export_peft(task, tmp_path / "adapter")


def test_export_refuses_other_models_and_unmapped_layers(tmp_path):
    model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4)])
    apply_adalora(model, init_rank=2)
    with pytest.raises(ValueError, match="Supported families: bert"):
        export_peft(model, tmp_path / "a")
    task = hub_models.bert()
    apply_adalora(
        task, init_rank=2, target=["all", "logits"], keep_trainable=[]
    )
    with pytest.raises(ValueError, match=r"\['logits'\]"):
        export_peft(task, tmp_path / "b")
    assert not os.path.exists(tmp_path / "b")

    masked = keras_hub.models.BertMaskedLM(
        hub_models.bert().backbone, preprocessor=None
    )
    apply_adalora(masked, init_rank=2, target="all")
    with pytest.raises(ValueError, match="Pass the backbone"):
        export_peft(masked, tmp_path / "c")
    # The backbone alone exports for the Hugging Face base model.
    config = export_peft(masked.backbone, tmp_path / "c")
    assert config["task_type"] is None
    assert all(name.startswith("encoder.") for name in config["target_modules"])


def test_import_checks_everything_before_changing_the_model(tmp_path):
    task = exported_gpt2(tmp_path)
    export_peft(task, tmp_path / "adapter")

    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        import_peft(hub_models.gpt2(), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="already holds AdaLoRA layers"):
        import_peft(task, tmp_path / "adapter")

    # Another width: the module's shapes do not fit; nothing changes.
    wide = hub_models.gpt2(intermediate_dim=48)
    trainable = [v.path for v in wide.trainable_variables]
    with pytest.raises(
        ValueError, match=r"module 'transformer\.h\.\d\.mlp\.c_"
    ):
        import_peft(wide, tmp_path / "adapter")
    assert not adapted_layers(wide)
    assert [v.path for v in wide.trainable_variables] == trainable

    # Fewer blocks: the layers of block 1 are missing.
    short = hub_models.gpt2(num_layers=1)
    with pytest.raises(ValueError, match="fewer blocks"):
        import_peft(short, tmp_path / "adapter")
    assert not adapted_layers(short)

    # Another family.
    with pytest.raises(ValueError, match="does not map onto a KerasHub layer"):
        import_peft(hub_models.llama(), tmp_path / "adapter")

    # PEFT options that are not plain LoRA.
    path = tmp_path / "adapter" / "adapter_config.json"
    config = json.loads(path.read_text())
    for option, value, message in [
        ("use_dora", True, "DoRA"),
        ("bias", "all", "trained biases"),
        ("peft_type", "IA3", "reads LoRA and AdaLoRA adapters"),
    ]:
        path.write_text(json.dumps({**config, option: value}))
        fresh = hub_models.gpt2()
        with pytest.raises(ValueError, match=message):
            import_peft(fresh, tmp_path / "adapter")
        assert not adapted_layers(fresh)


def test_import_of_a_head_needs_the_task(tmp_path):
    task = hub_models.bert()
    apply_adalora(task, init_rank=2, target="all")
    export_peft(task, tmp_path / "adapter")
    with pytest.raises(ValueError, match="modules_to_save"):
        import_peft(hub_models.bert().backbone, tmp_path / "adapter")

    five = keras_hub.models.BertTextClassifier(
        hub_models.bert().backbone, num_classes=5, preprocessor=None
    )
    with pytest.raises(ValueError, match="num_classes"):
        import_peft(five, tmp_path / "adapter")
    assert not adapted_layers(five)
