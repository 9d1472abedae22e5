"""Tiny random Hugging Face checkpoints of the families `export_peft` maps,
written with `save_pretrained` and read back by KerasHub (no network), and
batches that feed the same tokens to both sides."""

import numpy as np

VOCAB, LENGTH, BLOCKS = 40, 8, 2
FAMILIES = ("bert", "gpt2", "llama", "mistral", "gemma")


def hf_config(family):
    import transformers

    common = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=BLOCKS,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    if family == "bert":
        # KerasHub's BERT uses the tanh approximation of GELU, which
        # transformers calls "gelu_new"; with BERT's own exact "gelu" the two
        # ports differ by ~1e-4 once the adapters have trained, whatever the
        # adapter.
        return transformers.BertConfig(
            num_labels=3, hidden_act="gelu_new", **common
        )
    if family == "gpt2":
        return transformers.GPT2Config(
            vocab_size=VOCAB,
            n_embd=16,
            n_layer=BLOCKS,
            n_head=2,
            n_positions=16,
            bos_token_id=0,
            eos_token_id=0,
        )
    decoder = dict(
        num_key_value_heads=1, bos_token_id=0, eos_token_id=0, pad_token_id=0
    )
    if family == "llama":
        return transformers.LlamaConfig(**common, **decoder)
    if family == "mistral":
        return transformers.MistralConfig(**common, **decoder)
    if family == "gemma":
        return transformers.GemmaConfig(head_dim=8, **common, **decoder)
    raise ValueError(family)


def hf_task_class(family):
    import transformers

    return {
        "bert": transformers.BertForSequenceClassification,
        "gpt2": transformers.GPT2LMHeadModel,
        "llama": transformers.LlamaForCausalLM,
        "mistral": transformers.MistralForCausalLM,
        "gemma": transformers.GemmaForCausalLM,
    }[family]


def save_checkpoint(family, directory, seed=0):
    """Writes a random tiny checkpoint of `family`'s task model."""
    import torch

    torch.manual_seed(seed)
    model = hf_task_class(family)(hf_config(family))
    model.save_pretrained(directory)
    return directory


def load_hf(family, directory):
    return hf_task_class(family).from_pretrained(directory).eval()


def keras_task(family, directory):
    """The KerasHub task of `family` on the checkpoint in `directory`."""
    import keras_hub

    models = keras_hub.models
    backbone_class, task_class = {
        "bert": (models.BertBackbone, models.BertTextClassifier),
        "gpt2": (models.GPT2Backbone, models.GPT2CausalLM),
        "llama": (models.LlamaBackbone, models.LlamaCausalLM),
        "mistral": (models.MistralBackbone, models.MistralCausalLM),
        "gemma": (models.GemmaBackbone, models.GemmaCausalLM),
    }[family]
    backbone = backbone_class.from_preset(directory)
    if family == "bert":
        return task_class(backbone, num_classes=3, preprocessor=None)
    return task_class(backbone, preprocessor=None)


def tokens(n=4, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(1, VOCAB, size=(n, LENGTH)).astype("int32")


def keras_inputs(family, ids):
    x = {"token_ids": ids, "padding_mask": np.ones(ids.shape, bool)}
    if family == "bert":
        x["segment_ids"] = np.zeros(ids.shape, "int32")
    return x


def train_batch(family, n=16, seed=0):
    """`(x, y, sample_weight)` for a brief `fit` of the KerasHub task."""
    ids = tokens(n, seed)
    x = keras_inputs(family, ids)
    rng = np.random.default_rng(seed + 1)
    if family == "bert":
        return x, rng.integers(0, 3, size=(n,)), None
    return x, np.roll(ids, -1, axis=1), None


def keras_outputs(task, family, ids):
    """`(last hidden states, task outputs)` of the KerasHub task."""
    import keras

    x = keras_inputs(family, ids)
    hidden = task.backbone(x)
    if isinstance(hidden, dict):
        hidden = hidden["sequence_output"]
    out = task(x)
    return np.asarray(keras.ops.convert_to_numpy(hidden)), np.asarray(
        keras.ops.convert_to_numpy(out)
    )


def hf_outputs(model, ids):
    """`(last hidden states, logits)` of a transformers (or PEFT) model."""
    import torch

    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids, dtype=torch.long),
            attention_mask=torch.ones(ids.shape, dtype=torch.long),
            output_hidden_states=True,
        )
    return out.hidden_states[-1].numpy(), out.logits.numpy()
