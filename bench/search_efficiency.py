"""Search efficiency: how much of the machine a search spends inside its trials' epochs.

    python bench/search_efficiency.py [--num-samples 16] [--max-epochs 4] [--train-size 12000]

Runs `search/run.py --space cnn` (ASHA, one CPU per trial, so 2 concurrent trials on 2 CPUs)
as a user would. efficiency = sum of every epoch's time (training + validation, every attempt)
/ (wall time of the whole command x concurrent slots). The naive set-up of issue 7 measured
0.18. Prints one JSON line, appended to bench/results/search_efficiency.jsonl.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from report import emit
from searchbench import add_size_args, epoch_starts, search, size_flags, workdir


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=16)
    p.add_argument("--max-epochs", type=int, default=4)
    add_size_args(p, train=12_000, val=3_000)
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--scheduler", default="asha")
    args = p.parse_args()
    slots = max(1, min(args.cpus, args.num_samples))
    run = search(workdir(args.keep), f"eff-{int(time.time())}", "--space", "cnn",
                 "--num-samples", str(args.num_samples), "--max-epochs", str(args.max_epochs),
                 *size_flags(args),
                 "--scheduler", args.scheduler, "--cpus-per-trial", "1", "--time-budget",
                 "3600")
    raw = run["raw"]
    inside = float(raw["epoch_time_s"].sum())
    first = float(epoch_starts(raw).min())
    emit("search_efficiency", {
        "bench": "search_efficiency", "space": "cnn", "scheduler": args.scheduler,
        "num_samples": args.num_samples, "max_epochs": args.max_epochs,
        "train": args.train_size, "val": args.val_size, "slots": slots,
        "trials": int(len(run["trials"])), "trial_epochs": int(len(raw)),
        "epoch_time_sum_s": round(inside, 1), "wall_s": round(run["wall_s"], 1),
        "first_epoch_starts_after_s": round(first - run["start"], 1),
        "efficiency": round(inside / (run["wall_s"] * slots), 3),
        "target": 0.80, "naive": 0.18, "machine": platform.machine(), "cpus": args.cpus,
        "time": time.time(),
    })


if __name__ == "__main__":
    main()
