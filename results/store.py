"""The Parquet layout of an experiment (DESIGN.md): atomic writes, canonical reads. No Ray.

    <root>/<experiment>/experiment.parquet   one row
    <root>/<experiment>/trials/part-*.parquet one row per finished trial (latest row wins)
    <root>/<experiment>/epochs/part-*.parquet one row per trial, epoch and attempt
    <root>/<experiment>/tune-state.json       Ray Tune's last snapshot, whole (TUNE_STATE_FILE)

`root` is a local folder or any URI pyarrow's filesystems accept (s3://, gs://, file://).
Every part file is written as `*.tmp`, synced, then renamed; readers ignore anything else.
Results arrive at least once; the canonical views keep one row per key.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

EXPERIMENT_FILE = "experiment.parquet"
TRIALS_DIR = "trials"
EPOCHS_DIR = "epochs"
FINAL_DIR = "final"
CLAIM_FILE = ".claim.json"  # in a final folder while its evaluation runs
SEARCH_LOCK = ".search.json"  # in an experiment folder while a search writes it
RAY_DIR = "ray"
# Ray Tune's last experiment snapshot (its state files for one session), kept whole. Tune
# uploads those files to ray/ one by one; a driver killed mid-upload leaves a mix of two
# snapshots there (trials from the new one, the searcher's count from the old one), and a
# --resume of that mix draws more trials than --num-samples. The files inside are Tune's own,
# as Tune wrote them (some are its pickles), and go back to ray/ only for Tune to read. Not in
# ray/ itself: Tune copies ray/ to the driver at --resume and back up at every snapshot, which
# would put the copy it took over each newer one.
TUNE_STATE_FILE = "tune-state.json"
KEEP_SLICE = 3 << 20  # bytes base64-encoded at a time; a multiple of 3, so slices join
TMP_SUFFIX = ".tmp"
QUARANTINE_DIR = "_corrupt"

EPOCH_SCHEMA = pa.schema([
    ("trial_id", pa.string()),
    ("epoch", pa.int64()),
    ("attempt", pa.int64()),
    ("timestamp", pa.timestamp("us", tz="UTC")),
    ("loss", pa.float64()),
    ("accuracy", pa.float64()),
    ("val_loss", pa.float64()),
    ("val_accuracy", pa.float64()),
    ("lr", pa.float64()),
    ("epoch_time_s", pa.float64()),
    ("train_time_s", pa.float64()),
    ("samples_per_s", pa.float64()),
    ("node", pa.string()),
    ("node_ip", pa.string()),
    ("gpu_ids", pa.string()),
    ("data_sha256", pa.string()),  # digest of the train+validation arrays the trial received
    ("precision", pa.string()),  # the Keras dtype policy the epoch trained with
])

TRIAL_COLUMNS = [
    ("trial_id", pa.string()),
    ("family", pa.string()),
    ("status", pa.string()),  # completed, stopped, error, budget, interrupted, abandoned
    ("stop_reason", pa.string()),
    ("epochs", pa.int64()),
    ("best_val_accuracy", pa.float64()),
    ("best_epoch", pa.int64()),
    ("last_val_accuracy", pa.float64()),
    ("start_time", pa.timestamp("us", tz="UTC")),
    ("end_time", pa.timestamp("us", tz="UTC")),
    ("wall_time_s", pa.float64()),
    ("train_time_s", pa.float64()),
    ("cpus", pa.float64()),
    ("gpus", pa.float64()),
    ("node", pa.string()),
    ("gpu_ids", pa.string()),
    ("data_sha256", pa.string()),
    ("precision", pa.string()),
    ("failures", pa.int64()),
    ("error", pa.string()),
    ("written_at", pa.timestamp("us", tz="UTC")),
]
PARAM_PREFIX = "params_"


class StoreError(ValueError):
    """A results folder is missing, not an experiment, or unreadable."""


def open_root(uri: str) -> tuple[pafs.FileSystem, str]:
    """A pyarrow filesystem and path for a local folder or a URI."""
    if "://" in uri:
        try:
            return pafs.FileSystem.from_uri(uri)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise StoreError(f"cannot open storage {uri!r}: {exc}") from None
    return pafs.LocalFileSystem(), str(Path(uri).expanduser().resolve())


PROBE_S = 10.0  # how long a first look at a gs:// root retries before it gives up


def probe_uri(uri: str, seconds: float | None = None) -> None:
    """Look a storage URI up once; StoreError with the first line of the reason if it fails.

    Google Cloud Storage retries for many minutes by default, so a machine without access
    (no network, no credentials) would hang; here its retries are cut to `seconds`. Other
    filesystems fail on their own within seconds.
    """
    seconds = PROBE_S if seconds is None else seconds
    fs, path = open_root(uri)
    if isinstance(fs, pafs.GcsFileSystem):
        sep = "&" if "?" in uri else "?"
        fs, path = pafs.FileSystem.from_uri(f"{uri}{sep}retry_limit_seconds={seconds:g}")
    try:
        fs.get_file_info(path)
    except OSError as exc:
        first = next((line for line in str(exc).splitlines() if line.strip()), repr(exc))
        raise StoreError(f"cannot reach {uri} ({first.strip()[:300]})") from None


def _alive(pid: int) -> bool:
    """Whether process `pid` on this machine runs a Python program (a zombie, killed but not
    yet reaped, does not; nor does another program that took the number of a killed one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        return True
    try:
        if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
            return False
        # a process that is not Python took the number of a search that was killed
        return b"python" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, IndexError):  # no /proc here: it exists
        return True


def _owner_note() -> str:
    """What a claim or lock file says: this process, this machine, since when."""
    return json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")})


def _lock_holder(path: Path, name: str | None = None) -> str | None:
    """Who holds the search lock at `path` (named `name` in the message, else its own path):
    a live process, or None. A lock left by a process gone from this machine is no one's; one
    from another machine cannot be checked from here, so it counts. A lock still being written
    (empty, at most 5 s old) counts as its maker's; one torn by a kill is no one's."""
    try:
        text = path.read_text()
        age = time.time() - path.stat().st_mtime
    except OSError:
        return None
    try:
        who = json.loads(text)
        pid, host = int(who["pid"]), str(who["host"])
        owner = _owner_text(who)
    except (ValueError, KeyError, TypeError):
        return "a search starting now (its lock is being written)" if not text and age < 5 \
            else None
    if host == socket.gethostname() and (pid == os.getpid() or not _alive(pid)):
        return None
    where = path.with_name(name) if name else path
    return f"{owner}; if no search of it runs there, delete {where}"


def _owner_text(who: dict[str, Any]) -> str:
    return f"process {who['pid']} on {who['host']}, since {who['since']}"


def _create_owned(path: str) -> bool:
    """Create `path` exclusively with `_owner_note` in it; False if it exists. A note that
    cannot be written (a full disk) leaves no file that nobody holds."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w") as f:
            f.write(_owner_note())
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(path)
        raise
    return True


def os_reason(exc: OSError) -> str:
    """An OSError in a few words: its strerror, else the first line of its message."""
    lines = str(exc).strip().splitlines()
    return exc.strerror or (lines[0][:300] if lines else repr(exc))


def _join(*parts: str) -> str:
    return "/".join(p.rstrip("/") for p in parts if p)


def _is_local(fs: pafs.FileSystem) -> bool:
    return isinstance(fs, pafs.LocalFileSystem)


class ExperimentStore:
    """Reads and writes one experiment folder."""

    def __init__(self, root: str, name: str):
        self.root_uri = root
        self.name = name
        self.fs, root_path = open_root(root)
        self.path = _join(root_path, name)

    # ------------------------------------------------------------------ paths

    def uri(self, *parts: str) -> str:
        """Path (or URI) of something inside the experiment, for other tools (e.g. Ray)."""
        if "://" in self.root_uri:
            return _join(self.root_uri, self.name, *parts)
        return _join(self.path, *parts)

    def exists(self) -> bool:
        return self.fs.get_file_info(_join(self.path, EXPERIMENT_FILE)).type == pafs.FileType.File

    def has_ray_state(self) -> bool:
        """True once Ray Tune has snapshotted its experiment state (needed to resume)."""
        return bool(self._ray_sessions())

    def folder_exists(self) -> bool:
        return self.fs.get_file_info(self.path).type != pafs.FileType.NotFound

    # ------------------------------------------------------------------ writing

    def _write_atomic(self, table: pa.Table, path: str) -> None:
        self._write_whole(path, lambda f: pq.write_table(table, f))

    def _write_whole(self, path: str, write: Any) -> None:
        """`write(file)` into `path + TMP_SUFFIX`, synced, then renamed to `path`."""
        parent = path.rsplit("/", 1)[0]
        self.fs.create_dir(parent, recursive=True)
        tmp = path + TMP_SUFFIX
        if _is_local(self.fs):
            try:
                with open(tmp, "wb") as f:
                    write(f)
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, path)
            except BaseException:  # a full disk: leave no partial file behind to take space
                with contextlib.suppress(OSError):
                    os.remove(tmp)
                raise
            dir_fd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # make the rename itself durable
            finally:
                os.close(dir_fd)
        else:  # object stores: an upload becomes visible whole, the move is best effort
            with self.fs.open_output_stream(tmp) as f:
                write(f)
            self.fs.move(tmp, path)

    def write_table(self, table: pa.Table, relative: str) -> None:
        """Write one named Parquet file inside the experiment (e.g. `final/final.parquet`)."""
        self._write_atomic(table, _join(self.path, relative))

    @property
    def is_local(self) -> bool:
        """True when the experiment is a folder on this machine (not in a bucket)."""
        return _is_local(self.fs)

    def put_file(self, local: str | os.PathLike, relative: str) -> None:
        """Copy a file of this machine into the experiment (for a bucket: one upload)."""
        path = _join(self.path, relative)
        self.fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
        with open(local, "rb") as src, self.fs.open_output_stream(path) as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)

    def keep_tune_state(self, session: str, files: Mapping[str, bytes]) -> None:
        """Write Ray Tune's snapshot of one session (file name -> bytes) as TUNE_STATE_FILE,
        whole; it replaces the one kept before.

        The file is JSON, {"session": ..., "files": {name: base64}}, written a slice of base64
        at a time: Tune's experiment state is about 23 KB a trial here, and building the whole
        text first held four more copies of it (at 5,000 trials, 112 MB: 1.1-1.3 s and a
        661 MB peak in a process holding the state, against 0.5 s and 225 MB)."""

        def write(f: Any) -> None:
            f.write(f'{{"session": {json.dumps(session)}, "files": {{'.encode())
            for i, (name, data) in enumerate(files.items()):
                f.write(f'{", " if i else ""}{json.dumps(name)}: "'.encode())
                view = memoryview(data)
                for start in range(0, len(view), KEEP_SLICE):  # base64 has nothing to escape
                    f.write(base64.b64encode(view[start:start + KEEP_SLICE]))
                f.write(b'"')
            f.write(b"}}")

        self._write_whole(_join(self.path, TUNE_STATE_FILE), write)

    def drop_tune_state(self) -> None:
        """Remove the kept snapshot (one that could not be replaced must not be restored)."""
        with contextlib.suppress(OSError):
            self.fs.delete_file(_join(self.path, TUNE_STATE_FILE))

    def _kept_tune_state(self) -> tuple[str, dict[str, bytes]] | None:
        """The kept snapshot (session, file name -> bytes); None when none is kept, when it
        cannot be read, or when it names a file Tune does not write in ray/."""
        try:
            with self.fs.open_input_stream(_join(self.path, TUNE_STATE_FILE)) as f:
                kept = json.loads(f.read().decode("utf-8"))
            session = str(kept["session"])
            files = {str(name): base64.b64decode(data, validate=True)
                     for name, data in kept["files"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None
        if any(not name or name.startswith(".") or "/" in name or "\\" in name
               for name in files):
            return None
        return session, files

    def _ray_sessions(self) -> list[str]:
        """The sessions whose experiment state is in ray/ (Tune reads the newest)."""
        selector = pafs.FileSelector(_join(self.path, RAY_DIR), allow_not_found=True)
        return [i.base_name[len("experiment_state-"):-len(".json")]
                for i in self.fs.get_file_info(selector)
                if i.base_name.startswith("experiment_state-") and i.base_name.endswith(".json")]

    def _restorable_tune_state(self, sessions: list[str]) -> tuple[str, dict[str, bytes]] | None:
        """The kept snapshot, unless ray/ holds a later session's experiment state than it
        (`sessions`: `_ray_sessions()`)."""
        kept = self._kept_tune_state()
        if kept is None:
            return None
        return None if sessions and max(sessions) > kept[0] else kept

    def restore_tune_state(self) -> list[str]:
        """Put the kept snapshot's files back in ray/ over what Tune's upload left there, and
        return their names; nothing when none is kept, when it cannot be read, or when ray/
        holds a later session's experiment state (a snapshot that was not kept)."""
        kept = self._restorable_tune_state(self._ray_sessions())
        if kept is None:
            return []
        for name, data in kept[1].items():
            self._write_whole(_join(self.path, RAY_DIR, name), lambda f, d=data: f.write(d))
        return sorted(kept[1])

    def tune_state_problem(self) -> str | None:
        """Why Ray Tune could not read the experiment state a --resume hands it, or None.

        That is the newest `experiment_state-*.json` in ray/ once `restore_tune_state` has run
        (the kept snapshot's where it is put back). Tune's reaction to one it cannot read is to
        start the experiment again from nothing, in the same folder and under the same trial
        ids as the trials on record, so --resume asks first. Only read: nothing is written."""
        sessions = self._ray_sessions()
        kept = self._restorable_tune_state(sessions) or ("", {})
        named = {f"experiment_state-{s}.json": "ray" for s in sessions}
        named.update((name, "kept") for name in kept[1] if name.startswith("experiment_state-")
                     and name.endswith(".json"))
        if not named:
            return None  # nothing to read: has_ray_state says so first
        name = max(named)
        try:
            if named[name] == "kept":
                data = kept[1][name]
            else:
                with self.fs.open_input_stream(_join(self.path, RAY_DIR, name)) as f:
                    data = f.read()
            state = json.loads(data.decode("utf-8"))
            if not isinstance(state, dict) or not {"runner_data", "trial_data"} <= state.keys():
                raise ValueError("not a Tune experiment state: no runner_data and trial_data")
        except (OSError, ValueError) as exc:  # ValueError: JSON and UTF-8 errors too
            if named[name] == "kept":
                return f"the copy of {RAY_DIR}/{name} kept in {TUNE_STATE_FILE} is damaged ({exc})"
            return (f"{RAY_DIR}/{name} cannot be read ({exc}; a kill while Tune wrote it?), "
                    f"and {TUNE_STATE_FILE} keeps no whole copy of it")
        return None

    def unwritten(self, created_at: datetime) -> ExperimentStore:
        """Where the search puts rows it could not write here (a full disk, a bucket that
        stopped answering): an experiment-shaped folder in this machine's temporary folder,
        one per experiment (its URI and `created_at`), whose part files `adopt_parts` (or a
        copy) brings back."""
        key = f"{self.uri()}|{round(created_at.timestamp() * 1e6)}"
        tag = hashlib.sha256(key.encode()).hexdigest()[:12]
        return ExperimentStore(str(Path(tempfile.gettempdir()) / "fmnist-unwritten"),
                               f"{self.name}-{tag}")

    def adopt_parts(self, other: ExperimentStore) -> int:
        """Move `other`'s epoch and trial part files in (epochs first, each written atomically
        under its own name, then removed from `other`); the number moved."""
        moved = 0
        for folder in (EPOCHS_DIR, TRIALS_DIR):
            for info in other._parts(folder):
                with other.fs.open_input_file(info.path) as f:
                    table = pq.read_table(f)
                self._write_atomic(table, _join(self.path, folder, info.base_name))
                other.fs.delete_file(info.path)
                moved += 1
        return moved

    def search_holder(self) -> str | None:
        """Who is searching this experiment now (a live process that holds SEARCH_LOCK), or
        None. A lock left by a search killed on this machine (its process gone) is no one's;
        one from another machine cannot be checked from here, so it counts. Buckets: None
        (no lock is kept there)."""
        if not _is_local(self.fs):
            return None
        return _lock_holder(Path(self.path, SEARCH_LOCK))

    def lock_search(self) -> None:
        """Hold SEARCH_LOCK for this process (created exclusively), taking over one nobody
        holds (`search_holder`); StoreError when a live search holds it."""
        if not _is_local(self.fs):
            return
        path = str(Path(self.path, SEARCH_LOCK))
        for _ in range(5):
            if _create_owned(path):
                return
            if holder := self.search_holder():
                raise StoreError(f"{self.uri()} is being searched now by {holder}")
            moved = f"{path}.stale-{os.getpid()}"
            try:  # only one taker can move it
                os.rename(path, moved)
            except FileNotFoundError:
                continue
            if holder := _lock_holder(Path(moved), SEARCH_LOCK):
                # Not the lock looked at: another taker's, made since. Put it back (unless a
                # third made one meanwhile) and stand aside.
                with contextlib.suppress(OSError):
                    os.link(moved, path)
                os.remove(moved)
                raise StoreError(f"{self.uri()} is being searched now by {holder}")
            os.remove(moved)
        raise StoreError(f"{self.uri()}: could not take {SEARCH_LOCK} (others keep taking it)")

    def unlock_search(self) -> None:
        """Give SEARCH_LOCK back, if this process holds it."""
        if not _is_local(self.fs):
            return
        path = Path(self.path, SEARCH_LOCK)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            if int(json.loads(path.read_text())["pid"]) == os.getpid():
                path.unlink()

    def claim_final_folder(self) -> tuple[str, list[str]]:
        """Claim the folder for a new final evaluation: `final`, or `final-2`, `final-3`, ...
        past every one that holds results (each one read the test set: none is overwritten) or
        is claimed by another evaluation. Returns the folder and why each earlier one was
        passed over.

        The claim is a file in the folder (CLAIM_FILE) naming the process; `release_final_folder`
        removes it. On a local disk it is created exclusively, so two evaluations started at
        once get different folders. A bucket has no exclusive create: there the claim is looked
        up, then written.
        """
        passed, n = [], 1
        while True:
            name = FINAL_DIR if n == 1 else f"{FINAL_DIR}-{n}"
            folder = _join(self.path, name)
            if self.fs.get_file_info(_join(folder, "final.parquet")).type != pafs.FileType.NotFound:
                passed.append(f"{name}/ holds an earlier evaluation")
            elif (holder := self._claim(folder)) is None:
                return name, passed
            else:
                passed.append(f"{name}/ is claimed by another evaluation ({holder}): one still "
                              "running, or one that stopped after it had tested a model")
            n += 1

    def _claim(self, folder: str) -> str | None:
        """Claim `folder`: None when this process now holds it, else who holds it."""
        path = _join(folder, CLAIM_FILE)
        self.fs.create_dir(folder, recursive=True)
        if _is_local(self.fs):
            if _create_owned(path):
                return None
        elif self.fs.get_file_info(path).type == pafs.FileType.NotFound:
            with self.fs.open_output_stream(path) as f:
                f.write(_owner_note().encode())
            return None
        try:
            with self.fs.open_input_stream(path) as f:
                return _owner_text(json.loads(f.read().decode()))
        except (OSError, ValueError, KeyError, TypeError):
            return "unknown process"

    def release_final_folder(self, name: str) -> None:
        """Drop this process's claim on `name`: its evaluation finished (its final.parquet
        marks the folder from now on) or ended before it tested a model (the folder is free
        again, and removed when nothing else is in it)."""
        folder = _join(self.path, name)
        with contextlib.suppress(OSError):  # FileNotFoundError included
            self.fs.delete_file(_join(folder, CLAIM_FILE))
        if _is_local(self.fs):
            with contextlib.suppress(OSError):  # only an empty folder goes
                os.rmdir(folder)

    def _part_path(self, folder: str) -> str:
        name = f"part-{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.parquet"
        return _join(self.path, folder, name)

    def write_experiment(self, row: Mapping[str, Any]) -> None:
        """Write the one-row experiment table (settings as JSON strings where nested)."""
        flat = {k: (json.dumps(v, sort_keys=True, default=str) if isinstance(v, dict | list)
                    else v) for k, v in row.items()}
        self._write_atomic(pa.Table.from_pylist([flat]), _join(self.path, EXPERIMENT_FILE))

    def append_epochs(self, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = list(rows)
        if rows:
            table = pa.Table.from_pylist([{f.name: r.get(f.name) for f in EPOCH_SCHEMA}
                                          for r in rows], schema=EPOCH_SCHEMA)
            self._write_atomic(table, self._part_path(EPOCHS_DIR))

    def append_trials(self, rows: Iterable[Mapping[str, Any]]) -> None:
        rows = list(rows)
        if not rows:
            return
        fixed = pa.schema(TRIAL_COLUMNS)
        param_names = sorted({k for r in rows for k in r if k.startswith(PARAM_PREFIX)})
        fields = list(fixed)
        for name in param_names:
            values = [r.get(name) for r in rows]
            fields.append(pa.field(name, _param_type(values)))
        schema = pa.schema(fields)
        table = pa.Table.from_pylist(
            [{f.name: _param_value(r.get(f.name), f.type) for f in schema} for r in rows],
            schema=schema)
        self._write_atomic(table, self._part_path(TRIALS_DIR))

    def sweep_tmp(self) -> list[str]:
        """Remove `*.tmp` files left by a writer that died mid-write; return what was removed."""
        removed = []
        for info in self._list(""):
            if info.base_name.endswith(TMP_SUFFIX):
                self.fs.delete_file(info.path)
                removed.append(info.path)
        return removed

    # ------------------------------------------------------------------ reading

    def _ray_texts(self, base_name: str) -> Iterator[str]:
        for info in self._list(RAY_DIR):
            if info.base_name == base_name:
                with self.fs.open_input_stream(info.path) as f:
                    yield f.read().decode("utf-8", errors="replace")

    def ray_json(self, base_name: str) -> Iterator[dict[str, Any]]:
        """Every readable JSON object in a file named `base_name` under `ray/` (any depth)."""
        for text in self._ray_texts(base_name):
            try:
                value = json.loads(text)
            except ValueError:
                continue  # torn by a kill mid-write
            if isinstance(value, dict):
                yield value

    def ray_results(self) -> Iterator[tuple[str, int, dict[str, Any]]]:
        """(trial_id, epoch, result) from Ray Tune's own per-trial `result.json` logs."""
        for text in self._ray_texts("result.json"):
            for line in text.splitlines():
                try:
                    result = json.loads(line)
                    yield result["trial_id"], int(result["epoch"]), result
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line, or a result without an epoch

    def _list(self, folder: str) -> list[pafs.FileInfo]:
        selector = pafs.FileSelector(_join(self.path, folder), allow_not_found=True,
                                     recursive=True)
        return [i for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]

    def _parts(self, folder: str) -> list[pafs.FileInfo]:
        return sorted((i for i in self._list(folder) if i.base_name.endswith(".parquet")
                       and QUARANTINE_DIR not in i.path), key=lambda i: i.path)

    def _read_parts(self, folder: str) -> tuple[pd.DataFrame | None, list[str]]:
        """Read every part; unreadable ones (torn, zero-byte) are moved aside and reported."""
        tables, bad = [], []
        for info in self._parts(folder):
            try:
                with self.fs.open_input_file(info.path) as f:
                    tables.append(pq.read_table(f))
            except (pa.ArrowInvalid, OSError) as exc:
                bad.append(f"{info.path}: {exc}")
                aside = _join(self.path, QUARANTINE_DIR, folder, info.base_name)
                self.fs.create_dir(aside.rsplit("/", 1)[0], recursive=True)
                self.fs.move(info.path, aside)
        if not tables:
            return None, bad
        try:  # one conversion to pandas is much faster than one per part
            return pa.concat_tables(tables, promote_options="permissive").to_pandas(), bad
        except (pa.ArrowInvalid, pa.ArrowTypeError):  # e.g. a param stored as int, then text
            return pd.concat([t.to_pandas() for t in tables], ignore_index=True), bad

    def read_experiment(self) -> dict[str, Any]:
        if not self.exists():
            if not self.folder_exists():
                raise StoreError(f"{self.uri()} does not exist")
            raise StoreError(f"{self.uri()} is not an experiment (no {EXPERIMENT_FILE})")
        try:
            with self.fs.open_input_file(_join(self.path, EXPERIMENT_FILE)) as f:
                return pq.read_table(f).to_pylist()[0]
        except (pa.ArrowInvalid, IndexError) as exc:  # cut short by a full disk or a kill
            raise StoreError(f"{self.uri(EXPERIMENT_FILE)} is damaged ({exc})") from None

    def read_epochs(self, canonical: bool = True) -> pd.DataFrame:
        """Epoch rows; canonical: one per (trial_id, epoch), the latest attempt."""
        df, self.corrupt_epochs = self._read_parts(EPOCHS_DIR)
        if df is None:
            return EPOCH_SCHEMA.empty_table().to_pandas()
        if canonical:
            df = canonical_epochs(df)
        return df

    def read_trials(self) -> pd.DataFrame:
        """Trial rows, one per trial_id (the latest written)."""
        df, self.corrupt_trials = self._read_parts(TRIALS_DIR)
        if df is None:
            return pa.schema(TRIAL_COLUMNS).empty_table().to_pandas()
        return canonical_trials(df)


def open_experiment(path: str) -> ExperimentStore:
    """The experiment at a folder or URI (`runs/vgg-1`, `s3://bucket/runs/vgg-1`)."""
    path = path.rstrip("/")
    if "://" in path:
        scheme, rest = path.split("://", 1)
        if "/" not in rest:
            raise StoreError(f"{path}: expected <root>/<experiment>")
        root, name = rest.rsplit("/", 1)
        probe_uri(path)
        return ExperimentStore(f"{scheme}://{root}", name)
    p = Path(path).expanduser().resolve()
    return ExperimentStore(str(p.parent), p.name)


def canonical_trials(df: pd.DataFrame) -> pd.DataFrame:
    """One row per trial_id: the latest written."""
    df = df.sort_values(["trial_id", "written_at"], kind="stable")
    return df.drop_duplicates("trial_id", keep="last").reset_index(drop=True)


def canonical_epochs(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (trial_id, epoch): the latest attempt, then the latest timestamp."""
    df = df.sort_values(["trial_id", "epoch", "attempt", "timestamp"], kind="stable")
    return df.drop_duplicates(["trial_id", "epoch"], keep="last").reset_index(drop=True)


def _param_type(values: list[Any]) -> pa.DataType:
    present = [v for v in values if v is not None]
    if present and all(isinstance(v, bool) for v in present):
        return pa.bool_()
    if present and all(isinstance(v, int) and not isinstance(v, bool) for v in present):
        return pa.int64()
    if present and all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return pa.float64()
    return pa.string()


def _param_value(value: Any, type_: pa.DataType) -> Any:
    if isinstance(value, list | tuple):
        return json.dumps(list(value))
    if pa.types.is_string(type_) and value is not None and not isinstance(value, str):
        return str(value)  # a column mixing types is stored as text
    return value
