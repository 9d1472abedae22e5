"""`summary`, `plot_rank_allocation` and the block/kind reading of paths."""

import sys

import numpy as np
import pytest
from helpers import mlp

import keras_adalora
from keras_adalora import RankBudgetCallback
from keras_adalora import apply_adalora
from keras_adalora.summary import adapter_table
from keras_adalora.summary import block_grid


def test_block_grid_reads_blocks_and_kinds_in_data_flow_order():
    paths = [
        "decoder_block_1/ffw_linear",
        "decoder_block_1/attention/query",
        "decoder_block_0/attention/value",
        "decoder_block_0/attention/query",
        "decoder_block_0/ffw_gating",
        "decoder_block_1/attention/value",
        "lm_head",
    ]
    blocks, kinds, cells, others = block_grid(paths)
    assert blocks == [0, 1]
    assert kinds == ["query", "value", "ffw_gating", "ffw_linear"]
    assert cells["decoder_block_1/attention/query"] == (1, 0)
    assert cells["decoder_block_0/ffw_gating"] == (0, 2)
    assert others == ["lm_head"]


def test_block_grid_keeps_full_kinds_when_their_last_parts_clash():
    paths = [f"layer_{i}/{part}/query" for i in (0, 1) for part in ("self", "cross")]
    _, kinds, _, _ = block_grid(paths)
    assert kinds == ["self/query", "cross/query"]


@pytest.mark.parametrize(
    "paths",
    [
        ["mlp/hidden", "mlp/hidden_2"],  # numbered leaves are not blocks
        ["sequential_1/dense", "sequential_1/dense_1"],  # one model, not blocks
        [],
    ],
)
def test_block_grid_is_none_without_repeated_blocks(paths):
    assert block_grid(paths) is None


def pruned_mlp():
    model = apply_adalora(mlp(), init_rank=4, target=["hidden"])
    model.get_layer("hidden").rank_mask.assign(np.array([1, 1, 0, 0], "float32"))
    return model


def test_adapter_table_counts_alive_parameters():
    records = adapter_table(pruned_mlp())
    assert [(r["path"], r["active_rank"], r["params"]) for r in records] == [
        ("hidden", 2, 2 * (16 + 32 + 1)),
        ("hidden_2", 4, 4 * (32 + 32 + 1)),
    ]


@pytest.mark.parametrize(
    "budget, verdict",
    [(None, None), (6, "reached"), (5, "1 components above"), (8, "2 components below")],
)
def test_summary_totals_against_the_budget(budget, verdict):
    lines = []
    keras_adalora.summary(pruned_mlp(), budget=budget, print_fn=lines.append)
    assert lines[0] == "AdaLoRA layers of model 'mlp'"
    assert lines[-2 if budget is not None else -1].startswith(
        "Budget" if budget is not None else "Parameters"
    )
    total = next(line for line in lines if line.startswith("Total")).split()
    assert total[1:] == ["8", "6", "358"]
    if verdict:
        assert verdict in lines[-2]


def test_summary_takes_the_callback_once_it_knows_the_model():
    callback = RankBudgetCallback(target_rank=2)
    with pytest.raises(ValueError, match="has not been used with a model"):
        keras_adalora.summary(pruned_mlp(), budget=callback)
    with pytest.raises(ValueError, match="`budget` must be"):
        keras_adalora.summary(pruned_mlp(), budget="all")
    model = pruned_mlp()
    model.compile(optimizer="adam", loss="mse")
    callback.set_model(model)
    lines = []
    keras_adalora.summary(model, budget=callback, print_fn=lines.append)
    assert "Budget: 4 components, 2 components above it" in lines[-2]


def test_summary_of_a_plain_model_says_how_to_adapt_it():
    with pytest.raises(ValueError, match="apply_adalora"):
        keras_adalora.summary(mlp())


def test_models_without_blocks_get_one_bar_per_layer(tmp_path):
    figure = keras_adalora.plot_rank_allocation(pruned_mlp(), tmp_path / "r.png")
    assert (tmp_path / "r.png").stat().st_size > 0
    labels = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert labels == ["hidden", "hidden_2"]
    widths = sorted(p.get_width() for p in figure.axes[0].patches)
    assert widths == [2, 4, 4, 4]  # active 2 and 4 over initial 4 and 4


def test_plotting_into_a_missing_folder_creates_it(tmp_path):
    path = tmp_path / "plots" / "run-1" / "ranks.png"
    keras_adalora.plot_rank_allocation(pruned_mlp(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    keras_adalora.plot_rank_allocation(pruned_mlp(), str(tmp_path / "again.png"))
    assert (tmp_path / "again.png").stat().st_size > 0


def test_plotting_without_matplotlib_says_how_to_install_it(monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match="pip install matplotlib"):
        keras_adalora.plot_rank_allocation(pruned_mlp())
