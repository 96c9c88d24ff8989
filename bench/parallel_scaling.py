"""Parallel scaling: two one-thread trials at once vs the same two one after the other.

    python bench/parallel_scaling.py [--epochs 6] [--train-size 12000]

Both sides are `search/run.py` on the same fixed CNN config with `--cpus-per-trial 1` (one
TensorFlow thread per trial); only `--max-concurrent` differs (2 vs 1). Throughput is training
images / the trials' span (first epoch start to last epoch end, so Ray's start-up, the same on
both sides, is left out; the whole-command walls are printed too). speedup = concurrent
throughput / sequential throughput; the target is >= 1.7. Prints one JSON line, appended to
bench/results/parallel_scaling.jsonl.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

from report import emit
from searchbench import (
    REFERENCE,
    add_size_args,
    epoch_starts,
    reference_space,
    search,
    size_flags,
    workdir,
)


def span_s(raw) -> float:
    return float(raw["timestamp"].max().timestamp() - epoch_starts(raw).min())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6)
    add_size_args(p, train=12_000, val=3_000)
    args = p.parse_args()
    folder = workdir(args.keep)
    space = reference_space(folder)
    stamp = int(time.time())
    runs = {}
    for label, concurrent in (("sequential", 1), ("concurrent", 2)):
        runs[label] = search(folder, f"scaling-{label}-{stamp}", "--space", str(space),
                             "--num-samples", "2", "--max-epochs", str(args.epochs),
                             "--scheduler", "fifo", "--cpus-per-trial", "1", "--max-concurrent",
                             str(concurrent), *size_flags(args), "--time-budget", "3600")
    images = 2 * args.epochs * args.train_size
    thr = {k: images / span_s(r["raw"]) for k, r in runs.items()}
    emit("parallel_scaling", {
        "bench": "parallel_scaling", "config": REFERENCE, "epochs": args.epochs,
        "train": args.train_size, "val": args.val_size,
        "sequential_span_s": round(span_s(runs["sequential"]["raw"]), 1),
        "concurrent_span_s": round(span_s(runs["concurrent"]["raw"]), 1),
        "sequential_wall_s": round(runs["sequential"]["wall_s"], 1),
        "concurrent_wall_s": round(runs["concurrent"]["wall_s"], 1),
        "sequential_images_per_s": round(thr["sequential"]),
        "concurrent_images_per_s": round(thr["concurrent"]),
        "speedup": round(thr["concurrent"] / thr["sequential"], 3),
        "wall_speedup": round(runs["sequential"]["wall_s"] / runs["concurrent"]["wall_s"], 3),
        "target": 1.7, "machine": platform.machine(), "cpus": os.cpu_count(),
        "time": time.time(),
    })


if __name__ == "__main__":
    main()
