"""float32 vs mixed bfloat16: the same configs trained both ways, side by side, in one process.

    python bench/precision.py [--configs 8] [--epochs 9] [--train-size 2500] [--val-size 2000]

`precision: auto` (TrainConfig's default) trains with Keras' `mixed_bfloat16` policy where
`fmnist.train.resolve_precision` finds a CPU with bfloat16 instructions, on TensorFlow. This
measures whether that pays: configs drawn at random from a space (`cnn` by default, seed 0),
each trained for the same epochs on the same split twice, once per precision, one after the
other (the order alternates between configs), with `--threads` threads (1, as a one-CPU trial).

Reported per config and as medians over configs: the steady epoch time (median of epochs 2 on)
as wall and as the process's CPU time (which another tenant's load moves less), the first
epoch's time (model build and tracing), and the best and last validation accuracy. The ratios
are bfloat16 over float32; the accuracy differences are bfloat16 minus float32, in points: at
equal epochs (best and last), and at equal time (bfloat16's best against float32's best among
the epochs that had ended when bfloat16 had trained all of its; both on the same configured
schedule). Each side's per-epoch validation accuracy and epoch times are in the JSON.
Prints one JSON line, appended to bench/results/precision.jsonl.
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import statistics
import sys
import time

import numpy as np
from report import emit
from searchbench import median  # also puts the repository on sys.path

POLICIES = ("float32", "mixed_bfloat16")


def train_once(cfg, data, epochs: int) -> dict:
    """Train `cfg` for `epochs`; per-epoch wall and CPU seconds and validation accuracy."""
    import keras

    from fmnist.train import TrainingRun

    keras.backend.clear_session()
    run = TrainingRun(cfg, data)
    wall, cpu, acc = [], [], []
    for _ in range(epochs):
        c0 = time.process_time()
        m = run.fit_epoch()
        cpu.append(time.process_time() - c0)
        wall.append(m["epoch_time_s"])
        acc.append(m["val_accuracy"])
    return {"precision": run.precision, "first_s": wall[0],
            "epoch_s": statistics.median(wall[1:] or wall),
            "epoch_cpu_s": statistics.median(cpu[1:] or cpu),
            "best": max(acc), "last": acc[-1], "curve": acc, "epoch_times": wall}


def best_by(result: dict, seconds: float) -> float | None:
    """The best validation accuracy among the epochs that had ended `seconds` into training."""
    ended = np.cumsum(result["epoch_times"])
    reached = [a for a, t in zip(result["curve"], ended, strict=True) if t <= seconds + 1e-9]
    return max(reached) if reached else None


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def rounded(result: dict) -> dict:
    return {k: ([round(x, 4) for x in v] if isinstance(v, list) else round(v, 4))
            for k, v in result.items() if k != "precision"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--space", default="cnn")
    p.add_argument("--configs", type=int, default=8)
    p.add_argument("--epochs", type=int, default=9)
    p.add_argument("--train-size", type=int, default=2_500)
    p.add_argument("--val-size", type=int, default=2_000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir")
    args = p.parse_args()
    if args.configs < 1 or args.epochs < 2 or args.threads < 1:
        p.error("--configs and --threads must be >= 1, --epochs >= 2 (epoch 1 is the "
                "first-epoch figure)")

    from fmnist.data import load_splits
    from fmnist.train import bf16_cpu, configure_threads, resolve_precision
    from search.spaces import load_space

    configure_threads(args.threads, 1 if args.threads == 1 else 2)
    space = load_space(args.space)
    data = load_splits(args.data_dir, val_size=args.val_size, train_size=args.train_size,
                       seed=0)
    rng = np.random.default_rng(args.seed)
    rows = []
    signal.signal(signal.SIGTERM, _interrupt)  # `timeout` and schedulers send SIGTERM
    interrupted = False
    try:
        for i in range(args.configs):
            sampled = space.sample(rng)
            base = space.config(sampled).replace(epochs=args.epochs, seed=args.seed)
            got = {}
            for policy in (POLICIES if i % 2 == 0 else POLICIES[::-1]):
                got[policy] = train_once(base.replace(precision=policy), data, args.epochs)
                if got[policy]["precision"] != policy:
                    raise SystemExit(f"asked for {policy}, the model computed in "
                                     f"{got[policy]['precision']}")
            f, b = got["float32"], got["mixed_bfloat16"]
            row = {"config": {k: (round(v, 6) if isinstance(v, float) else v)
                              for k, v in sampled.items() if k in space.dists},
                   "float32": rounded(f), "mixed_bfloat16": rounded(b),
                   "epoch_ratio": round(b["epoch_s"] / f["epoch_s"], 3),
                   "epoch_cpu_ratio": round(b["epoch_cpu_s"] / f["epoch_cpu_s"], 3),
                   "first_ratio": round(b["first_s"] / f["first_s"], 3),
                   "best_diff_points": round(100 * (b["best"] - f["best"]), 2),
                   "last_diff_points": round(100 * (b["last"] - f["last"]), 2)}
            # equal time: float32's best by the time bfloat16 had ended all its epochs
            f_then = best_by(f, sum(b["epoch_times"]))
            row["equal_time_diff_points"] = (None if f_then is None
                                             else round(100 * (b["best"] - f_then), 2))
            rows.append(row)
            print(f"config {i + 1}/{args.configs}: epoch {f['epoch_s']:.2f} -> "
                  f"{b['epoch_s']:.2f} s ({row['epoch_ratio']}), best {f['best']:.4f} -> "
                  f"{b['best']:.4f}", file=sys.stderr, flush=True)
    except KeyboardInterrupt:  # keep the configs that finished: they are measured
        interrupted = True
        print(f"interrupted: {len(rows)} of {args.configs} configs done", file=sys.stderr)
    if not rows:
        raise SystemExit("no config finished both ways: nothing to report")
    diffs = [r["best_diff_points"] for r in rows]
    emit("precision", {
        "bench": "precision", "space": args.space, "configs": len(rows),
        "configs_asked": args.configs, "interrupted": interrupted,
        "epochs": args.epochs, "train": args.train_size, "val": args.val_size,
        "threads": args.threads, "seed": args.seed,
        "auto_here": resolve_precision("auto"), "bf16_cpu": bf16_cpu(),
        "per_config": rows,
        "median_epoch_ratio": median([r["epoch_ratio"] for r in rows]),
        "median_epoch_cpu_ratio": median([r["epoch_cpu_ratio"] for r in rows]),
        "median_first_ratio": median([r["first_ratio"] for r in rows]),
        "median_best_diff_points": median(diffs, 2),
        "mean_best_diff_points": round(statistics.mean(diffs), 2),
        "bf16_best_higher": sum(d > 0 for d in diffs), "bf16_best_lower": sum(d < 0 for d in diffs),
        "median_equal_time_diff_points": median([r["equal_time_diff_points"] for r in rows], 2),
        "machine": platform.machine(), "cpus": os.cpu_count(), "time": time.time(),
    })


if __name__ == "__main__":
    main()
