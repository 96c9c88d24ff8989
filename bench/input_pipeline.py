"""Time lost waiting on Keras' input pipeline, side by side: its own vs `fmnist.train.feed`.

    python bench/input_pipeline.py [--train-size 12000] [--val-size 3000] [--epochs 5]

Keras gives arrays to TensorFlow through an autotuned `tf.data` pipeline. TensorFlow's
autotuner thread sleeps for a period that doubles from 10 ms, and when `fit` or `evaluate`
ends, the pipeline waits for that thread; on this machine it often slept on to the end of its
period, so a one-thread epoch of about 7 s ended at 10.3 s with the process idle.
`fmnist.train.feed` passes the same batches through a `tf.data` pipeline with autotuning off.

Fresh one-thread processes train the `overhead.py` reference CNN for a warm-up epoch and then
--epochs more, each variant alone, then two processes of the same variant at once (what two
one-CPU trials on 2 cores do). Per variant: median epoch wall and CPU time, the idle time of
the epochs (wall minus the process's CPU time; ~0 when nothing waits), how many epochs idled
more than 1 s, and training images/s of the pair over images/s alone. Prints one JSON line,
appended to bench/results/input_pipeline.jsonl.
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
from searchbench import REFERENCE, REPO, median

VARIANTS = ("keras", "feed")  # Keras' own pipeline for arrays; fmnist.train.feed


def child(args: argparse.Namespace) -> None:
    """One process: a warm-up epoch, then --epochs timed ones; prints the times as JSON."""
    import fmnist.train
    from fmnist.config import TrainConfig
    from fmnist.data import load_splits

    fmnist.train.configure_threads(1, 1)
    if args.variant == "keras":  # the arrays as they are: Keras builds its autotuned pipeline
        fmnist.train.feed = fmnist.train.keras_feed
    data = load_splits(args.data_dir, val_size=args.val_size, train_size=args.train_size, seed=0)
    run = fmnist.train.TrainingRun(TrainConfig.from_dict({**REFERENCE, "epochs": 99}), data)
    run.fit_epoch()
    epochs, start = [], time.time()
    for _ in range(args.epochs):
        c0, t0 = time.process_time(), time.perf_counter()
        run.fit_epoch()
        epochs.append((time.perf_counter() - t0, time.process_time() - c0))
    print(json.dumps({"epochs": epochs, "span": [start, time.time()]}))


def launch(args: argparse.Namespace, variant: str) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--epochs",
           str(args.epochs), "--train-size", str(args.train_size), "--val-size",
           str(args.val_size), *(["--data-dir", args.data_dir] if args.data_dir else [])]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def collect(*procs: subprocess.Popen) -> list[dict]:
    out = []
    for p in procs:
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"child exited {p.returncode}\n{stderr[-2000:]}")
        out.append(json.loads(stdout.strip().splitlines()[-1]))
    return out


def summary(alone: dict, pair: list[dict], images: int) -> dict:
    epochs = alone["epochs"] + [e for r in pair for e in r["epochs"]]
    idle = [wall - cpu for wall, cpu in epochs]
    alone_rate = images * len(alone["epochs"]) / sum(w for w, _ in alone["epochs"])
    span = max(r["span"][1] for r in pair) - min(r["span"][0] for r in pair)
    pair_rate = images * sum(len(r["epochs"]) for r in pair) / span
    return {
        "epoch_wall_s_alone": round(median([w for w, _ in alone["epochs"]]), 2),
        "epoch_wall_s_pair": round(median([w for r in pair for w, _ in r["epochs"]]), 2),
        "epoch_cpu_s": round(median([c for _, c in epochs]), 2),
        "idle_s": round(sum(idle), 1), "epochs": len(epochs),
        "epochs_idle_over_1s": sum(i > 1 for i in idle),
        "images_per_s_alone": round(alone_rate), "images_per_s_pair": round(pair_rate),
        "pair_speedup": round(pair_rate / alone_rate, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-size", type=int, default=12_000)
    p.add_argument("--val-size", type=int, default=3_000)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--data-dir")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.epochs < 1:
        raise SystemExit("--epochs must be >= 1")
    if args.child:
        return child(args)
    alone = {v: collect(launch(args, v))[0] for v in VARIANTS}
    pair = {v: collect(launch(args, v), launch(args, v)) for v in VARIANTS}
    result = {v: summary(alone[v], pair[v], args.train_size) for v in VARIANTS}
    emit("input_pipeline", {
        "bench": "input_pipeline", "config": REFERENCE, "threads": 1,
        "train": args.train_size, "val": args.val_size, "epochs_per_process": args.epochs,
        **result,
        "alone_wall_ratio": round(result["feed"]["epoch_wall_s_alone"]
                                  / result["keras"]["epoch_wall_s_alone"], 3),
        "pair_wall_ratio": round(result["feed"]["epoch_wall_s_pair"]
                                 / result["keras"]["epoch_wall_s_pair"], 3),
        "machine": platform.machine(), "cpus": os.cpu_count(), "time": time.time(),
    })


if __name__ == "__main__":
    main()
