"""End-to-end searches on a real local Ray with tiny data and tiny models."""

import argparse
import contextlib
import importlib.util
import io
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fmnist.data import digest_arrays, load_splits, load_test
from results.store import EPOCH_SCHEMA, TRIAL_COLUMNS, ExperimentStore
from search import run
from search.spaces import load_space
from search.trainable import FMNISTTrainable
from tests.conftest import REPO, alive, processes_under, run_cli, search_args, write_dataset

# Every searcher meets every scheduler that stops or pauses trials; fifo, which only lets
# them complete (as the others do with their best trials), meets Tune's BasicVariantGenerator:
# random, and grid, checked for what it draws under fifo and under asha.
PAIRS = [(searcher, scheduler) for searcher in ("random", "optuna", "hyperopt")
         for scheduler in ("asha", "hyperband", "median")] + [
    ("random", "fifo"), ("grid", "asha"), ("grid", "fifo")]


@pytest.mark.parametrize("searcher, scheduler", PAIRS)
def test_scheduler_searcher_pair_end_to_end(ray_session, tiny_data_dir, tiny_space, tmp_path,
                                            scheduler, searcher):
    # grid crosses units' 2 choices with 2 samples; the others sample 4 configurations.
    samples = "2" if searcher == "grid" else "4"
    name = f"{scheduler}-{searcher}"
    out = io.StringIO()
    code = run.main(search_args(tiny_data_dir, tiny_space, tmp_path, name, "--scheduler",
                                scheduler, "--searcher", searcher, "--num-samples", samples,
                                "--max-epochs", "3", "--seed", "1"), out=out)
    assert code == 0, out.getvalue()
    store = ExperimentStore(str(tmp_path), name)
    trials, epochs = store.read_trials(), store.read_epochs()
    assert len(trials) == 4
    assert set(trials["status"]) <= {"completed", "stopped"}
    # Epoch rows per trial equal the epochs the trial ran, numbered 1..n without gaps.
    for row in trials.itertuples():
        mine = epochs[epochs["trial_id"] == row.trial_id]["epoch"].tolist()
        assert mine == list(range(1, row.epochs + 1)), row.trial_id
        if row.status == "stopped":
            assert row.epochs < 3 and row.stop_reason == f"stopped by {scheduler} at epoch " \
                f"{row.epochs}"
        else:
            assert row.epochs == 3 and row.stop_reason == "completed"
        best = epochs[epochs["trial_id"] == row.trial_id]["val_accuracy"].max()
        assert row.best_val_accuracy == pytest.approx(best)
    if scheduler == "fifo":
        assert set(trials["status"]) == {"completed"}
    if searcher == "grid":
        assert sorted(trials["params_units"]) == [8, 8, 16, 16]
    assert "Top 4 of 4 trials" in out.getvalue()


def test_parquet_columns_and_types(ray_session, tiny_data_dir, tiny_space, tmp_path,
                                   monkeypatch):
    stops = (signal.SIGINT, signal.SIGUSR1, signal.SIGTERM)
    before = {sig: signal.getsignal(sig) for sig in stops}
    env_before = {k: os.environ.get(k) for k in (run.OUTPUT_ENV, run.PENDING_ENV)}
    out = io.StringIO()
    code = run.main(search_args(tiny_data_dir, tiny_space, tmp_path, "types", "--num-samples",
                                "2", "--scheduler", "fifo"), out=out)
    assert code == 0
    # Tune's and the recorder's handlers are gone: the caller's next Ctrl+C is its own; the
    # variables set for Tune during the search are as they were.
    assert {sig: signal.getsignal(sig) for sig in stops} == before
    assert {k: os.environ.get(k) for k in env_before} == env_before
    folder = tmp_path / "types"
    exp = pq.read_table(folder / "experiment.parquet")
    assert exp.num_rows == 1
    row = exp.to_pylist()[0]
    for key in ("name", "created_at", "space", "scheduler", "scheduler_settings", "searcher",
                "dataset", "dataset_fingerprint", "train_size", "val_size", "versions",
                "git_commit", "cluster_resources", "command"):
        assert key in row, key
    assert row["train_size"] == 200 and row["val_size"] == 100 and row["name"] == "types"
    epochs = pq.read_table(folder / "epochs")
    assert epochs.schema.equals(EPOCH_SCHEMA)
    assert epochs.num_rows == 4
    assert set(epochs.column("node").to_pylist()) == {ray_session.get_runtime_context()
                                                     .get_node_id()}
    # the space leaves precision at auto: each trial resolves it and records what it used.
    # A trial that asks for no GPU sees none (Ray hides them), so auto is the CPU's choice.
    import fmnist.train

    monkeypatch.setattr(fmnist.train, "gpus_visible", lambda: False)
    auto = fmnist.train.resolve_precision("auto")
    assert set(epochs.column("precision").to_pylist()) == {auto}
    # and the plan, printed before any trial ran, said which
    assert f"precision: auto: {auto} (" in out.getvalue()
    trials = pq.read_table(folder / "trials")
    assert set(trials.column("precision").to_pylist()) == {auto}
    types = {f.name: f.type for f in trials.schema}
    for name, type_ in TRIAL_COLUMNS:
        assert types[name] == type_, name
    assert str(types["params_units"]) == "int64" and str(types["params_dropout"]) == "double"
    assert str(types["params_model"]) == "string"
    assert not list(folder.rglob("*.tmp"))


def test_trials_never_receive_test_images(ray_session, tiny_data_dir, tiny_space, tmp_path):
    argv = search_args(tiny_data_dir, tiny_space, tmp_path, "no-test", "--num-samples", "2",
                       "--scheduler", "fifo", "--max-epochs", "1")
    plan = run.resolve(argv)
    payload = plan.splits.arrays()  # exactly what the trainable receives
    assert set(payload) == {"x_train", "y_train", "x_val", "y_val"}
    x_test, _, _ = load_test(tiny_data_dir)
    assert (x_test[:, 0, 0] == 255).all()  # the fixture marks every test image
    assert not (payload["x_train"][:, 0, 0] == 255).any()
    assert not (payload["x_val"][:, 0, 0] == 255).any()
    assert run.main(argv, out=io.StringIO()) == 0
    trials = ExperimentStore(str(tmp_path), "no-test").read_trials()
    # Every trial records a digest of the arrays it trained on: the train/val split, only.
    assert set(trials["data_sha256"]) == {digest_arrays(payload)}
    split = load_splits(tiny_data_dir, val_size=100, train_size=200, seed=0)
    assert digest_arrays(split.arrays()) == digest_arrays(payload)


def test_dry_run_prints_plan_without_ray(tiny_data_dir, tmp_path):
    out = run_cli("--space", "vgg", "--data-dir", str(tiny_data_dir), "--storage",
                   str(tmp_path), "--name", "plan", "--val-size", "100", "--train-size", "300",
                   "--num-samples", "9", "--max-epochs", "9", "--dry-run")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "NO_RAY" in text
    assert "rungs at epochs 1, 3" in text and "9 samples x 1 grid points = 9 trials" in text
    assert "at most 81 trial-epochs" in text and "learning_rate" in text
    assert "\nprecision: auto: " in text
    assert not (tmp_path / "plan").exists()
    fixed = run_cli("--space", "vgg", "--data-dir", str(tiny_data_dir), "--val-size", "100",
                     "--train-size", "300", "--set", "precision=float32", "--gpus-per-trial",
                     "0.5", "--dry-run")
    assert fixed.returncode == 0, fixed.stderr
    assert "\nprecision: float32 (fixed)\n" in fixed.stdout
    # the slots are counted from the CPUs; the GPUs only once Ray is up to find them
    assert "0.5 GPU per trial" in fixed.stdout and "GPUs are counted when Ray starts" in (
        fixed.stdout) and "GPUs are counted" not in text


def test_a_trial_given_a_gpu_its_backend_cannot_see_refuses_to_train_on_the_cpu():
    from fmnist.train import backend_gpus
    from search.trainable import gpu_problem

    assert gpu_problem(0) is None  # no GPU asked for: nothing to check
    if backend_gpus():  # a machine with a GPU TensorFlow can use
        assert gpu_problem(0.5) is None
    else:  # this one, CI: the trial raises this (search/run.py checks one worker first)
        assert gpu_problem(0.5).startswith("--gpus-per-trial 0.5: Ray gave GPU none on ")
        assert "Keras' tensorflow backend sees no GPU there" in gpu_problem(0.5)


def test_tunes_warnings_with_nothing_to_act_on_are_dropped_and_others_kept(tmp_path):
    import logging

    from ray.tune.analysis import experiment_analysis
    from ray.tune.logger import logger as tune_logger_module
    from ray.tune.search.optuna import optuna_search

    run.quiet_tune()
    run.quiet_tune()  # a second search in this process adds nothing
    for module, noise in ((tune_logger_module, "Remote file not found: /r/t/result.json"),
                          (optuna_search, "Received additional result for trial 1a2b, but "
                                          "it already finished. Result: {}"),
                          (experiment_analysis, "Failed to fetch metrics for 2 trial(s):\n- "
                                                "T_1: FileNotFoundError('...')")):
        seen: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record, seen=seen: seen.append(record.getMessage())
        module.logger.addHandler(handler)
        try:
            module.logger.warning(noise)
            module.logger.warning("Error downloading /r/t/result.json")
        finally:
            module.logger.removeHandler(handler)
        assert seen == ["Error downloading /r/t/result.json"]
        assert module.logger.filters.count(run._not_news) == 1
    # Tune's error for a checkpoint deleted before a --resume: dropped; other errors kept
    import pyarrow.fs as pafs
    from ray.train._internal.storage import _delete_fs_path
    from ray.tune.execution import tune_controller

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    tune_controller.logger.addHandler(handler)
    try:
        for gone in (lambda: _delete_fs_path(pafs.LocalFileSystem(), str(tmp_path / "gone")),
                     lambda: open(tmp_path / "gone")):
            try:
                gone()
            except FileNotFoundError:
                tune_controller.logger.exception("Trial %s: Error handling checkpoint %s",
                                                 "T_1", "checkpoint_000000")
    finally:
        tune_controller.logger.removeHandler(handler)
    assert seen == ["Trial T_1: Error handling checkpoint checkpoint_000000"]  # the open's


@pytest.mark.parametrize("max_t,factor", [(3, 3), (4, 3), (9, 3), (30, 3), (50, 3), (2, 3),
                                           (16, 2), (5, 2.5)])
def test_the_plans_hyperband_brackets_are_rays(max_t, factor):
    # The plan copies Ray's bracket arithmetic (it is printed before Ray starts): check the copy
    # against Ray's own scheduler and brackets, halving each bracket as Ray does.
    from ray.tune.schedulers import HyperBandScheduler

    ray_sched = HyperBandScheduler(metric="val_accuracy", mode="max", max_t=max_t,
                                   reduction_factor=factor)
    expected = []
    for s in range(ray_sched._s_max_1):
        if ray_sched._get_r0(s) == 0:
            continue  # Ray skips a bracket too small to start
        bracket = ray_sched._create_bracket(s)
        rounds = [(bracket._n, bracket._r)]
        while bracket._halves > 0:
            bracket.successive_halving("val_accuracy", 1)
            rounds.append((bracket._n, bracket._r))
        expected.append(rounds)
    assert run.hyperband_brackets(max_t, factor) == expected


@pytest.mark.parametrize("scheduler, flags", [
    ("asha", ["--grace-period", "2", "--reduction-factor", "2"]),
    ("asha-promote", ["--grace-period", "2", "--reduction-factor", "2"]),
    ("median", ["--grace-period", "2"]),
    ("hyperband", ["--reduction-factor", "2"]),
])
def test_scheduler_flags_are_taken_by_the_schedulers_that_read_them(tiny_data_dir, tmp_path,
                                                                    scheduler, flags):
    plan = run.resolve(["--space", "mlp", "--data-dir", str(tiny_data_dir), "--val-size", "100",
                        "--train-size", "300",
                        "--storage", str(tmp_path), "--max-epochs", "4", "--scheduler",
                        scheduler, *flags])
    assert plan.settings["reduction_factor"] == (2.0 if "--reduction-factor" in flags else 3.0)
    assert plan.settings["grace_period"] == (2 if "--grace-period" in flags else 1)


def test_the_plan_names_hyperband_brackets_that_end_before_max_t(tiny_data_dir):
    def plan(*flags):
        out = run_cli("--space", "cnn", "--data-dir", str(tiny_data_dir), "--val-size", "100",
                      "--train-size", "300", "--scheduler", "hyperband", *flags, "--dry-run")
        assert out.returncode == 0, out.stderr
        return next(line for line in out.stdout.splitlines() if line.startswith("scheduler:"))

    line = plan("--max-epochs", "9")
    # Keras Tuner's Hyperband has the same 17 configs for max epochs 9, factor 3
    assert "3x9 | 5x3 -> 2x9 | 9x1 -> 3x3 -> 1x9; new configs fill them in this order, 17 to a " \
        "band" in line
    assert "before max_t" not in line
    # 4 is no power of 3: the second bracket's last round is 3 epochs (seen in a real search:
    # its best trial "stopped by hyperband at epoch 3")
    line = plan("--max-epochs", "4")
    assert "2x4 | 3x1 -> 1x3;" in line and "ends a bracket at epoch 3, before max_t" in line


def test_the_plan_reads_the_backend_from_keras_json(tmp_path, monkeypatch):
    # Keras reads keras.json when KERAS_BACKEND is not set; the plan's precision line does too.
    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    (tmp_path / "keras.json").write_text('{"backend": "jax"}')
    a = argparse.Namespace(address=None, gpus_per_trial=0)
    assert run.precision_plan(load_space("cnn"), a) == "auto: float32 (not the TensorFlow backend)"
    (tmp_path / "keras.json").write_text('{"backend": "tensorflow"}')
    assert run.precision_plan(load_space("cnn"), a) != "auto: float32 (not the TensorFlow backend)"


def test_driver_never_imports_tensorflow(tiny_data_dir, tiny_space, tmp_path):
    # Only the workers train: the driver of a real search must not pay TensorFlow's import
    # (seconds of start-up on a small machine, and its memory) for a class it passes by name.
    # from a shell without Ray's variables, as a user's (this process's Ray sets some)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = run_cli(*search_args(tiny_data_dir, tiny_space, tmp_path, "lean", "--num-samples",
                                "1", "--max-epochs", "1", "--scheduler", "fifo"), timeout=300,
                  env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "RAY_IMPORTED" in out.stdout and "NO_TF" in out.stdout
    # token authentication, Ray's default for a local cluster, set without Ray's warning
    assert "Token authentication" not in out.stderr, out.stderr[-2000:]
    assert len(ExperimentStore(str(tmp_path), "lean").read_epochs()) == 1  # it did train
    # Tune's box of class names and its TensorBoard command for a copy under /tmp/ray are not
    # printed; the closing lines name the TensorBoard folder that stays.
    assert "Configuration for experiment" not in out.stdout, out.stdout[-2000:]
    assert "/tmp/ray" not in out.stdout + out.stderr
    assert f"tensorboard --logdir {tmp_path / 'lean' / 'ray'}" in out.stdout


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--space", "nope"], "unknown space 'nope'"),
        (["--space", "{bad_key}"], "filterz: unknown key"),
        (["--space", "{bad_log}"], "lower bound must be > 0"),
        (["--space", "{empty_choice}"], "empty choice"),
        (["--max-epochs", "-2"], "--max-epochs must be >= 1"),
        (["--set", "epochs=-2"], "epochs must be >= 1"),
        (["--num-samples", "0"], "--num-samples must be >= 1"),
        (["--scheduler", "pbt"], "--scheduler 'pbt': choose one of"),
        (["--searcher", "bohb"], "--searcher 'bohb': choose one of"),
        (["--space", "{grid}", "--searcher", "tpe-rungs"],
         "need --searcher grid or random, not tpe-rungs"),
        (["--data-dir", "{missing}"], "does not exist"),
        (["--name", "a/b"], "no path separators"),
        (["--name", ".."], "no path separators"),
        (["--storage", "{runs}/../outside"], "escapes its folder through '..'"),
        (["--storage", "{runs}/a/../../outside"], "escapes its folder through '..'"),
        (["--storage", "s3://bucket/../outside"], "escapes its folder through '..'"),
        (["--storage", "http://example.com/runs"], "unsupported scheme 'http'"),
        (["--storage", " "], "--storage is empty"),
        (["--storage", "{a_file}/runs"], "a_file is a file, not a folder"),
        (["--storage", "/proc/fmnist-runs"], "cannot create folders in /"),
        (["--seed", "-1"], "--seed must be between 0 and 4294967295, got -1"),
        (["--set", "seed=-1"], "seed must be between 0 and 4294967295"),
        (["--val-size", "590"], "(the 600 training images less val_size 590)"),
        (["--val-size", "599"], "val_size must be between 10 (one image of each class) and 590"),
        (["--train-size", "9"], "train_size must be between 10 (one image of each class) and"),
        (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
        (["--retry-errored"], "--retry-errored runs an experiment's failed trials again: it "
         "goes with --resume --name NAME"),
        (["--scheduler", "asha-promote", "--max-concurrent", "2"],
         "--max-concurrent cannot be used with --scheduler asha-promote"),
        (["--scheduler", "hyperband", "--max-concurrent", "2"],
         "--max-concurrent cannot be used with --scheduler hyperband"),
        (["--scheduler", "hyperband", "--grace", "2"],  # argparse takes the abbreviation
         "--grace-period is read by --scheduler asha, asha-promote and median, not hyperband"),
        (["--scheduler", "fifo", "--reduction-factor=4"],
         "--reduction-factor is read by --scheduler asha, asha-promote and hyperband, not fifo"),
        (["--address", "127.0.0.1:9", "--train-size", "200"],  # nothing listens on port 9
         "--address 127.0.0.1:9: cannot reach 127.0.0.1:9 ("),
        (["--address", "ray://127.0.0.1:9", "--train-size", "200", "--dry-run"],
         "--address ray://127.0.0.1:9: cannot reach 127.0.0.1:9 ("),
    ],
)
def test_bad_input_is_one_line_exit_2(tmp_path, tiny_data_dir, argv, match):
    files = {"bad_key": "model: mlp\nfilterz: 2\n",
             "bad_log": "model: mlp\nlearning_rate: {loguniform: [0.0, 0.1]}\n",
             "empty_choice": "model: mlp\nunits: {choice: []}\n",
             "grid": "model: mlp\nunits: {grid: [8, 16]}\n"}
    for key, text in files.items():
        (tmp_path / f"{key}.yaml").write_text(text)
    subst = {f"{{{k}}}": str(tmp_path / f"{k}.yaml") for k in files}
    subst["{missing}"] = str(tmp_path / "no-such-dir")
    (tmp_path / "a_file").write_text("not a folder")
    argv = [a.replace("{a_file}", str(tmp_path / "a_file")) for a in argv]
    argv = [a.replace("{runs}", str(tmp_path / "runs")) for a in argv]
    argv = [subst.get(a, a) for a in argv]
    base = ["--storage", str(tmp_path / "runs"), "--space", "mlp", "--data-dir",
            str(tiny_data_dir), "--val-size", "100"]
    out = run_cli(*base, *argv)
    assert out.returncode == 2, out.stdout + out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], lines
    assert "NO_RAY" in out.stdout
    assert not (tmp_path / "runs").exists() and not (tmp_path / "outside").exists()


def test_a_keras_backend_the_trials_cannot_import_is_one_line_before_ray(tmp_path,
                                                                        tiny_data_dir):
    # Else every trial would fail on `import keras`, after Ray had started and results were made.
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    missing = next((b for b in ("jax", "torch", "openvino") if importlib.util.find_spec(b) is None),
                   None)
    (tmp_path / "keras.json").write_text('{"backend": "tensorflow"}')
    cases = [({"KERAS_BACKEND": "tensorflw"}, "Keras backend 'tensorflw' (from KERAS_BACKEND) "
              "cannot train models here; use one of tensorflow, jax, torch"),
             ({"KERAS_BACKEND": "numpy"}, "Keras backend 'numpy' (from KERAS_BACKEND) cannot "
              "train")]
    if missing:  # from keras.json, as Keras reads it when KERAS_BACKEND is not set
        (tmp_path / "keras.json").write_text(f'{{"backend": "{missing}"}}')
        cases.append(({}, f"Keras backend '{missing}' (from {tmp_path / 'keras.json'}) is not "
                          "installed here"))
    for extra, match in cases:
        out = run_cli("--space", "mlp", "--data-dir", str(tiny_data_dir), "--val-size", "100",
                       "--storage", str(tmp_path / "runs"),
                       env={**env, "KERAS_HOME": str(tmp_path), **extra})
        assert out.returncode == 2, out.stdout + out.stderr
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], lines
        assert "NO_RAY" in out.stdout and not (tmp_path / "runs").exists()


def test_resume_from_another_folder_with_relative_space_and_data(
        ray_session, tiny_data_dir, tiny_space, tmp_path, monkeypatch):
    # Relative --space and --data-dir are saved as absolute paths, so --resume works anywhere.
    start, elsewhere, runs = tmp_path / "start", tmp_path / "elsewhere", tmp_path / "runs"
    elsewhere.mkdir()
    shutil.copytree(tiny_data_dir, start / "data")
    (start / "my.yaml").write_text(tiny_space.read_text())
    monkeypatch.chdir(start)
    out = io.StringIO()
    code = run.main(["--space", "my.yaml", "--data-dir", "data", "--storage", str(runs),
                     "--name", "rel", "--train-size", "200", "--val-size", "100",
                     "--num-samples", "2"], out=out)
    assert code == 0, out.getvalue()
    store = ExperimentStore(str(runs), "rel")
    settings = json.loads(store.read_experiment()["settings"])
    assert settings["space"] == str((start / "my.yaml").resolve())
    assert settings["data_dir"] == str((start / "data").resolve())
    # Flags that repeat the experiment's settings are fine, from the first folder too;
    # flags that differ could not take effect (Tune restores the search as saved): refused.
    again = ["--storage", str(runs), "--name", "rel", "--resume"]
    assert run.main([*again, "--space", "my.yaml", "--data-dir", "data", "--num-samples", "2",
                     "--dry-run"], out=io.StringIO()) == 0
    # The data may have moved (--data-dir), but it must be the same files.
    shutil.copytree(tiny_data_dir, tmp_path / "moved")
    assert run.main([*again, "--data-dir", str(tmp_path / "moved"), "--dry-run"],
                    out=io.StringIO()) == 0
    write_dataset(tmp_path / "other", seed=1)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run.main([*again, "--data-dir", str(tmp_path / "other"), "--dry-run"],
                        out=io.StringIO()) == 2
    assert err.getvalue().startswith(f"error: --resume: the data at {tmp_path / 'other'} is "
                                     "not the data 'rel' searched on (fingerprint "), err.getvalue()
    # --verify-data may be added, and is applied: these tiny files are not Fashion-MNIST's.
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run.main([*again, "--verify-data", "--dry-run"], out=io.StringIO()) == 2
    assert "sha256" in err.getvalue(), err.getvalue()
    monkeypatch.chdir(elsewhere)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = run.main([*again, "--num-samples", "5", "--set", "units=8", "--full"], out=out)
    assert code == 2 and err.getvalue().splitlines() == [
        "error: --resume continues 'rel' with its own settings, and --num-samples 5 (it has 2), "
        "--set units=8 (it has none), --full on (it has off) differ; start a new --name to "
        "change them"]
    # a search of it running now (here: a live process holds its lock) is not run over
    holder = subprocess.Popen([sys.executable, "-c", "import time; print(flush=True); "
                               "time.sleep(120)"], stdout=subprocess.PIPE)
    holder.stdout.readline()  # running Python: caught inside exec, its command line is empty
    try:
        (runs / "rel" / ".search.json").write_text(json.dumps(
            {"pid": holder.pid, "host": socket.gethostname(), "since": "a moment ago"}))
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert run.main(again, out=out) == 2
        assert err.getvalue() == (f"error: --resume: 'rel' is being searched now by process "
                                  f"{holder.pid} on {socket.gethostname()}, since a moment "
                                  "ago; if no search of it runs there, delete "
                                  f"{runs / 'rel' / '.search.json'}\n")
    finally:
        holder.kill()
        holder.wait()
    assert run.main(again, out=out) == 0, out.getvalue()  # a lock nobody holds is taken over
    assert len(store.read_trials()) == 2 and not (runs / "rel" / ".search.json").exists()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_a_resume_ray_tune_cannot_restore_is_one_line_and_runs_nothing(
        ray_session, tiny_data_dir, tiny_space, tmp_path):
    # Tune reads an experiment back, and on any error logs it and starts the experiment again
    # from nothing in the same folder, under the trial ids on record (seen before this test:
    # exit 0, a trial with none of the space's parameters recorded under a finished one's id).
    runs = tmp_path / "runs"
    args = search_args(tiny_data_dir, tiny_space, runs, "r", "--num-samples", "2")
    assert run.main(args, out=io.StringIO()) == 0
    folder, again = runs / "r", ["--storage", str(runs), "--name", "r", "--resume"]
    (folder / "tune-state.json").unlink()  # no whole copy kept (an experiment made before it)
    whole = _files(folder)
    [state] = (folder / "ray").glob("experiment_state-*.json")
    [searcher] = (folder / "ray").glob("basic-variant-state-*.json")  # Tune's pickle

    # A torn experiment state: refused while the command is checked, before Ray is imported.
    state.write_bytes(whole[f"ray/{state.name}"][:1000])
    torn = _files(folder)
    out = run_cli(*again)
    assert out.returncode == 2 and "NO_RAY" in out.stdout, out.stderr
    with pytest.raises(json.JSONDecodeError) as why:
        json.loads(state.read_bytes())
    assert out.stderr.splitlines() == [
        f"error: --resume: 'r' cannot be continued: ray/{state.name} cannot be read "
        f"({why.value}; a kill while Tune wrote it?), and tune-state.json keeps no whole copy "
        f"of it; its trials and epochs so far stay as they are (python -m results leaderboard "
        f"{folder}): start a new --name"]
    assert _files(folder) == torn

    # What only Tune can read (its searcher's pickle) torn: stopped as Tune reports it.
    state.write_bytes(whole[f"ray/{state.name}"])
    searcher.write_bytes(whole[f"ray/{searcher.name}"][:50])
    torn = _files(folder)
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run.main(again, out=io.StringIO()) == 2
    assert err.getvalue().splitlines() == [
        "error: --resume: Ray Tune could not restore 'r' (UnpicklingError: pickle data was "
        "truncated); nothing ran, and its trials and epochs so far stay as they are (python -m "
        f"results leaderboard {folder}): start a new --name"], err.getvalue()
    assert _files(folder) == torn

    # Whole again, it resumes (the check is gone with the command): the same two trials.
    searcher.write_bytes(whole[f"ray/{searcher.name}"])
    assert run.main(again, out=io.StringIO()) == 0
    trials = ExperimentStore(str(runs), "r").read_trials()
    assert len(trials) == 2 and trials["params_units"].notna().all()
    assert not logging_filters_left()


def logging_filters_left() -> list[Any]:
    import logging

    return [f for f in logging.getLogger(run.RESTORE_FAILED[0]).filters
            if getattr(f, "__name__", "") == "stop"]


def test_existing_experiment_needs_resume(tmp_path, tiny_data_dir, tiny_space):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    out = run_cli(*search_args(tiny_data_dir, tiny_space, tmp_path / "runs", "taken"))
    assert out.returncode == 2 and "already exists" in out.stderr and "--resume" in out.stderr


def test_tiny_search_then_final_writes_every_artifact(ray_session, tiny_data_dir, tiny_space,
                                                      tmp_path, capsys):
    from results.__main__ import main as results_main

    train_only = tmp_path / "train-only"  # a search reads no test file: it need not be there
    train_only.mkdir()
    for path in tiny_data_dir.glob("train-*"):
        shutil.copy(path, train_only)
    argv = search_args(train_only, tiny_space, tmp_path, "final", "--num-samples", "3",
                       "--max-epochs", "2")
    out = io.StringIO()
    assert run.main(argv, out=out) == 0
    exp = tmp_path / "final"  # the search says what to run next, and where TensorBoard reads
    py = run._python()  # this interpreter as it can be typed here: .venv/bin/python
    assert os.path.samefile(shutil.which(py) or py, sys.executable)
    assert (f"\nnext: {py} -m results plots {exp} --out plots/, then {py} -m results final "
            f"{exp} (retrains the best config, tests it once); TensorBoard: tensorboard "
            f"--logdir {exp / 'ray'}\n") in out.getvalue()
    assert list((exp / "ray").glob("*/events.out.tfevents.*"))
    capsys.readouterr()
    assert results_main(["final", str(exp), "--seeds", "2"], out=io.StringIO()) == 2
    assert capsys.readouterr().err == (
        f"error: data dir {train_only} lacks t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte "
        "(.gz or raw), which the test split is read from; --test-dir names the folder that "
        "holds the test pair\n")
    assert not list(exp.glob("final*"))
    out = io.StringIO()
    assert results_main(["final", str(exp), "--seeds", "2", "--test-dir", str(tiny_data_dir)],
                        out=out) == 0
    text = out.getvalue()
    assert "seed 2/2" in text and "epoch 1/" in text and "test accuracy" in text
    folder = tmp_path / "final" / "final"
    for name in ("final.parquet", "per_class.parquet", "model.keras", "report.md",
                 "confusion_matrix.png", "misclassified.png", "learning_curves.png",
                 "anytime.png", "hyperparameters.png", "scheduler.png", "dataset.png"):
        assert (folder / name).is_file(), name
    final = pq.read_table(folder / "final.parquet").to_pandas()
    trials = ExperimentStore(str(tmp_path), "final").read_trials()
    best = trials.sort_values("best_val_accuracy", ascending=False).iloc[0]
    assert len(final) == 2 and set(final["trial_id"]) == {best["trial_id"]}
    assert (final["test_images"] == 200).all() and (final["train_images"] == 300).all()
    assert final["test_accuracy"].between(0, 1).all()
    assert set(final["precision"]) == {best["precision"]}  # retrained as the search trained it
    tested = load_test(tiny_data_dir)[2]  # which test set it was: recorded with each row
    assert set(final["test_location"]) == {str(tiny_data_dir)}
    assert set(final["test_fingerprint"]) == {tested.fingerprint}
    per_class = pq.read_table(folder / "per_class.parquet").to_pandas()
    assert len(per_class) == 10 and per_class["support"].sum() == 200
    import keras

    model = keras.saving.load_model(folder / "model.keras", safe_mode=True)
    assert model.output_shape == (None, 10)
    report = (folder / "report.md").read_text()
    for needle in ("Test accuracy", "![confusion matrix](confusion_matrix.png)",
                   "trial-epochs run", "fingerprint", "search/run.py", "-m results final",
                   f"- test set at {tiny_data_dir}, fingerprint `{tested.fingerprint}` "
                   "(**not** the published fashion_mnist test files)\n"):  # tiny data
        assert needle in report, needle
    acc = final["test_accuracy"]  # the spread reported is the seeds' sample deviation
    spread = f"{acc.mean():.4f} +- {acc.std(ddof=1):.4f}"
    assert f"Test accuracy: {spread}** (mean +- standard deviation over 2 seeds)" in report
    assert f"test accuracy {spread} (mean" in text
    # --precision retrains the other way; bfloat16 on a CPU without it says it will be slow
    other = "float32" if best["precision"] == "mixed_bfloat16" else "mixed_bfloat16"
    out = io.StringIO()
    assert results_main(["final", str(exp), "--seeds", "1", "--precision", other,
                         "--data-dir", str(tiny_data_dir)], out=out) == 0
    second = tmp_path / "final" / "final-2"  # beside the first, which stays as it was
    assert ("final/ holds an earlier evaluation; this one goes to final-2/ (none is "
            "overwritten)") in out.getvalue()
    assert not list((tmp_path / "final").glob("final*/.claim.json"))  # released when done
    assert set(pq.read_table(second / "final.parquet").column("precision").to_pylist()) == {
        other}
    assert pq.read_table(folder / "final.parquet").to_pandas().equals(final)
    report = (second / "report.md").read_text()  # one seed has no spread to report
    assert "This is evaluation 2 of this experiment on the test set" in report
    assert "+-" not in out.getvalue() and "one seed, so no spread measured" in out.getvalue()
    assert "one seed, so no spread measured" in report and "0.0000" not in report.split("##")[0]
    from fmnist.config import bf16_cpu

    slow = other == "mixed_bfloat16" and not bf16_cpu()
    assert ("no bfloat16 instructions" in out.getvalue()) == slow


class SigtermAtFirstEpoch(io.StringIO):
    """An output that sends this process SIGTERM when the first epoch line is written to it."""

    sent = False

    def write(self, text: str) -> int:
        written = super().write(text)
        if not self.sent and text.lstrip().startswith("epoch "):
            self.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return written


def test_final_retrains_a_stopped_trial_as_the_search_trained_it(
        ray_session, tiny_data_dir, tiny_space, tmp_path, capsys, sigterm_not_ignored):
    # Hyperband with max_t 4 and factor 3 (the plan's "2x4 | 3x1 -> 1x3"): of configs 3-5, the
    # best after epoch 1 runs to epoch 3 and is stopped there, 1 short of its cosine schedule.
    from results.__main__ import main as results_main

    out = io.StringIO()
    assert run.main(search_args(tiny_data_dir, tiny_space, tmp_path, "hb", "--scheduler",
                                "hyperband", "--num-samples", "5", "--max-epochs", "4",
                                "--set", "lr_schedule=cosine"), out=out) == 0, out.getvalue()
    assert "2x4 | 3x1 -> 1x3;" in out.getvalue()
    trials = ExperimentStore(str(tmp_path), "hb").read_trials()
    assert sorted(trials["epochs"]) == [1, 1, 3, 4, 4]
    stopped = trials[trials["epochs"] == 3].iloc[0]
    assert stopped["stop_reason"] == "stopped by hyperband at epoch 3"
    # a trial with epochs and no trial row (as while a search runs) is named, not chosen
    store = ExperimentStore(str(tmp_path), "hb")
    ghost = store.read_epochs().head(1).assign(trial_id="ghost", val_accuracy=0.99)
    store.write_table(pa.Table.from_pandas(ghost, schema=EPOCH_SCHEMA, preserve_index=False),
                      "epochs/part-ghost.parquet")
    # SIGTERM (Slurm's time limit, `docker stop`) at the retraining's first epoch ends it as
    # Ctrl+C does: exit 130, "interrupted", and its final/ let go (the next one takes it below)
    out, before = SigtermAtFirstEpoch(), signal.getsignal(signal.SIGTERM)
    assert results_main(["final", str(tmp_path / "hb"), "--trial", stopped["trial_id"],
                         "--seeds", "1"], out=out) == 130, out.getvalue()
    assert out.sent and "  epoch 1/3 " in out.getvalue() and "test accuracy" not in out.getvalue()
    assert capsys.readouterr().err.endswith("interrupted\n")
    assert signal.getsignal(signal.SIGTERM) is before  # the handler before, back
    assert not (tmp_path / "hb" / "final").exists()
    out = io.StringIO()
    assert results_main(["final", str(tmp_path / "hb"), "--trial", stopped["trial_id"],
                         "--seeds", "1"], out=out) == 0, out.getvalue()
    assert "3 epochs (of its 4-epoch cosine schedule: the search stopped it there) on 300" in \
        out.getvalue()
    final = pq.read_table(tmp_path / "hb" / "final" / "final.parquet").to_pandas().iloc[0]
    config = json.loads(final["config"])
    assert final["epochs"] == 3 and config["epochs"] == 4
    import keras

    # the saved model ends where the trial was stopped: 3/4 into the cosine decay, not at 0
    model = keras.saving.load_model(tmp_path / "hb" / "final" / "model.keras", safe_mode=True)
    steps = int(model.optimizer.iterations)
    assert steps == 3 * math.ceil(300 / 64)  # train+validation images, batch size 64
    expected = config["learning_rate"] * 0.5 * (1 + math.cos(math.pi * 3 / 4))
    assert float(model.optimizer.learning_rate) == pytest.approx(expected, rel=1e-4)
    report = (tmp_path / "hb" / "final" / "report.md").read_text()
    assert "for 3 epochs (of its 4-epoch cosine schedule" in report
    rank = int((trials["best_val_accuracy"] > stopped["best_val_accuracy"]).sum()) + 1
    assert f"trial {stopped['trial_id']} (rank {rank}), seed 1/1" in out.getvalue()
    assert "note: not ranked: 1 trial(s) with epochs but no trial row yet" in out.getvalue()
    assert "ghost (epoch 1, best 0.9900)" in out.getvalue() and "ghost (epoch 1" in report


def build_fails_for_units_16():
    """The real trainable, except that a 16-unit model fails to build (as a model too large for
    the machine's memory would): a space can no longer name a model that cannot be built, it is
    refused before Ray starts (test_an_unbuildable_model_is_refused_before_ray). Defined in a
    function, so Ray sends the class to its workers by value (they cannot import tests)."""

    class BuildFailsForUnits16(FMNISTTrainable):
        def _build(self, config):
            if {**self._fixed, **config}.get("units") == 16:
                raise ValueError("injected: the 16-unit model cannot be built")
            super()._build(config)

    return BuildFailsForUnits16


def test_failing_trials_are_recorded_and_final_refuses(ray_session, tiny_data_dir, tmp_path):
    from results.__main__ import main as results_main

    space = tmp_path / "broken.yaml"  # every config has 16 units: every trial fails to build
    space.write_text("model: mlp\nepochs: 2\nhidden_layers: 1\nunits: 16\n"
                     "batch_size: {choice: [32, 64]}\n")
    out = io.StringIO()
    code = run.run_search(run.resolve(search_args(tiny_data_dir, space, tmp_path, "broken",
                                                  "--num-samples", "2", "--max-failures", "0")),
                          out=out, trainable_cls=build_fails_for_units_16())
    assert code == 1
    trials = ExperimentStore(str(tmp_path), "broken").read_trials()
    assert len(trials) == 2 and set(trials["status"]) == {"error"}
    assert trials["error"].str.contains("the 16-unit model cannot be built").all()
    assert trials["stop_reason"].str.startswith("error at epoch 1").all()
    proc = subprocess.run([sys.executable, "-m", "results", "final", str(tmp_path / "broken")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "no finished trial" in proc.stderr
    assert results_main(["final", str(tmp_path / "broken")], out=io.StringIO()) == 2


def test_one_failing_trial_does_not_stop_the_others(ray_session, tiny_data_dir, tmp_path):
    space = tmp_path / "mixed.yaml"  # the 16-unit config fails to build; the 8-unit one trains
    space.write_text("model: mlp\nepochs: 2\nhidden_layers: 1\nunits: {grid: [8, 16]}\n")
    out = io.StringIO()
    argv = search_args(tiny_data_dir, space, tmp_path, "mixed", "--searcher", "grid",
                       "--num-samples", "1", "--max-failures", "0", "--scheduler", "fifo")
    code = run.run_search(run.resolve(argv), out=out, trainable_cls=build_fails_for_units_16())
    assert code == 1  # the exit code says some trials failed
    trials = ExperimentStore(str(tmp_path), "mixed").read_trials().set_index("params_units")
    assert trials.loc[16, "status"] == "error"
    assert "the 16-unit model cannot be built" in trials.loc[16, "error"]
    assert trials.loc[8, "status"] == "completed" and trials.loc[8, "epochs"] == 2


@pytest.mark.parametrize("text,flags,message", [
    ("model: cnn\nepochs: 2\nblocks: {grid: [1, 5]}\n", [],
     "{space}: blocks: 5 is not valid (blocks must be between 1 and 4 for 28x28 inputs"),
    ("model: vgg\nepochs: 2\nblocks: 4\nconvs_per_block: [1, 2]\n", [],
     "{space}: convs_per_block has 2 entries but blocks=4"),
    ("model: mlp\nepochs: 2\n", ["--set", "hidden_layers=6"],
     "--set hidden_layers: hidden_layers must be between 1 and 5, got 6"),
    # the --set fits alone but not with the file's 4 conv counts: the --set is named
    ("model: vgg\nepochs: 2\nblocks: 4\nconvs_per_block: [2, 2, 3, 3]\n",
     ["--set", "blocks=3"], "--set blocks: convs_per_block has 4 entries but blocks=3"),
    ("model: cnn\nepochs: 2\nkernel_size: {choice: [3, 7]}\n", [],
     "{space}: kernel_size: 7 is not valid (kernel_size must be 3 or 5, got 7)"),
    ("model: resnet\nepochs: 2\nstages: {randint: [1, 6]}\n", [],
     "{space}: stages: 5 is not valid (stages must be between 1 and 4, got 5)"),
])
def test_an_unbuildable_model_is_refused_before_ray(tiny_data_dir, tmp_path, text, flags,
                                                    message):
    # It was a trial error at epoch 1 in every trial that drew it, after Ray had started.
    space = tmp_path / "space.yaml"
    space.write_text(text)
    out = run_cli(*search_args(tiny_data_dir, space, tmp_path, "unbuildable"), *flags)
    assert out.returncode == 2
    assert out.stderr.startswith(f"error: {message.format(space=space)}"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "NO_RAY" in out.stdout
    assert not (tmp_path / "unbuildable").exists()


def test_max_concurrent_one_runs_trials_one_after_the_other(ray_session, tiny_data_dir,
                                                           tiny_space, tmp_path):
    # 2 CPUs and 1 CPU per trial would fit two trials at once; --max-concurrent 1 forbids it.
    # The random (and grid) searcher is where Tune ignored the limit; Searchers get Tune's
    # own ConcurrencyLimiter.
    code = run.main(search_args(tiny_data_dir, tiny_space, tmp_path, "serial", "--num-samples",
                                "3", "--max-epochs", "2", "--scheduler", "fifo", "--max-concurrent",
                                "1"), out=io.StringIO())
    assert code == 0
    epochs = ExperimentStore(str(tmp_path), "serial").read_epochs()
    epochs["start"] = epochs["timestamp"] - pd.to_timedelta(epochs["epoch_time_s"], unit="s")
    spans = epochs.groupby("trial_id").agg(start=("start", "min"), end=("timestamp", "max"))
    spans = spans.sort_values("start")
    assert len(spans) == 3
    assert (spans["start"].iloc[1:].to_numpy() >= spans["end"].iloc[:-1].to_numpy()).all(), spans


def test_a_reused_worker_frees_each_finished_trials_model_and_keeps_imports_out_of_collections(
        ray_session, tiny_data_dir, tiny_space, tmp_path):
    # One worker runs three trials one after the other (Tune reuses its actor). Each reset
    # must free the finished trial's model at once, and the worker has frozen what its imports
    # left, so the full collection each reset runs walks only what trials made since (a reset
    # took 0.26 s without, 0.04 s with, here: bench/trial_switch.py). A trainable set up in a
    # caller's process freezes nothing there (test_a_trial_resumed_on_another_worker_...).
    import gc
    import weakref

    folder = tmp_path / "resets"
    folder.mkdir()

    class Probe(FMNISTTrainable):
        def reset_config(self, new_config):
            finished = weakref.ref(self._run.model)
            done = super().reset_config(new_config)
            (folder / f"{len(list(folder.iterdir()))}.json").write_text(json.dumps({
                "pid": os.getpid(), "frozen": gc.get_freeze_count(),
                "finished_model_freed": finished() is None}))
            return done

    argv = search_args(tiny_data_dir, tiny_space, tmp_path, "reused", "--num-samples", "3",
                       "--max-epochs", "1", "--scheduler", "fifo", "--max-concurrent", "1")
    assert run.run_search(run.resolve(argv), out=io.StringIO(), trainable_cls=Probe) == 0
    resets = [json.loads(p.read_text()) for p in sorted(folder.iterdir())]
    assert len(resets) == 2 and len({r["pid"] for r in resets}) == 1, resets  # one worker
    assert all(r["finished_model_freed"] for r in resets), resets
    assert all(r["frozen"] > 10_000 for r in resets), resets  # TensorFlow's, Ray's, ours


def test_time_budget_records_every_trial_and_queues_no_more_than_can_run(
        ray_session, tiny_data_dir, tiny_space, tmp_path):
    # Far more samples and epochs than fit in the budget: the budget, not the count, ends it,
    # and the first two trials (FIFO, 1,000 epochs) hold both slots until it does.
    out = io.StringIO()
    code = run.main(search_args(tiny_data_dir, tiny_space, tmp_path, "budget", "--num-samples",
                                "100", "--max-epochs", "1000", "--scheduler", "fifo",
                                "--time-budget", "15"), out=out)
    assert code == 0
    assert "the time budget (15 s) ended the search; it is part of the experiment, so " \
        "--resume cannot extend it" in out.getvalue()
    store = ExperimentStore(str(tmp_path), "budget")
    trials, epochs = store.read_trials(), store.read_epochs()
    assert set(trials["status"]) == {"budget"}  # nothing reached 1,000 epochs
    # A loaded machine may not finish a first epoch inside the budget (workers import
    # TensorFlow first), so a trial that started may have 0 epochs; each still says which.
    never = "time budget ended the search before the trial started"
    for row in trials.itertuples():  # every epoch a trial reported is on disk, once
        mine = epochs[epochs["trial_id"] == row.trial_id]["epoch"].tolist()
        assert mine == list(range(1, row.epochs + 1)), row.trial_id
        assert row.stop_reason in (never, f"time budget ended the search at epoch {row.epochs}")
        assert row.stop_reason != never or row.epochs == 0
    queued = trials[trials["stop_reason"] == never]
    # Tune would have queued up to 200 configs (100 here); the embedded Ray queues one per
    # slot (2 CPUs, 1 per trial), so at most that many were drawn and never run, beside the
    # two trials holding the slots.
    assert len(queued) <= 2, queued[["trial_id", "stop_reason"]]
    assert len(trials) <= 4, trials[["trial_id", "stop_reason"]]
    assert run.PENDING_ENV not in os.environ  # not left behind for later runs
    # The trials the budget cut short never ended: Tune's loggers kept their files open (and
    # their TensorBoard writers' threads) for as long as this process lived.
    assert not trials_writing_tune_logs()
    # Tune saves what is left of the budget (nothing) with its state: no trial can run again
    again = ["--storage", str(tmp_path), "--name", "budget", "--resume", "--retry-errored"]
    with pytest.raises(run.UsageError, match=r"--retry-errored: the time budget \(15 s\) ended "
                       "'budget', and --resume cannot extend it"):
        run.resolve(again)


@pytest.mark.parametrize("flags, resources, expected", [
    ([], {"CPU": 2.0}, 2),
    (["--cpus-per-trial", "0.5"], {"CPU": 2.0}, 4),
    (["--cpus-per-trial", "4"], {"CPU": 2.0}, 1),
    (["--max-concurrent", "1"], {"CPU": 8.0}, 1),
    (["--gpus-per-trial", "0.5"], {"CPU": 16.0, "GPU": 1.0}, 2),
    (["--address", "127.0.0.1:6379"], {"CPU": 2.0}, None),  # a cluster may autoscale
])
def test_pending_limit_is_the_number_of_trials_that_fit(tiny_data_dir, tiny_space, tmp_path,
                                                        monkeypatch, flags, resources, expected):
    monkeypatch.delenv(run.PENDING_ENV, raising=False)
    args = run.build_parser().parse_args(
        search_args(tiny_data_dir, tiny_space, tmp_path, "x", *flags))
    assert run.pending_limit(args, resources) == expected
    monkeypatch.setenv(run.PENDING_ENV, "7")  # the user's own setting wins
    assert run.pending_limit(args, resources) is None


def test_workers_get_this_checkout_and_the_drivers_pythonpath(tiny_data_dir, tiny_space,
                                                              tmp_path):
    # A backend installed on PYTHONPATH passes the driver's check, so the trials must see it
    # too: Ray's runtime environment replaced the variable with the checkout alone, and every
    # trial failed with "No module named 'jax'" (seen with KERAS_BACKEND=jax).
    args = run.build_parser().parse_args(search_args(tiny_data_dir, tiny_space, tmp_path, "x"))
    root, extra = str(run.ROOT), str(tmp_path / "site")
    assert run.worker_env(args, {})["PYTHONPATH"] == root
    env = run.worker_env(args, {"PYTHONPATH": os.pathsep.join([extra, "", root, extra])})
    assert env["PYTHONPATH"] == os.pathsep.join([root, extra])  # once each, checkout first
    assert env["TF_CPP_MIN_LOG_LEVEL"] == "2" and "XLA_PYTHON_CLIENT_MEM_FRACTION" not in env
    shared = run.build_parser().parse_args(
        search_args(tiny_data_dir, tiny_space, tmp_path, "x", "--gpus-per-trial", "0.25"))
    assert run.worker_env(shared, {})["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.225"


def sigterm_blocked(pid: int) -> bool:
    """Whether process `pid` has SIGTERM blocked (its SigBlk mask in /proc)."""
    for line in (Path("/proc") / str(pid) / "status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    raise AssertionError(f"no SigBlk for {pid}")


def test_the_embedded_ray_starts_no_idle_workers_and_stops_its_monitor_first_and_all(
        no_ray_running, tiny_data_dir, tiny_space, tmp_path, monkeypatch):
    # Ray stops the GCS first, and its autoscaler monitor then waits on it for a second before
    # Ray kills it: stop_ray ends the monitor before Ray's own shutdown starts. That path uses
    # Ray's internals, so this checks it still runs on the Ray installed (it falls back to the
    # plain shutdown silently) and that nothing the embedded Ray started outlives it. Its
    # processes leave SIGTERM to the driver (search/sigterm.py), so Ray stops them with SIGKILL,
    # and the raylet's agents, which outlived a killed raylet, go too.
    import ray
    from ray._private import ray_constants

    args = run.build_parser().parse_args(search_args(tiny_data_dir, tiny_space, tmp_path, "x"))
    # started ignoring SIGTERM (as CI runners can start it), the driver ignores it after
    # ray.init too, which sets its own handler (an exit) over it; fmnist-train leaves it so
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        assert run.start_ray(args)
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)
    started = {kind: [info.process for info in infos]
               for kind, infos in ray._private.worker._global_node.all_processes.items()}
    monitor = started[ray_constants.PROCESS_TYPE_MONITOR][0]
    gcs = started[ray_constants.PROCESS_TYPE_GCS_SERVER][0]
    # No workers started ahead: Tune's trial actors could not use them (EMBEDDED_RAY_CONFIG).
    # With Ray's default, two `ray::IDLE` workers are already there when ray.init returns.
    raylet = started[ray_constants.PROCESS_TYPE_RAYLET][0].pid
    assert sorted(processes_under(raylet).values()) == ["ray::DashboardAgent",
                                                   "ray::RuntimeEnvAgent"]
    below = {p.pid: kind for kind, procs in started.items() for p in procs}
    for pid in list(below):  # and what they started: the raylet's agents
        below.update(processes_under(pid))
    assert len(below) >= 5 and all(sigterm_blocked(pid) for pid in below), below
    assert not sigterm_blocked(os.getpid())  # the driver acts on it
    seen = {}
    real_shutdown = ray.shutdown

    def shutdown(*a, **k):  # Ray's own shutdown, run as it is; only what precedes it is noted
        seen.update(monitor=monitor.poll(), gcs=gcs.poll())
        return real_shutdown(*a, **k)

    monkeypatch.setattr(ray, "shutdown", shutdown)
    run.stop_ray()
    assert seen == {"monitor": -signal.SIGKILL, "gcs": None}
    assert not ray.is_initialized()
    left = {kind: [p.pid for p in procs if p.poll() is None] for kind, procs in started.items()}
    assert not any(left.values()), left
    assert not [title for pid, title in below.items() if alive(pid)]


@pytest.mark.parametrize("flags, resources, problem", [
    ([], {"CPU": 2.0}, None),
    (["--cpus-per-trial", "2"], {"CPU": 2.0}, None),
    (["--cpus-per-trial", "3"], {"CPU": 2.0}, "--cpus-per-trial 3: Ray has 2 CPUs here"),
    (["--gpus-per-trial", "1"], {"CPU": 2.0}, "--gpus-per-trial 1: Ray found 0 GPUs here"),
    (["--gpus-per-trial", "0.5"], {"CPU": 2.0, "GPU": 1.0}, None),
    (["--gpus-per-trial", "2"], {"CPU": 8.0, "GPU": 1.0}, "Ray found 1 GPUs"),
    (["--address", "127.0.0.1:6379", "--gpus-per-trial", "1"], {"CPU": 2.0}, None),  # may grow
])
def test_a_trial_larger_than_the_embedded_ray_is_refused(tiny_data_dir, tiny_space, tmp_path,
                                                          flags, resources, problem):
    args = run.build_parser().parse_args(
        search_args(tiny_data_dir, tiny_space, tmp_path, "x", *flags))
    found = run.unfit_trial(args, resources)
    assert found == problem if problem is None else problem in found


@pytest.mark.parametrize("dry_run", [False, True])
def test_more_cpus_per_trial_than_the_machine_has_is_one_line_before_ray_starts(
        tiny_data_dir, tiny_space, tmp_path, dry_run):
    # Tune would keep the trial pending until the time budget ran out; --dry-run said it fits.
    storage = tmp_path / "runs"
    argv = search_args(tiny_data_dir, tiny_space, storage, "big", "--cpus-per-trial", "1000")
    out = run_cli(*argv, *(["--dry-run"] if dry_run else []))
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --cpus-per-trial 1000: this machine has {os.cpu_count()} CPUs, "
                      "so no trial could start on the embedded Ray; use --address for a "
                      "cluster"], out.stderr[-2000:]
    assert "Traceback" not in out.stderr and not storage.exists()
    assert "NO_RAY" in out.stdout


class _Arrival:
    """What on_trial_result reads of a trial: its id (no Ray state involved)."""

    def __init__(self, trial_id: str):
        self.trial_id = trial_id


def test_asha_promote_continues_only_the_top_third_of_a_rung():
    from search.schedulers import PromotingASHA

    sched = PromotingASHA(max_t=9, rungs=[1, 3], reduction_factor=3, metric="val_accuracy",
                          mode="max")
    scores = {"a": 0.2, "b": 0.3, "c": 0.5, "d": 0.4, "e": 0.1, "f": 0.6}
    decisions = {tid: sched.on_trial_result(None, _Arrival(tid), {"training_iteration": 1,
                                                                  "val_accuracy": acc})
                 for tid, acc in scores.items()}
    # a, b: fewer than 3 recorded, nobody can be in the top third yet. c: top 1 of 3.
    # d: 4 recorded, top 1 is c (promoted already). e: last of 5. f: top 2 of 6 are f and c.
    assert decisions == {"a": "PAUSE", "b": "PAUSE", "c": "CONTINUE", "d": "PAUSE",
                         "e": "PAUSE", "f": "CONTINUE"}
    # Nothing else is promotable by floor(6/3); finishing (ceil) does not add one either.
    assert not any(sched.promotable(1, tid) for tid in scores)
    assert not any(sched.promotable(1, tid, finishing=True) for tid in scores)
    # A rung with two trials promotes nobody by floor(2/3), the better one by ceil.
    for tid in ("c", "f"):
        assert sched.on_trial_result(None, _Arrival(tid), {"training_iteration": 3,
                                                           "val_accuracy": scores[tid]}) == "PAUSE"
    assert [sched.promotable(3, t, finishing=True) for t in ("c", "f")] == [False, True]
    assert not sched.promotable(3, "f")
    # Later epochs between rungs continue; max_t stops; a NaN ranks last.
    assert sched.on_trial_result(None, _Arrival("c"), {"training_iteration": 2,
                                                       "val_accuracy": 0.5}) == "CONTINUE"
    assert sched.on_trial_result(None, _Arrival("f"), {"training_iteration": 9,
                                                       "val_accuracy": 0.7}) == "STOP"
    sched.on_trial_result(None, _Arrival("g"), {"training_iteration": 1,
                                               "val_accuracy": float("nan")})
    assert not sched.promotable(1, "g", finishing=True)


def _given_trials(sched: Any, ids: str) -> dict[str, Any]:
    """Tune's Trial objects `ids`, added to a new scheduler as Tune adds every trial of the
    experiment on --resume."""
    from ray.tune.experiment import Trial

    trials = {t: Trial("FMNISTTrainable", config={}, trial_id=t, stub=True) for t in ids}
    for trial in trials.values():
        sched.on_trial_add(None, trial)
    return trials


class _Controller:
    """What PromotingASHA asks Tune's controller: the trials, whether the searcher is done,
    and to stop a trial (recorded here)."""

    def __init__(self, trials: list, searched: bool):
        self.trials, self.stopped = trials, []
        self.search_alg = type("Searcher", (), {"is_finished": lambda _: searched})()

    def get_trials(self) -> list:
        return self.trials

    def stop_trial(self, trial) -> None:
        self.stopped.append(trial.trial_id)


def test_asha_promote_after_a_resume_keeps_waiting_trials_waiting(monkeypatch, tmp_path):
    # Tune brings every unfinished trial back pending, which it would start at once: those
    # that waited at a rung must wait again, and the rungs hold what was recorded there.
    from ray.train import Checkpoint
    from ray.train._internal.session import _TrainingResult
    from ray.tune.experiment import Trial

    from search.schedulers import OnRecord, PromotingASHA

    monkeypatch.setattr(OnRecord, "scores", {
        "a": {e: 0.9 + e / 100 for e in range(1, 10)},  # completed
        "b": {1: 0.5},  # stopped at rung 1
        "c": {1: 0.6},  # waited at rung 1
        "d": {1: 0.8, 2: 0.81},  # promoted, killed in epoch 3
        "e": {1: 0.85, 2: 0.9, 3: 0.95},  # waited at rung 3
        "f": {1: 0.7}})  # at rung 1 after Tune's last saved state: back from no checkpoint
    sched = PromotingASHA(max_t=9, rungs=[1, 3], reduction_factor=3, metric="val_accuracy",
                          mode="max")
    trials = {t: Trial("FMNISTTrainable", config={}, trial_id=t, stub=True) for t in "abcdefg"}
    for tid, trial in trials.items():
        trial.set_status(Trial.TERMINATED if tid in "ab" else Trial.PENDING)
        scores = OnRecord.scores.get(tid, {})
        if scores and tid != "f":  # the checkpoint Tune knows: of the last epoch on record
            trial._restore_checkpoint_result = _TrainingResult(
                Checkpoint(str(tmp_path)), {"training_iteration": max(scores)})
        sched.on_trial_add(None, trial)
    status = {tid: t.status for tid, t in trials.items()}
    assert status == {"a": "TERMINATED", "b": "TERMINATED", "c": "PAUSED", "d": "PENDING",
                      "e": "PAUSED", "f": "PENDING", "g": "PENDING"}  # g: not started
    # rung 1: a to f with a, d, e promoted from it; rung 3: a (promoted) and e
    assert not any(sched.promotable(1, t, finishing=True) for t in "abcdef")
    assert [sched.promotable(3, t, finishing=True) for t in "ae"] == [False, True]
    controller = _Controller(list(trials.values()), searched=False)
    assert sched.choose_trial_to_run(controller).trial_id == "d"  # running when killed: goes on
    # f reports epoch 1 again (0.65 now): judged with it, below the top third (a, d, e, ...)
    assert sched.on_trial_result(None, trials["f"], _result(1, 0.65)) == "PAUSE"
    trials["f"].set_status(Trial.PAUSED)
    for tid in "dg":
        trials[tid].set_status(Trial.TERMINATED)
    controller = _Controller(list(trials.values()), searched=True)
    assert sched.choose_trial_to_run(controller).trial_id == "e"  # the best at rung 3
    trials["e"].set_status(Trial.TERMINATED)
    assert sched.choose_trial_to_run(controller) is None and controller.stopped == ["c", "f"]


def _result(epoch: int, acc: float) -> dict[str, float]:
    return {"training_iteration": epoch, "val_accuracy": acc}


def test_asha_after_a_resume_judges_trials_against_the_epochs_on_record(monkeypatch):
    from search.schedulers import OnRecord, ResumableASHA

    def restored(factor: float = 3) -> tuple[ResumableASHA, dict[str, Any]]:
        """a completed, b and c stopped at epoch 1, d interrupted after epoch 2, e not started."""
        sched = ResumableASHA(time_attr="training_iteration", metric="val_accuracy",
                              mode="max", max_t=9, grace_period=1, reduction_factor=factor)
        return sched, _given_trials(sched, "abcde")

    # Empty rungs (Ray's ASHA on resume): the first to reach a rung continues, whatever it is.
    sched, trials = restored()
    assert sched.on_trial_result(None, trials["e"], _result(1, 0.65)) == "CONTINUE"
    assert sched.on_trial_result(None, trials["d"], _result(3, 0.63)) == "CONTINUE"

    monkeypatch.setattr(OnRecord, "scores", {
        "a": {1: 0.9, 2: 0.91, 3: 0.92}, "b": {1: 0.8}, "c": {1: 0.7}, "d": {1: 0.6, 2: 0.62}})
    sched, trials = restored()
    # rung 1 holds a, b, c, d: e's 0.65 is below its top third
    assert sched.on_trial_result(None, trials["e"], _result(1, 0.65)) == "STOP"
    # d passed rung 1 before the resume; at rung 3 it meets a's 0.92
    assert sched.on_trial_result(None, trials["d"], _result(3, 0.63)) == "STOP"
    # a factor of 2.5 puts a rung at 2.5 epochs: Ray records the result of epoch 3 there
    # (a's 0.92, not its 0.91 of epoch 2)
    sched, trials = restored(2.5)
    assert sched.on_trial_result(None, trials["e"], _result(3, 0.915)) == "STOP"


def test_scores_on_record_take_the_epochs_only_tunes_log_has(tmp_path):
    # A driver killed between a result and the recorder's next flush leaves the epoch in
    # Tune's result.json only; the resumed schedulers' state must count it too
    store = ExperimentStore(str(tmp_path), "e")
    ts = pd.Timestamp.now(tz="UTC")
    store.append_epochs({"trial_id": "a", "epoch": e, "attempt": 0, "timestamp": ts,
                         "val_accuracy": v} for e, v in ((1, 0.5), (2, 0.6)))
    logged = [{"trial_id": "a", "epoch": 2, "val_accuracy": 0.1},  # Parquet's 0.6 stands
              {"trial_id": "a", "epoch": 3, "val_accuracy": 0.7},
              {"trial_id": "b", "epoch": 1, "val_accuracy": 0.2},
              {"trial_id": "b", "epoch": 1, "val_accuracy": 0.3},  # run again: the latest
              {"trial_id": "b", "epoch": 2, "val_accuracy": None}]
    folder = tmp_path / "e" / "ray" / "trial_a_b"
    folder.mkdir(parents=True)
    (folder / "result.json").write_text(
        "".join(json.dumps(r) + "\n" for r in logged) + '{"trial_id": "b", "epo')  # torn
    assert run.scores_on_record(store) == {"a": {1: 0.5, 2: 0.6, 3: 0.7}, "b": {1: 0.3}}


class _NoneWaiting:
    """What the median rule asks Tune's controller when it has too few results to compare
    with: which trials wait to run (none here, so it lets the trial go on)."""

    def get_live_trials(self) -> list:
        return []


def test_the_median_rule_after_a_resume_compares_with_the_epochs_on_record(monkeypatch):
    from search.schedulers import OnRecord, ResumableMedian

    def restored() -> tuple[ResumableMedian, dict[str, Any]]:
        """run.py's settings; a completed, b stopped at epoch 2, d interrupted after epoch 1,
        e not started."""
        sched = ResumableMedian(time_attr="training_iteration", metric="val_accuracy",
                                mode="max", grace_period=1, min_samples_required=2)
        return sched, _given_trials(sched, "abde")


    # Nothing to compare with (Ray's rule on resume): every trial goes on.
    sched, trials = restored()
    assert sched.on_trial_result(_NoneWaiting(), trials["e"], _result(1, 0.5)) == "CONTINUE"
    assert sched.on_trial_result(_NoneWaiting(), trials["d"], _result(2, 0.35)) == "CONTINUE"

    monkeypatch.setattr(OnRecord, "scores", {"a": {1: 0.9, 2: 0.9, 3: 0.9}, "b": {1: 0.8, 2: 0.8},
                                             "d": {1: 0.3}})
    sched, trials = restored()
    # at epoch 1 the running means of a, b, d are 0.9, 0.8, 0.3: e's 0.5 is below the median
    assert sched.on_trial_result(_NoneWaiting(), trials["e"], _result(1, 0.5)) == "STOP"
    # d's best by epoch 2 (its epoch 1 on record, 0.35 now) is below a's and b's 0.85
    assert sched.on_trial_result(_NoneWaiting(), trials["d"], _result(2, 0.35)) == "STOP"

    # d, killed after its epoch-2 result and before that epoch's checkpoint, runs epoch 2 again
    # from epoch 1's: 0.9 replaces the 0.3 on record. Counted twice, d's running mean at epoch 2
    # would be 0.5 and the median of a's and d's 0.7, which e's 0.72 passes; it is 0.75.
    monkeypatch.setattr(OnRecord, "scores", {"a": {1: 0.9, 2: 0.9}, "d": {1: 0.3, 2: 0.3}})
    sched, trials = restored()
    assert sched.on_trial_result(_NoneWaiting(), trials["d"], _result(2, 0.9)) == "CONTINUE"
    assert sched.on_trial_result(_NoneWaiting(), trials["e"], _result(1, 0.72)) == "CONTINUE"
    assert sched.on_trial_result(_NoneWaiting(), trials["e"], _result(2, 0.72)) == "STOP"


def test_the_median_rule_weighs_a_stopped_trials_last_epoch_once(monkeypatch):
    from search.schedulers import OnRecord, ResumableMedian

    monkeypatch.setattr(OnRecord, "scores", {})
    # Tune hands a trial the rule stopped its last result again (on_trial_complete): Ray's rule
    # counted it twice, c's running mean at epoch 2 would be 0.233 and the median of a's 0.65
    # and c's 0.442, which x's best 0.46 passes; it is 0.3, the median 0.475.
    sched = ResumableMedian(time_attr="training_iteration", metric="val_accuracy", mode="max",
                            grace_period=1, min_samples_required=1)
    trials = _given_trials(sched, "acx")
    for trial, epoch, acc, decision in (("a", 1, 0.4, "CONTINUE"), ("a", 2, 0.9, "CONTINUE"),
                                        ("c", 1, 0.5, "CONTINUE"), ("c", 2, 0.1, "STOP")):
        assert sched.on_trial_result(_NoneWaiting(), trials[trial], _result(epoch, acc)) \
            == decision, (trial, epoch)
    sched.on_trial_complete(_NoneWaiting(), trials["c"], _result(2, 0.1))
    assert sched.on_trial_result(_NoneWaiting(), trials["x"], _result(1, 0.46)) == "CONTINUE"
    assert sched.on_trial_result(_NoneWaiting(), trials["x"], _result(2, 0.2)) == "STOP"


TUNE_LOGS = ("result.json", "progress.csv", "events.out.tfevents.")


def trials_writing_tune_logs() -> set[str]:
    """The trials whose Tune logs this process holds open for writing: the files Tune's
    loggers write in the driver's staging folder (`.../driver_artifacts/<trial>/`). Tune's
    uploads of that folder read it (and write --storage), so they are not counted."""
    trials = set()
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError, ValueError):
            target = Path(os.readlink(fd))
            if target.name.startswith(TUNE_LOGS) and target.parent.parent.name == \
                    "driver_artifacts":
                flags = Path(f"/proc/self/fdinfo/{fd.name}").read_text().split("flags:")[1]
                if int(flags.split()[0], 8) & os.O_ACCMODE != os.O_RDONLY:
                    trials.add(target.parent.name)
    return trials


class OpenTuneLogs(threading.Thread):
    """Every 20 ms, how many trials have Tune logs open for writing in this process (the
    search runs in it), less any open before it started; `most` is the highest count seen."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.most, self.done, self.before = 0, threading.Event(), trials_writing_tune_logs()

    def run(self) -> None:
        while not self.done.wait(0.02):
            self.most = max(self.most, len(trials_writing_tune_logs() - self.before))


@pytest.mark.parametrize("searcher", ["random", "optuna", "tpe-rungs"])
def test_asha_promote_pauses_at_rungs_and_resumes_the_best(ray_session, tiny_data_dir,
                                                           tiny_space, tmp_path, searcher):
    # 6 configs, 9 epochs, factor 3: rungs at epochs 1 and 3. Each trial ends at a rung or at 9.
    name = f"promote-{searcher}"
    out = io.StringIO()
    logs = OpenTuneLogs()
    logs.start()
    try:
        code = run.main(search_args(tiny_data_dir, tiny_space, tmp_path, name, "--scheduler",
                                    "asha-promote", "--searcher", searcher, "--num-samples",
                                    "6", "--max-epochs", "9", "--seed", "3"), out=out)
    finally:
        logs.done.set()
        logs.join()
    assert code == 0, out.getvalue()
    store = ExperimentStore(str(tmp_path), name)
    trials, raw = store.read_trials(), store.read_epochs(canonical=False)
    epochs = store.read_epochs()
    assert len(trials) == 6 and len(raw) == len(epochs)  # no epoch ran twice
    for row in trials.itertuples():
        mine = epochs[epochs["trial_id"] == row.trial_id]["epoch"].tolist()
        assert mine == list(range(1, row.epochs + 1)), row.trial_id
        assert row.epochs in (1, 3, 9), row
        expected = "completed" if row.epochs == 9 else "stopped"
        assert row.status == expected, row
    assert (trials["epochs"] == 9).sum() >= 1
    assert len(epochs) < 6 * 9
    # At each rung the best trial recorded there went on (a tie goes to the first recorded:
    # 100 validation images make ties common).
    for rung, nxt in ((1, 3), (3, 9)):
        at = epochs[epochs["epoch"] == rung].sort_values("timestamp")
        best = at.loc[at["val_accuracy"] == at["val_accuracy"].max(), "trial_id"].iloc[0]
        assert trials.set_index("trial_id").loc[best, "epochs"] >= nxt, (rung, best)
    # No trial began epoch 2 before 3 trials had reported epoch 1: the first arrivals waited
    # (paused), where Ray's ASHA lets the first trial at a rung go on at once.
    epochs["start"] = epochs["timestamp"] - pd.to_timedelta(epochs["epoch_time_s"], unit="s")
    third_at_rung = epochs[epochs["epoch"] == 1]["timestamp"].sort_values().iloc[2]
    assert (epochs[epochs["epoch"] == 2]["start"] >= third_at_rung).all()
    # A trial that waited and was promoted resumed from its checkpoint (a new attempt).
    resumed = raw[(raw["epoch"] > 1) & (raw["attempt"] >= 1)]
    assert not resumed.empty
    # Tune's logs (3 files a trial) were open for the trials that ran, 2 at a time, and for
    # at most one that had just paused (its files close at the end of the step of Tune's loop
    # in which it paused, where the trial taking its worker may have started), not for those
    # that waited: the trials stopped at a rung all waited there, paused, until the end, and
    # Tune's own loggers kept their files open all that while (all 6 trials' here; a
    # 400-config search ran out of file descriptors under `ulimit -n` 1024).
    assert (trials["status"] == "stopped").sum() >= 4
    assert 1 <= logs.most <= 2 + 1, logs.most
    if searcher == "tpe-rungs":  # it saw every trial's rung result; its state is plain JSON
        (state_file,) = (tmp_path / name / "ray").glob("searcher-state-*.json")
        seen = json.loads(state_file.read_text())["seen"]
        for epoch, results in seen.items():
            assert set(results) == set(epochs[epochs["epoch"] == int(epoch)]["trial_id"])


# Nothing listens on port 9 and there are no credentials for it: Google Cloud Storage would
# retry such a root for many minutes before this change; the probe gives up after PROBE_S.
DEAD_BUCKET = "gs://fmnist-test/runs?endpoint_override=127.0.0.1:9&scheme=http"


@pytest.mark.parametrize("tool", ["search", "results"])
def test_an_unreachable_bucket_is_one_line_not_a_hang(tiny_data_dir, tiny_space, tool):
    if tool == "search":
        argv = ["search/run.py", *search_args(tiny_data_dir, tiny_space, "unused", "x"),
                "--storage", DEAD_BUCKET]
        call = "from search import run; rc = run.main()"
    else:
        argv = ["results", "leaderboard", DEAD_BUCKET.replace("runs?", "runs/x?")]
        call = "from results.__main__ import main; rc = main()"
    code = ("import sys; sys.argv = sys.argv[1:]\n"
            "import results.store; results.store.PROBE_S = 1\n"
            f"{call}\n"
            "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY')\n"
            "sys.exit(rc)\n")
    out = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True,
                         text=True, timeout=90)
    assert out.returncode == 2, out.stderr[-2000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach gs://fmnist-test/runs" in lines[0], lines
    assert "NO_RAY" in out.stdout


def test_a_trial_resumed_on_another_worker_trains_as_if_it_had_never_paused(
        ray_session, tiny_data_dir, tmp_path, monkeypatch):
    # What Tune does when it pauses a trial at a rung and resumes it later on another worker
    # (asha-promote, Hyperband): that worker loads the checkpoint, with no model built first
    # only to be replaced, and its next epoch is the one the trial would have trained on.
    # Dropout and augmentation make the random streams part of what must carry over.
    import gc
    from types import SimpleNamespace

    import ray.tune.trainable.trainable
    from ray.tune.result import TRIAL_INFO

    import fmnist.train

    # A trainable made outside Tune logs to a folder under ~/ray_results: under tmp_path here.
    monkeypatch.setattr(ray.tune.trainable.trainable, "DEFAULT_STORAGE_PATH", str(tmp_path))
    data = load_splits(tiny_data_dir, val_size=100, train_size=300).arrays()
    fixed = dict(model="cnn", epochs=3, batch_size=64, base_filters=4, dense_units=8,
                 augment_flip=True, augment_translate=0.1, seed=1)

    class Worker(FMNISTTrainable):
        def setup(self, config):
            super().setup(config, data=data, fixed=fixed)

    # What Tune hands a trainable as its trial's _TrialInfo (the fields Trainable reads)
    info = SimpleNamespace(trial_id="a", trial_name="a", experiment_name="e",
                           trial_resources=None)
    (tmp_path / "a1").mkdir()  # Tune makes a checkpoint's folder
    first = Worker({"dropout": 0.3, TRIAL_INFO: info})
    assert gc.get_freeze_count() == 0  # set up here, in the caller's process, not a Tune worker
    assert first.train()["epoch"] == 1
    first.save_checkpoint(str(tmp_path / "a1"))
    straight_on = first.train()
    made = []  # the checkpoint each TrainingRun of the other worker was made from
    make = fmnist.train.TrainingRun.__init__
    monkeypatch.setattr(fmnist.train.TrainingRun, "__init__",
                        lambda run, cfg, data, checkpoint=None: made.append(checkpoint)
                        or make(run, cfg, data, checkpoint))
    other = Worker({"dropout": 0.3, TRIAL_INFO: info})
    other.restore(str(tmp_path / "a1"))
    assert len(made) == 1 and Path(made[0]) == tmp_path / "a1"  # loaded, nothing built first
    resumed = other.train()
    assert straight_on["epoch"] == resumed["epoch"] == 2
    assert (straight_on["attempt"], resumed["attempt"]) == (0, 1)
    assert math.isclose(straight_on["val_loss"], resumed["val_loss"], rel_tol=1e-5)
    for wa, wb in zip(first.training.model.get_weights(), other.training.model.get_weights(),
                      strict=True):
        np.testing.assert_allclose(wa, wb, rtol=1e-5, atol=1e-6)
    first.stop()
    other.stop()
