"""What a trial pays before its epochs run at speed: the first epoch's extra time, side by side.

    python bench/first_epoch.py [--train-size 2500] [--val-size 2000] [--rounds 3]

A trial's first epoch builds and traces TensorFlow's training and validation steps, and a
restored trial (ASHA promotion, Hyperband, a retry) does it again. With ASHA a third of all
epochs are first epochs, so this fixed cost is a large share of a search on small data.

Each round starts two fresh one-thread processes one after the other, one with
`TrainingRun` as it is ("after") and one with its `_build_state` step switched off
("before": Keras' default on TensorFlow, which creates the optimizer's and metrics' variables
inside the first traced step, so the step is traced twice). Each trains a fixed CNN config
for 3 epochs, saves, restores and trains 2 more. Reported per variant, as medians over
rounds: extra time of the first epoch and of the first epoch after a restore (each minus the
median of the other epochs), as wall time and as the process's CPU time (which another
tenant's load on a shared machine moves less), and how many times the train step was traced.
Prints one JSON line, appended to bench/results/first_epoch.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

from report import emit
from searchbench import REPO, median

CONFIG = dict(model="cnn", blocks=2, base_filters=32, kernel_size=3, batch_norm=True,
              dense_units=128, dropout=0.2, optimizer="adam", learning_rate=1e-3,
              lr_schedule="cosine", batch_size=128, epochs=9, augment_flip=True,
              augment_translate=0.1)


def child(args: argparse.Namespace) -> None:
    """One process: 3 epochs, save, restore, 2 epochs; prints times and trace counts."""
    from fmnist.config import TrainConfig
    from fmnist.data import load_splits
    from fmnist.train import TrainingRun, configure_threads

    configure_threads(1, 1)
    if args.variant == "before":
        TrainingRun._build_state = lambda self: None
    data = load_splits(args.data_dir, val_size=args.val_size, train_size=args.train_size, seed=0)
    run = TrainingRun(TrainConfig.from_dict(CONFIG), data)

    def count_traces() -> list[int]:
        calls: list[int] = []
        step = run.model.train_step  # Python runs it only while TensorFlow traces the step
        run.model.train_step = lambda batch: calls.append(1) or step(batch)
        return calls

    def epoch() -> tuple[float, float]:
        c0 = time.process_time()
        wall = run.fit_epoch()["epoch_time_s"]
        return wall, time.process_time() - c0

    first = count_traces()
    times = [epoch() for _ in range(3)]
    with tempfile.TemporaryDirectory() as ckpt:
        run.save(ckpt)
        run.restore(ckpt)
    restored = count_traces()
    times += [epoch() for _ in range(2)]
    print(json.dumps({"wall": [w for w, _ in times], "cpu": [c for _, c in times],
                      "traced_first": len(first), "traced_restored": len(restored)}))


def measure(args: argparse.Namespace, variant: str) -> dict:
    cmd = [sys.executable, __file__, "--child", variant, "--train-size", str(args.train_size),
           "--val-size", str(args.val_size)]
    if args.data_dir:
        cmd += ["--data-dir", args.data_dir]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    if out.returncode != 0:
        raise SystemExit(f"{variant} exited {out.returncode}\n{out.stderr[-2000:]}")
    r = json.loads(out.stdout.strip().splitlines()[-1])
    row = {"traced_first": r["traced_first"], "traced_restored": r["traced_restored"]}
    for kind in ("wall", "cpu"):
        t = r[kind]
        steady = median([t[1], t[2], t[4]])
        row.update({f"first_extra_{kind}_s": t[0] - steady,
                    f"restored_extra_{kind}_s": t[3] - steady, f"steady_epoch_{kind}_s": steady})
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--train-size", type=int, default=2_500)
    p.add_argument("--val-size", type=int, default=2_000)
    p.add_argument("--rounds", type=int, default=3, help="before/after pairs (default: 3)")
    p.add_argument("--data-dir")
    p.add_argument("--child", choices=["before", "after"], dest="variant",
                   help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        return child(args)
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for i in range(args.rounds):
        for variant in ("before", "after") if i % 2 == 0 else ("after", "before"):
            runs[variant].append(measure(args, variant))
            print(variant, json.dumps(runs[variant][-1]), file=sys.stderr, flush=True)
    summary = {v: {k: round(median([r[k] for r in rs]), 3) for k in rs[0]}
               for v, rs in runs.items()}
    b, a = summary["before"], summary["after"]
    emit("first_epoch", {
        "bench": "first_epoch", "config": CONFIG, "train": args.train_size,
        "val": args.val_size, "rounds": args.rounds, "before": b, "after": a,
        **{f"{when}_extra_{kind}_ratio":
           round(a[f"{when}_extra_{kind}_s"] / b[f"{when}_extra_{kind}_s"], 3)
           for when in ("first", "restored") for kind in ("wall", "cpu")},
        "machine": platform.machine(), "cpus": os.cpu_count(), "time": time.time(),
    })


if __name__ == "__main__":
    main()
