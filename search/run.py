"""Hyperparameter search on Ray Tune: `python search/run.py --space vgg`.

Everything the user typed is checked before Ray starts or anything is written; a mistake is one
line on stderr and exit code 2. Results land in <storage>/<name>/ as Parquet (DESIGN.md).
Exit codes: 0 all trials ended cleanly, 1 some trials failed or rows could not be written to
the storage, 2 bad input, 130 interrupted (--resume continues).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Tune warns on every forced snapshot; with per-epoch checkpoints those are what make resume exact.
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
if str(ROOT) not in sys.path:  # `python search/run.py` from a checkout that is not installed
    sys.path.insert(0, str(ROOT))

from fmnist.config import (  # noqa: E402
    METRIC,
    MODE,
    auto_precision,
    keras_backend,
    keras_backend_problem,
)
from fmnist.data import (  # noqa: E402
    DataError,
    Splits,
    folder_problem,
    load_splits,
    resolve_data_dir,
)
from results.store import (  # noqa: E402
    RAY_DIR,
    ExperimentStore,
    StoreError,
    open_root,
    os_reason,
    probe_uri,
)
from search.spaces import (  # noqa: E402
    Space,
    SpaceError,
    check_searcher,
    grid_points,
    is_space_file,
    list_spaces,
    load_space,
    parse_override,
    space_json,
    space_path,
)

SCHEDULERS = ("asha", "asha-promote", "hyperband", "median", "fifo")
ASHAS = ("asha", "asha-promote")  # the schedulers with rungs at grace x factor^k
# Schedulers that park trials at rungs and resume them later, and why a concurrency limit
# (which counts paused trials as live) breaks each of them.
PAUSING = {"asha-promote": "no new config starts while they wait",
           "hyperband": "its brackets never fill and it stops no trial"}
SEARCHERS = ("random", "optuna", "hyperopt", "tpe-rungs", "grid")
# Scheduler flags and the schedulers that read them: given for another, a flag would be
# recorded with the experiment and change nothing.
SCHEDULER_FLAGS = {"grace_period": ("asha", "asha-promote", "median"),
                   "reduction_factor": ("asha", "asha-promote", "hyperband")}
# The default run finishes on a laptop CPU in about 15 minutes; --full is the real study.
# Measured here: 8 VGG samples at 4 epochs on 12k+12k images hit the 14-min budget with two
# trials never started; 6k+6k images and 3 epochs let ASHA compare all 8.
QUICK = {"num_samples": 8, "max_epochs": 3, "train_size": 6_000, "val_size": 6_000,
         "time_budget": 14 * 60}
FULL = {"num_samples": 64, "max_epochs": None, "train_size": None, "val_size": 12_000,
        "time_budget": None}
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
ADDRESS_RE = re.compile(r"^(auto|(ray://)?[A-Za-z0-9.\-\[\]:]+:\d+)$")
# Where results may go: a local folder or a filesystem pyarrow can write to.
STORAGE_SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
CONNECT_TIMEOUT_S = 10.0  # --address: how long to wait for the head to answer
GPU_CHECK_S = 120.0  # --gpus-per-trial: how long to wait for a GPU to check (a cluster may grow)
VERSIONED = ("tensorflow", "keras", "ray", "optuna", "hyperopt", "numpy", "pandas", "pyarrow")


class UsageError(ValueError):
    """Bad flags or files: reported as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not argparse's usage block
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python search/run.py",
        description="Hyperparameter search for Keras classifiers on Fashion-MNIST, on Ray Tune. "
        "Without --full the budget is a quick one (8 samples, 3 epochs, 6,000 training and "
        "6,000 validation images, 14 min time budget) that finishes on a laptop CPU.",
    )
    a = p.add_argument
    a("--space", default="vgg", help="space name (see --list-spaces) or path to a .yaml file")
    a("--list-spaces", action="store_true", help="list the spaces shipped in search/spaces/")
    a("--set", action="append", default=[], metavar="KEY=VALUE",
      help="pin a parameter (value parsed as YAML, may also be a distribution); repeatable")
    a("--full", action="store_true",
      help="the full study: 64 samples, the space's epochs, the full 48,000 / 12,000 split, "
      "no time budget (each still overridable)")
    a("--scheduler", default="asha", help=f"trial scheduler: {', '.join(SCHEDULERS)}")
    a("--searcher", default="random", help=f"config searcher: {', '.join(SEARCHERS)}")
    a("--num-samples", type=int, help="configurations to sample (per grid point with grids)")
    a("--max-epochs", type=int, help="epochs of a trial that is never stopped (max_t); "
      "default: the space's `epochs`, capped at 3 without --full")
    a("--grace-period", type=int, default=1,
      help="asha, asha-promote, median: epochs before a trial may stop (the first rung)")
    a("--reduction-factor", type=float, default=3.0,
      help="asha, asha-promote, hyperband: keep 1/factor of the trials at each rung")
    a("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial (TF threads follow)")
    a("--gpus-per-trial", type=float, default=0.0,
      help="GPUs per trial; fractions pack trials on one GPU (0.25 = four per GPU)")
    a("--max-concurrent", type=int,
      help="at most this many trials at once (not with asha-promote or hyperband)")
    a("--max-failures", type=int, default=2,
      help="retries of a failed trial from its last checkpoint")
    a("--time-budget", type=float, help="stop the search after this many seconds")
    a("--seed", type=int, default=0, help="searcher seed and data split seed")
    a("--train-size", type=int, help="class-balanced subset of the training split")
    a("--val-size", type=int, help="validation images (6,000; 12,000 with --full)")
    a("--dataset", default="fashion_mnist", help="fashion_mnist or mnist (MNIST-format folder)")
    a("--data-dir", help="folder with the train IDX files (else FMNIST_DATA_DIR, the Debian "
      "package folder, the Keras cache)")
    a("--verify-data", action="store_true",
      help="check the data files' sha256 against the known Fashion-MNIST fingerprints")
    a("--address", help="Ray cluster: auto, host:port or ray://host:port; default: an embedded "
      "local Ray")
    a("--storage", default="runs", help="results root: a folder or a URI pyarrow accepts "
      "(s3://bucket/path, gs://...); default ./runs")
    a("--shared-storage", action="store_true",
      help="the local --storage folder is shared by every node (NFS); needed for a plain "
      "folder on a cluster of several machines")
    a("--name", help="experiment name (folder under --storage); default <space>-<time>")
    a("--resume", action="store_true",
      help="continue the interrupted experiment --name with its original settings")
    a("--retry-errored", action="store_true",
      help="with --resume: run the experiment's failed trials again from their last "
      "checkpoint, one more attempt each (once what made them fail is fixed)")
    a("--dry-run", action="store_true",
      help="check everything and print the plan without starting Ray")
    return p


@dataclass
class Plan:
    """Everything resolved and checked; nothing started, nothing written."""

    args: argparse.Namespace
    space: Space
    splits: Splits
    store: ExperimentStore
    settings: dict[str, Any]
    argv: list[str]


# Flags that say where and how this invocation runs, not what the experiment is.
NOT_SETTINGS = ("name", "storage", "address", "resume", "retry_errored", "dry_run",
                "list_spaces", "default_name")


def check_storage(value: str) -> None:
    """Refuse a --storage that is empty, of an unknown scheme, or climbs out through '..'.

    A results root is written to and swept (stale *.tmp files are deleted), so it must say
    plainly where it is: 'runs/../../x' reads like a folder under runs/ and is not one.
    """
    if not value.strip():
        raise UsageError("--storage is empty: give a folder or a URI such as s3://bucket/runs")
    if any(ord(c) < 32 for c in value):
        raise UsageError(f"--storage {value!r}: control characters are not allowed")
    scheme, sep, rest = value.partition("://")
    if sep and scheme.lower() not in STORAGE_SCHEMES:
        raise UsageError(f"--storage {value!r}: unsupported scheme {scheme!r}; use a folder or "
                         f"one of {', '.join(s + '://' for s in STORAGE_SCHEMES)}")
    path = rest.split("?", 1)[0] if sep else value
    if ".." in re.split(r"[/\\]+", path):
        raise UsageError(f"--storage {value!r} escapes its folder through '..'; "
                         "give the folder it means directly")


def check_storage_reachable(value: str) -> None:
    """Refuse a --storage root that cannot be reached or, for a folder, created or written.

    A local folder is probed (`fmnist.data.folder_problem`), a bucket looked up once
    (`results.store.probe_uri`); neither leaves anything behind.
    """
    if "://" in value and not value.lower().startswith("file://"):
        try:
            probe_uri(value)  # opens the bucket itself: open it once here, not twice
        except StoreError as exc:
            raise UsageError(f"--storage {exc}") from None
        return
    problem = folder_problem(open_root(value)[1])  # a local path: nothing goes over a network
    if problem:
        raise UsageError(f"--storage {value}: {problem}")


def _settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """What --resume restores: every resolved flag except those in NOT_SETTINGS."""
    return {k: v for k, v in vars(args).items() if k not in NOT_SETTINGS}


def typed_flags(argv: list[str]) -> dict[str, Any]:
    """The flags on the command line (abbreviated or not), without argparse's defaults."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return vars(parser.parse_args(argv))


def changed_on_resume(argv: list[str], saved: dict[str, Any]) -> list[str]:
    """The flags given with --resume whose values differ from the experiment's own, as text.

    Ray Tune restores the search as it was saved, so such a flag could not take effect.
    """
    given = typed_flags(argv)
    changed = []
    for key, value in given.items():
        if key in NOT_SETTINGS or key not in saved or key in ("verify_data", "data_dir"):
            continue
        old = saved[key]
        if key == "space" and is_space_file(value):
            value = str(space_path(value).resolve())
        elif key == "set":
            value, old = sorted(value), sorted(old or [])
        if value != old:
            changed.append(f"--{key.replace('_', '-')} {_shown(value)} (it has {_shown(old)})")
    return changed


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return shlex.join(value) if value else "none"
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def resolve(argv: list[str]) -> Plan:
    """Parse and check everything. Raises UsageError with a one-line message."""
    args = build_parser().parse_args(argv)
    if args.address is not None and not ADDRESS_RE.match(args.address):
        raise UsageError(f"--address {args.address!r}: use auto, HOST:PORT or ray://HOST:PORT")
    check_storage(args.storage)
    check_storage_reachable(args.storage)
    if args.name is not None and not NAME_RE.match(args.name):
        raise UsageError(f"--name {args.name!r}: use letters, digits, '.', '_' and '-' only "
                         "(no path separators)")
    if args.retry_errored and not args.resume:
        raise UsageError("--retry-errored runs an experiment's failed trials again: it goes "
                         "with --resume --name NAME")
    if args.resume:
        if not args.name:
            raise UsageError("--resume needs --name of the experiment to continue")
        store = ExperimentStore(args.storage, args.name)
        if not store.exists():
            raise UsageError(f"--resume: no experiment {args.name!r} under {args.storage}")
        if not store.has_ray_state():
            raise UsageError(f"--resume: {args.name!r} stopped before Ray Tune saved its state; "
                             "nothing to continue, start it again under a new --name")
        if problem := store.tune_state_problem():
            raise UsageError(f"--resume: {args.name!r} cannot be continued: {problem}; "
                             f"{left_as_is(store)}")
        if holder := store.search_holder():  # two drivers would write over each other
            raise UsageError(f"--resume: {args.name!r} is being searched now by {holder}")
        searched = store.read_experiment()
        saved = json.loads(searched["settings"])
        if args.retry_errored and (store.read_trials()["status"] == "budget").any():
            raise UsageError(f"--retry-errored: the time budget ({_shown(saved['time_budget'])} "
                             f"s) ended {args.name!r}, and --resume cannot extend it, so no "
                             "trial can run again; start a new --name (a larger --time-budget, "
                             "or --full)")
        changed = changed_on_resume(argv, saved)
        if changed:
            raise UsageError(f"--resume continues {args.name!r} with its own settings, and "
                             f"{', '.join(changed)} differ; start a new --name to change them")
        # Where the files are now, and checking them again, change nothing in the search;
        # that they are the same files is checked below, once they are read.
        data_dir, verify = args.data_dir, args.verify_data
        for key, value in saved.items():  # the original settings; only where/how may differ
            setattr(args, key, value)
        args.verify_data = args.verify_data or verify
        if data_dir:
            args.data_dir = str(Path(data_dir).expanduser().resolve())
    preset = FULL if args.full else QUICK
    for key, value in preset.items():
        if getattr(args, key) is None and key != "max_epochs":
            setattr(args, key, value)
    if args.scheduler not in SCHEDULERS:
        raise UsageError(f"--scheduler {args.scheduler!r}: choose one of {', '.join(SCHEDULERS)}")
    if not args.resume:  # a resumed experiment keeps what it was started with
        for key in sorted(typed_flags(argv).keys() & SCHEDULER_FLAGS.keys()):
            readers = SCHEDULER_FLAGS[key]
            if args.scheduler not in readers:
                raise UsageError(f"--{key.replace('_', '-')} is read by --scheduler "
                                 f"{', '.join(readers[:-1])} and {readers[-1]}, not "
                                 f"{args.scheduler}: leave it out")
    if args.searcher not in SEARCHERS:
        raise UsageError(f"--searcher {args.searcher!r}: choose one of {', '.join(SEARCHERS)}")
    checks = [
        (args.num_samples >= 1, f"--num-samples must be >= 1, got {args.num_samples}"),
        (args.max_epochs is None or args.max_epochs >= 1,
         f"--max-epochs must be >= 1, got {args.max_epochs}"),
        (args.grace_period >= 1, f"--grace-period must be >= 1, got {args.grace_period}"),
        (args.reduction_factor > 1, f"--reduction-factor must be > 1, got {args.reduction_factor}"),
        (args.cpus_per_trial > 0, f"--cpus-per-trial must be > 0, got {args.cpus_per_trial}"),
        (args.gpus_per_trial >= 0, f"--gpus-per-trial must be >= 0, got {args.gpus_per_trial}"),
        (args.max_concurrent is None or args.max_concurrent >= 1,
         f"--max-concurrent must be >= 1, got {args.max_concurrent}"),
        (args.max_failures >= 0, f"--max-failures must be >= 0, got {args.max_failures}"),
        (not (args.max_concurrent and args.scheduler in PAUSING),
         f"--max-concurrent cannot be used with --scheduler {args.scheduler}: its paused trials "
         f"count against the limit, so {PAUSING.get(args.scheduler)}; --cpus-per-trial sets "
         "how many run at once"),
        (args.time_budget is None or args.time_budget > 0,
         f"--time-budget must be > 0 seconds, got {args.time_budget}"),
        (args.train_size is None or args.train_size >= 1,
         f"--train-size must be >= 1, got {args.train_size}"),
        (args.val_size >= 1, f"--val-size must be >= 1, got {args.val_size}"),
        (0 <= args.seed < 2**32, f"--seed must be between 0 and {2**32 - 1}, got {args.seed}"),
    ]
    for ok, message in checks:
        if not ok:
            raise UsageError(message)
    if not args.address and args.cpus_per_trial > (os.cpu_count() or 1):
        # Ray never counts more CPUs than the OS shows (fewer under a cgroup quota, which
        # run_search checks once Ray has counted), so this holds before Ray starts.
        raise UsageError(f"--cpus-per-trial {args.cpus_per_trial:g}: this machine has "
                         f"{os.cpu_count() or 1} CPUs, so no trial could start on the embedded "
                         "Ray; use --address for a cluster")
    problem = None if args.address else keras_backend_problem()  # a cluster's nodes differ
    if problem:
        raise UsageError(f"{problem} (the trials import Keras)")
    overrides = dict(parse_override(s) for s in args.set)
    # A resumed experiment was checked when it started, maybe before the unread-key check.
    space = load_space(args.space, overrides, check_read=not args.resume)
    if args.max_epochs is None:
        args.max_epochs = space.epochs if args.full else min(space.epochs, QUICK["max_epochs"])
    space = load_space(args.space, {**overrides, "epochs": args.max_epochs},  # re-check
                       check_read=not args.resume)
    if args.grace_period > args.max_epochs:
        raise UsageError(f"--grace-period {args.grace_period} exceeds --max-epochs "
                         f"{args.max_epochs}")
    check_searcher(space, args.searcher)
    resolve_data_dir(args.data_dir, args.dataset, "train")  # a clear error for a missing folder
    splits = load_splits(args.data_dir, args.dataset, val_size=args.val_size,
                         train_size=args.train_size, seed=args.seed, verify=args.verify_data)
    if args.resume and splits.source.fingerprint != searched["dataset_fingerprint"]:
        raise UsageError(f"--resume: the data at {splits.source.location} is not the data "
                         f"{args.name!r} searched on (fingerprint {splits.source.fingerprint[:12]}"
                         f", it has {searched['dataset_fingerprint'][:12]}); give --data-dir "
                         "with the same files")
    if not args.resume:
        args.default_name = not args.name  # then a clash at start picks the next free one
        name = args.name or f"{space.name}-{datetime.now():%Y%m%d-%H%M%S}"
        store = ExperimentStore(args.storage, name)
        if store.folder_exists():
            raise UsageError(f"experiment {name!r} already exists under {args.storage}; "
                             "use --resume to continue it or another --name")
        args.name = name
        # The saved settings must name the same files when --resume runs from another folder.
        if is_space_file(args.space):
            args.space = str(space_path(args.space).resolve())
        if args.data_dir:
            args.data_dir = str(Path(args.data_dir).expanduser().resolve())
    return Plan(args, space, splits, store, _settings_from(args), argv)


# ----------------------------------------------------------------------------- plan


def asha_rungs(grace: int, factor: float, max_t: int) -> list[int]:
    rungs, t = [], float(grace)
    while t < max_t:
        rungs.append(int(t))
        t *= factor
    return rungs


def hyperband_brackets(max_t: int, factor: float) -> list[list[tuple[int, int]]]:
    """The brackets of one band of Ray's HyperBandScheduler, as (configs, epochs) per round.

    Ray's own arithmetic (ray/tune/schedulers/hyperband.py, 2.60): brackets s = 0, 1, ...
    while s < round(log(max_t) / log(factor)) + 1, each starting n0 configs at r0 epochs and
    keeping ceil(n / factor) of them for min(r * factor, max_t) epochs, s times. A bracket
    whose r0 rounds to 0 is skipped. New configs fill the brackets in this order.
    """
    s_max_1 = int(round(math.log(max_t) / math.log(factor))) + 1
    brackets = []
    for s in range(s_max_1):
        n, r = math.ceil(s_max_1 / (s + 1) * factor**s), int(max_t * factor ** (-s))
        if r == 0:
            continue
        rounds = [(n, r)]
        for _ in range(s):
            n, r = math.ceil(n / factor), int(min(r * factor, max_t))
            rounds.append((n, r))
        brackets.append(rounds)
    return brackets


def describe_hyperband(max_t: int, factor: float) -> str:
    brackets = hyperband_brackets(max_t, factor)
    text = " | ".join(" -> ".join(f"{n}x{r}" for n, r in b) for b in brackets)
    per_band = sum(b[0][0] for b in brackets)
    out = (f"hyperband (reduction {factor:g}, max_t {max_t}): brackets of configs x epochs "
           f"{text}; new configs fill them in this order, {per_band} to a band")
    short = sorted({b[-1][1] for b in brackets if b[-1][1] < max_t})
    if short:
        out += (f"; Ray's rounding ends {'a bracket' if len(short) == 1 else 'brackets'} at "
                f"epoch {', '.join(map(str, short))}, before max_t (a max_t that is a power "
                f"of {factor:g} avoids it)")
    return out


def concurrent_slots(a: argparse.Namespace, cpus: float, gpus: float | None = None) -> int:
    """How many trials fit at once on `cpus` (and `gpus`, when given), within --max-concurrent."""
    slots = int(cpus // a.cpus_per_trial) if a.cpus_per_trial > 0 else 1
    if gpus is not None and a.gpus_per_trial > 0:
        slots = min(slots, int(gpus // a.gpus_per_trial))
    if a.max_concurrent:
        slots = min(slots, a.max_concurrent)
    return max(1, slots)


def precision_plan(space: Space, a: argparse.Namespace) -> str:
    """What the plan says about precision. `auto` is decided inside each trial
    (fmnist.train.resolve_precision); this predicts it for the embedded local Ray."""
    if "precision" in space.dists:
        return "sampled per trial"
    precision = space.fixed.get("precision", "auto")
    if precision != "auto":
        return f"{precision} (fixed)"
    if a.address:
        return ("auto: each node decides (mixed_bfloat16 on a CPU with bfloat16 instructions, "
                "float32 elsewhere)")
    policy, why = auto_precision(keras_backend(), lambda: a.gpus_per_trial > 0)
    return f"auto: {policy} ({why})"


def describe(plan: Plan, cpus: float | None) -> str:
    a, s = plan.args, plan.space
    lines = [f"space {s.name} ({s.source}): {len(s.dists)} sampled, {len(s.fixed)} fixed"]
    lines += [f"  {k:<18} {d.describe()}" for k, d in s.dists.items()]
    lines.append("  fixed: " + ", ".join(f"{k}={v}" for k, v in s.fixed.items()))
    src = plan.splits.source
    lines.append(f"data: {src.dataset} from {src.location}, train {len(plan.splits.y_train)} / "
                 f"val {len(plan.splits.y_val)} (test split not loaded), "
                 f"fingerprint {src.fingerprint[:12]}")
    if a.scheduler in ASHAS:
        rungs = asha_rungs(a.grace_period, a.reduction_factor, a.max_epochs)
        how = ("a trial waits at each rung until it ranks in the top 1/reduction"
               if a.scheduler == "asha-promote" else "stop-or-continue on reaching each rung")
        sched = (f"{a.scheduler} (grace {a.grace_period}, reduction {a.reduction_factor:g}, "
                 f"max_t {a.max_epochs}): rungs at epochs {', '.join(map(str, rungs)) or '-'}; "
                 f"{how}")
    elif a.scheduler == "hyperband":
        sched = describe_hyperband(a.max_epochs, a.reduction_factor)
    elif a.scheduler == "median":
        sched = f"median stopping (grace {a.grace_period} epochs, max_t {a.max_epochs})"
    else:
        sched = f"fifo (every trial runs {a.max_epochs} epochs)"
    lines.append(f"scheduler: {sched}")
    points = grid_points(s, a.searcher)
    trials = a.num_samples * points
    lines.append(f"searcher: {a.searcher} (seed {a.seed}), {a.num_samples} samples x {points} "
                 f"grid points = {trials} trials")
    budget = f"budget: at most {trials * a.max_epochs} trial-epochs ({trials} x {a.max_epochs})"
    if a.time_budget:
        budget += f", time budget {a.time_budget:g} s"
    lines.append(budget)
    slots = "?" if cpus is None else concurrent_slots(a, cpus)
    if a.address:
        where = a.address
    elif a.gpus_per_trial > 0:  # Ray finds the GPUs when it starts
        where = (f"embedded local Ray ({cpus:g} CPUs; GPUs are counted when Ray starts, and "
                 "can lower this)")
    else:
        where = f"embedded local Ray ({cpus:g} CPUs)"
    lines.append(f"resources: {a.cpus_per_trial:g} CPU, {a.gpus_per_trial:g} GPU per trial; "
                 f"up to {slots} concurrent on {where}")
    lines.append(f"precision: {precision_plan(s, a)}")
    lines.append(f"results: {plan.store.uri()}")
    if a.resume:
        lines.append(resume_plan(plan.store, a.retry_errored, a.max_concurrent))
    return "\n".join(lines)


def resume_plan(store: ExperimentStore, retry_errored: bool,
                max_concurrent: int | None = None) -> str:
    """What --resume will do with the trials recorded so far, as one line."""
    trials = store.read_trials()
    counts = trials["status"].value_counts().to_dict()
    line = "resume: " + (", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
                         if counts else "no trial recorded yet")
    failed = counts.get("error", 0)
    if failed and retry_errored:
        line += f"; the {failed} failed trial(s) run again from their last checkpoint"
        if max_concurrent:  # Tune re-queues them itself; its limit counts the searcher's
            line += (f", as CPUs/GPUs free up (--max-concurrent {max_concurrent} holds back "
                     "new configurations, not these)")
    elif failed:
        line += f"; the {failed} failed trial(s) stay failed (--retry-errored runs them again)"
    elif retry_errored:
        line += "; no failed trial to run again"
    return line


# ----------------------------------------------------------------------------- Ray


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def check_reachable(address: str, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Refuse a HOST:PORT (or ray://HOST:PORT) that nothing answers on.

    `ray.init` retries an unreachable address for many minutes; one TCP connect says at once.
    "auto" is left to Ray, which looks for a cluster started on this machine.
    """
    if address == "auto":
        return
    hostport = address.removeprefix("ray://")
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        why = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise UsageError(f"--address {address}: cannot reach {hostport} ({why}); is the Ray "
                         "head running there? `ray start --head` prints its address") from exc


def worker_env(args: argparse.Namespace, driver_env: Mapping[str, str]) -> dict[str, str]:
    """The variables Ray sets in the trials' workers.

    Their PYTHONPATH is this checkout, then the driver's own entries: a Keras backend or a
    package installed there (PYTHONPATH=... python search/run.py) is one the driver's checks
    found, so the trials must find it too (Ray's runtime environment replaces the variable).
    """
    path = [str(ROOT), *(p for p in driver_env.get("PYTHONPATH", "").split(os.pathsep) if p)]
    env = {"TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": os.pathsep.join(dict.fromkeys(path))}
    if args.gpus_per_trial and args.gpus_per_trial < 1:  # JAX: share GPUs like TF's limit
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.9 * args.gpus_per_trial:.3f}"
    return env


# Ray starts one worker per CPU ahead as the driver connects, but Tune gives every trainable
# actor a runtime env of its own (PL_DISABLE_FORK=1), so no trial can use those workers: each
# gets a fresh one anyway. Starting them only competed with Ray's own start and the first
# trial's worker for the CPUs. Without them, a 1-epoch search reached its first epoch about
# 1 s sooner on this 2-core machine (bench/README.md).
EMBEDDED_RAY_CONFIG = {"prestart_worker_first_driver": False}


def start_ray(args: argparse.Namespace) -> bool:
    """Connect to --address or start an embedded Ray; True if this process started it."""
    import ray

    if ray.is_initialized():
        return False
    from search.sigterm import children_ignore_sigterm, kill_at_once, left_ignored

    common = dict(runtime_env={"env_vars": worker_env(args, os.environ)}, log_to_driver=False,
                  logging_level="WARNING", configure_logging=True)
    if args.address:
        check_reachable(args.address)
        try:
            with left_ignored():
                ray.init(address=args.address, **common)
        except ConnectionError as exc:  # no cluster for "auto", a token refused, ...
            first = next((line for line in str(exc).splitlines() if line.strip()), repr(exc))
            raise UsageError(f"--address {args.address}: {first.strip()}") from exc
    else:
        # Ray's processes leave SIGTERM to this one, as they leave it SIGINT: a SIGTERM sent
        # to the whole job (Slurm, systemd, `timeout`) ends the search as Ctrl+C does.
        # (ignored again before the mask is lifted, so one that came meanwhile is dropped)
        with children_ignore_sigterm() as ignored, left_ignored():
            # Dashboard off and everything on loopback: nothing listens beyond this machine.
            ray.init(include_dashboard=False, dashboard_host="127.0.0.1",
                     _node_ip_address="127.0.0.1", _system_config=EMBEDDED_RAY_CONFIG,
                     **common)
            if ignored:  # before a SIGTERM that came meanwhile is acted on
                kill_at_once(ray._private.worker._global_node)
    return True


def stop_ray() -> None:
    """`ray.shutdown()` of the Ray this process started, less the second its monitor costs.

    Ray stops the GCS before the autoscaler's monitor, whose SIGTERM handler then tries to
    tell the GCS it failed and blocks until Ray kills it a second later (1.0 of the 1.35 s a
    shutdown took here). A local Ray has nothing for that monitor to scale or report, so it
    is killed first, and Ray stops the rest as it always does (with SIGKILL, at once, where
    its processes ignore SIGTERM: search/sigterm.py). Where Ray's internals differ (another
    version), the plain shutdown runs.
    """
    import ray

    try:
        from ray._private import ray_constants
        from ray._private.worker import _global_node

        monitors = _global_node.all_processes.get(ray_constants.PROCESS_TYPE_MONITOR, [])
        for info in monitors:
            info.process.kill()
            info.process.wait(timeout=5)
    except Exception:  # noqa: BLE001 - only a faster path; ray.shutdown below is the real one
        pass
    ray.shutdown()


def storage_problem(hosts: set[str], storage: str, shared: bool) -> str | None:
    """Why `storage` cannot hold a search whose trials run on `hosts`, or None.

    Ray Tune no longer copies trial checkpoints to the head node: each worker writes them to
    `--storage` as it sees it, so a folder on one machine's disk would scatter them.
    """
    if len(hosts) > 1 and "://" not in storage and not shared:
        return (f"--storage {storage} is a local folder but the cluster spans {len(hosts)} "
                "machines; use a bucket (s3://, gs://) or a folder shared by every node and say "
                "so with --shared-storage")
    return None


def check_storage_reaches_all_nodes(args: argparse.Namespace) -> None:
    import ray

    hosts = {n["NodeManagerAddress"] for n in ray.nodes() if n.get("Alive")}
    problem = storage_problem(hosts, args.storage, args.shared_storage)
    if problem:
        raise UsageError(problem)


def check_trials_see_gpus(args: argparse.Namespace, out) -> None:
    """With --gpus-per-trial, ask one worker holding a trial's GPUs whether Keras sees a GPU
    there (`search.trainable.gpu_problem`): where it does not, every trial would fail on it,
    each after its retries, so the search stops here instead, before anything is written.
    A cluster that has no GPU free within GPU_CHECK_S is not waited for: the trials ask too."""
    if args.gpus_per_trial <= 0:
        return
    import ray

    from search.trainable import gpu_problem

    check = ray.remote(num_cpus=0, num_gpus=args.gpus_per_trial, max_calls=1)(gpu_problem)
    ref = check.remote(args.gpus_per_trial)
    ready, _ = ray.wait([ref], timeout=GPU_CHECK_S)
    if not ready:
        ray.cancel(ref, force=True)
        print(f"gpu check: no GPU free within {GPU_CHECK_S:g} s; each trial checks its own",
              file=out or sys.stdout, flush=True)
        return
    try:
        problem = ray.get(ref)
    except ray.exceptions.RayError as exc:
        last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        problem = f"--gpus-per-trial {args.gpus_per_trial:g}: a GPU worker failed: {last}"
    if problem:
        raise UsageError(problem)


def make_scheduler(args: argparse.Namespace):
    from ray.tune.schedulers import FIFOScheduler

    if args.scheduler == "asha":
        from search.schedulers import ResumableASHA

        return ResumableASHA(time_attr="training_iteration", max_t=args.max_epochs,
                             grace_period=args.grace_period,
                             reduction_factor=args.reduction_factor)
    if args.scheduler == "asha-promote":
        from search.schedulers import PromotingASHA

        return PromotingASHA(max_t=args.max_epochs, reduction_factor=args.reduction_factor,
                             rungs=asha_rungs(args.grace_period, args.reduction_factor,
                                              args.max_epochs))
    if args.scheduler == "hyperband":
        from search.schedulers import ResumableHyperBand

        return ResumableHyperBand(time_attr="training_iteration", max_t=args.max_epochs,
                                  reduction_factor=args.reduction_factor)
    if args.scheduler == "median":
        from search.schedulers import ResumableMedian

        return ResumableMedian(time_attr="training_iteration", grace_period=args.grace_period,
                               min_samples_required=2)
    return FIFOScheduler()


def make_searcher(args: argparse.Namespace, space: Space):
    """The search algorithm for --searcher, as Tune would wrap it (a Searcher in a
    ConcurrencyLimiter for --max-concurrent, then a SearchGenerator), keeping its snapshots
    whole (search/tunestate.py). It carries the concurrency limit itself: Tune applies
    `max_concurrent_trials` only to a bare Searcher."""
    from ray.tune.search import ConcurrencyLimiter

    from search.tunestate import KeptSearchGenerator, KeptVariantGenerator

    searcher = None
    if args.searcher == "optuna" and space.dists:
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        searcher = OptunaSearch(sampler=optuna.samplers.TPESampler(seed=args.seed))
    elif args.searcher == "hyperopt" and space.dists:
        from ray.tune.search.hyperopt import HyperOptSearch

        searcher = HyperOptSearch(random_state_seed=args.seed,
                                  n_initial_points=min(20, max(1, args.num_samples // 2)))
    elif args.searcher == "tpe-rungs" and space.dists:
        from search.searchers import RungTPE

        searcher = RungTPE(seed=args.seed)
    if searcher is None:
        return KeptVariantGenerator(random_state=args.seed,
                                    max_concurrent=args.max_concurrent or 0)
    if args.max_concurrent:
        searcher = ConcurrencyLimiter(searcher, max_concurrent=args.max_concurrent)
    return KeptSearchGenerator(searcher)


def experiment_row(plan: Plan, resources: dict[str, Any]) -> dict[str, Any]:
    a = plan.args
    return {
        "name": a.name,
        "created_at": datetime.now(UTC),
        "space_name": plan.space.name,
        "space": space_json(plan.space),
        "scheduler": a.scheduler,
        "scheduler_settings": {"max_t": a.max_epochs, "grace_period": a.grace_period,
                               "reduction_factor": a.reduction_factor, "metric": METRIC,
                               "mode": MODE,
                               "rungs": asha_rungs(a.grace_period, a.reduction_factor,
                                                   a.max_epochs)
                               if a.scheduler in ASHAS else []},
        "searcher": a.searcher,
        "searcher_settings": {"seed": a.seed, "num_samples": a.num_samples,
                              "max_concurrent": a.max_concurrent},
        "num_samples": a.num_samples,
        "max_epochs": a.max_epochs,
        "dataset": plan.splits.dataset,
        "dataset_fingerprint": plan.splits.source.fingerprint,
        "dataset_files": plan.splits.source.sha256,
        "data_location": plan.splits.source.location,
        "train_size": len(plan.splits.y_train),
        "val_size": len(plan.splits.y_val),
        "split_seed": plan.splits.seed,
        "cpus_per_trial": a.cpus_per_trial,
        "gpus_per_trial": a.gpus_per_trial,
        "cluster_resources": resources,
        "address": a.address or "local",
        "versions": _versions(),
        "git_commit": _git_commit(),
        "command": shlex.join([sys.executable, "search/run.py", *plan.argv]),
        "settings": plan.settings,
    }


PENDING_ENV = "TUNE_MAX_PENDING_TRIALS_PG"

# Ray Tune's output engine prints, even with verbose=0, a "Configuration for experiment" box
# (searcher and scheduler class names) and a TensorBoard command for a copy of the results
# under /tmp/ray that is removed with the session; the plan above says more, and the closing
# lines name the TensorBoard folder that stays. Its older engine (which Tune uses with a Ray
# Client anyway) prints nothing at verbose=0. A value set in the environment is kept.
OUTPUT_ENV = "RAY_AIR_NEW_OUTPUT"


def pending_limit(args: argparse.Namespace, resources: dict[str, Any]) -> int | None:
    """How many trials Tune may queue ahead of the running ones; None leaves Tune's own choice.

    Tune queues up to 200 trials for its random searcher, so that an autoscaling cluster sees
    the demand and grows, and one for any other searcher. Neither fits a Ray that cannot grow
    (the embedded one): when a time budget ends the search the 200 are configs drawn and never
    run, and with one, Optuna's or HyperOpt's second trial is asked for only once the first runs
    (a worker's TensorFlow import, ~7 s, later). On it the queue holds as many trials as can run
    at once. Clusters (`--address`) and a limit the user set in the environment keep theirs.
    """
    if args.address or PENDING_ENV in os.environ:
        return None
    return concurrent_slots(args, resources.get("CPU", 1), resources.get("GPU", 0))


def unfit_trial(args: argparse.Namespace, resources: dict[str, Any]) -> str | None:
    """Why no trial could ever start on a Ray that cannot grow, or None.

    Tune would keep such a trial pending until the time budget ends the search. Only the Ray
    this process uses without --address is known not to grow: a cluster may autoscale.
    """
    if args.address:
        return None
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if args.cpus_per_trial > cpus:
        return (f"--cpus-per-trial {args.cpus_per_trial:g}: Ray has {cpus:g} CPUs here, so no "
                "trial could start")
    if args.gpus_per_trial > gpus:
        return (f"--gpus-per-trial {args.gpus_per_trial:g}: Ray found {gpus:g} GPUs here, so no "
                "trial could start")
    return None


def run_search(plan: Plan, out=None, trainable_cls: type | None = None) -> int:
    """Run the planned search; `trainable_cls` swaps in a subclass (fault-injection tests)."""
    if not plan.args.address and "ray" not in sys.modules:
        # Token authentication is Ray's default for a new local cluster, and it warns about it
        # at the top of every search unless the mode is set; set here, as Ray reads it when it
        # is imported (RAY_AUTH_MODE=disabled in the environment still opts out).
        os.environ.setdefault("RAY_AUTH_MODE", "token")
    import ray
    from ray import tune

    from search.recorder import ParquetRecorder
    from search.schedulers import OnRecord
    from search.spaces import to_tune
    from search.trainable import FMNISTTrainable
    from search.tunelogs import tune_loggers
    from search.tunestate import keep_snapshots_in

    a = plan.args
    limit, own_output = None, False
    started_here, locked = start_ray(a), False
    try:
        check_storage_reaches_all_nodes(a)
        resources = {k: v for k, v in ray.cluster_resources().items()
                     if k in ("CPU", "GPU", "memory") or k.startswith("accelerator")}
        resources["nodes"] = len([n for n in ray.nodes() if n.get("Alive")])
        problem = unfit_trial(a, resources)
        if problem:
            raise UsageError(problem)  # before anything is written
        check_trials_see_gpus(a, out)
        trainable = tune.with_resources(
            tune.with_parameters(trainable_cls or FMNISTTrainable, data=plan.splits.arrays(),
                                 fixed=plan.space.fixed, cpus=a.cpus_per_trial,
                                 gpus=a.gpus_per_trial),
            {"cpu": a.cpus_per_trial, "gpu": a.gpus_per_trial},
        )
        quiet_tune()
        if not a.resume:  # made now, exclusively: a search started beside this one may
            plan.store = claim_experiment_folder(plan.store, a.default_name)  # have its name
            a.name = plan.store.name
        print(describe(plan, resources.get("CPU")), file=out or sys.stdout, flush=True)
        if a.resume:
            plan.store.lock_search()  # before its *.tmp are swept: they could be a live one's
            locked = True
            plan.store.sweep_tmp()
            # Tune's own upload of its last snapshot may have been cut off by a kill: put back
            # the snapshot kept whole (search/tunestate.py).
            plan.store.restore_tune_state()
            ParquetRecorder.relocated_to = plan.store  # where it is now, if it moved
            OnRecord.scores = scores_on_record(plan.store)  # asha's, median's state again
            tuner = tune.Tuner.restore(plan.store.uri("ray"), trainable=trainable,
                                       resume_unfinished=True,
                                       resume_errored=a.retry_errored)
        else:
            try:
                plan.store.write_experiment(experiment_row(plan, resources))
            except OSError as exc:  # a full disk: the probe of --storage saw it writable
                if plan.store.is_local:  # the folder it made for it, empty: nothing stays
                    with contextlib.suppress(OSError):
                        os.rmdir(plan.store.path)
                raise UsageError(f"--storage {a.storage}: cannot write the experiment there "
                                 f"({os_reason(exc)})") from None
            plan.store.lock_search()  # a --resume of it meanwhile is refused
            locked = True
            recorder = ParquetRecorder(plan.store, plan.space.fixed, a.scheduler,
                                       a.cpus_per_trial, a.gpus_per_trial, out=out)
            tuner = tune.Tuner(
                trainable,
                param_space=to_tune(plan.space, a.searcher),
                tune_config=tune.TuneConfig(
                    metric=METRIC, mode=MODE, scheduler=make_scheduler(a),
                    # The search algorithm carries --max-concurrent itself (make_searcher).
                    search_alg=make_searcher(a, plan.space), num_samples=a.num_samples,
                    time_budget_s=a.time_budget,
                    reuse_actors=True,
                ),
                run_config=tune.RunConfig(
                    name="ray", storage_path=plan.store.uri(),
                    callbacks=[recorder, *tune_loggers()],
                    stop={"training_iteration": a.max_epochs},
                    checkpoint_config=tune.CheckpointConfig(checkpoint_frequency=1,
                                                            num_to_keep=2),
                    failure_config=tune.FailureConfig(max_failures=a.max_failures),
                    verbose=0,
                ),
            )
        limit = pending_limit(a, resources)
        if limit is not None:  # read once, when Tune's controller starts (inside fit)
            os.environ[PENDING_ENV] = str(limit)
        own_output = OUTPUT_ENV not in os.environ
        if own_output:  # read inside fit
            os.environ[OUTPUT_ENV] = "0"
        start = time.monotonic()
        handlers, tune_failed = _stop_handlers(), False
        keep_snapshots_in(plan.store)  # where the search keeps Tune's snapshots whole
        try:
            with restore_or_stop(plan.store) if a.resume else contextlib.nullcontext():
                tuner.fit()
        except (OSError, EOFError) as exc:
            # Tune's own files could not be written or read back: on a full disk it ends the
            # search building its result objects from error files left empty. What the search
            # recorded is in Parquet (or set aside by the recorder): the report reads that.
            print(f"warning: Ray Tune ended with {type(exc).__name__}: {exc} (its own files "
                  f"under {plan.store.uri(RAY_DIR)} may be incomplete)", file=sys.stderr)
            tune_failed = True
        finally:
            # Tune leaves its Ctrl+C handler installed after the search, so in a notebook or
            # any caller that goes on, the next Ctrl+C would be swallowed: put back the caller's.
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
        wall = time.monotonic() - start
    finally:
        if limit is not None:
            os.environ.pop(PENDING_ENV, None)
        if own_output:
            os.environ.pop(OUTPUT_ENV, None)
        ParquetRecorder.relocated_to = None
        keep_snapshots_in(None)
        OnRecord.scores = {}
        if locked:
            plan.store.unlock_search()
        if started_here:
            stop_ray()
    try:
        code = report(plan.store, wall, out, time_budget=a.time_budget)
    except OSError as exc:  # the storage stopped answering at the very end
        print(f"error: the search ended, but its results could not be read back from "
              f"{plan.store.uri()} ({os_reason(exc)}); `python -m results leaderboard` reads "
              "them once it answers", file=sys.stderr)
        return 1
    return 1 if tune_failed and code == 0 else code


# Ray Tune's warnings that tell a user nothing to act on, by logger: the start of each.
NOT_NEWS = {
    # A paused trial that resumes gets its result.json copied back from --storage, which
    # warns when Tune has not synced it there yet; the driver's own copy is whole and goes on
    # (checked: 3 lines for 3 epochs after the warning, under asha-promote).
    "ray.tune.logger.logger": "Remote file not found: ",
    # --retry-errored: Optuna was told these trials failed, and warns of every result they
    # report now, each with the whole result dict.
    "ray.tune.search.optuna.optuna_search": "Received additional ",
    # At the end of a resumed search Tune's result objects look for trials' result.json in
    # --storage before Tune's last sync has put them there (they were there after it: checked,
    # a median search resumed); the report reads the Parquet rows, not these objects.
    "ray.tune.analysis.experiment_analysis": "Failed to fetch metrics for ",
}


# After a --resume Tune's restored state can list checkpoints a trial had already deleted
# (it keeps 2) after Tune last saved that state; deleting them again logs an ERROR with a
# FileNotFoundError traceback at the trial's next checkpoint (checked: a kill then --resume,
# the trial went on and finished, its last 2 checkpoints on disk).
DELETED_ALREADY = ("ray.tune.execution.tune_controller", "_delete_fs_path")


def _not_news(record: logging.LogRecord) -> bool:
    """False for a warning of NOT_NEWS, and for DELETED_ALREADY's error."""
    if record.name == DELETED_ALREADY[0]:
        exc = record.exc_info[1] if record.exc_info else None
        return not (isinstance(exc, FileNotFoundError) and any(
            frame.name == DELETED_ALREADY[1] for frame in traceback.extract_tb(exc.__traceback__)))
    start = NOT_NEWS.get(record.name)
    return start is None or not record.getMessage().startswith(start)


def quiet_tune() -> None:
    """Drop NOT_NEWS's warnings and DELETED_ALREADY's error (at their loggers, so before any
    handler sees them)."""
    for name in (*NOT_NEWS, DELETED_ALREADY[0]):
        logging.getLogger(name).addFilter(_not_news)  # added once however often called


def left_as_is(store: ExperimentStore) -> str:
    """The end of a --resume refused for Tune's state: what is kept and what to do."""
    return (f"its trials and epochs so far stay as they are (python -m results leaderboard "
            f"{store.uri()}): start a new --name")


# What Tune logs when it cannot read an experiment back (then starts it again from nothing).
RESTORE_FAILED = ("ray.tune.execution.tune_controller", "Failed to restore the run state.")


@contextlib.contextmanager
def restore_or_stop(store: ExperimentStore) -> Iterator[None]:
    """A --resume that Ray Tune cannot restore ends with a one-line error (UsageError).

    Tune catches any error while it reads an experiment back, logs it, and starts the
    experiment again from nothing in the same folder: new trials under the trial ids of those
    on record (seen: a trial with none of the space's parameters, its epochs recorded under
    the id of a finished one). `ExperimentStore.tune_state_problem` catches a torn experiment
    state before Ray starts; this catches the rest (a searcher's state torn, a trial Tune cannot
    rebuild) as Tune logs it, before its controller exists, so no trial runs.
    """
    def stop(record: logging.LogRecord) -> bool:
        if record.getMessage() != RESTORE_FAILED[1]:
            return True
        exc = record.exc_info[1] if record.exc_info else None
        why = (f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0]}"
               if exc is not None else "see Ray's log")
        raise UsageError(f"--resume: Ray Tune could not restore {store.name!r} ({why}); nothing "
                         f"ran, and {left_as_is(store)}")

    logger = logging.getLogger(RESTORE_FAILED[0])
    logger.addFilter(stop)
    try:
        yield
    finally:
        logger.removeFilter(stop)


def scores_on_record(store: ExperimentStore) -> dict[str, dict[int, float]]:
    """Every trial's METRIC by epoch, from the experiment's canonical epochs (OnRecord's form),
    and from Tune's result.json for epochs a killed driver logged there but had not yet
    written to Parquet (the recorder backfills those rows once the search runs).

    A second read of the epochs besides the recorder's own: Tune adds the trials to the
    scheduler while it restores, before it sets up the callbacks."""
    epochs = store.read_epochs()
    scores: dict[str, dict[int, float]] = {}
    for trial_id, epoch, value in zip(epochs["trial_id"], epochs["epoch"], epochs[METRIC],
                                      strict=True):
        if value is not None and value == value:  # not None, not NaN
            scores.setdefault(trial_id, {})[int(epoch)] = float(value)
    logged: dict[str, dict[int, float]] = {}
    for trial_id, epoch, result in store.ray_results():  # in order: the last one is the latest
        value = result.get(METRIC)
        if isinstance(value, int | float) and not isinstance(value, bool) and value == value:
            logged.setdefault(trial_id, {})[epoch] = float(result[METRIC])
    for trial_id, by_epoch in logged.items():
        scores[trial_id] = {**by_epoch, **scores.get(trial_id, {})}  # Parquet's first
    return scores


def claim_experiment_folder(store: ExperimentStore, default_name: bool) -> ExperimentStore:
    """Make the experiment's folder, exclusively, so that two searches started at once with the
    same name do not write into one experiment. The default name (`<space>-<date>-<time>`, the
    same for searches started within a second) moves on to `-2`, `-3`, ...; a `--name` given
    is refused. A bucket has no folders to make: there the name was checked when resolved."""
    if not store.is_local:
        return store
    Path(store.path).parent.mkdir(parents=True, exist_ok=True)
    base, n = store.name, 1
    while True:
        try:
            os.mkdir(store.path)
            return store
        except FileExistsError:
            if not default_name:
                raise UsageError(f"experiment {store.name!r} was created under "
                                 f"{store.root_uri} by another search a moment ago; use "
                                 "another --name") from None
        n += 1
        store = ExperimentStore(store.root_uri, f"{base}-{n}")


def _stop_handlers() -> dict[int, Any]:
    """The handlers Tune (SIGINT, SIGUSR1) and the recorder (SIGTERM) replace during a search.

    Only the main thread may set them, and there is nothing to put back elsewhere.
    """
    if threading.current_thread() is not threading.main_thread():
        return {}
    names = ("SIGINT", "SIGUSR1", "SIGTERM")
    handlers = {getattr(signal, n): signal.getsignal(getattr(signal, n)) for n in names
                if hasattr(signal, n)}
    return {sig: h for sig, h in handlers.items() if h is not None}  # None: not set from Python


def report(store: ExperimentStore, wall_s: float, out=None, top: int = 10,
           time_budget: float | None = None) -> int:
    """Print the top trials from what is on disk (and set aside, when the storage refused
    rows); exit code 1 if any trial failed or rows are set aside, 130 if it was interrupted."""
    import pandas as pd

    from results.leaderboard import searched_params, varying_params
    from results.store import canonical_epochs, canonical_trials

    out = out or sys.stdout
    trials, epochs = store.read_trials(), store.read_epochs()
    experiment = store.read_experiment()
    aside = store.unwritten(experiment["created_at"])  # rows not written there
    there = aside.folder_exists()
    aside_trials = aside.read_trials() if there else trials.iloc[:0]
    aside_epochs = aside.read_epochs() if there else epochs.iloc[:0]
    if len(aside_trials) or len(aside_epochs):
        trials = canonical_trials(pd.concat([trials, aside_trials]))
        epochs = canonical_epochs(pd.concat([epochs, aside_epochs]))
    ranked = trials.sort_values(["best_val_accuracy", "best_epoch"], ascending=[False, True],
                                na_position="last").head(top)
    sampled = varying_params(trials, searched_params([experiment.get("space")]))
    print(f"\nTop {len(ranked)} of {len(trials)} trials by best {METRIC} "
          f"(wall {wall_s:.0f} s, {len(epochs)} trial-epochs):", file=out)
    header = f"{'#':>2}  {'trial':<18} {'val_acc':>7} {'epoch':>5} {'ran':>3} {'status':<11} " \
             f"{'time_s':>6}  params"
    print(header, file=out)
    for rank, row in enumerate(ranked.itertuples(index=False), 1):
        r = row._asdict()
        params = " ".join(f"{c[7:]}={_short(r[c])}" for c in sampled)
        acc = "-" if r["best_val_accuracy"] is None or math.isnan(r["best_val_accuracy"]) \
            else f"{r['best_val_accuracy']:.4f}"
        best_epoch = "-" if r["best_epoch"] is None or r["best_epoch"] != r["best_epoch"] \
            else int(r["best_epoch"])
        print(f"{rank:>2}  {r['trial_id']:<18} {acc:>7} {best_epoch:>5} {r['epochs']:>3} "
              f"{r['status']:<11} {r['train_time_s']:>6.0f}  {params}", file=out)
    counts = trials["status"].value_counts().to_dict()
    print("status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), file=out)
    print(f"results: {store.uri()}", file=out, flush=True)
    aside_rows = len(aside_trials) + len(aside_epochs)
    if (trials["status"] != "error").any() and trials["best_val_accuracy"].notna().any() \
            and not counts.get("interrupted") and not aside_rows:
        uri = shlex.quote(store.uri())
        py = shlex.quote(_python())
        print(f"next: {py} -m results plots {uri} --out plots/, then {py} -m results final "
              f"{uri} (retrains the best config, tests it once); TensorBoard: tensorboard "
              f"--logdir {shlex.quote(store.uri(RAY_DIR))}", file=out, flush=True)
    if counts.get("budget") and not counts.get("interrupted"):
        print(f"the time budget ({_shown(time_budget)} s) ended the search; it is part of the "
              "experiment, so --resume cannot extend it: for more, start a new --name with a "
              "larger --time-budget, or --full", file=out, flush=True)
    failed = trials[trials["status"] == "error"]
    for row in failed.itertuples(index=False):
        print(f"failed: {row.trial_id}: {row.stop_reason}", file=sys.stderr)
    if aside_rows:
        print(f"error: {len(aside_epochs)} epoch and {len(aside_trials)} trial row(s) could not "
              f"be written to {store.uri()} and are in {aside.uri()} (the table above includes "
              "them); once it can be written, --resume takes them back (or copy the part files "
              "of its epochs/ and trials/ in)", file=sys.stderr)
    interrupted = (trials["status"] == "interrupted").any()
    # (a spent time budget lets no trial run again: resolve refuses --retry-errored then)
    if len(failed) and not interrupted and not counts.get("budget"):
        print(f"once what made them fail is fixed, {_resume_command(store, '--retry-errored')} "
              "runs the failed trials again from their last checkpoint", file=sys.stderr)
    if len(failed) or aside_rows:
        return 1
    if interrupted:
        print(f"interrupted; continue with: {_resume_command(store)}", file=sys.stderr)
        return 130  # as a shell reports a command ended by Ctrl+C
    return 0


def _resume_command(store: ExperimentStore, *extra: str) -> str:
    """The command that resumes this experiment, as it can be typed here."""
    root = store.root_uri if not store.is_local else store.path.rsplit("/", 1)[0]
    script = os.path.relpath(ROOT / "search" / "run.py")
    again = [_python(), script if not script.startswith("..") else str(ROOT / "search" /
             "run.py"), "--resume", "--name", store.name, "--storage", root, *extra]
    return shlex.join(again)


def _python() -> str:
    """This interpreter as the user would type it here: `python` when that is it, else its
    path (relative under this folder, as `.venv/bin/python`), so printed commands run."""
    found = shutil.which("python")
    if found and os.path.realpath(found) == os.path.realpath(sys.executable) and \
            os.path.samefile(os.path.dirname(found), os.path.dirname(sys.executable)):
        return "python"
    rel = os.path.relpath(sys.executable)
    return rel if not rel.startswith("..") else sys.executable


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def main(argv: list[str] | None = None, out=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if "--list-spaces" in argv:
            for name in list_spaces():
                space = load_space(name)
                print(f"{name:<10} {space.fixed['model']:<7} {len(space.dists)} sampled, "
                      f"max {space.epochs} epochs", file=out or sys.stdout)
            return 0
        plan = resolve(argv)
        if plan.args.address:  # one TCP connect, before Ray is imported (--dry-run too)
            check_reachable(plan.args.address)
    except (UsageError, SpaceError, DataError, StoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if plan.args.dry_run:
        print(describe(plan, os.cpu_count() if not plan.args.address else None),
              file=out or sys.stdout)
        return 0
    try:
        return run_search(plan, out)
    except (UsageError, StoreError) as exc:  # found once connected, before anything is written
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
