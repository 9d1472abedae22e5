"""AdaLoRA against uniform-rank controls, Keras LoRA, full fine-tuning and
a trained head, with choices made on validation and paired seeds on test.

Model: all-MiniLM-L6-v2 as a KerasHub `BertTextClassifier`; data: the
SpamAssassin copy in `examples/spam_assassin/` (`spam`: ham vs spam;
`source`: which of 5 corpus folders) and the WordNet 3.0 nouns in
`examples/wordnet_nouns/` (`nouns`: which of 26 lexicographer files a
synset is in). Fit and validation examples come from the `train` split,
test examples from the `test` split (all of it unless `--test-examples`:
1,209 e-mails, 16,423 synsets). A regime with other data sizes (such as
1,000 or 8,000 fit examples on `nouns`) keeps its own results: give it
its own `--out`.

For each task, method and budget (the average final rank per layer: `low`
2, `mid` 8), every learning rate of the method's grid trains on the fit
split with each selection seed and is scored on validation; a rate that
collapsed to the majority class on any of them is ruled out, the best of
the rest trains on every seed and is scored on test once. The report pairs seeds: AdaLoRA minus each baseline,
mean and 95% t interval. Each run is a subprocess (its peak RSS is read
from `os.wait4`); results go to `<out>/results/<backend>.json`, the report
to `<out>/RESULTS.md` (its prose lives in `bench/report.md`).

    python benchmarks/compare.py --backend jax                 # everything
    python benchmarks/compare.py --tasks spam --budgets low --methods adalora,uniform
    python benchmarks/compare.py --select-only --variants rank-free,rank-free-long-final
    python benchmarks/compare.py --report-only
    python benchmarks/compare.py --smoke --out /tmp/bench       # tiny, for CI
    python benchmarks/compare.py --smoke --tasks nouns --methods adalora,uniform --out /tmp/n

The code: `bench/protocol.py` (what is compared), `bench/data.py`,
`bench/workers.py` (one run), `bench/runner.py` (which runs),
`bench/selection.py` (the choice on validation),
`bench/stats.py` (paired intervals), `bench/report.py` (RESULTS.md).
"""

import argparse
import os
import pathlib
import shlex
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

from bench.protocol import BUDGETS, METHODS, TASKS, VARIANTS  # noqa: E402

HERE = pathlib.Path(__file__).resolve().parent


def _split(parser, text, allowed, flag):
    items = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [item for item in items if item not in allowed]
    if unknown or not items:
        parser.error(f"{flag} takes a comma-separated list of {', '.join(allowed)}; got {text!r}")
    return items


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--backend", choices=["jax", "tensorflow", "torch"],
                        default=os.environ.get("KERAS_BACKEND", "jax"),
                        help="Keras backend of every run ($KERAS_BACKEND if set)")
    parser.add_argument("--parts", default="quality", help="quality, speed or both")
    parser.add_argument("--tasks", default=None,
                        help="of: " + ", ".join(TASKS) + " (default: spam,source; spam with "
                        "--smoke)")
    parser.add_argument("--methods", default=None,
                        help="of: " + ", ".join(METHODS) + " (default: all; adalora, uniform "
                        "and the peers with --smoke)"),
    parser.add_argument("--budgets", default=",".join(BUDGETS),
                        help="of: " + ", ".join(f"{k} (average rank {v})" for k, v in BUDGETS.items()))
    parser.add_argument("--variants", default="sqrt,rank-free",
                        help="AdaLoRA variants the validation split chooses among, of: "
                        + ", ".join(VARIANTS))
    parser.add_argument("--seeds", type=int, default=5, help="test seeds 0..N-1")
    parser.add_argument("--select-seeds", type=int, default=1,
                        help="seeds per learning rate on validation; a rate where any "
                        "of them collapses to the majority class is ruled out "
                        "(bench/selection.py)")
    parser.add_argument("--select-only", action="store_true",
                        help="only the validation stage")
    parser.add_argument("--fit-examples", type=int, default=640)
    parser.add_argument("--validation-examples", type=int, default=300)
    parser.add_argument("--test-examples", type=int, default=None,
                        help="default: the whole test split (1,209 e-mails, 16,423 synsets)")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--sequence-length", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr-schedule", choices=["cosine", "constant"], default="cosine",
                        help="cosine: linear warm-up over the first tenth of the steps to "
                        "the chosen rate, then cosine decay to 0; constant: the rate "
                        "throughout (the protocol of the archived 1-3 December runs)")
    parser.add_argument("--data-dir", default=None, help="where tfds keeps prepared data; unset: tfds' own "
                        "(~/tensorflow_datasets)")
    parser.add_argument("--out", default=str(HERE), help="RESULTS.md, results/ and plots/ go here")
    parser.add_argument("--report-only", action="store_true",
                        help="rewrite RESULTS.md from the results files")
    parser.add_argument("--smoke", action="store_true", help="tiny settings, for the tests")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker or args.report_only:
        return args
    if args.smoke:
        args.tasks = args.tasks or "spam"
        args.budgets = "low"
        args.methods = args.methods or "adalora,uniform,peft-adalora,peft-lora"
        args.variants = "rank-free,rank-free-params"
        args.seeds, args.fit_examples, args.validation_examples = 2, 16, 8
        args.test_examples, args.epochs, args.sequence_length, args.batch_size = 8, 1, 16, 8
    args.tasks = args.tasks or "spam,source"
    args.methods = args.methods or ",".join(METHODS)
    args.parts = _split(parser, args.parts, ("quality", "speed"), "--parts")
    args.tasks = _split(parser, args.tasks, tuple(TASKS), "--tasks")
    args.methods = _split(parser, args.methods, tuple(METHODS), "--methods")
    args.budgets = _split(parser, args.budgets, tuple(BUDGETS), "--budgets")
    args.variants = _split(parser, args.variants, tuple(VARIANTS), "--variants")
    for name in ("seeds", "select_seeds", "fit_examples", "validation_examples", "epochs",
                 "sequence_length", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.test_examples is not None and args.test_examples < 1:
        parser.error("--test-examples must be at least 1 (or left out: the whole split)")
    return args


def settings_of(args):
    """The settings every run of one backend shares, so that they compare."""
    grids = {m: list(spec["grid"]) for m, spec in METHODS.items()}
    if args.smoke:
        grids = {m: g[:2] for m, g in grids.items()}
    return {
        "fit_examples": args.fit_examples,
        "validation_examples": args.validation_examples,
        "test_examples": args.test_examples,
        "epochs": args.epochs,
        "sequence_length": args.sequence_length,
        "batch_size": args.batch_size,
        "grids": grids,
        "schedule": {},  # the callback's defaults: tinit 0.1, tfinal 0.7, delta_t 10
        "speed_steps": 3 if args.smoke else 15,
        "speed_rounds": 1 if args.smoke else 3,
        "speed_predict_examples": 16 if args.smoke else 400,
        "optimizer": "AdamW (Keras defaults besides the learning rate)",
        "lr_schedule": (
            {"name": "cosine", "warmup_fraction": 0.1}
            if args.lr_schedule == "cosine" else {"name": "constant"}
        ),
        "smoke": args.smoke,
    }


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        from bench import workers

        workers.run(args.worker)
        return None
    from bench import report

    if args.report_only:
        report.write(pathlib.Path(args.out))
        return None
    from bench.runner import Runner

    command = "python benchmarks/compare.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv)
    )
    runner = Runner(args, settings_of(args))
    runner.main(command)
    return runner.data


if __name__ == "__main__":
    main()
