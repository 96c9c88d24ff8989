"""Torn writes and bad data files: nothing half-written is read, nothing starts on bad data."""

import base64
import gzip
import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

from fmnist.data import write_idx
from results.store import KEEP_SLICE, ExperimentStore, StoreError
from tests.conftest import REPO, search_args, write_dataset


def _rows(n, trial="t1"):
    now = datetime.now(UTC)
    return [dict(trial_id=trial, epoch=e, attempt=0, timestamp=now, val_accuracy=e / 10)
            for e in range(1, n + 1)]


def test_leftover_tmp_files_are_ignored_then_swept(tmp_path):
    store = ExperimentStore(str(tmp_path), "e")
    store.append_epochs(_rows(3))
    folder = tmp_path / "e" / "epochs"
    # A writer killed mid-write leaves a partial *.tmp; one killed after fsync but before the
    # rename leaves a complete one. Neither is part of the data set until renamed.
    good = next(folder.glob("*.parquet")).read_bytes()
    (folder / "part-killed-mid-write.parquet.tmp").write_bytes(good[: len(good) // 2])
    (folder / "part-killed-before-rename.parquet.tmp").write_bytes(good)
    assert len(store.read_epochs()) == 3
    removed = store.sweep_tmp()
    assert len(removed) == 2 and not list(folder.glob("*.tmp"))
    assert len(store.read_epochs()) == 3


def test_the_kept_tune_snapshot_replaces_a_torn_upload_unless_ray_holds_a_later_one(tmp_path):
    store = ExperimentStore(str(tmp_path), "e")
    ray = tmp_path / "e" / "ray"
    ray.mkdir(parents=True)
    snapshot = {"experiment_state-S1.json": b'{"trial_data": [1, 2, 3]}',
                "search_gen_state-S1.json": bytes(range(256))}  # a pickle, byte for byte
    store.keep_tune_state("S1", snapshot)
    # A kill mid-upload: the experiment state torn, the search state from an older snapshot.
    (ray / "experiment_state-S1.json").write_bytes(b'{"trial_da')
    (ray / "search_gen_state-S1.json").write_bytes(b"older")
    (ray / "searcher-state-S0.json").write_bytes(b"an earlier run's")
    assert store.restore_tune_state() == sorted(snapshot)
    assert {p.name: p.read_bytes() for p in ray.glob("*S1.json")} == snapshot
    assert (ray / "searcher-state-S0.json").read_bytes() == b"an earlier run's"
    # A later snapshot kept replaces this one.
    store.keep_tune_state("S2", {"experiment_state-S2.json": b"{}"})
    assert store.restore_tune_state() == ["experiment_state-S2.json"]
    # ray/ holds a later run's state than the one kept (its keeping failed): left as it is.
    (ray / "experiment_state-S3.json").write_bytes(b"{}")
    (ray / "experiment_state-S2.json").write_bytes(b"torn")
    assert store.restore_tune_state() == []
    assert (ray / "experiment_state-S2.json").read_bytes() == b"torn"
    # None kept, or one that names a file outside ray/: nothing restored.
    store.drop_tune_state()
    assert store.restore_tune_state() == []
    (tmp_path / "e" / "tune-state.json").write_text(
        json.dumps({"session": "S9", "files": {"../experiment.parquet": ""}}))
    assert store.restore_tune_state() == []
    assert not (tmp_path / "e" / "experiment.parquet").exists()


def test_the_kept_snapshot_is_written_in_slices_as_the_json_it_always_was(tmp_path):
    # Written a slice of base64 at a time (not built whole in memory first): a file longer
    # than a slice, of a length that is no multiple of 3, comes back byte for byte, and the
    # kept file is the JSON that building it whole gave, so snapshots kept before still read.
    store = ExperimentStore(str(tmp_path), "e")
    rng = np.random.default_rng(0)
    files = {"experiment_state-S1.json": rng.bytes(2 * KEEP_SLICE + 7),
             "search_gen_state-S1.json": b"", "searcher-state-S1.json": b'{"x": "\\u00e9"}'}
    store.keep_tune_state("S1", files)
    kept = (tmp_path / "e" / "tune-state.json").read_bytes()
    assert kept == json.dumps({"session": "S1", "files": {
        name: base64.b64encode(data).decode("ascii") for name, data in files.items()}}).encode()
    (tmp_path / "e" / "ray").mkdir()
    assert store.restore_tune_state() == sorted(files)
    assert {name: (tmp_path / "e" / "ray" / name).read_bytes() for name in files} == files


def test_the_experiment_state_a_resume_would_hand_tune_is_read_first(tmp_path):
    store = ExperimentStore(str(tmp_path), "e")
    ray = tmp_path / "e" / "ray"
    ray.mkdir(parents=True)
    whole = b'{"runner_data": {}, "trial_data": []}'
    (ray / "experiment_state-S1.json").write_bytes(whole)
    assert store.tune_state_problem() is None
    (ray / "experiment_state-S1.json").write_bytes(whole[:5])  # a kill mid-upload
    assert store.tune_state_problem().startswith(
        "ray/experiment_state-S1.json cannot be read (Unterminated string")
    # The whole copy kept is what --resume hands Tune: nothing to refuse, nothing written.
    store.keep_tune_state("S1", {"experiment_state-S1.json": whole})
    assert store.tune_state_problem() is None
    assert (ray / "experiment_state-S1.json").read_bytes() == whole[:5]
    # Tune reads the newest session's: a later one in ray/ (its keeping failed) counts.
    (ray / "experiment_state-S2.json").write_bytes(b"\xff\xfe")
    assert store.tune_state_problem().startswith(
        "ray/experiment_state-S2.json cannot be read ('utf-8' codec can't decode")
    (ray / "experiment_state-S2.json").write_bytes(b'{"trial_data": []}')
    assert store.tune_state_problem() == (
        "ray/experiment_state-S2.json cannot be read (not a Tune experiment state: no "
        "runner_data and trial_data; a kill while Tune wrote it?), and tune-state.json keeps no "
        "whole copy of it")
    # A kept snapshot later than anything uploaded yet is read from the copy...
    store.keep_tune_state("S3", {"experiment_state-S3.json": b"[]"})
    assert store.tune_state_problem() == (
        "the copy of ray/experiment_state-S3.json kept in tune-state.json is damaged (not a "
        "Tune experiment state: no runner_data and trial_data)")
    # ... one without an experiment state leaves Tune the newest in ray/.
    store.keep_tune_state("S4", {"search_gen_state-S4.json": b"pickle"})
    (ray / "experiment_state-S2.json").write_bytes(whole)
    assert store.tune_state_problem() is None


def test_checkpoint_trial_files_are_read_back_torn_ones_skipped(tmp_path):
    # What the recorder reads for a trial Tune forgot: the trial.json its checkpoints carry.
    ray = tmp_path / "e" / "ray"
    files = {"T_a/checkpoint_000000/trial.json": '{"trial_id": "a", "config": {"units": 8}}',
             "T_a/checkpoint_000001/trial.json": '{"trial_id": "a", "config": {"units": 8}}',
             "T_b/checkpoint_000000/trial.json": '{"trial_id": "b", "conf',  # torn by a kill
             "T_c/checkpoint_000000/trial.json": '["not", "an", "object"]',
             "T_c/checkpoint_000000/state.json": '{"epoch": 1}'}
    for name, text in files.items():
        (ray / name).parent.mkdir(parents=True, exist_ok=True)
        (ray / name).write_text(text)
    found = list(ExperimentStore(str(tmp_path), "e").ray_json("trial.json"))
    assert found == [{"trial_id": "a", "config": {"units": 8}}] * 2


def at_once(target, n: int, *args) -> list[str]:
    """Run `target(barrier, queue, *args)` in `n` fresh processes that wait for each other at
    the barrier, then act at the same moment; what they put on the queue, sorted."""
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")  # no fork of pytest's threads; no TensorFlow
    barrier, queue = ctx.Barrier(n), ctx.Queue()
    procs = [ctx.Process(target=target, args=(barrier, queue, *args)) for _ in range(n)]
    for proc in procs:
        proc.start()
    got = sorted(queue.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=60)
    return got


def _claim_after(barrier, queue, root):
    barrier.wait()
    queue.put(ExperimentStore(root, "e").claim_final_folder()[0])


def test_final_evaluations_started_at_once_claim_different_folders(tmp_path):
    got = at_once(_claim_after, 6, str(tmp_path))
    assert got == sorted(["final", *(f"final-{n}" for n in range(2, 7))])
    store = ExperimentStore(str(tmp_path), "e")
    name, passed = store.claim_final_folder()  # each claim names its process
    assert name == "final-7" and len(passed) == 6
    assert passed[0].startswith("final/ is claimed by another evaluation (process ")
    # one that ends before it tests a model frees its folder; a finished one keeps it
    store.release_final_folder("final-3")
    assert not (tmp_path / "e" / "final-3").exists()
    (tmp_path / "e" / "final-2" / "final.parquet").write_bytes(b"")
    store.release_final_folder("final-2")
    assert not (tmp_path / "e" / "final-2" / ".claim.json").exists()
    name, passed = store.claim_final_folder()
    assert name == "final-3" and passed[1] == "final-2/ holds an earlier evaluation"


def test_a_final_that_stops_before_testing_frees_its_folder_one_after_keeps_it(tmp_path):
    from results.final import FinalWriteError, claimed

    store = ExperimentStore(str(tmp_path), "e")
    with pytest.raises(KeyboardInterrupt), claimed(store) as claim:
        raise KeyboardInterrupt  # Ctrl+C while retraining
    assert claim.folder == "final" and not (tmp_path / "e" / "final").exists()
    with pytest.raises(RuntimeError), claimed(store) as claim:
        claim.tested = True
        raise RuntimeError("the disk filled up while writing the report")
    assert (tmp_path / "e" / "final" / ".claim.json").is_file()  # it looked at the test set
    with claimed(store) as claim:
        assert claim.folder == "final-2" and "final/ is claimed" in claim.passed[0]
    assert not (tmp_path / "e" / "final-2").exists()  # released (a real one has files there)
    with pytest.raises(FinalWriteError, match=r"^cannot write the evaluation to .*final-2 "
                       r"\(No space left on device\); the test set was looked at"), \
            claimed(store) as claim:
        claim.tested = True
        with open("/dev/full", "w") as full:  # a device that is always full
            full.write("x")
            full.flush()
    assert (tmp_path / "e" / "final-2" / ".claim.json").is_file()


def test_results_on_a_full_disk_is_one_error_line_exit_1(tmp_path):
    from results.synthetic import write_synthetic

    write_synthetic(str(tmp_path), "e", trials=3, max_epochs=2, seed=0, searcher="random")
    out = subprocess.run([sys.executable, "-m", "results", "leaderboard", str(tmp_path / "e"),
                          "--out", "/dev/full"], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 1 and out.stderr == "error: No space left on device\n", out.stderr


@pytest.mark.parametrize("damage", ["zero-byte", "truncated"])
def test_damaged_part_is_reported_and_moved_aside(tmp_path, damage):
    store = ExperimentStore(str(tmp_path), "e")
    store.append_epochs(_rows(2, "a"))
    store.append_epochs(_rows(3, "b"))
    folder = tmp_path / "e" / "epochs"
    victim = sorted(folder.glob("*.parquet"))[0]
    data = victim.read_bytes()
    victim.write_bytes(b"" if damage == "zero-byte" else data[:-20])
    view = store.read_epochs()
    assert len(store.corrupt_epochs) == 1 and victim.name in store.corrupt_epochs[0]
    assert not victim.exists()
    assert (tmp_path / "e" / "_corrupt" / "epochs" / victim.name).exists()
    assert len(view) in (2, 3) and view["trial_id"].nunique() == 1  # the other part reads
    assert store.read_epochs().equals(view)  # and keeps reading the same afterwards


def _corrupt_magic(folder):
    path = folder / "train-images-idx3-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(b"\x00\x00\x07\x03" + raw[4:]))


def _truncate_gzip(folder):
    path = folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-40])


def _count_mismatch(folder):
    write_idx(folder / "train-labels-idx1-ubyte.gz", np.zeros(599, np.uint8))


@pytest.mark.parametrize(
    "damage,extra,match",
    [(_truncate_gzip, [], "corrupt or truncated gzip"),
     (_corrupt_magic, [], "wrong magic number"),
     (_count_mismatch, [], "count mismatch"),
     (lambda folder: None, ["--verify-data"], "fingerprint mismatch")],
)
def test_bad_data_stops_the_search_before_ray(tmp_path, tiny_space, damage, extra, match):
    data = write_dataset(tmp_path / "data", 600, 200)
    damage(data)
    argv = search_args(data, tiny_space, tmp_path / "runs", "bad-data", *extra)
    code = ("import sys; from search import run\n"
            "rc = run.main(sys.argv[1:])\n"
            "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY'); sys.exit(rc)\n")
    out = subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    line = out.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and match in line
    assert str(data) in line  # names the file or folder
    assert "NO_RAY" in out.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("good", ["runs", "/tmp/runs", "~/runs", "a..b/runs", "s3://bucket/runs",
                                  "gs://bucket", "file:///tmp/runs", "./runs/"])
def test_plain_storage_values_are_accepted(good):
    from search.run import check_storage

    check_storage(good)  # raises UsageError on refusal


@pytest.mark.parametrize("bad", ["..", "runs/..", "../runs", "runs/../../etc", "s3://b/../x",
                                 "ftp://host/runs", "runs\\..\\x", "", "runs\n"])
def test_escaping_storage_values_are_refused(bad):
    from search.run import UsageError, check_storage

    with pytest.raises(UsageError, match="--storage"):
        check_storage(bad)


def test_rows_a_write_fails_on_are_kept_then_written_or_set_aside_and_taken_back(
        tmp_path, monkeypatch, capsys):
    # A full disk or a bucket that stops answering: here a folder replaced by a file, so every
    # write into it fails with a real OSError, as a full disk's would.
    import tempfile
    from types import SimpleNamespace

    from search.recorder import ParquetRecorder
    from search.run import report

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where rows are set aside
    store = ExperimentStore(str(tmp_path / "runs"), "e")
    store.write_experiment({"name": "e", "created_at": datetime.now(UTC)})
    recorder = ParquetRecorder(store, {"model": "mlp", "epochs": 2}, "asha", 1.0, 0.0,
                               flush_every_s=0, progress_every_s=0)
    recorder.setup()
    trial = SimpleNamespace(trial_id="t1", config={"units": 8}, num_failures=0)
    folder = tmp_path / "runs" / "e"

    def broken(broken: bool) -> None:
        for name in ("epochs", "trials"):
            path = folder / name
            if path.is_dir():
                for part in path.iterdir():
                    part.rename(tmp_path / f"{name}-{part.name}")
                path.rmdir()
            elif path.exists():
                path.unlink()
            if broken:
                path.write_text("a file where a folder should be")
            else:
                path.mkdir()
                for part in tmp_path.glob(f"{name}-part-*"):
                    part.rename(path / part.name[len(name) + 1:])

    broken(True)
    recorder.on_trial_result(0, [trial], trial, {"epoch": 1, "val_accuracy": 0.5})
    err = capsys.readouterr().err
    assert err.startswith(f"warning: cannot write results to {folder} (") and "1 epoch" in err
    broken(False)  # the next flush writes what the failed one kept
    recorder.on_trial_result(0, [trial], trial, {"epoch": 2, "val_accuracy": 0.6})
    assert capsys.readouterr().err == f"results written to {folder} again\n"
    assert store.read_epochs()["epoch"].tolist() == [1, 2]

    broken(True)  # and at the end nothing can be written: the rows go aside on this machine
    recorder.on_trial_complete(0, [trial], trial)
    recorder.on_experiment_end([trial])
    aside = store.unwritten(store.read_experiment()["created_at"])
    assert str(tmp_path / "tmp" / "fmnist-unwritten") in aside.uri()
    assert aside.read_trials()["status"].tolist() == ["completed"]
    broken(False)
    assert store.read_trials().empty
    assert report(store, 1.0) == 1  # the table has the trial; the error line says where it is
    out, err = capsys.readouterr()
    assert "Top 1 of 1 trials" in out and "status: completed 1" in out and "next:" not in out
    assert f"error: 0 epoch and 1 trial row(s) could not be written to {folder} and are in " \
           f"{aside.uri()}" in err and "--resume takes them back" in err

    ParquetRecorder(store, {"model": "mlp", "epochs": 2}, "asha", 1.0, 0.0).setup()  # --resume
    assert "took back 1 part file(s)" in capsys.readouterr().err
    assert store.read_trials()["status"].tolist() == ["completed"]
    assert not aside.folder_exists() and report(store, 1.0) == 0


def _experiment_after(barrier, queue, root, default_name):
    from search.run import UsageError, claim_experiment_folder

    barrier.wait()
    try:
        queue.put(claim_experiment_folder(ExperimentStore(root, "cnn-20261124-113200"),
                                          default_name).name)
    except UsageError as exc:
        queue.put(f"refused: {exc}")


@pytest.mark.parametrize("default_name", [True, False])
def test_searches_started_at_once_with_one_name_get_their_own_folders(tmp_path, default_name):
    # a loop launching one search per seed starts them within the same second, and the
    # default name has a resolution of one second
    got = at_once(_experiment_after, 4, str(tmp_path / "runs"), default_name)
    base = "cnn-20261124-113200"
    if default_name:  # each gets a folder of its own
        assert got == sorted([base, f"{base}-2", f"{base}-3", f"{base}-4"])
        assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == got
    else:  # a name the user gave is one experiment's: the others are refused
        assert got[0] == base and all(g.startswith(f"refused: experiment '{base}' was created "
                                                   "under ") for g in got[1:]), got


def test_a_search_lock_counts_only_while_its_process_lives(tmp_path):
    import json
    import os
    import socket

    store = ExperimentStore(str(tmp_path), "e")
    (tmp_path / "e").mkdir()
    lock = tmp_path / "e" / ".search.json"
    store.lock_search()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert store.search_holder() is None  # this process's own lock stops no one here
    store.unlock_search()
    assert not lock.exists()
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a search killed on this machine: its lock is taken over
    lock.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "since": "x"}))
    assert store.search_holder() is None
    other = subprocess.Popen(["sleep", "60"])  # not Python: it took a killed search's number
    try:
        deadline = time.monotonic() + 10  # until it runs sleep: before, it is this Python
        while not Path(f"/proc/{other.pid}/cmdline").read_bytes().startswith(b"sleep") \
                and time.monotonic() < deadline:
            time.sleep(0.01)
        lock.write_text(json.dumps({"pid": other.pid, "host": socket.gethostname(),
                                    "since": "x"}))
        assert store.search_holder() is None
    finally:
        other.kill()
        other.wait()
    store.lock_search()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    # another machine's cannot be checked from here: it counts, and says how to clear it
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere", "since": "10:00"}))
    assert store.search_holder() == (f"process 1 on elsewhere, since 10:00; if no search of "
                                     f"it runs there, delete {lock}")
    with pytest.raises(StoreError, match="is being searched now by process 1 on elsewhere"):
        store.lock_search()
    store.unlock_search()  # not this process's: left alone
    assert lock.exists()
    # Two takers of a stale lock: this one looked while it was stale, the other took it over
    # since. Moving the other's live lock away, it sees so, puts it back and stands aside.
    held = lock.read_text()
    looked = store.search_holder
    store.search_holder = lambda: None
    try:
        with pytest.raises(StoreError, match="is being searched now by process 1 on elsewhere"):
            store.lock_search()
    finally:
        store.search_holder = looked
    assert lock.read_text() == held and not list(lock.parent.glob("*.stale-*"))
    # A lock being written (empty, fresh) is its maker's; one left empty by a kill is no one's
    lock.write_text("")
    assert store.search_holder() == "a search starting now (its lock is being written)"
    os.utime(lock, (time.time() - 10, time.time() - 10))
    assert store.search_holder() is None
    store.lock_search()
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    store.unlock_search()
