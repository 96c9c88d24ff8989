"""Fault injection on real Ray: a trial that raises mid-run, a worker node that dies, a driver
killed again and again. Each asserts the "nothing lost" definition of the README's Reliability
section: every trial ends with a terminal row, the canonical epochs view has every
(trial, epoch) key exactly once, and nothing half-written is left behind.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from results.store import ExperimentStore
from search import run
from search.trainable import FMNISTTrainable
from tests.conftest import REPO, alive, driver_cmd, driver_env, processes_under, search_args


def _full_keys(trials, epochs_per_trial: int) -> list[tuple[str, int]]:
    return sorted((t, e) for t in trials["trial_id"] for e in range(1, epochs_per_trial + 1))


def _keys(epochs) -> list[tuple[str, int]]:
    return sorted(zip(epochs["trial_id"], epochs["epoch"], strict=True))


def _resume_cmd(storage: Path, name: str) -> list[str]:
    """The command that continues experiment `name`, as a user types it."""
    return [sys.executable, "search/run.py", "--storage", str(storage), "--name", name,
            "--resume"]


def test_a_trial_that_raises_at_epoch_2_fails_alone(ray_session, tiny_data_dir, tmp_path):
    class FaultAtEpochTwo(FMNISTTrainable):
        """The real trainable, except that the 16-unit trial raises during its second epoch."""

        def step(self):
            if self.cfg.units == 16 and self.training.epoch == 1:
                raise RuntimeError("injected fault in epoch 2")
            return super().step()

    space = tmp_path / "fault.yaml"
    space.write_text("model: mlp\nepochs: 3\nhidden_layers: 1\nunits: {grid: [8, 16]}\n")
    argv = search_args(tiny_data_dir, space, tmp_path, "fault", "--searcher", "grid",
                       "--num-samples", "1", "--scheduler", "fifo", "--max-failures", "0")
    out = io.StringIO()
    code = run.run_search(run.resolve(argv), out=out, trainable_cls=FaultAtEpochTwo)
    assert code == 1  # some trials failed
    store = ExperimentStore(str(tmp_path), "fault")
    trials = store.read_trials().set_index("params_units")
    assert trials.loc[16, "status"] == "error"
    assert trials.loc[16, "stop_reason"] == ("error at epoch 2: RuntimeError: "
                                             "injected fault in epoch 2")
    assert trials.loc[16, "epochs"] == 1  # the epoch it finished before the fault is kept
    assert trials.loc[8, "status"] == "completed" and trials.loc[8, "epochs"] == 3
    epochs = store.read_epochs()
    assert _keys(epochs) == sorted([(trials.loc[16, "trial_id"], 1)]
                                   + [(trials.loc[8, "trial_id"], e) for e in (1, 2, 3)])
    assert "1 failed" in out.getvalue()


def test_failed_trials_run_again_from_their_checkpoint_under_resume_retry_errored(
        ray_session, tiny_data_dir, tmp_path, capsys):
    """A fault that goes away (a full disk, a lost node) leaves trials `error`; `--resume
    --retry-errored` runs them again from their last checkpoint. Under Hyperband, whose
    brackets Tune rebuilds on resume with every trial in them, finished ones included."""
    fault = tmp_path / "fault-on"
    fault.touch()

    class FaultWhileFlagged(FMNISTTrainable):
        """The real trainable, except that 16-unit trials raise in epoch 2 while `fault` is."""

        def step(self):
            if self.cfg.units == 16 and self.training.epoch == 1 and fault.exists():
                raise RuntimeError("injected fault in epoch 2")
            return super().step()

    space = tmp_path / "fault.yaml"
    space.write_text("model: mlp\nepochs: 3\nhidden_layers: 1\nunits: {grid: [8, 16]}\n")
    # 4 trials (8, 16, 8, 16); Hyperband's brackets for max_t 3: 2x3 | 3x1 -> 1x3. A time
    # budget ends the resumed search if a bracket waits for ever (it did: a finished trial in
    # the bracket never reaches the rung), so the test fails instead of hanging.
    argv = search_args(tiny_data_dir, space, tmp_path, "retry", "--searcher", "grid",
                       "--num-samples", "2", "--scheduler", "hyperband", "--max-failures", "0",
                       "--time-budget", "90")
    assert run.run_search(run.resolve(argv), out=io.StringIO(),
                          trainable_cls=FaultWhileFlagged) == 1
    store = ExperimentStore(str(tmp_path), "retry")
    before = store.read_trials().set_index("trial_id")
    failed = before.index[before["status"] == "error"]
    assert len(failed) >= 1 and (before.loc[failed, "params_units"] == 16).all()
    assert (before.loc[failed, "epochs"] == 1).all()
    err = capsys.readouterr().err
    assert "--resume --name retry --storage" in err and "--retry-errored runs the failed " \
        "trials again from their last checkpoint" in err

    # Tune starts re-queued trials whatever the searcher's concurrency limit; the plan says so.
    assert run.resume_plan(store, True, 1).endswith(
        f"the {len(failed)} failed trial(s) run again from their last checkpoint, as CPUs/GPUs "
        "free up (--max-concurrent 1 holds back new configurations, not these)")

    fault.unlink()  # what made them fail is fixed
    out = io.StringIO()
    again = ["--storage", str(tmp_path), "--name", "retry", "--resume", "--retry-errored"]
    assert run.run_search(run.resolve(again), out=out, trainable_cls=FaultWhileFlagged) == 0
    assert f"the {len(failed)} failed trial(s) run again from their last checkpoint" \
        in out.getvalue()
    after = store.read_trials().set_index("trial_id")
    assert (after.loc[failed, "status"] == "completed").all()
    assert (after.loc[failed, "epochs"] == 3).all()
    assert (after.loc[failed, "failures"] == 1).all()
    others = before.index.difference(failed)  # finished: untouched
    assert after.loc[others, ["status", "epochs"]].equals(before.loc[others, ["status", "epochs"]])
    epochs = store.read_epochs()
    assert len(epochs) == len(epochs.drop_duplicates(["trial_id", "epoch"]))
    retried = epochs[epochs["trial_id"].isin(failed)].set_index(["trial_id", "epoch"])
    for trial in failed:  # epoch 1 from the first run, then on from its checkpoint
        assert retried.loc[trial]["attempt"].to_dict() == {1: 0, 2: 1, 3: 1}
    assert "failed" not in capsys.readouterr().err


def test_worker_node_dies_trials_retry_from_checkpoint(tiny_data_dir, tiny_space, tmp_path):
    from ray.cluster_utils import Cluster

    # A head that runs no trials and two one-CPU worker nodes: real raylets, real processes.
    cluster = Cluster(initialize_head=True, connect=False,
                      head_node_args={"num_cpus": 0, "include_dashboard": False})
    workers = {n.node_id: n for n in (cluster.add_node(num_cpus=1) for _ in range(2))}
    # Every epoch lasts 1 s (the driver's "slow" mode): tiny epochs can take 0.05 s, and a
    # trial would pass from epoch 2 to its end between two 2-second flushes of Parquet.
    epochs_per_trial, proc = 10, None
    try:
        cluster.wait_for_nodes()
        argv = search_args(tiny_data_dir, tiny_space, tmp_path, "nodeloss", "--num-samples",
                           "2", "--max-epochs", str(epochs_per_trial), "--scheduler", "fifo",
                           "--max-failures", "3", "--address", cluster.address)
        proc = subprocess.Popen(driver_cmd(tmp_path, "slow", argv), cwd=REPO,
                                env=driver_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        store = ExperimentStore(str(tmp_path), "nodeloss")
        victim, deadline = None, time.monotonic() + 240
        while victim is None and time.monotonic() < deadline:
            if proc.poll() is not None:
                pytest.fail("the search ended before a node could be removed:\n"
                            + proc.stdout.read()[-3000:])
            time.sleep(0.3)
            if not (tmp_path / "nodeloss" / "epochs").exists():
                continue
            done = store.read_epochs().groupby(["node", "trial_id"])["epoch"].max()
            # A node whose trial has at least two checkpointed epochs and many still to go.
            ready = done[(done >= 2) & (done <= epochs_per_trial - 5)]
            if len(ready):
                victim = ready.index[0]
        assert victim is not None, "no trial reached epoch 2 in time"
        node_id, trial_id = victim
        before = store.read_epochs()
        cluster.remove_node(workers[node_id], allow_graceful=False)  # kills raylet and workers
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 0, output[-3000:]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        cluster.shutdown()

    trials = store.read_trials().set_index("trial_id")
    epochs = store.read_epochs()
    assert len(trials) == 2 and set(trials["status"]) == {"completed"}  # terminal rows
    assert trials.loc[trial_id, "failures"] >= 1  # the node loss is counted
    assert _keys(epochs) == _full_keys(trials.reset_index(), epochs_per_trial)  # no gap
    assert not epochs.duplicated(["trial_id", "epoch"]).any()  # no duplicate
    mine = epochs[epochs["trial_id"] == trial_id].set_index("epoch")
    retried = mine[mine["attempt"] >= 1]
    # It retried from its last checkpoint, not from scratch, and on the surviving node.
    assert len(retried) and retried.index.min() > before[before["trial_id"] == trial_id][
        "epoch"].min()
    assert (mine.loc[1:2, "attempt"] == 0).all()
    assert set(retried["node"]) == set(workers) - {node_id}
    assert not list((tmp_path / "nodeloss").rglob("*.tmp"))


def _completed(store: ExperimentStore) -> int:
    trials = store.read_trials()
    return int((trials["status"] == "completed").sum()) if len(trials) else 0


def test_driver_killed_at_random_moments_then_resumed(tiny_data_dir, tiny_space, tmp_path):
    seed = random.randrange(1 << 16)
    rng = random.Random(seed)
    samples, epochs_per_trial, kills_wanted = 3, 8, 3
    why = f"(kill-time seed {seed})"
    start = driver_cmd(tmp_path, "slow", search_args(
        tiny_data_dir, tiny_space, tmp_path, "killed", "--num-samples", str(samples),
        "--max-epochs", str(epochs_per_trial), "--scheduler", "fifo", "--max-concurrent", "2"))
    resume = driver_cmd(tmp_path, "slow", _resume_cmd(tmp_path, "killed")[2:])
    store = ExperimentStore(str(tmp_path), "killed")
    epochs_dir = tmp_path / "killed" / "epochs"
    completed, seen, kills, planted, rc = [0], set(), 0, None, None
    for run_no in range(kills_wanted + 3):
        proc = subprocess.Popen(start if run_no == 0 else resume, cwd=REPO, env=driver_env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                start_new_session=True)  # its own group: driver and its Ray
        if kills < kills_wanted:
            # Under way: Tune has saved state (first run) or the new run swept the torn file
            # planted after the last kill. Then a random moment later, SIGKILL everything.
            deadline = time.monotonic() + 180
            while proc.poll() is None and time.monotonic() < deadline:
                if store.has_ray_state() and (planted is None or not planted.exists()):
                    break
                time.sleep(0.2)
            if planted is not None and proc.poll() is None:
                assert not planted.exists(), f"the resumed run never swept {planted.name} {why}"
            time.sleep(rng.uniform(0.5, 6.0))
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                kills += 1
        _, err = proc.communicate(timeout=400)
        rc = proc.returncode
        if rc == 0:
            break
        assert rc == -signal.SIGKILL, f"run {run_no} exited {rc} {why}: {err[-2000:]}"
        now = store.read_epochs()
        keys = set(_keys(now))
        assert seen <= keys, f"epochs written before a kill went missing {why}"
        seen = keys
        completed.append(_completed(store))
        assert completed[-1] >= completed[-2], f"completed went backwards: {completed} {why}"
        if epochs_dir.exists():  # a writer killed mid-write leaves a torn temp file behind
            planted = epochs_dir / "part-torn-by-kill.parquet.tmp"
            planted.write_bytes(b"PAR1 half a part file")
    assert rc == 0 and kills == kills_wanted, f"exit {rc} after {kills} kills {why}"
    trials = store.read_trials()
    epochs = store.read_epochs()
    assert len(trials) <= samples and set(trials["status"]) == {"completed"}, why
    assert epochs["trial_id"].nunique() <= samples
    assert _keys(epochs) == _full_keys(trials, epochs_per_trial), why
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    assert seen <= set(_keys(epochs))
    assert _completed(store) >= completed[-1]
    assert not list(Path(tmp_path / "killed").rglob("*.tmp")), why


def test_asha_promote_driver_killed_while_trials_wait_then_resumed(tiny_data_dir, tiny_space,
                                                                   tmp_path):
    # Kill the driver (and its Ray) once 3 trials have reported epoch 1: by then at least two
    # of them wait paused at the rung. --resume brings them back; nothing may be lost or
    # recorded twice, and the search must still end with a trial at max_t. The searcher is
    # tpe-rungs, the one that keeps its own state: Tune restores it from its JSON file.
    # The kill also tears Tune's upload of its last snapshot to ray/, as one that lands in the
    # middle of it does: the experiment state cut short, the search algorithm's files still
    # the first snapshot's (CI saw a resume of such a mix draw 10 trials for 6).
    samples, max_epochs = 6, 9
    start = [sys.executable, "search/run.py",
             *search_args(tiny_data_dir, tiny_space, tmp_path, "waiting", "--num-samples",
                          str(samples), "--max-epochs", str(max_epochs), "--scheduler",
                          "asha-promote", "--searcher", "tpe-rungs", "--seed", "2")]
    store = ExperimentStore(str(tmp_path), "waiting")
    proc = subprocess.Popen(start, cwd=REPO, env=driver_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    before, ray_dir, first = None, tmp_path / "waiting" / "ray", {}
    while proc.poll() is None and time.monotonic() < deadline:
        for path in ray_dir.glob("*state-*.json"):
            if not path.name.startswith("experiment_state") and path.name not in first:
                first[path.name] = path.read_bytes()
        if store.has_ray_state():
            epochs = store.read_epochs()
            if (epochs["epoch"] == 1).sum() >= 3:
                before = epochs
                break
        time.sleep(0.1)
    assert before is not None and proc.poll() is None, "the search ended before the kill"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    for name, data in first.items():
        (ray_dir / name).write_bytes(data)
    torn = max(ray_dir.glob("experiment_state-*.json"))
    torn.write_bytes(torn.read_bytes()[: torn.stat().st_size // 2])
    seen = set(_keys(store.read_epochs()))
    resumed = subprocess.run(_resume_cmd(tmp_path, "waiting"), cwd=REPO, env=driver_env(),
                             capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials, epochs = store.read_trials(), store.read_epochs()
    # A trial started after Tune's last saved state is unknown to the resumed run, which draws
    # another in its place: it ends `abandoned` (test_a_trial_started_after_tunes_last_...).
    live = trials[trials["status"] != "abandoned"]
    assert len(live) == samples and set(live["status"]) <= {"completed", "stopped"}
    assert set(epochs["trial_id"]) == set(trials["trial_id"])  # every trial has its row
    assert seen <= set(_keys(epochs))  # nothing seen before the kill went missing
    assert not epochs.duplicated(["trial_id", "epoch"]).any()
    for row in trials.itertuples():
        mine = epochs[epochs["trial_id"] == row.trial_id]["epoch"].tolist()
        assert mine == list(range(1, row.epochs + 1)), row.trial_id
    assert (trials["epochs"] == max_epochs).any()
    assert not list((tmp_path / "waiting").rglob("*.tmp"))
    # The restored searcher drew no config twice and lost none: it holds exactly the trials'
    # configs and every result they recorded (a result that came after Tune's last experiment
    # checkpoint is reported again: the trial resumes from the checkpoint Tune knows). Each run
    # writes its own state file, named by its start time: the newest is read. Abandoned trials
    # are unknown to the resumed searcher.
    state = json.loads(max((tmp_path / "waiting" / "ray").glob("searcher-state-*.json"))
                       .read_text())
    by_id = live.set_index("trial_id")
    assert set(state["params"]) == set(by_id.index)
    for trial_id, params in state["params"].items():
        assert params == {k: by_id.loc[trial_id, f"params_{k}"] for k in params}, trial_id
    observed = {(tid, int(e)) for e, results in state["seen"].items() for tid in results}
    assert observed == set(_keys(epochs[epochs["trial_id"].isin(by_id.index)]))


def test_a_trial_started_after_tunes_last_saved_state_is_recorded_abandoned(
        tiny_data_dir, tiny_space, tmp_path):
    # Tune saves its experiment state every so often (here only when forced: a trial's second
    # checkpoint). A trial it started since then is unknown to `--resume`, which draws a new
    # config in its place (tpe-rungs names trials at random). The forgotten trial's epochs are
    # in Parquet already; it must end with a terminal row like every other trial.
    folder = tmp_path / "driver-files"
    argv = search_args(tiny_data_dir, tiny_space, tmp_path, "forgot", "--num-samples", "2",
                       "--max-epochs", "2", "--scheduler", "fifo", "--max-concurrent", "1",
                       "--searcher", "tpe-rungs", "--seed", "3")
    proc = subprocess.Popen(driver_cmd(tmp_path, "hold", argv), cwd=REPO,
                            env={**driver_env(), "TUNE_GLOBAL_CHECKPOINT_S": "100000"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    store = ExperimentStore(str(tmp_path), "forgot")
    held, deadline = None, time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline:
        if (folder / "held.json").exists():
            held = json.loads((folder / "held.json").read_text())
            if held["trial_id"] in set(store.read_epochs()["trial_id"]):
                break
        time.sleep(0.3)
    assert proc.poll() is None and held is not None, proc.stderr.read()[-3000:] \
        if proc.poll() is not None else "no trial held before the deadline"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    resumed = subprocess.run(driver_cmd(tmp_path, "go", _resume_cmd(tmp_path, "forgot")[2:]),
                             cwd=REPO, env=driver_env(), capture_output=True, text=True,
                             timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    trials, epochs = store.read_trials(), store.read_epochs()
    assert set(epochs["trial_id"]) == set(trials["trial_id"])  # every trial has its row
    assert len(trials) == 3
    lost = trials.set_index("trial_id").loc[held["trial_id"]]
    assert lost["status"] == "abandoned" and lost["epochs"] == 1, lost.to_dict()
    assert "--resume" in lost["stop_reason"]
    mine = epochs[epochs["trial_id"] == held["trial_id"]].iloc[0]
    assert lost["best_val_accuracy"] == mine["val_accuracy"]
    # Its time is its epoch's: the run that saw it start was killed.
    assert lost["end_time"] == mine["timestamp"] < lost["written_at"]
    assert lost["wall_time_s"] == pytest.approx(mine["epoch_time_s"], abs=1e-3)
    began = mine["timestamp"] - pd.Timedelta(seconds=mine["epoch_time_s"])
    assert abs((lost["start_time"] - began).total_seconds()) < 1e-3
    for key, value in held["config"].items():
        assert lost[f"params_{key}"] == value, key
    others = trials[trials["trial_id"] != held["trial_id"]]
    assert set(others["status"]) == {"completed"} and set(others["epochs"]) == {2}
    assert len(epochs) == 5 and not list((tmp_path / "forgot").rglob("*.tmp"))


@pytest.mark.parametrize("how", ["ctrl-c", "sigterm", "sigterm-all"])
def test_ctrl_c_or_sigterm_records_trials_as_interrupted_then_resume_finishes_them(
        tiny_data_dir, tiny_space, tmp_path, how, sigterm_not_ignored):
    # Ctrl+C sends SIGINT to the whole foreground process group; `kill`, `docker stop` or
    # Kubernetes send SIGTERM to the driver. Tune saves its state and ends the search as it does
    # when the time budget runs out; the rows must say which it was. Slurm (scancel, a time
    # limit), systemd and `timeout` send SIGTERM to every process of the job at once, Ray's
    # included ("sigterm-all"): it ended the driver with exit 1 and no rows, as Ray's processes
    # went and took the driver with them.
    argv = search_args(tiny_data_dir, tiny_space, tmp_path, "ctrl-c", "--num-samples", "3",
                       "--max-epochs", "3", "--scheduler", "fifo", "--seed", "2")
    proc = subprocess.Popen(driver_cmd(tmp_path, "slow", argv), cwd=REPO, env=driver_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    store = ExperimentStore(str(tmp_path), "ctrl-c")
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline and store.read_epochs().empty:
        time.sleep(0.3)
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    search = processes_under(proc.pid)  # Ray's processes, its workers and agents
    assert any("Trainable" in title for title in search.values()), sorted(search.values())
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    elif how == "sigterm":
        os.kill(proc.pid, signal.SIGTERM)
    else:
        for pid in [proc.pid, *search]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert not [title for pid, title in search.items() if alive(pid)]  # all stopped after
    assert f"--resume --name ctrl-c --storage {tmp_path}" in err
    trials, epochs = store.read_trials(), store.read_epochs()
    cut = trials[trials["status"] != "completed"]  # a trial may have finished before the signal
    assert len(cut) and set(cut["status"]) == {"interrupted"}, trials[["trial_id", "status"]]
    assert cut["stop_reason"].str.endswith("; --resume continues it").all()
    assert (cut["epochs"] < 3).all() and "interrupted" in out  # the report's status line
    assert set(epochs["trial_id"]) <= set(trials["trial_id"])
    if how == "sigterm-all":  # what follows is the same as after Ctrl+C
        return
    storage = tmp_path
    if how == "sigterm":  # and the experiment moves before --resume, to another --storage
        storage = tmp_path / "moved"
        storage.mkdir()
        shutil.move(tmp_path / "ctrl-c", storage / "ctrl-c")
        store = ExperimentStore(str(storage), "ctrl-c")
    resumed = subprocess.run(_resume_cmd(storage, "ctrl-c"), cwd=REPO, env=driver_env(),
                             capture_output=True, text=True, timeout=400)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert storage == tmp_path or not (tmp_path / "ctrl-c").exists()  # none where it was
    trials, epochs = store.read_trials(), store.read_epochs()
    assert len(trials) == 3 and set(trials["status"]) == {"completed"}, trials["status"]
    for trial_id, mine in epochs.groupby("trial_id"):
        assert sorted(mine["epoch"]) == [1, 2, 3], trial_id
