"""Overhead of the search machinery: one fixed config N times through `search/run.py` vs N
times through plain `fmnist.train` in one Python process.

    python bench/overhead.py [--runs 3] [--epochs 16] [--train-size 12000]

Both sides are whole commands timed from outside (Python start, TensorFlow import, data load
included), both on the same split, with 2 TensorFlow threads and one run at a time. The search
side adds Ray, Tune, one checkpoint per epoch and the Parquet recorder. The issue's target
(ratio <= 1.15) is for trials of 30 s or more: with the defaults a plain run lasted 31-33 s on
this 2-core CPU in bfloat16 (12 epochs lasted 27 s; in float32 they lasted 30-87 s), and the
summary says when a plain run was shorter (`plain_runs_under_30_s`; raise --epochs). Prints
one JSON line, appended to bench/results/overhead.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

from report import emit
from searchbench import REFERENCE, REPO, add_size_args, reference_space, search, size_flags, workdir


def plain(args: argparse.Namespace) -> None:
    """The baseline, run in its own process: N trainings one after the other, no Ray."""
    from fmnist.data import load_splits
    from fmnist.train import TrainConfig, train

    data = load_splits(args.data_dir, val_size=args.val_size, train_size=args.train_size, seed=0)
    cfg = TrainConfig.from_dict({**REFERENCE, "epochs": args.epochs, "intra_op_threads": 2,
                                 "inter_op_threads": 2})
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        train(cfg, data)
        times.append(time.perf_counter() - t0)
    print(json.dumps({"run_s": times}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=16)
    add_size_args(p, train=12_000, val=3_000)
    p.add_argument("--data-dir")
    p.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plain:
        return plain(args)
    folder = workdir(args.keep)
    space = reference_space(folder)
    data_flags = ["--data-dir", args.data_dir] if args.data_dir else []
    cmd = [sys.executable, __file__, "--plain", "--runs", str(args.runs), "--epochs",
           str(args.epochs), *size_flags(args), *data_flags]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    plain_wall = time.perf_counter() - t0
    plain_runs = json.loads(out.stdout.strip().splitlines()[-1])["run_s"]
    run = search(folder, f"overhead-{int(time.time())}", "--space", str(space),
                 "--num-samples", str(args.runs), "--max-epochs", str(args.epochs),
                 "--scheduler", "fifo", "--cpus-per-trial", "2", *size_flags(args),
                 "--time-budget", "3600", *data_flags)
    emit("overhead", {
        "bench": "overhead", "config": REFERENCE, "runs": args.runs, "epochs": args.epochs,
        "train": args.train_size, "val": args.val_size,
        "plain_wall_s": round(plain_wall, 1), "search_wall_s": round(run["wall_s"], 1),
        "plain_run_s": [round(t, 1) for t in plain_runs],
        "plain_runs_under_30_s": sum(t < 30 for t in plain_runs),
        "search_epoch_time_sum_s": round(float(run["raw"]["epoch_time_s"].sum()), 1),
        "ratio": round(run["wall_s"] / plain_wall, 3), "target": 1.15,
        "machine": platform.machine(), "cpus": os.cpu_count(), "time": time.time(),
    })


if __name__ == "__main__":
    main()
