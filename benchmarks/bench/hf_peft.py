"""One run of a peer: Hugging Face PEFT's AdaLoRA or LoRA on the same MiniLM.

The peer trains what a PEFT user would write: `transformers`'
`BertForSequenceClassification` read from the same MiniLM checkpoint, the
same 36 projections adapted (`query`, `key`, `value`, the attention output
and both feed-forward projections of each block), the new classifier
trained in full (PEFT's `modules_to_save` for a sequence-classification
task), a plain PyTorch loop. Everything the protocol fixes is the same as
in the Keras runs: the tokenized e-mails, the batches in the same order
(the same `tf.data` pipeline), AdamW with Keras's defaults besides the
learning rate, the learning-rate schedule, the steps, AdaLoRA's schedule
(`tinit` and `tfinal` at the callback's default fractions, `delta_t` 10,
`init_rank` 1.5x the budget). PEFT's own defaults stay where the protocol
says nothing (`lora_alpha` 8, `orth_reg_weight` 0.5, betas 0.85, no
dropout on the adapters).
"""

import math
import time

# The projections of a `transformers` BERT block that KerasHub names
# query, key, value, attention_output, feedforward_intermediate_dense and
# feedforward_output_dense (`protocol.PROJECTIONS`).
TARGET_MODULES = (
    r".*encoder\.layer\.\d+\.(attention\.self\.(query|key|value)"
    r"|attention\.output\.dense|intermediate\.dense|output\.dense)"
)
# Keras's AdamW defaults (`keras.optimizers.AdamW`), which the Keras runs use.
KERAS_ADAMW = {"betas": (0.9, 0.999), "eps": 1e-7, "weight_decay": 0.004}


def learning_rate_at(step, peak, schedule, total_steps):
    """The learning rate of optimizer step `step` (0-based), as
    `workers.learning_rate_of` gives Keras: `peak` throughout, or a linear
    warm-up from 0 over `warmup_fraction` of the steps, then a cosine decay
    to 0 (`keras.optimizers.schedules.CosineDecay` with `warmup_target`).

    >>> [round(learning_rate_at(t, 1.0, {"name": "cosine", "warmup_fraction": 0.1}, 20), 3)
    ...  for t in (0, 1, 2, 11, 20)]
    [0.0, 0.5, 1.0, 0.5, 0.0]
    >>> learning_rate_at(7, 2e-3, {"name": "constant"}, 20)
    0.002
    """
    name = (schedule or {"name": "constant"})["name"]
    if name == "constant":
        return peak
    warmup = max(1, int(round(schedule["warmup_fraction"] * total_steps)))
    if step < warmup:
        return peak * step / warmup
    decay_steps = max(1, total_steps - warmup)
    progress = min(step - warmup, decay_steps) / decay_steps
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


def peft_schedule(total_steps, schedule):
    """PEFT's `tinit`, `tfinal` and `deltaT` for the callback's schedule:
    `schedule` holds the callback's arguments (fractions of the run, or
    empty for its defaults: `tinit` 0.1, `tfinal` 0.7, `delta_t` 10). PEFT's
    `tfinal` is the length of the last phase, ours the step it starts at.

    PEFT's last mask (at step `total_steps - tfinal`, steps counted from 1
    here) reads scores, so it must come after the first step: in a run of
    a few steps the last phase is cut short to allow that.

    >>> peft_schedule(160, {})
    {'tinit': 16, 'tfinal': 48, 'deltaT': 10}
    >>> peft_schedule(2, {})
    {'tinit': 0, 'tfinal': 0, 'deltaT': 10}
    """
    tinit = schedule.get("tinit", 0.1)
    tfinal = schedule.get("tfinal", 0.7)
    start = int(round(tinit * total_steps)) if tinit < 1 else int(tinit)
    end = int(round(tfinal * total_steps)) if tfinal < 1 else int(tfinal)
    last_phase = max(0, min(total_steps - end, total_steps - 2))
    return {"tinit": start, "tfinal": last_phase,
            "deltaT": int(schedule.get("delta_t", 10))}


def adalora_ranks(model):
    """`{module name: alive components}` of a PEFT AdaLoRA model (the
    non-zero entries of each `lora_E`, which PEFT zeroes when it prunes)."""
    ranks = {}
    for name, parameter in model.named_parameters():
        if name.endswith("lora_E.default"):
            module = name[: -len(".lora_E.default")]
            ranks[module] = int((parameter.detach() != 0).sum())
    return ranks


def adapter_params(model, method, ranks=None):
    """The adapter's parameters once pruned components are dropped: an
    AdaLoRA component costs `d_in + d_out + 1`, a LoRA rank `d_in + d_out`."""
    total = 0
    for name, module in model.named_modules():
        if not hasattr(module, "lora_A") or "default" not in module.lora_A:
            continue
        d_in, d_out = module.in_features, module.out_features
        if method == "peft-adalora":
            total += ranks[name] * (d_in + d_out + 1)
        else:
            total += module.r["default"] * (d_in + d_out)
    return total


def _torch_batch(x, y=None):
    import torch

    batch = {
        "input_ids": torch.as_tensor(x["token_ids"], dtype=torch.long),
        "attention_mask": torch.as_tensor(x["padding_mask"], dtype=torch.long),
        "token_type_ids": torch.as_tensor(x["segment_ids"], dtype=torch.long),
    }
    if y is not None:
        batch["labels"] = torch.as_tensor(y, dtype=torch.long)
    return batch


def evaluate(model, x, y, batch_size=64):
    """`(mean cross-entropy, accuracy)` over `(x, y)`, in eval mode."""
    import numpy as np
    import torch

    model.eval()
    losses, right = [], 0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            xb = {k: v[start:start + batch_size] for k, v in x.items()}
            yb = y[start:start + batch_size]
            logits = model(**_torch_batch(xb)).logits
            target = torch.as_tensor(yb, dtype=torch.long)
            losses.append(float(torch.nn.functional.cross_entropy(
                logits, target, reduction="sum")))
            right += int((logits.argmax(-1).numpy() == np.asarray(yb)).sum())
    model.train()
    return sum(losses) / len(y), right / len(y)


def peft_model(spec, num_classes, total_steps):
    """The PEFT-wrapped `BertForSequenceClassification` of a spec."""
    import peft
    import transformers

    model = transformers.BertForSequenceClassification.from_pretrained(
        spec["preset"], num_labels=num_classes
    )
    common = {"task_type": "SEQ_CLS", "target_modules": TARGET_MODULES}
    if spec["method"] == "peft-adalora":
        config = peft.AdaLoraConfig(
            init_r=spec["init_rank"], target_r=spec["target_rank"],
            total_step=total_steps,
            **peft_schedule(total_steps, spec["schedule"]), **common,
        )
    else:
        config = peft.LoraConfig(r=spec["target_rank"], **common)
    return peft.get_peft_model(model, config)


def quality(spec, splits, record):
    """Trains the peer of `spec["method"]`; fills `record` as
    `workers.quality` does and returns it."""
    import numpy as np
    import torch

    from . import workers

    s, seed = spec["settings"], spec["seed"]
    torch.manual_seed(seed)
    x_fit, y_fit = splits["fit"]
    total = workers.fit_steps(s, len(y_fit))
    model = peft_model(spec, len(splits["classes"]), total)
    if spec["method"] == "peft-adalora":
        record["init_rank"] = spec["init_rank"]
    else:
        record["lora_rank"] = spec["target_rank"]
    trainable = [p for p in model.parameters() if p.requires_grad]
    record["trainable_params_training"] = int(sum(p.numel() for p in trainable))
    record["head_params"] = int(sum(
        p.numel() for n, p in model.named_parameters()
        if p.requires_grad and "classifier" in n))
    optimizer = torch.optim.AdamW(trainable, lr=0.0, **KERAS_ADAMW)
    model.train()
    step, losses, step_seconds = 0, [], []
    fit_started = time.perf_counter()
    for _ in range(s["epochs"]):
        losses = []
        batches = workers._batches(x_fit, y_fit, s["batch_size"], seed)
        for xb, yb in batches.as_numpy_iterator():
            began = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = learning_rate_at(step, spec["learning_rate"],
                                               s.get("lr_schedule"), total)
            loss = model(**_torch_batch(xb, yb)).loss
            loss.backward()
            optimizer.step()
            step += 1
            if spec["method"] == "peft-adalora":
                model.base_model.update_and_allocate(step)
            optimizer.zero_grad()
            losses.append(float(loss))
            step_seconds.append(time.perf_counter() - began)
    record["train_seconds"] = time.perf_counter() - fit_started
    record["steps"] = step
    record["median_step_seconds"] = float(np.median(step_seconds[1:] or step_seconds))
    record["final_train_loss"] = float(np.mean(losses))
    for split in ("validation", "test") if spec["evaluate_test"] else ("validation",):
        loss, accuracy = evaluate(model, *splits[split])
        prefix = "val" if split == "validation" else "test"
        record[f"{prefix}_loss"] = loss
        record[f"{prefix}_accuracy"] = accuracy
    ranks = None
    if spec["method"] == "peft-adalora":
        ranks = record["rank_pattern"] = adalora_ranks(model)
    record["adapter_params"] = adapter_params(model, spec["method"], ranks)
    record["trainable_params_final"] = record["adapter_params"] + record["head_params"]
    return record
