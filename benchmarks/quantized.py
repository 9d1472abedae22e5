"""Peak memory and step time of AdaLoRA on a quantized (int8) base.

Three ways to fine-tune the same KerasHub Llama-style causal LM (random
weights, built at a realistic width), every attention and feed-forward
projection adapted at the same initial rank:

- `adalora-int8`: `causal_lm.quantize("int8")`, then `apply_adalora`, fitted
  with `RankBudgetCallback` (the QLoRA-style workflow);
- `adalora-float`: `apply_adalora` on the float model, fitted the same way;
- `lora-int8`: `causal_lm.quantize("int8")`, then Keras's own
  `layer.enable_lora(rank)` on the same projections, every other weight
  frozen.

Each configuration trains in a fresh process (peak resident memory is a
high-water mark, so it cannot be shared), several rounds alternating the
three so that machine noise hits them alike. Printed: the median step time
and the peak resident set size of each, and the ratios of AdaLoRA on int8
to Keras LoRA on int8. Targets (issue 12): memory within 10%, step time at
most 1.15x.

    python benchmarks/quantized.py                    # hidden 2048, 2 blocks
    python benchmarks/quantized.py --smoke            # tiny; numbers mean nothing
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = ("adalora-int8", "adalora-float", "lora-int8")


def build(config, hidden, blocks, vocabulary, rank, total_steps):
    import keras
    import keras_hub
    import numpy as np

    import keras_adalora
    from keras_adalora.targets import select_layers

    keras.utils.set_random_seed(0)
    backbone = keras_hub.models.LlamaBackbone(
        vocabulary_size=vocabulary,
        num_layers=blocks,
        num_query_heads=hidden // 128,
        num_key_value_heads=hidden // 128,
        hidden_dim=hidden,
        intermediate_dim=int(hidden * 2.75),
    )
    model = keras_hub.models.LlamaCausalLM(backbone, preprocessor=None)
    if config.endswith("int8"):
        model.quantize("int8")
    callbacks = []
    if config.startswith("adalora"):
        keras_adalora.apply_adalora(model, init_rank=rank, target="all")
        # Pruning (scores every step, masks every 2) spans the whole run.
        callbacks = [
            keras_adalora.RankBudgetCallback(
                target_rank=rank // 2, tinit=1, tfinal=total_steps - 1, delta_t=2
            )
        ]
    else:
        layers, _ = select_layers(model, "all")
        for layer in layers:
            layer.enable_lora(rank)
        for variable in model.weights:
            if "lora_kernel" not in variable.path:
                variable.trainable = False
    model.compile(
        optimizer=keras.optimizers.AdamW(1e-4),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    trainable = sum(int(np.prod(v.shape)) for v in model.trainable_weights)
    return model, callbacks, trainable


def worker(args):
    import keras
    import numpy as np

    steps = args.warmup + args.steps
    model, callbacks, trainable = build(
        args.worker, args.hidden, args.blocks, args.vocabulary, args.rank, steps
    )
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, args.vocabulary, (steps * args.batch, args.length + 1))
    x = {
        "token_ids": tokens[:, :-1].astype("int32"),
        "padding_mask": np.ones((steps * args.batch, args.length), "int32"),
    }
    y = tokens[:, 1:].astype("int32")
    times = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            self.start = time.perf_counter()

        def on_train_batch_end(self, batch, logs=None):
            times.append(time.perf_counter() - self.start)

    model.fit(
        x, y, batch_size=args.batch, epochs=1, verbose=0,
        callbacks=callbacks + [Clock()],
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB
    print(json.dumps({
        "config": args.worker,
        "step_s": statistics.median(times[args.warmup:]),
        "peak_gib": peak,
        "trainable": trainable,
    }))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default=os.environ.get("KERAS_BACKEND", "jax"))
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--vocabulary", type=int, default=1024)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.hidden, args.blocks, args.length = 256, 1, 16
        args.warmup, args.steps, args.rounds = 1, 3, 1
    if args.worker:
        return worker(args)

    results = {config: [] for config in CONFIGS}
    env = {**os.environ, "KERAS_BACKEND": args.backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    forwarded = [
        f"--{name}={getattr(args, name)}"
        for name in ("hidden", "blocks", "vocabulary", "length", "batch",
                     "rank", "warmup", "steps")
    ]
    for round_ in range(args.rounds):
        order = CONFIGS if round_ % 2 == 0 else CONFIGS[::-1]
        for config in order:
            out = subprocess.run(
                [sys.executable, __file__, "--worker", config, *forwarded],
                env=env, capture_output=True, text=True, check=False,
            )
            if out.returncode != 0:
                sys.exit(f"{config} failed:\n{out.stderr[-3000:]}")
            results[config].append(json.loads(out.stdout.strip().splitlines()[-1]))

    print(
        f"backend {args.backend}, Llama-style, hidden {args.hidden}, "
        f"{args.blocks} blocks, sequence {args.length}, batch {args.batch}, "
        f"rank {args.rank}, {args.steps} timed steps x {args.rounds} rounds"
    )
    print(f"{'config':<15}{'trainable':>12}{'median step s':>15}{'peak RSS GiB':>14}")
    summary = {}
    for config, runs in results.items():
        step = statistics.median(r["step_s"] for r in runs)
        peak = max(r["peak_gib"] for r in runs)
        summary[config] = (step, peak)
        print(f"{config:<15}{runs[0]['trainable']:>12,}{step:>15.3f}{peak:>14.2f}")
    step, peak = summary["adalora-int8"]
    lora_step, lora_peak = summary["lora-int8"]
    print(
        f"adalora-int8 / lora-int8: memory {peak / lora_peak:.3f} (target "
        f"<= 1.10), step time {step / lora_step:.3f} (target <= 1.15)"
    )
    float_step, float_peak = summary["adalora-float"]
    print(
        f"adalora-int8 / adalora-float: memory {peak / float_peak:.3f}, "
        f"step time {step / float_step:.3f}"
    )


if __name__ == "__main__":
    main()
