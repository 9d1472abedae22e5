"""What each mask update does to the function: the validation loss right
before and right after it, at the same weights.

One AdaLoRA run of the comparison benchmark's protocol (same data, splits,
model and optimizer as `compare.py`), with a probe callback listed after
`RankBudgetCallback`: whenever the masks change, it scores the validation
split with the new masks and with the previous ones (same weights), so the
difference is what that pruning step alone cost. Every `--every` steps it
also records the validation loss, for a trajectory to set beside a
uniform-rank run (`--method uniform`, no callback). Validation only; the
test split is not read.

    python benchmarks/pruning_probe.py --task spam --budget mid --learning-rate 4e-3
    python benchmarks/pruning_probe.py --task spam --budget mid --method uniform

Prints one line per mask update and writes the records as JSON (`--out`).
What it found is in `RESULTS.md`'s notes.
"""

import argparse
import json
import os
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench.protocol import (  # noqa: E402
    ADALORA_LAYER_METHODS, BUDGETS, TASKS, VARIANTS, adapter_rank_of, schedule_of,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=list(TASKS), default="spam")
    parser.add_argument("--budget", choices=list(BUDGETS), default="mid")
    parser.add_argument("--method", choices=list(ADALORA_LAYER_METHODS), default="adalora")
    parser.add_argument("--variant", choices=list(VARIANTS), default="rank-free")
    parser.add_argument("--learning-rate", type=float, default=4e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=10,
                        help="record the validation loss every this many steps")
    parser.add_argument("--delta-t", type=int, default=None,
                        help="the callback's delta_t (default: the callback's)")
    parser.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine",
                        help="as compare.py's")
    parser.add_argument("--out", default=None, help="JSON file for the records")
    parser.add_argument("--cache-dir", default=str(HERE / "results" / ".cache"),
                        help="where the tokenized splits are cached (compare.py's cache)")
    parser.add_argument("--smoke", action="store_true",
                        help="compare.py's tiny smoke settings, for the tests")
    args = parser.parse_args(argv)
    if args.learning_rate <= 0:
        parser.error("--learning-rate must be positive")
    if args.every < 1:
        parser.error("--every must be at least 1")
    if args.delta_t is not None and args.delta_t < 1:
        parser.error("--delta-t must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import compare
    import keras
    import numpy as np

    import keras_adalora
    from bench import runner, workers

    settings = compare.settings_of(compare.parse_args(
        ["--lr-schedule", args.lr_schedule] + (["--smoke"] if args.smoke else [])))
    spec = {
        "settings": settings,
        "task": args.task,
        "preset": runner.minilm_preset(),
        "cache_dir": args.cache_dir,
    }
    keras.utils.set_random_seed(args.seed)
    splits = workers.load_data(spec)
    model = workers.classifier(spec, len(splits["classes"]))
    target = BUDGETS[args.budget]
    init = adapter_rank_of(args.method, target)
    layers = workers.adapt(model, init, VARIANTS[args.variant]["adalora"], target, args.seed)
    x_val, y_val = splits["validation"]

    def score():
        losses, right = [], 0
        for start in range(0, len(y_val), 100):
            batch = {k: v[start:start + 100] for k, v in x_val.items()}
            logits = keras.ops.convert_to_numpy(model(batch, training=False))
            logits = logits - logits.max(axis=1, keepdims=True)
            log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            labels = y_val[start:start + 100]
            losses.append(-log_p[np.arange(len(labels)), labels])
            right += int((logits.argmax(axis=1) == labels).sum())
        return float(np.concatenate(losses).mean()), right / len(y_val)

    def masks():
        return [np.asarray(keras.ops.convert_to_numpy(l.rank_mask)) for l in layers]

    def set_masks(values):
        for layer, value in zip(layers, values):
            layer.rank_mask.assign(value)

    records = {"updates": [], "trajectory": [], "args": vars(args)}

    class Probe(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.step = 0
            self.previous = None

        def on_train_begin(self, logs=None):
            self.model  # noqa: B018 -- syncs the JAX state
            self.previous = masks()

        def on_train_batch_end(self, batch, logs=None):
            self.step += 1
            self.model  # noqa: B018 -- syncs the JAX state
            now = masks()
            if any(not np.array_equal(a, b) for a, b in zip(now, self.previous)):
                after = score()
                set_masks(self.previous)
                before = score()
                set_masks(now)
                pruned_scale = 0.0
                for layer, old, new in zip(layers, self.previous, now):
                    gone = (old > 0.5) & (new < 0.5)
                    lam = np.abs(keras.ops.convert_to_numpy(layer.adalora_lam))
                    pruned_scale += float(layer.scale * lam[gone].sum())
                record = {
                    "step": self.step,
                    "alive_before": int(sum(m.sum() for m in self.previous)),
                    "alive_after": int(sum(m.sum() for m in now)),
                    "val_loss_before": before[0], "val_loss_after": after[0],
                    "val_acc_before": before[1], "val_acc_after": after[1],
                    "pruned_scale_x_lam": pruned_scale,
                }
                records["updates"].append(record)
                print(f"step {self.step:4d}: {record['alive_before']} -> "
                      f"{record['alive_after']} alive, val loss {before[0]:.4f} -> "
                      f"{after[0]:.4f} (acc {before[1]:.3f} -> {after[1]:.3f}), "
                      f"sum scale*|lam| pruned {pruned_scale:.2f}", flush=True)
                self.previous = now
            if self.step % args.every == 0:
                loss, accuracy = score()
                records["trajectory"].append(
                    {"step": self.step, "val_loss": loss, "val_acc": accuracy})
                print(f"step {self.step:4d}: val loss {loss:.4f}, acc {accuracy:.3f}",
                      flush=True)

    callbacks = [Probe()]
    if args.method == "adalora":
        extra = {} if args.delta_t is None else {"delta_t": args.delta_t}
        schedule = schedule_of(settings["schedule"], args.variant)
        callbacks.insert(0, keras_adalora.RankBudgetCallback(
            target_rank=target, **schedule, **extra))
    x_fit, y_fit = splits["fit"]
    workers.compile_model(model, args.learning_rate, settings["lr_schedule"],
                          workers.fit_steps(settings, len(y_fit)))
    model.fit(workers._batches(x_fit, y_fit, settings["batch_size"], args.seed),
              epochs=settings["epochs"], verbose=0, callbacks=callbacks)
    loss, accuracy = score()
    records["final"] = {"val_loss": loss, "val_acc": accuracy}
    shock = sum(r["val_loss_after"] - r["val_loss_before"] for r in records["updates"])
    print(f"final val loss {loss:.4f}, acc {accuracy:.3f}; summed loss change at "
          f"mask updates {shock:+.4f} over {len(records['updates'])} updates")
    if args.out:
        pathlib.Path(args.out).write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
