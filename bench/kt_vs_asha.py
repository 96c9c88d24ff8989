"""The peer: Keras Tuner's Hyperband (what notebook 000 used) vs our ASHA, side by side.

    .venv/bin/pip install -e '.[bench]'     # keras-tuner
    python bench/kt_vs_asha.py [--max-epochs 9] [--factor 3] [--seeds 0 1 2] [--same-configs]
                                [--cpus-per-trial 2] [--paired-draws] [--searcher tpe-rungs]

Both search the `cnn` space (Keras Tuner gets the same distributions, translated), with the
same max epochs and reduction factor, the same train/validation split (2,500 / 2,000 images
by default), on the same machine, one after the other; once per seed given. Keras Tuner runs
as its documented single process (TensorFlow using all cores); ours is `search/run.py` with
the promotion-based ASHA (`--asha asha` for Ray's), one CPU per trial (`--cpus-per-trial 2` on
this 2-core machine: one two-thread trial at a time), drawing configs at random as Hyperband does
(`--searcher tpe-rungs`: ours' TPE that learns from every rung's results).

Precision: ours trains as `search/run.py` does by default (`precision: auto`, mixed bfloat16 on
a CPU with bfloat16 instructions); Keras Tuner's models are float32, Keras' default, as its
users run it. `--kt-precision auto` gives Keras Tuner ours' precision too, and `--precision
float32` gives ours Keras Tuner's; each pair records what each tuner's models computed in.

How much each tuner may search: Keras Tuner's Hyperband fixes its own number of configs (17
for 9 epochs and factor 3, 75 epochs in all); ASHA is an anytime algorithm that keeps sampling
until it is stopped. By default ours gets the wall time Keras Tuner took (`--time-budget`, and
only epochs that ended within that time from the command's start count), sampling as many
configs as fit. `--same-configs` instead gives ours exactly as many configs as Hyperband drew,
run to the end (the default until 2026-11-22): ASHA then trains fewer epochs than Hyperband and
leaves part of the time unused.

Draws: by default each tuner draws its configs its own way (the same distributions, different
random streams), so a seed's ratio follows how lucky each draw was as much as the tuners.
`--paired-draws` hands Keras Tuner's Hyperband the configs ours draws, in ours' order (common
random numbers): the first 17 configs are the same for both, and ours goes on drawing after
them. The draws are reproduced with Ray's own generator before either tuner runs and checked
against the configs ours recorded; a mismatch stops the benchmark.

Times run from each command's start. Unless `--target` is given, the target is the lower of
the two bests minus 0.3 points. Targets: ours <= 0.6x Keras Tuner's time to the target, at
equal or better best accuracy. Prints one JSON line, appended to
bench/results/kt_vs_asha.jsonl.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from report import emit
from searchbench import (
    REPO,
    add_asha_arg,
    add_size_args,
    epoch_ends,
    median,
    search,
    size_flags,
    target_for,
    time_to_target,
    workdir,
)

from fmnist.config import PRECISIONS  # noqa: E402  (searchbench puts the repo on the path)

UNBOUNDED = 10_000  # --num-samples when the time budget, not the count, ends our search
PAIRED_DRAWS = 500  # more than one Hyperband iteration draws (17 for 9 epochs, 143 for 81)
HISTORY: list[tuple[float, float]] = []  # (seconds since start, val_accuracy), every epoch
PRECISION_SEEN: set[str] = set()  # the dtype policies Keras Tuner's models were built with


def run_keras_tuner(args: argparse.Namespace) -> None:
    """Keras Tuner's Hyperband in this process; prints its epoch history as JSON."""
    t0 = args.started_at  # the command's start, as measured by the parent
    import keras
    import keras_tuner as kt

    from fmnist.data import load_splits
    from fmnist.train import TrainConfig, TrainingRun
    from search.spaces import load_space

    space = load_space("cnn")
    data = load_splits(args.data_dir, val_size=args.val_size, train_size=args.train_size,
                       seed=args.seeds[0])

    def sample(hp, key, dist):
        a = dist.args
        if dist.kind in ("choice", "grid"):
            return hp.Choice(key, list(a))
        if dist.kind in ("uniform", "loguniform"):
            return hp.Float(key, a[0], a[1], sampling="log" if dist.log else "linear")
        if dist.kind == "randint":
            return hp.Int(key, a[0], a[1] - 1)
        raise SystemExit(f"no Keras Tuner translation for {dist.kind} ({key})")

    class Model(kt.HyperModel):
        def build(self, hp):
            params = {k: sample(hp, k, d) for k, d in space.dists.items()}
            cfg = TrainConfig.from_dict({**space.fixed, **params, "epochs": args.max_epochs,
                                         "seed": args.seeds[0],
                                         "precision": args.kt_precision})
            run = TrainingRun(cfg, data)  # the same model, optimizer and loss as ours
            PRECISION_SEEN.add(run.precision)
            return run.model

        def fit(self, hp, model, *a, **kw):
            return model.fit(*a, batch_size=hp.get("batch_size"), **kw)

    class Record(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            HISTORY.append((time.time() - t0, float(logs["val_accuracy"])))

    tuner = kt.Hyperband(Model(), objective="val_accuracy", max_epochs=args.max_epochs,
                         factor=args.factor, hyperband_iterations=1, seed=args.seeds[0],
                         directory=args.kt_dir, project_name="kt", overwrite=True)
    if args.draws:  # Hyperband's new configs come from ours' draws, in order
        queue = json.loads(Path(args.draws).read_text())

        def next_draw():
            if not queue:
                raise SystemExit(f"Hyperband wanted more configs than the {args.draws} holds")
            return queue.pop(0)

        tuner.oracle._random_values = next_draw
    tuner.search(data.x_train, data.y_train, validation_data=(data.x_val, data.y_val),
                 callbacks=[Record()], verbose=0)
    trials = tuner.oracle.trials.values()
    configs = sum(1 for t in trials if "tuner/trial_id" not in t.hyperparameters.values)
    print(json.dumps({"history": HISTORY, "trials": len(trials), "configs": configs,
                      "precision": ",".join(sorted(PRECISION_SEEN))}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-epochs", type=int, default=9)
    p.add_argument("--factor", type=int, default=3)
    add_size_args(p, train=2_500, val=2_000)  # a pair took 15-29 min at 6,000, 15.3 at 3,000
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="seeds, one Keras Tuner / ASHA pair each (default: 0)")
    p.add_argument("--data-dir")
    add_asha_arg(p)
    p.add_argument("--target", type=float, help="validation accuracy to reach")
    p.add_argument("--cpus-per-trial", type=int, default=1,
                   help="threads per trial of ours (default 1: one-thread trials, as many at once "
                        "as there are cores; all the cores: one trial at a time, as Keras Tuner "
                        "trains)")
    p.add_argument("--same-configs", action="store_true",
                   help="ours samples as many configs as Hyperband drew, run to the end "
                        "(default: ours samples until Keras Tuner's wall time is spent)")
    p.add_argument("--searcher", choices=("random", "tpe-rungs", "optuna"), default="random",
                   help="ours' searcher (default random, as Keras Tuner's Hyperband draws; "
                        "tpe-rungs learns from every rung's results)")
    p.add_argument("--paired-draws", action="store_true",
                   help="Keras Tuner gets the configs ours draws, in the same order (default: "
                        "each tuner draws its own)")
    p.add_argument("--kt-precision", choices=PRECISIONS, default="float32",
                   help="Keras Tuner's models' precision (default float32: Keras' default, as "
                        "its users run it; auto: as ours)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="ours' precision (default auto, search/run.py's default)")
    p.add_argument("--kt-dir", help=argparse.SUPPRESS)
    p.add_argument("--draws", help=argparse.SUPPRESS)
    p.add_argument("--keras-tuner", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--started-at", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.keras_tuner:
        return run_keras_tuner(args)
    if not 1 <= args.cpus_per_trial <= (os.cpu_count() or 1):
        p.error(f"--cpus-per-trial must be 1 to {os.cpu_count()} (this machine's cores)")
    if args.paired_draws and args.searcher != "random":
        p.error("--paired-draws reproduces the random searcher's draws: not with --searcher "
                f"{args.searcher}")
    if importlib.util.find_spec("keras_tuner") is None:
        raise SystemExit("keras-tuner is not installed: .venv/bin/pip install -e '.[bench]'")
    folder = workdir(args.keep)
    pairs = [pair(args, folder, seed) for seed in args.seeds]
    emit("kt_vs_asha", {
        "bench": "kt_vs_asha", "space": "cnn", "max_epochs": args.max_epochs,
        "factor": args.factor, "ours": args.asha, "seeds": args.seeds,
        "ours_cpus_per_trial": args.cpus_per_trial, "ours_searcher": args.searcher,
        "ours_budget": "same configs" if args.same_configs else "same wall time",
        "draws": "paired" if args.paired_draws else "independent",
        "train": args.train_size, "val": args.val_size,
        "target_rule": "given" if args.target is not None else "lower best - 0.003",
        "per_seed": pairs,
        "median_time_ratio": median([r["time_ratio"] for r in pairs]),
        "ours_equal_or_better": sum(r["ours_best"] is not None and r["ours_best"] >= r["kt_best"]
                                    for r in pairs),
        "median_wall_ratio": median([r["wall_ratio"] for r in pairs]),
        "time_ratio_target": 0.6,
        "machine": platform.machine(), "cpus": os.cpu_count(), "time": time.time(),
    })


def pair(args: argparse.Namespace, folder: Path, seed: int) -> dict:
    """Keras Tuner, then ours, same split and seed; each tuner draws its own configs, or with
    --paired-draws Keras Tuner runs ours' draws."""
    data_flags = ["--data-dir", args.data_dir] if args.data_dir else []
    sizes = size_flags(args)
    cmd = [sys.executable, __file__, "--keras-tuner", "--kt-dir",
           str(folder / f"keras-tuner-s{seed}"), "--max-epochs", str(args.max_epochs),
           "--factor", str(args.factor), "--seeds", str(seed), "--kt-precision",
           args.kt_precision, *sizes, *data_flags]
    draws = ours_draws(seed, PAIRED_DRAWS) if args.paired_draws else None
    if draws:
        draws_file = folder / f"draws-s{seed}.json"
        draws_file.write_text(json.dumps(draws))
        cmd += ["--draws", str(draws_file)]
    print("$", " ".join(cmd[1:]), file=sys.stderr, flush=True)
    cmd += ["--started-at", repr(time.time())]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    kt_wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"keras tuner exited {out.returncode}\n{out.stderr[-2000:]}")
    kt = json.loads(out.stdout.strip().splitlines()[-1])
    if args.same_configs:  # as many configs as Hyperband drew, each run to the end
        budget = ["--num-samples", str(kt["configs"]), "--time-budget", "3600"]
    else:  # configs until Keras Tuner's wall time is spent (ASHA never runs out of configs)
        budget = ["--num-samples", str(UNBOUNDED), "--time-budget", f"{kt_wall:.0f}"]
    ours = search(folder, f"{args.asha}-{int(time.time())}-s{seed}", "--space", "cnn",
                  "--scheduler", args.asha, *budget, "--max-epochs", str(args.max_epochs),
                  "--reduction-factor", str(args.factor), "--grace-period", "1",
                  "--seed", str(seed), "--searcher", args.searcher,
                  "--cpus-per-trial", str(args.cpus_per_trial), *sizes,
                  *data_flags, *([] if args.precision == "auto" else
                                 ["--set", f"precision={args.precision}"]))
    if draws:
        check_draws(ours["trials"], draws[:kt["configs"]])
    raw = ours["raw"]
    if not args.same_configs:  # only what ours had by the time Keras Tuner was done counts
        raw = raw[epoch_ends(raw) - ours["start"] <= kt_wall]
    kt_best = max(acc for _, acc in kt["history"])
    # None when ours had not finished an epoch by then (Ray's start-up is longer than a tiny KT run)
    our_best = float(raw["val_accuracy"].max()) if len(raw) else None
    target = target_for([b for b in (kt_best, our_best) if b is not None], args.target)
    kt_ttt = next((t for t, acc in kt["history"] if acc >= target), None)
    our_ttt = time_to_target(raw, ours["start"], target)
    ratio = our_ttt / kt_ttt if our_ttt is not None and kt_ttt else None
    return {
        "seed": seed, "configs": kt["configs"],
        "paired_configs": 0 if draws is None else min(kt["configs"], len(ours["trials"])),
        "kt_trials": kt["trials"], "target": target,
        "kt_best": round(kt_best, 4), "ours_best": None if our_best is None else round(our_best, 4),
        "kt_time_to_target_s": None if kt_ttt is None else round(kt_ttt, 1),
        "ours_time_to_target_s": None if our_ttt is None else round(our_ttt, 1),
        "kt_wall_s": round(kt_wall, 1), "ours_wall_s": round(ours["wall_s"], 1),
        "kt_epochs": len(kt["history"]), "ours_trial_epochs": int(len(raw)),
        "kt_precision": kt["precision"],
        "ours_precision": ",".join(sorted(set(raw["precision"].dropna()))),
        "ours_configs": int(raw["trial_id"].nunique()),
        "time_ratio": None if ratio is None else round(ratio, 3),
        "wall_ratio": round(ours["wall_s"] / kt_wall, 3),
    }


def ours_draws(seed: int, n: int) -> list[dict]:
    """The first n configs `search/run.py --searcher random --seed seed` samples, in order.

    Ray's BasicVariantGenerator resolves each sample with generate_variants on one numpy
    generator seeded with `seed`; doing the same here gives the same sequence. check_draws
    compares it with what ours recorded, so a change in Ray's sampling cannot pass unnoticed.
    """
    from ray.tune.search.basic_variant import _BackwardsCompatibleNumpyRng
    from ray.tune.search.variant_generator import generate_variants

    from search.spaces import load_space, to_tune

    rng = _BackwardsCompatibleNumpyRng(seed)
    spec = {"config": to_tune(load_space("cnn"), "random")}
    return [next(generate_variants(spec, random_state=rng))[1]["config"] for _ in range(n)]


def check_draws(trials, draws: list[dict]) -> None:
    """Stop unless ours' first trials (in creation order) ran `draws`, one for one."""
    trials = trials.sort_values("trial_id").head(len(draws))
    for want, (_, row) in zip(draws, trials.iterrows(), strict=False):  # ours may run fewer
        got = {k: row[f"params_{k}"] for k in want}
        same = all(math.isclose(got[k], v, rel_tol=1e-9) if isinstance(v, float) else got[k] == v
                   for k, v in want.items())
        if not same:
            raise SystemExit(f"paired draws: ours ran {got} where Keras Tuner was given {want}")


if __name__ == "__main__":
    main()
