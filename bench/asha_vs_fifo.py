"""Time to target: ASHA vs FIFO on the `cnn` space, same searcher seed, same sampled configs.

    python bench/asha_vs_fifo.py [--num-samples 27] [--max-epochs 9] [--seeds 0 1 2]

Runs `search/run.py --space cnn` twice, ASHA (the promotion-based `asha-promote`; `--asha asha`
for Ray's) and FIFO, with the same `--seed` (so the random searcher proposes the same configs in
the same order) and one CPU per trial; once per seed given. The default search is sized the way
ASHA is used: 27 configs and 9 epochs with reduction factor 3, so rungs at epochs 1 and 3 each
pass on about a third of the trials that reach them (27 -> 9 -> 3 when all have arrived), on
1,500 / 1,500 images to fit a pair in 12-13 minutes here. With 12 configs and 6 epochs
(`--num-samples 12 --max-epochs 6 --train-size 6000 --val-size 2000`, the default until
2026-11-22) the rungs have little to cut, and the winner's own 6 epochs are most of ASHA's time
to target. Which configs come first decides much of a single pair's result, so the summary has
every seed's figures and their medians. Reports each run's final best validation accuracy and
the time, from the command's start, until its best first reached the target. Unless `--target`
is given, the target is the lower of the two final bests minus 0.3 points (a level both runs
reached). Targets: ASHA <= 0.4x FIFO's time, final bests within 0.3 points. Prints one JSON
line, appended to bench/results/asha_vs_fifo.jsonl.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from report import emit
from searchbench import (
    add_asha_arg,
    add_size_args,
    median,
    search,
    size_flags,
    target_for,
    time_to_target,
    workdir,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num-samples", type=int, default=27)
    p.add_argument("--max-epochs", type=int, default=9)
    p.add_argument("--reduction-factor", type=float, default=3)
    add_size_args(p, train=1_500, val=1_500)
    p.add_argument("--seeds", type=int, nargs="+", default=[0],
                   help="searcher seeds, one ASHA/FIFO pair each (default: 0)")
    p.add_argument("--target", type=float, help="validation accuracy to reach")
    add_asha_arg(p)
    args = p.parse_args()
    folder, stamp = workdir(args.keep), int(time.time())
    pairs = [pair(args, folder, f"{stamp}-s{seed}", seed) for seed in args.seeds]
    emit("asha_vs_fifo", {
        "bench": "asha_vs_fifo", "space": "cnn", "num_samples": args.num_samples,
        "asha": args.asha, "max_epochs": args.max_epochs,
        "reduction_factor": args.reduction_factor,
        "seeds": args.seeds, "train": args.train_size, "val": args.val_size,
        "target_rule": "given" if args.target is not None else "lower final best - 0.003",
        "per_seed": pairs,
        "median_time_ratio": median([r["time_ratio"] for r in pairs]),
        "median_best_gap_points": median([r["best_gap_points"] for r in pairs], 2),
        "median_wall_ratio": median([r["wall_ratio"] for r in pairs]),
        "time_ratio_target": 0.4, "best_gap_target_points": 0.3,
        "machine": platform.machine(), "cpus": os.cpu_count(), "time": time.time(),
    })


def pair(args: argparse.Namespace, folder: Path, tag: str, seed: int) -> dict:
    """One ASHA run and one FIFO run with the same searcher seed; their figures."""
    runs = {}
    for key, scheduler in (("asha", args.asha), ("fifo", "fifo")):
        factor = ["--reduction-factor", str(args.reduction_factor)] if key == "asha" else []
        runs[key] = search(
            folder, f"{scheduler}-{tag}", "--space", "cnn", "--scheduler", scheduler,
            "--num-samples", str(args.num_samples), "--max-epochs", str(args.max_epochs),
            *factor, "--seed", str(seed), "--cpus-per-trial", "1", *size_flags(args),
            "--time-budget", "3600")
    best = {k: float(r["epochs"]["val_accuracy"].max()) for k, r in runs.items()}
    target = target_for(list(best.values()), args.target)
    ttt = {k: time_to_target(r["raw"], r["start"], target) for k, r in runs.items()}
    ratio = ttt["asha"] / ttt["fifo"] if ttt["asha"] is not None and ttt["fifo"] else None
    return {
        "seed": seed, "target": target,
        **{f"{k}_best": round(v, 4) for k, v in best.items()},
        **{f"{k}_time_to_target_s": None if v is None else round(v, 1) for k, v in ttt.items()},
        **{f"{k}_wall_s": round(r["wall_s"], 1) for k, r in runs.items()},
        **{f"{k}_trial_epochs": int(len(r["raw"])) for k, r in runs.items()},
        "time_ratio": None if ratio is None else round(ratio, 3),
        "best_gap_points": round(100 * (best["fifo"] - best["asha"]), 2),
        "wall_ratio": round(runs["asha"]["wall_s"] / runs["fifo"]["wall_s"], 3),
    }


if __name__ == "__main__":
    main()
