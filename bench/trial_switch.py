"""What a reused worker pays to go from one trial to the next, side by side.

    python bench/trial_switch.py [--trials 12] [--rounds 2] [--train-size 2500] [--val-size 2000]

With `reuse_actors`, a worker that ends a trial is handed the next one: `reset_config` clears
Keras' session, whose last act is a full garbage collection of the process, and the next
trial's model is built and traced. In a worker that holds TensorFlow, Ray and the data, a full
collection walks some 400,000 objects the imports left, every time. The trainable now freezes
those once (`gc.freeze()` in a Tune worker's setup) and lets the finished trial's run go before
the collection, so the collection frees its model at once ("after"); "before" is the same
trainable with both undone (the imports unfrozen, the run held through the collection).

Each side is one whole `search/run.py` search run through this script, so that the variant can
be swapped in: `--trials` configs of the `cnn` space (random searcher, seed 0: both sides draw
the same configs), one epoch each, one trial at a time on one CPU, so one worker runs them all.
The sides take turns (before, after, then after, before: ABBA), `--rounds` pairs. Reported per
side, as medians over its resets and trials: the time `reset_config` took, the switch (a trial's
epoch end to the next trial's epoch start: Tune's bookkeeping, the reset, the next model's
build), the first epoch (build of the steps and their trace included), the worker's resident
memory after each reset, and each command's wall time; then the ratios after / before.
Prints one JSON line, appended to bench/results/trial_switch.jsonl.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

from report import emit
from searchbench import add_size_args, epoch_ends, epoch_starts, median, search, size_flags, workdir

from search.trainable import FMNISTTrainable


class After(FMNISTTrainable):
    """The trainable as it is, with each reset timed into LOG."""

    LOG = ""  # set in the child before the search; sent to the worker with the class

    def reset_config(self, new_config):
        t0 = time.perf_counter()
        done = self._reset(new_config)
        seconds = time.perf_counter() - t0
        rss_mib = int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf(
            "SC_PAGE_SIZE") / 2**20 if Path("/proc/self/statm").exists() else None
        with open(self.LOG, "a") as f:
            f.write(json.dumps({"pid": os.getpid(), "reset_s": seconds, "rss_mib": rss_mib,
                                "frozen": gc.get_freeze_count()}) + "\n")
        return done

    def _reset(self, new_config):
        return super().reset_config(new_config)


class Before(After):
    """The same, with the imports unfrozen and the finished run held through the collection."""

    def setup(self, *args, **kwargs):
        super().setup(*args, **kwargs)
        gc.unfreeze()

    def _reset(self, new_config):
        import keras

        keras.backend.clear_session()  # self._run, the finished trial's, is still held here
        self._build(new_config)
        return True


def child(variant: str, log: str, flags: list[str]) -> int:
    """One search with the variant's trainable, as `search/run.py` runs it after parsing."""
    from search import run

    cls = {"before": Before, "after": After}[variant]
    cls.LOG = log
    return run.run_search(run.resolve(flags), trainable_cls=cls)


def side(args: argparse.Namespace, folder: Path, variant: str, i: int) -> dict:
    log = folder / f"resets-{variant}-{i}.jsonl"
    got = search(folder, f"switch-{variant}-{i}", "--space", "cnn", "--num-samples",
                 str(args.trials), "--max-epochs", "1", "--scheduler", "fifo", "--seed", "0",
                 "--cpus-per-trial", "1", "--max-concurrent", "1", "--time-budget", "3600",
                 *size_flags(args), *(["--data-dir", args.data_dir] if args.data_dir else []),
                 program=[sys.executable, __file__, "--child", variant, str(log)])
    resets = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    if len({r["pid"] for r in resets}) != 1:
        raise SystemExit(f"{variant}: the trials did not all run in one reused worker "
                         f"({len({r['pid'] for r in resets})} pids in {len(resets)} resets)")
    raw = got["raw"].assign(start=lambda d: epoch_starts(d), end=lambda d: epoch_ends(d))
    raw = raw.sort_values("start")
    switches = (raw["start"].to_numpy()[1:] - raw["end"].to_numpy()[:-1]).tolist()
    return {"wall_s": got["wall_s"], "trials": int(raw["trial_id"].nunique()),
            "resets": len(resets), "frozen": resets[-1]["frozen"],
            "reset_s": median([r["reset_s"] for r in resets]),
            "switch_s": median(switches),
            "first_epoch_s": median(raw["epoch_time_s"].tolist()),
            "rss_mib_last": resets[-1]["rss_mib"],
            "configs": sorted(map(str, got["trials"].filter(like="params_")
                                  .to_dict("records")))}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        sys.exit(child(sys.argv[2], sys.argv[3], sys.argv[4:]))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=12, help="configs per search (default: 12)")
    p.add_argument("--rounds", type=int, default=2,
                   help="before/after pairs, taking turns ABBA (default: 2)")
    p.add_argument("--data-dir")
    add_size_args(p, train=2_500, val=2_000)
    args = p.parse_args()
    if args.trials < 2 or args.rounds < 1:
        p.error("--trials must be at least 2 and --rounds at least 1")
    folder = workdir(args.keep)
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for i in range(args.rounds):
        for variant in ("before", "after") if i % 2 == 0 else ("after", "before"):
            runs[variant].append(side(args, folder, variant, i))
            shown = {k: v for k, v in runs[variant][-1].items() if k != "configs"}
            print(variant, json.dumps(shown), file=sys.stderr, flush=True)
    if runs["before"][0]["configs"] != runs["after"][0]["configs"]:
        raise SystemExit("the two sides drew different configs")
    keys = ("wall_s", "reset_s", "switch_s", "first_epoch_s", "rss_mib_last")
    summary = {v: {k: median([r[k] for r in rs]) for k in keys} for v, rs in runs.items()}
    b, a = summary["before"], summary["after"]
    emit("trial_switch", {
        "bench": "trial_switch", "space": "cnn", "trials": args.trials, "rounds": args.rounds,
        "train": args.train_size, "val": args.val_size, "before": b, "after": a,
        "frozen_objects": runs["after"][0]["frozen"],
        **{f"{k}_ratio": round(a[k] / b[k], 3) for k in keys if a[k] and b[k]},
        "per_run": {v: [{k: r[k] for k in keys} for r in rs] for v, rs in runs.items()},
        "machine": platform.machine(), "cpus": os.cpu_count(), "time": time.time(),
    })


if __name__ == "__main__":
    main()
