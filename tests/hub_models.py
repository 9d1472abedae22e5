"""Tiny KerasHub models of four families (BERT classifier, GPT-2, Gemma and
Llama causal LMs) and batches for them, shared by the tests (and by the
fresh processes some tests start)."""

import keras_hub
import numpy as np

VOCAB, LENGTH, BLOCKS = 40, 8, 2


def bert():
    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=VOCAB,
        num_layers=BLOCKS,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=LENGTH,
    )
    return keras_hub.models.BertTextClassifier(
        backbone, num_classes=3, preprocessor=None
    )


def bert_with_preprocessor():
    """`bert()` with its preprocessor: the classifier takes raw text."""
    words = ["spam", "ham", "offer", "meeting", "free", "lunch", "win", "now"]
    tokenizer = keras_hub.models.BertTokenizer(
        vocabulary=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words
    )
    preprocessor = keras_hub.models.BertTextClassifierPreprocessor(
        tokenizer, sequence_length=LENGTH
    )
    model = bert()
    return keras_hub.models.BertTextClassifier(
        model.backbone, num_classes=3, preprocessor=preprocessor
    )


def texts(n=16, seed=0):
    """Short texts for `bert_with_preprocessor`, and labels."""
    rng = np.random.default_rng(seed)
    words = ["spam", "ham", "offer", "meeting", "free", "lunch", "win", "now"]
    x = np.array([" ".join(rng.choice(words, size=4)) for _ in range(n)])
    return x, rng.integers(0, 3, size=(n,))


def gpt2(**overrides):
    """A tiny GPT-2 causal LM; `overrides` change its backbone's arguments."""
    arguments = dict(
        vocabulary_size=VOCAB,
        num_layers=BLOCKS,
        num_heads=2,
        hidden_dim=16,
        intermediate_dim=32,
        max_sequence_length=LENGTH,
    )
    backbone = keras_hub.models.GPT2Backbone(**{**arguments, **overrides})
    return keras_hub.models.GPT2CausalLM(backbone, preprocessor=None)


def gemma():
    backbone = keras_hub.models.GemmaBackbone(
        vocabulary_size=VOCAB,
        num_layers=BLOCKS,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
        head_dim=8,
    )
    return keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)


def llama():
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=VOCAB,
        num_layers=BLOCKS,
        num_query_heads=2,
        num_key_value_heads=1,
        hidden_dim=16,
        intermediate_dim=32,
    )
    return keras_hub.models.LlamaCausalLM(backbone, preprocessor=None)


# Family -> (builder, feed-forward projections per block).
FAMILIES = {
    "bert": (bert, 2),
    "gpt2": (gpt2, 2),
    "gemma": (gemma, 3),
    "llama": (llama, 3),
}


def batch(family, n=16, seed=0):
    """Inputs and targets for `fit`/`predict` without a preprocessor."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCAB, size=(n, LENGTH)).astype("int32")
    padding = np.ones((n, LENGTH), bool)
    padding[: n // 2, -2:] = False
    x = {"token_ids": tokens, "padding_mask": padding}
    if family == "bert":
        x["segment_ids"] = np.zeros((n, LENGTH), "int32")
        return x, rng.integers(0, 3, size=(n,)), None
    # Causal LM: predict the next token, ignore padded positions.
    y = np.roll(tokens, -1, axis=1)
    return x, y, padding.astype("float32")
