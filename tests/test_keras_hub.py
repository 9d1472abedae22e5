"""KerasHub models end to end: BERT classifier, GPT-2, Gemma and Llama causal
LMs, each built from a tiny config: named targets, unchanged outputs at the
start, the budget reached by `fit`, the adapter file on a fresh base, merge
and `generate()`."""

import warnings

import keras
import numpy as np
import pytest
from helpers import to_numpy

import keras_adalora
from keras_adalora import RankBudgetCallback
from keras_adalora import apply_adalora
from keras_adalora import compact_adalora
from keras_adalora import get_rank_pattern
from keras_adalora import load_adapter
from keras_adalora import merge_adalora
from keras_adalora import save_adapter
from keras_adalora.targets import adapted_layers

keras_hub = pytest.importorskip("keras_hub")

from hub_models import BLOCKS  # noqa: E402
from hub_models import FAMILIES  # noqa: E402
from hub_models import LENGTH  # noqa: E402
from hub_models import batch  # noqa: E402
from hub_models import bert  # noqa: E402


def base_weights(model):
    return [np.array(to_numpy(w)) for w in model.weights]


def fresh_copy(family, weights):
    """A new, identical base model (what a user rebuilds from a preset)."""
    model = FAMILIES[family][0]()
    for variable, value in zip(model.weights, weights):
        variable.assign(value)
    return model


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize(
    "target, per_block",
    [("attention", 4), ("ffn", None), ("all", None), ("lora_names", 2)],
)
def test_named_targets_pick_the_projections(family, target, per_block):
    build, ffn = FAMILIES[family]
    model = build()
    expected = {"attention": 4, "ffn": ffn, "all": 4 + ffn}.get(target, per_block)
    if target == "lora_names":
        # KerasHub's own names, as in `backbone.enable_lora(rank)`.
        target = model.backbone.default_lora_layer_names()
    apply_adalora(model, init_rank=2, target=target)
    paths = list(get_rank_pattern(model))
    assert len(paths) == expected * BLOCKS
    if target == "attention":
        assert all("attention" in p for p in paths)
    if target == "ffn":
        assert not any("attention" in p for p in paths)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_position_embeddings_are_opt_in_and_found_where_a_family_learns_them(family):
    """BERT and GPT-2 learn their positions (a KerasHub `PositionEmbedding`);
    Gemma and Llama rotate them, so there is nothing to adapt."""
    model = FAMILIES[family][0]()
    learned = family in ("bert", "gpt2")
    apply_adalora(model, init_rank=2, target=["all", "embeddings"])
    assert "position_embedding" not in get_rank_pattern(model)
    model = FAMILIES[family][0]()
    if not learned:
        with pytest.raises(ValueError, match="'position_embeddings' selects"):
            apply_adalora(model, init_rank=2, target="position_embeddings")
        return
    apply_adalora(model, init_rank=2, target="position_embeddings")
    assert list(get_rank_pattern(model)) == ["position_embedding"]
    layer = model.backbone.position_embedding
    assert type(layer).__name__ == "AdaLoRAPositionEmbedding"
    assert [v.name for v in layer.trainable_weights] == [
        "adalora_A",
        "adalora_lam",
        "adalora_B",
    ]
    lines = []
    keras_adalora.summary(model, print_fn=lines.append)
    assert lines[-1].startswith("Rank by role: position_embeddings 2 of 2 (1 layer)")
    with pytest.raises(ValueError, match="already adapted"):
        apply_adalora(model, init_rank=2, target="position_embeddings")


def fit_with_budget(model, x, y, sample_weight):
    """Three epochs of training with a `RankBudgetCallback` of average rank
    1 (a causal LM keeps greedy sampling for `generate()`); the callback."""
    callback = RankBudgetCallback(target_rank=1, tinit=2, tfinal=8, delta_t=2)
    sampler = {"sampler": "greedy"} if hasattr(model, "generate") else {}
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
        **sampler,
    )
    model.fit(
        x,
        y,
        sample_weight=sample_weight,
        batch_size=4,
        epochs=3,
        callbacks=[callback],
        verbose=0,
    )
    return callback


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_adapt_train_save_load_merge(family, tmp_path):
    build, ffn = FAMILIES[family]
    model = build()
    x, y, sample_weight = batch(family)
    before = to_numpy(model.predict(x, verbose=0))
    weights = base_weights(model)

    apply_adalora(model, init_rank=4, target="all")
    layers = adapted_layers(model)
    assert len(layers) == (4 + ffn) * BLOCKS
    np.testing.assert_allclose(
        to_numpy(model.predict(x, verbose=0)), before, atol=1e-5
    )
    # The backbone is frozen; the adapters train, and so does a task head.
    adapter_weights = sum(len(layer.trainable_weights) for layer in layers)
    head = [] if family != "bert" else model.get_layer("logits").trainable_weights
    assert len(model.trainable_weights) == adapter_weights + len(head)

    callback = fit_with_budget(model, x, y, sample_weight)
    assert sum(get_rank_pattern(model).values()) == callback.target_budget
    assert callback.target_budget == len(layers)
    trained = to_numpy(model.predict(x, verbose=0))
    assert not np.allclose(trained, before, atol=1e-4)

    path = tmp_path / f"{family}.adalora.h5"
    save_adapter(model, path)
    restored = load_adapter(fresh_copy(family, weights), path)
    assert get_rank_pattern(restored) == get_rank_pattern(model)
    np.testing.assert_allclose(
        to_numpy(restored.predict(x, verbose=0)), trained, atol=1e-5
    )

    if family != "bert":
        prompt = {
            "token_ids": np.array([[3, 4, 5, 0, 0, 0, 0, 0]] * 2, "int32"),
            "padding_mask": np.array([[1, 1, 1, 0, 0, 0, 0, 0]] * 2, bool),
        }
        adapted_tokens = model.generate(prompt, stop_token_ids=None)
        assert adapted_tokens["token_ids"].shape == (2, LENGTH)
        assert adapted_tokens["padding_mask"][:, 3:].all()  # it generated

    merge_adalora(model)
    assert not adapted_layers(model)
    np.testing.assert_allclose(
        to_numpy(model.predict(x, verbose=0)), trained, atol=1e-4
    )
    if family != "bert":
        # Generation runs on the merged model too (its logits match the
        # adapted model's, above; greedy tokens of a tiny random model can
        # still flip on near-ties, so they are not compared).
        merged_tokens = model.generate(prompt, stop_token_ids=None)
        np.testing.assert_array_equal(merged_tokens["token_ids"][:, :3], [[3, 4, 5]] * 2)


def test_bert_summary_and_heatmap(tmp_path):
    model = apply_adalora(bert(), init_rank=4, target="all")
    layers = adapted_layers(model)
    for i, layer in enumerate(layers):
        mask = np.zeros(4, "float32")
        mask[: i % 5] = 1.0
        layer.rank_mask.assign(mask)
    lines = []
    keras_adalora.summary(model, budget=12, print_fn=lines.append)
    rows = [line for line in lines if line.startswith("transformer_layer")]
    assert len(rows) == 12
    # Block by block, each in data-flow order.
    assert [r.split()[0].split("/")[-1] for r in rows[:6]] == [
        "query",
        "key",
        "value",
        "attention_output",
        "feedforward_intermediate_dense",
        "feedforward_output_dense",
    ]
    alive = sum(get_rank_pattern(model).values())
    total = next(line for line in lines if line.startswith("Total"))
    assert total.split()[-2] == str(alive)
    verdict = "reached" if alive == 12 else "above"
    assert verdict in next(line for line in lines if line.startswith("Budget"))
    attention = sum(r for p, r in get_rank_pattern(model).items() if "attention" in p)
    assert lines[-1] == (
        f"Rank by role: attention {attention} of 32 (8 layers), "
        f"ffn {alive - attention} of 16 (4 layers)."
    )

    figure = keras_adalora.plot_rank_allocation(model, tmp_path / "ranks.png")
    assert (tmp_path / "ranks.png").stat().st_size > 0
    axes = figure.axes[0]
    assert [t.get_text() for t in axes.get_xticklabels()] == ["0", "1"]
    assert len(axes.get_yticklabels()) == 6
    cells = sorted(int(t.get_text()) for t in axes.texts)
    assert cells == sorted(get_rank_pattern(model).values())


def test_a_task_head_stays_trainable_unless_told_otherwise():
    model = apply_adalora(bert(), init_rank=2)  # target=None: every Dense
    paths = get_rank_pattern(model)
    assert "pooled_dense" in paths and "logits" not in paths
    assert {v.path for v in model.get_layer("logits").trainable_weights} == {
        "logits/kernel",
        "logits/bias",
    }
    frozen_head = apply_adalora(bert(), init_rank=2, target="all", keep_trainable=[])
    assert not frozen_head.get_layer("logits").trainable_weights


def test_a_head_holding_the_token_embedding_leaves_it_frozen():
    # BertMaskedLM's head holds the backbone's token embedding (tied
    # weights): the head trains, the backbone's embedding stays frozen, on
    # every backend (whichever of the two the model's layers list first).
    masked = keras_hub.models.BertMaskedLM(bert().backbone, preprocessor=None)
    apply_adalora(masked, init_rank=2, target="all")
    trained = {v.path for v in masked.trainable_variables if "adalora" not in v.path}
    assert trained == {
        "mlm_head/output_bias",
        "mlm_head/intermediate_dense/kernel",
        "mlm_head/intermediate_dense/bias",
        "mlm_head/intermediate_layer_norm/gamma",
        "mlm_head/intermediate_layer_norm/beta",
    }


@pytest.mark.parametrize("family", ["gpt2", "gemma", "llama"])
def test_token_embeddings_share_the_budget_through_fit_files_and_merge(
    family, tmp_path
):
    """`target=["all", "embeddings"]` adapts the token embedding of a causal
    LM (tied to the logits in GPT-2 and Gemma, untied in Llama) beside the
    projections, and one budget is shared between them; GPT-2 adds its
    learned position embeddings ("position_embeddings"), which `generate()`
    reads from a `start_index` at every cached step."""
    model = FAMILIES[family][0]()
    x, y, sample_weight = batch(family)
    prompt = {
        "token_ids": np.array([[3, 4, 5, 0, 0, 0, 0, 0]] * 2, "int32"),
        "padding_mask": np.array([[1, 1, 1, 0, 0, 0, 0, 0]] * 2, bool),
    }
    model.compile(sampler="greedy")
    before = to_numpy(model.predict(x, verbose=0))
    before_tokens = model.generate(prompt, stop_token_ids=None)["token_ids"]
    weights = base_weights(model)
    table = to_numpy(model.backbone.token_embedding.embeddings).copy()
    tied = model.backbone.token_embedding.tie_weights
    assert tied == (family != "llama")

    positions = family == "gpt2"
    target = ["all", "embeddings"] + (["position_embeddings"] if positions else [])
    apply_adalora(model, init_rank=4, target=target)
    embedding = model.backbone.token_embedding
    assert type(embedding).__name__ == "AdaLoRAReversibleEmbedding"
    assert "token_embedding" in get_rank_pattern(model)
    assert ("position_embedding" in get_rank_pattern(model)) == positions
    np.testing.assert_allclose(to_numpy(model.predict(x, verbose=0)), before, atol=1e-5)
    np.testing.assert_array_equal(
        model.generate(prompt, stop_token_ids=None)["token_ids"], before_tokens
    )
    frozen = {v.path for v in model.weights if "_embedding/" in v.path} - {
        v.path for v in model.trainable_weights
    }
    assert frozen == {"token_embedding/embeddings", "token_embedding/rank_mask"} | (
        set() if tied else {"token_embedding/reverse_embeddings"}
    ) | (
        {"position_embedding/embeddings", "position_embedding/rank_mask"}
        if positions
        else set()
    )

    callback = fit_with_budget(model, x, y, sample_weight)
    layers = adapted_layers(model)
    assert (
        sum(get_rank_pattern(model).values()) == callback.target_budget == len(layers)
    )
    lines = []
    keras_adalora.summary(model, print_fn=lines.append)
    assert lines[-1].startswith("Rank by role: embeddings ")
    trained = to_numpy(model.predict(x, verbose=0))
    assert not np.allclose(trained, before, atol=1e-4)
    # The pretrained table never moved.
    np.testing.assert_array_equal(to_numpy(embedding._embeddings), table)

    # The adapter file onto a fresh base, and the .keras round trip.
    save_adapter(model, tmp_path / "lm.adalora.h5")
    restored = load_adapter(fresh_copy(family, weights), tmp_path / "lm.adalora.h5")
    assert get_rank_pattern(restored) == get_rank_pattern(model)
    np.testing.assert_allclose(
        to_numpy(restored.predict(x, verbose=0)), trained, atol=1e-5
    )
    model.save(tmp_path / "lm.keras")
    reloaded = keras.saving.load_model(tmp_path / "lm.keras")
    assert (
        type(reloaded.backbone.token_embedding).__name__ == "AdaLoRAReversibleEmbedding"
    )
    np.testing.assert_allclose(
        to_numpy(reloaded.predict(x, verbose=0)), trained, atol=1e-5
    )

    adapted_tokens = model.generate(prompt, stop_token_ids=None)["token_ids"]
    compact_adalora(model)
    assert embedding.adapter_rank == embedding.active_rank
    np.testing.assert_allclose(
        to_numpy(model.predict(x, verbose=0)), trained, atol=1e-5
    )
    merge_adalora(model)
    assert type(model.backbone.token_embedding) is keras.layers.ReversibleEmbedding
    if positions:
        position = model.backbone.position_embedding
        assert type(position) is keras_hub.layers.PositionEmbedding
    np.testing.assert_allclose(
        to_numpy(model.predict(x, verbose=0)), trained, atol=1e-4
    )
    merged_tokens = model.generate(prompt, stop_token_ids=None)["token_ids"]
    np.testing.assert_array_equal(merged_tokens[:, :3], adapted_tokens[:, :3])


# Gemma only (its table tied to the logits): an untied quantized table is
# tested in tests/test_quantized.py, and a causal LM costs a minute a pass.
@pytest.mark.parametrize("family", ["gemma"])
def test_a_causal_lm_quantized_to_int8_adapts_with_its_token_embedding(
    family, tmp_path
):
    """README's QLoRA example: `model.quantize("int8")`, then
    `target=["all", "embeddings"]`: outputs and `generate()` unchanged at the start, the
    quantized weights never move, the exact budget, a `.keras` round trip,
    and a merge that stays int8."""
    keras.utils.set_random_seed(0)
    model = FAMILIES[family][0]()
    x, y, sample_weight = batch(family)
    prompt = {
        "token_ids": np.array([[3, 4, 5, 0, 0, 0, 0, 0]] * 2, "int32"),
        "padding_mask": np.array([[1, 1, 1, 0, 0, 0, 0, 0]] * 2, bool),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # layers without `quantize`
        model.quantize("int8")
    model.compile(sampler="greedy")
    before = to_numpy(model.predict(x, verbose=0))
    before_tokens = model.generate(prompt, stop_token_ids=None)["token_ids"]
    quantized = {v.path: to_numpy(v).copy() for v in model.weights}

    # Orthonormal factors at their larger scale: three epochs move the
    # outputs far more than re-quantizing the merged kernels does.
    apply_adalora(
        model, init_rank=4, target=["all", "embeddings"], factor_init="orthogonal"
    )
    layers = adapted_layers(model)
    assert {layer.quantization_mode for layer in layers} == {"int8"}
    assert "token_embedding" in get_rank_pattern(model)
    # (XLA may fuse the adapter's zero term differently: float32 round-off.)
    np.testing.assert_allclose(to_numpy(model.predict(x, verbose=0)), before, atol=1e-6)
    np.testing.assert_array_equal(
        model.generate(prompt, stop_token_ids=None)["token_ids"], before_tokens
    )
    assert all("adalora_" in v.path for v in model.trainable_weights)

    callback = fit_with_budget(model, x, y, sample_weight)
    assert sum(get_rank_pattern(model).values()) == callback.target_budget == len(layers)
    for variable in model.weights:
        if variable.path in quantized:
            np.testing.assert_array_equal(
                to_numpy(variable), quantized[variable.path], err_msg=variable.path
            )
    trained = to_numpy(model.predict(x, verbose=0))
    moved = np.abs(trained - before).max()
    assert moved > 1e-3

    model.save(tmp_path / "lm.keras")
    reloaded = keras.saving.load_model(tmp_path / "lm.keras")
    assert reloaded.backbone.token_embedding.quantization_mode == "int8"
    np.testing.assert_allclose(
        to_numpy(reloaded.predict(x, verbose=0)), trained, atol=1e-5
    )
    with pytest.warns(UserWarning, match="re-quantized"):
        merge_adalora(model)
    embedding = model.backbone.token_embedding
    assert type(embedding) is keras.layers.ReversibleEmbedding
    assert embedding.quantization_mode == "int8"
    assert np.abs(to_numpy(model.predict(x, verbose=0)) - trained).max() < 0.5 * moved
