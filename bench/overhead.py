"""Overhead of the search machinery: one fixed config N times through `search/run.py` vs N
times through plain `fmnist.train` in one Python process.

    python bench/overhead.py [--runs 3] [--epochs 16] [--rounds 2] [--train-size 12000]

Both sides are whole commands timed from outside (Python start, TensorFlow import, data load
included), both on the same split, with 2 TensorFlow threads and one run at a time. The search
side adds Ray, Tune, one checkpoint per epoch and the Parquet recorder. The issue's target
(ratio <= 1.15) is for trials of 30 s or more: with the defaults a plain run lasted 31-34 s on
this 2-core CPU in bfloat16 (12 epochs lasted 27 s; in float32 they lasted 30-87 s), and the
summary says when a plain run was shorter (`plain_runs_under_30_s`; raise --epochs).

The two sides take turns, --rounds times each, in the order plain, search, search, plain, ...
(ABBA): this machine's speed drifts by several percent over minutes, and one side always
going first would carry that drift into the ratio. The ratio is the search commands' wall
time over the plain commands'; each round's own ratio is listed too. The summary splits each
side into time inside epochs and time outside them (start, build, checkpoints, shutdown), so
a ratio can be read as fixed cost or as slower epochs. Prints one JSON line, appended to
bench/results/overhead.jsonl.
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
    times, epochs = [], []
    for _ in range(args.runs):
        run_epochs: list[float] = []
        t0 = time.perf_counter()
        train(cfg, data, on_epoch_end=lambda m, e=run_epochs: e.append(m["epoch_time_s"]))
        times.append(time.perf_counter() - t0)
        epochs.append(sum(run_epochs))
    print(json.dumps({"run_s": times, "run_epoch_s": epochs}))


def order(rounds: int) -> list[str]:
    """Which side runs when: plain, search, then search, plain, and so on (ABBA)."""
    return [side for r in range(rounds)
            for side in (("plain", "search") if r % 2 == 0 else ("search", "plain"))]


def run_plain(args: argparse.Namespace, data_flags: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--plain", "--runs", str(args.runs), "--epochs",
           str(args.epochs), *size_flags(args), *data_flags]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
    wall = time.perf_counter() - t0
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return {"wall_s": wall, "run_s": got["run_s"], "run_epoch_s": got["run_epoch_s"]}


def run_search(args: argparse.Namespace, data_flags: list[str], folder, space, i: int) -> dict:
    run = search(folder, f"overhead-{int(time.time())}-{i}", "--space", str(space),
                 "--num-samples", str(args.runs), "--max-epochs", str(args.epochs),
                 "--scheduler", "fifo", "--cpus-per-trial", "2", *size_flags(args),
                 "--time-budget", "3600", *data_flags)
    trials = run["raw"].groupby("trial_id").agg(start=("timestamp", "min"),
                                                inside=("epoch_time_s", "sum"))
    return {"wall_s": run["wall_s"],
            "run_epoch_s": [float(t) for t in trials.sort_values("start")["inside"]]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2,
                   help="commands per side, taking turns ABBA (1: plain then search)")
    add_size_args(p, train=12_000, val=3_000)
    p.add_argument("--data-dir")
    p.add_argument("--plain", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.plain:
        return plain(args)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    folder = workdir(args.keep)
    space = reference_space(folder)
    data_flags = ["--data-dir", args.data_dir] if args.data_dir else []
    done: dict[str, list[dict]] = {"plain": [], "search": []}
    for i, side in enumerate(order(args.rounds)):
        got = (run_plain(args, data_flags) if side == "plain"
               else run_search(args, data_flags, folder, space, i))
        print(f"{side}: {got['wall_s']:.1f} s, {sum(got['run_epoch_s']):.1f} s inside epochs",
              file=sys.stderr, flush=True)
        done[side].append(got)

    def wall(side: str) -> float:
        return sum(d["wall_s"] for d in done[side])

    def inside(side: str) -> float:  # time inside epochs, every run or trial of the side
        return sum(sum(d["run_epoch_s"]) for d in done[side])

    plain_runs = [t for d in done["plain"] for t in d["run_s"]]
    emit("overhead", {
        "bench": "overhead", "config": REFERENCE, "runs": args.runs, "epochs": args.epochs,
        "rounds": args.rounds, "order": order(args.rounds), "train": args.train_size,
        "val": args.val_size,
        "plain_wall_s": round(wall("plain"), 1), "search_wall_s": round(wall("search"), 1),
        "round_ratios": [round(s["wall_s"] / p["wall_s"], 3)
                         for p, s in zip(done["plain"], done["search"], strict=True)],
        "plain_run_s": [round(t, 1) for t in plain_runs],
        "plain_runs_under_30_s": sum(t < 30 for t in plain_runs),
        # time inside epochs per run (plain) and per trial in the order they ran (search):
        # whether the search's epochs are slower throughout or in some runs only
        "plain_run_epoch_s": [[round(t, 1) for t in d["run_epoch_s"]] for d in done["plain"]],
        "search_run_epoch_s": [[round(t, 1) for t in d["run_epoch_s"]]
                               for d in done["search"]],
        "plain_epoch_time_sum_s": round(inside("plain"), 1),
        "search_epoch_time_sum_s": round(inside("search"), 1),
        "epoch_ratio": round(inside("search") / inside("plain"), 3),
        "plain_outside_epochs_s": round(wall("plain") - inside("plain"), 1),
        "search_outside_epochs_s": round(wall("search") - inside("search"), 1),
        "ratio": round(wall("search") / wall("plain"), 3), "target": 1.15,
        "machine": platform.machine(), "cpus": os.cpu_count(), "time": time.time(),
    })


if __name__ == "__main__":
    main()
