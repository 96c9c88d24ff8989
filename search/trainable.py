"""The Ray Tune trainable: a thin adapter around `fmnist.train.TrainingRun`.

One Tune iteration is one epoch. Each epoch is reported with a checkpoint, so schedulers can
pause and resume trials (Hyperband) and a failed trial retries from its last epoch. With
`reuse_actors`, `reset_config` hands the worker the next trial, whose model is built in the
same process, so TensorFlow is imported and initialized once per worker, not once per trial.
"""

from __future__ import annotations

import gc
import json
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import ray
from ray import tune

from fmnist.config import TrainConfig
from fmnist.data import DATA_KEYS, digest_arrays

# Written into every checkpoint beside the model: which trial it is and its sampled config.
# The recorder reads it back for a trial that Ray Tune forgot (see ParquetRecorder).
TRIAL_FILE = "trial.json"

# fmnist.train (Keras, TensorFlow) is imported inside the methods below, which run in the
# workers: the driver only needs this class by name and never pays TensorFlow's import.


def gpu_memory_settings(fraction: float, total_mib: int) -> dict[str, Any]:
    """How a trial holding `fraction` of a GPU limits itself so others fit beside it.

    A whole GPU (or more) grows memory on demand; a fraction gets a hard limit in proportion,
    with 10% kept back for the CUDA context and allocator slack of each process.
    """
    if fraction <= 0:
        return {"memory_growth": False, "memory_limit_mib": None}
    if fraction >= 1:
        return {"memory_growth": True, "memory_limit_mib": None}
    return {"memory_growth": False, "memory_limit_mib": int(total_mib * fraction * 0.9)}


def _gpu_total_mib(index: int) -> int | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits",
             "-i", str(index)], capture_output=True, text=True, timeout=20, check=True)
        return int(out.stdout.strip().splitlines()[0])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def _configure_gpu(fraction: float) -> None:
    """Apply `gpu_memory_settings` to the GPU(s) Ray assigned (TensorFlow backend)."""
    import keras

    if fraction <= 0 or keras.backend.backend() != "tensorflow":
        return  # JAX takes XLA_PYTHON_CLIENT_MEM_FRACTION from the environment instead
    import tensorflow as tf  # GPU memory options have no Keras API

    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return
    total = _gpu_total_mib(int(ray.get_gpu_ids()[0])) if ray.get_gpu_ids() else None
    settings = gpu_memory_settings(fraction, total or 0)
    try:
        for gpu in gpus:
            if settings["memory_limit_mib"] and total:
                tf.config.set_logical_device_configuration(
                    gpu, [tf.config.LogicalDeviceConfiguration(settings["memory_limit_mib"])])
            else:
                tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError:
        pass  # already initialized in this (reused) worker: keep what it has


def gpu_problem(gpus: float) -> str | None:
    """Why a process Ray gave `gpus` GPUs could not train on them, or None.

    A backend that sees no GPU (TensorFlow without its CUDA libraries: PyPI's plain
    `tensorflow` on a node without a matching CUDA) trains on the trial's CPUs without a word
    while every epoch row names the GPU Ray assigned. Asked by each trial and, before a search
    starts, by `search/run.py` on one GPU worker.
    """
    if gpus <= 0:
        return None
    from fmnist.startup import import_keras
    from fmnist.train import GPU_BUILDS, backend_gpus

    keras = import_keras()  # TensorFlow's start-up lines filtered, as in trials

    if backend_gpus():
        return None
    backend = keras.backend.backend()
    ids = ",".join(str(g) for g in ray.get_gpu_ids()) or "none"
    return (f"--gpus-per-trial {gpus:g}: Ray gave GPU {ids} on {socket.gethostname()}, but "
            f"Keras' {backend} backend sees no GPU there, so trials would train on the CPU; "
            f"install the GPU build on every node ({GPU_BUILDS.get(backend, 'see its docs')}) "
            "or leave out --gpus-per-trial")


class FMNISTTrainable(tune.Trainable):
    """`config` holds the sampled hyperparameters; `fixed` the space's fixed values."""

    def setup(self, config: dict[str, Any], data: dict[str, Any], fixed: dict[str, Any],
              cpus: float = 1.0, gpus: float = 0.0) -> None:
        # The arrays come from the object store as read-only views (no copy). Only the
        # train/validation split is ever put there: the test split stays on disk.
        if set(data) != set(DATA_KEYS):
            raise ValueError(f"trial data must be exactly {DATA_KEYS}, got {sorted(data)}")
        self._data = data
        self._data_sha256 = digest_arrays(data)
        self._fixed = dict(fixed)
        self._gpus = gpus
        from fmnist.train import configure_threads

        self._threads = max(1, int(cpus))  # TF pools as wide as the trial's CPUs, no wider
        configure_threads(self._threads, min(2, self._threads))
        _configure_gpu(gpus)
        if problem := gpu_problem(gpus):
            raise RuntimeError(problem)
        if ray.get_runtime_context().get_actor_id() is not None:
            # A Tune worker (an actor; not a caller's process, where tests and notebooks make a
            # trainable): what the imports left is there for good, so Python's full garbage
            # collections, such as the one each reset_config runs, stop walking it.
            gc.freeze()
        self._node = ray.get_runtime_context().get_node_id()
        self._node_ip = ray.util.get_node_ip_address()
        self._host = socket.gethostname()
        self._build(config)

    def _build(self, config: dict[str, Any]) -> None:
        """Take a trial's config; its model is built when it first trains, unless a restore
        loads it from a checkpoint first (a model built only to be replaced took 0.2-0.6 s here)."""
        self.cfg = TrainConfig.from_dict({**self._fixed, **config,
                                          "intra_op_threads": self._threads,
                                          "inter_op_threads": min(2, self._threads)})
        self._run = None

    @property
    def training(self) -> Any:
        """The trial's `fmnist.train.TrainingRun`, built when first asked for."""
        if self._run is None:
            from fmnist.train import TrainingRun

            self._run = TrainingRun(self.cfg, self._data)
        return self._run

    def step(self) -> dict[str, Any]:
        run = self.training
        metrics = run.fit_epoch()
        gpu_ids = ",".join(str(g) for g in ray.get_gpu_ids())
        metrics.update(
            attempt=run.attempt,
            node=self._node,
            node_ip=self._node_ip,
            host=self._host,
            gpu_ids=gpu_ids,
            data_sha256=self._data_sha256,
            pid=os.getpid(),
            done=run.epoch >= self.cfg.epochs,
        )
        return metrics

    def save_checkpoint(self, checkpoint_dir: str) -> None:
        # The sampled keys, with the values TrainConfig coerced (plain Python, as in state.json).
        # Written first and small, so a kill while the model is written still leaves it.
        values = self.cfg.to_dict()
        mine = {"trial_id": self.trial_id, "config": {k: values[k] for k in self.config}}
        (Path(checkpoint_dir) / TRIAL_FILE).write_text(json.dumps(mine))
        self.training.save(checkpoint_dir)

    def load_checkpoint(self, checkpoint: str | dict) -> None:
        from fmnist.train import TrainingRun

        self._run = TrainingRun(self.cfg, self._data, checkpoint=checkpoint)

    def reset_config(self, new_config: dict[str, Any]) -> bool:
        # A reused worker keeps TensorFlow loaded; only the previous trial's graph state goes.
        # Its run is let go first, so that the collection clear_session ends with frees its
        # model, optimizer and traced steps now, not at some later full collection.
        import keras

        self._run = None
        keras.backend.clear_session()
        self._build(new_config)
        return True
