"""Shared fixtures: tiny MNIST-format datasets on disk, and one real local Ray per session."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from fmnist.data import FILES, write_idx  # noqa: E402
from search.sigterm import left_ignored  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Runs a search the way `search/run.py` does after parsing (`run.resolve`, `run.run_search`),
# with a subclass of the real trainable under the same class name (Tune's --resume checks it).
# FOLDER holds the files its trials leave for the test. MODE:
#   "slow": every epoch lasts 1 s at least, so a search's work does not shrink below a test's
#           kill delays on a fast machine;
#   "hold": the first trial to train goes on, any later one reports epoch 1, writes held.json
#           (its id and config) and waits to be killed; "go": nothing (the resumed run);
#   "meet": each trial's first epoch waits (60 s at most) until trials have started on two
#           nodes, each writing its node id as a file (all nodes of a test share this disk).
DRIVER = """\
import json, os, sys, time
from pathlib import Path
from search import run
from search.trainable import FMNISTTrainable

FOLDER, MODE = Path(sys.argv[1]), sys.argv[2]


def claim(path):
    try:
        os.close(os.open(path, os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


class FMNISTTrainable(FMNISTTrainable):
    def step(self):
        if MODE == "slow":
            time.sleep(1.0)
        elif MODE == "meet":
            if self.training.epoch == 0:
                (FOLDER / self._node).touch()
                deadline = time.monotonic() + 60
                while len(list(FOLDER.iterdir())) < 2 and time.monotonic() < deadline:
                    time.sleep(0.1)
        elif self.training.epoch == 0:
            self._hold = MODE == "hold" and not claim(FOLDER / "first")
        elif getattr(self, "_hold", False):  # unset in a trial restored past epoch 0
            tmp = FOLDER / "held.tmp"
            tmp.write_text(json.dumps({"trial_id": self.trial_id, "config": self.config}))
            tmp.rename(FOLDER / "held.json")
            time.sleep(300)
        return super().step()


sys.exit(run.run_search(run.resolve(sys.argv[3:]), trainable_cls=FMNISTTrainable))
"""


def driver_cmd(tmp_path: Path, mode: str, argv: list[str]) -> list[str]:
    """The command that runs DRIVER in `mode` with search arguments `argv`; its FOLDER is
    `tmp_path / "driver-files"`."""
    driver, folder = tmp_path / "driver.py", tmp_path / "driver-files"
    driver.write_text(DRIVER)
    folder.mkdir(exist_ok=True)
    return [sys.executable, str(driver), str(folder), mode, *argv]


def driver_env() -> dict[str, str]:
    """The environment as it is now (once this process has run ray.init, Ray has set
    RAY_AUTH_MODE=token here, and clusters started from here expect a token), unbuffered,
    with the repository importable."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO)}


def processes_under(pid: int) -> dict[int, str]:
    """Every live process below `pid` (its children, theirs, ...), read from /proc: pid ->
    what it calls itself (Ray's set titles such as `ray::IDLE`)."""
    parent, title = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
                cmd = (entry / "cmdline").read_bytes().split(b"\0")[0].decode().strip()
            except (OSError, ValueError):  # ended meanwhile
                continue
            if state != "Z":  # a zombie has ended; only its exit status waits to be read
                parent[int(entry.name)], title[int(entry.name)] = int(ppid), cmd
    below, todo = {}, [pid]
    while todo:
        top = todo.pop()
        for child in [p for p, pp in parent.items() if pp == top and p not in below]:
            below[child] = title[child]
            todo.append(child)
    return below


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie does not)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def sigterm_not_ignored():
    """SIGTERM handled here (a no-op) for the test where this process was started ignoring it.

    A CI runner may start the suite with SIGTERM ignored (this project's does), and an ignored
    signal stays ignored in every command started from here, which then rightly leaves it so
    (`fmnist.cli.sigterm_as_ctrl_c`); a handled one is back at its default there, as in a job
    that `kill`, Slurm or `docker stop` end."""
    with left_ignored():  # SIG_IGN back after the test, where it was
        if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN:
            signal.signal(signal.SIGTERM, lambda signum, frame: None)
        yield


def make_images(labels: np.ndarray, seed: int, marker: int | None = None) -> np.ndarray:
    """Learnable synthetic images: class c lights up row band c; noise on top.

    `marker` sets pixel (0, 0) of every image, so tests can tell which file an image came from.
    """
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 60, size=(len(labels), 28, 28), dtype=np.uint8)
    for i, c in enumerate(labels):
        images[i, 2 + 2 * c : 4 + 2 * c, 4:24] = 230
    if marker is not None:
        images[:, 0, 0] = marker
    return images


def write_dataset(folder: Path, n_train: int = 600, n_test: int = 200, seed: int = 0) -> Path:
    """A tiny, balanced, learnable dataset in the four IDX files. Test images carry marker 255."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y_train = np.resize(np.arange(10, dtype=np.uint8), n_train)
    rng.shuffle(y_train)
    y_test = np.resize(np.arange(10, dtype=np.uint8), n_test)
    x_train = make_images(y_train, seed, marker=1)
    x_test = make_images(y_test, seed + 1, marker=255)
    for (img, lbl), (x, y) in zip(
        (FILES["train"], FILES["test"]), ((x_train, y_train), (x_test, y_test)), strict=True
    ):
        write_idx(folder / f"{img}.gz", x)
        write_idx(folder / f"{lbl}.gz", y)
    return folder


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("tiny-fmnist"))


TINY_SPACE = """\
model: mlp
epochs: 2
units: {choice: [8, 16]}
hidden_layers: 1
batch_size: 64
learning_rate: {loguniform: [1.0e-3, 1.0e-2]}
dropout: {uniform: [0.0, 0.2]}
"""


@pytest.fixture(scope="session")
def tiny_space(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("spaces") / "tiny.yaml"
    path.write_text(TINY_SPACE)
    return path


@pytest.fixture(scope="session")
def _ray_shutdown_at_end():
    from search.run import stop_ray

    yield
    stop_ray()


@pytest.fixture
def ray_session(_ray_shutdown_at_end):
    """One real local Ray shared by the tests that use it (2 CPUs, loopback, no dashboard,
    set up as the embedded one).

    Started on first use and kept for the session; started again after `no_ray_running`.
    """
    import ray

    if not ray.is_initialized():
        from search.run import EMBEDDED_RAY_CONFIG

        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 log_to_driver=False, logging_level="WARNING",
                 _system_config=EMBEDDED_RAY_CONFIG,
                 runtime_env={"env_vars": {"TF_CPP_MIN_LOG_LEVEL": "2"}})
    return ray


@pytest.fixture
def no_ray_running():
    """No Ray on this machine during the test: the shared one is stopped first.

    `--address auto` finds a cluster through the temp dir's address file and, failing that,
    through any GCS process it sees in `ps` (Ray's legacy lookup), so an earlier test's Ray
    would be found and joined. Fails if a Ray this session did not start is running.
    """
    from ray._private.services import find_gcs_addresses  # what "auto" itself looks at

    from search.run import stop_ray

    stop_ray()
    deadline = time.monotonic() + 30
    while find_gcs_addresses() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not find_gcs_addresses(), "a Ray cluster is running on this machine; stop it first"


def run_cli(*argv, timeout=120, env=None):
    """Run the CLI in a fresh interpreter; report whether Ray was imported at all."""
    code = ("import sys; sys.argv = ['search/run.py', *sys.argv[1:]]\n"
            "from search import run\n"
            "rc = run.main()\n"
            "print('RAY_IMPORTED' if 'ray' in sys.modules else 'NO_RAY')\n"
            "print('TF_IMPORTED' if 'tensorflow' in sys.modules else 'NO_TF')\n"
            "sys.exit(rc)\n")
    return subprocess.run([sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def search_args(data_dir: Path, space: Path, storage: Path, name: str, *extra: str) -> list[str]:
    """Arguments of a tiny search: 200 training and 100 validation images."""
    return ["--space", str(space), "--data-dir", str(data_dir), "--storage", str(storage),
            "--name", name, "--train-size", "200", "--val-size", "100", *extra]
