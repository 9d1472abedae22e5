"""Where the layers of each KerasHub family live in its Hugging Face twin.

One table per family, read by `export_peft` and `import_peft` and by
nothing else. A table maps the path of a KerasHub layer (as `layer.path`
reads inside the backbone, `{}` standing for the block number) to the name
of the `transformers` module that holds the same matrix, and a KerasHub task
to its `transformers` class: the prefix that class puts before the
backbone's modules, PEFT's `task_type`, and the heads that go into a PEFT
adapter as `modules_to_save`.

Every kernel in these tables reads, as AdaLoRA's `(d_in, d_out)` matrix
(`EinsumMatrixView`), as the transpose of the Hugging Face `Linear` weight
`(out, in)` with the same flattening of heads (KerasHub's converters reshape
without permuting), or as the `Conv1D` weight of GPT-2 itself. PEFT's LoRA
factors `lora_A (r, in)`, `lora_B (out, r)` have that orientation for
either, so the tables need no per-layer transposes.

A module written `(name, k, n)` is the k-th of n equal slices, along its
outputs, of a fused Hugging Face matrix (GPT-2's `c_attn` holds the query,
key and value projections that KerasHub keeps apart).
"""

import re

# KerasHub keeps token embeddings in a `ReversibleEmbedding`, which AdaLoRA
# does not adapt, so the tables list no token embedding.


class Task:
    """A KerasHub task class and its `transformers` counterpart.

    Args:
        hf_class: the `transformers` class, e.g. `"LlamaForCausalLM"`.
        prefix: what that class puts before the backbone's module names,
            e.g. `"model."`.
        task_type: PEFT's `task_type` for it (`"SEQ_CLS"`, `"CAUSAL_LM"`).
        heads: `{KerasHub layer path: Hugging Face module}` for the task's
            trained heads that PEFT saves as `modules_to_save` (a `Dense`
            layer and a `Linear` module of the same shape).
    """

    def __init__(self, hf_class, prefix, task_type, heads=None):
        self.hf_class = hf_class
        self.prefix = prefix
        self.task_type = task_type
        self.heads = dict(heads or {})


class Family:
    """A KerasHub model family and its Hugging Face module names.

    Args:
        name: a short name, e.g. `"llama"`.
        backbones: KerasHub backbone class names of the family (subclasses
            count too).
        hf_class: the `transformers` class of the backbone alone.
        modules: `{KerasHub layer path template: Hugging Face module}`, a
            module being a name template or `(template, k, n)` for the k-th
            of n output slices of a fused matrix.
        tasks: `{KerasHub task class name: Task}`.
        fan_in_fan_out: whether the Hugging Face modules store `(in, out)`
            weights (`Conv1D`), which PEFT's config records.
    """

    def __init__(
        self, name, backbones, hf_class, modules, tasks, fan_in_fan_out=False
    ):
        self.name = name
        self.backbones = tuple(backbones)
        self.hf_class = hf_class
        self.tasks = dict(tasks)
        self.fan_in_fan_out = fan_in_fan_out
        self._entries = []
        for keras_template, module in modules.items():
            if isinstance(module, str):
                module = (module, 0, 1)
            hf_template, part, parts = module
            self._entries.append(
                (
                    keras_template,
                    re.compile(
                        r"(?:^|/)" + _template_regex(keras_template) + "$"
                    ),
                    hf_template,
                    re.compile(_template_regex(hf_template) + "$"),
                    part,
                    parts,
                )
            )

    def hf_module(self, path):
        """`(module, part, parts)` for a KerasHub layer path, or None."""
        for _, keras_re, hf_template, _, part, parts in self._entries:
            match = keras_re.search(path)
            if match:
                return hf_template.format(*match.groups()), part, parts
        return None

    def keras_paths(self, module):
        """`[(layer path, part, parts)]` of a Hugging Face module name (the
        backbone's, without a task prefix); empty if the table has none."""
        found = []
        for keras_template, _, _, hf_re, part, parts in self._entries:
            match = hf_re.fullmatch(module)
            if match:
                found.append(
                    (keras_template.format(*match.groups()), part, parts)
                )
        return found

    def prefixes(self):
        """The module prefixes of the family's `transformers` classes,
        longest first (the backbone's own, `""`, last)."""
        prefixes = {task.prefix for task in self.tasks.values()} | {""}
        return sorted(prefixes, key=len, reverse=True)


def _template_regex(template):
    return re.escape(template).replace(r"\{\}", r"(\d+)")


_LLAMA_MODULES = {
    "transformer_layer_{}/self_attention/query": "layers.{}.self_attn.q_proj",
    "transformer_layer_{}/self_attention/key": "layers.{}.self_attn.k_proj",
    "transformer_layer_{}/self_attention/value": "layers.{}.self_attn.v_proj",
    "transformer_layer_{}/self_attention/attention_output": "layers.{}.self_attn.o_proj",
    "transformer_layer_{}/feedforward_gate_dense": "layers.{}.mlp.gate_proj",
    "transformer_layer_{}/feedforward_intermediate_dense": "layers.{}.mlp.up_proj",
    "transformer_layer_{}/feedforward_output_dense": "layers.{}.mlp.down_proj",
}

FAMILIES = (
    Family(
        "bert",
        backbones=["BertBackbone"],
        hf_class="BertModel",
        modules={
            "transformer_layer_{}/self_attention_layer/query": "encoder.layer.{}.attention.self.query",
            "transformer_layer_{}/self_attention_layer/key": "encoder.layer.{}.attention.self.key",
            "transformer_layer_{}/self_attention_layer/value": "encoder.layer.{}.attention.self.value",
            "transformer_layer_{}/self_attention_layer/attention_output": "encoder.layer.{}.attention.output.dense",
            "transformer_layer_{}/feedforward_intermediate_dense": "encoder.layer.{}.intermediate.dense",
            "transformer_layer_{}/feedforward_output_dense": "encoder.layer.{}.output.dense",
            "pooled_dense": "pooler.dense",
            "segment_embedding": "embeddings.token_type_embeddings",
            "position_embedding": "embeddings.position_embeddings",
        },
        tasks={
            "BertTextClassifier": Task(
                "BertForSequenceClassification",
                prefix="bert.",
                task_type="SEQ_CLS",
                heads={"logits": "classifier"},
            ),
        },
    ),
    Family(
        "gpt2",
        backbones=["GPT2Backbone"],
        hf_class="GPT2Model",
        modules={
            "transformer_layer_{}/self_attention/query": (
                "h.{}.attn.c_attn",
                0,
                3,
            ),
            "transformer_layer_{}/self_attention/key": (
                "h.{}.attn.c_attn",
                1,
                3,
            ),
            "transformer_layer_{}/self_attention/value": (
                "h.{}.attn.c_attn",
                2,
                3,
            ),
            "transformer_layer_{}/self_attention/attention_output": "h.{}.attn.c_proj",
            "transformer_layer_{}/feedforward_intermediate_dense": "h.{}.mlp.c_fc",
            "transformer_layer_{}/feedforward_output_dense": "h.{}.mlp.c_proj",
            "position_embedding": "wpe",
        },
        tasks={
            "GPT2CausalLM": Task(
                "GPT2LMHeadModel", prefix="transformer.", task_type="CAUSAL_LM"
            ),
        },
        fan_in_fan_out=True,
    ),
    Family(
        "llama",
        backbones=["LlamaBackbone"],  # Llama3Backbone is a subclass
        hf_class="LlamaModel",
        modules=_LLAMA_MODULES,
        tasks={
            "LlamaCausalLM": Task(
                "LlamaForCausalLM", prefix="model.", task_type="CAUSAL_LM"
            ),
        },
    ),
    Family(
        "mistral",
        backbones=["MistralBackbone"],
        hf_class="MistralModel",
        modules=_LLAMA_MODULES,
        tasks={
            "MistralCausalLM": Task(
                "MistralForCausalLM", prefix="model.", task_type="CAUSAL_LM"
            ),
        },
    ),
    Family(
        "gemma",
        backbones=["GemmaBackbone"],
        hf_class="GemmaModel",
        modules={
            "decoder_block_{}/attention/query": "layers.{}.self_attn.q_proj",
            "decoder_block_{}/attention/key": "layers.{}.self_attn.k_proj",
            "decoder_block_{}/attention/value": "layers.{}.self_attn.v_proj",
            "decoder_block_{}/attention/attention_output": "layers.{}.self_attn.o_proj",
            "decoder_block_{}/ffw_gating": "layers.{}.mlp.gate_proj",
            "decoder_block_{}/ffw_gating_2": "layers.{}.mlp.up_proj",
            "decoder_block_{}/ffw_linear": "layers.{}.mlp.down_proj",
        },
        tasks={
            "GemmaCausalLM": Task(
                "GemmaForCausalLM", prefix="model.", task_type="CAUSAL_LM"
            ),
        },
    ),
)


def _class_names(obj):
    return [cls.__name__ for cls in type(obj).__mro__]


def identify(model, caller):
    """The `(family, task)` of a KerasHub backbone or task model.

    `task` is None for a backbone alone.

    Raises:
        ValueError: naming `caller` and the supported families, for a model
            of another family, or a task class without a table.
    """
    backbone = getattr(model, "backbone", None)
    is_task = backbone is not None and backbone is not model
    names = _class_names(backbone if is_task else model)
    family = next(
        (f for f in FAMILIES if any(name in f.backbones for name in names)),
        None,
    )
    if family is None:
        supported = ", ".join(
            f"{f.name} ({'/'.join(f.backbones)})" for f in FAMILIES
        )
        raise ValueError(
            f"`{caller}` maps KerasHub models onto their Hugging Face "
            f"modules, and has no table for model '{model.name}' (a "
            f"{type(model).__name__}"
            + (f" on a {type(backbone).__name__}" if is_task else "")
            + f"). Supported families: {supported}. For other models, "
            "`keras_adalora.save_adapter`/`load_adapter` keep the adapter "
            "in Keras."
        )
    if not is_task:
        return family, None
    task_names = _class_names(model)
    task = next(
        (family.tasks[name] for name in task_names if name in family.tasks),
        None,
    )
    if task is None:
        known = ", ".join(sorted(family.tasks))
        raise ValueError(
            f"`{caller}` knows the Hugging Face class of the {family.name} "
            f"tasks {known}, not of {type(model).__name__}. Pass the "
            f"backbone instead (`model.backbone`, the Hugging Face "
            f"{family.hf_class}); the task's own layers are then left out."
        )
    return family, task
