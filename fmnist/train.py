"""One readable training loop: `train(cfg, data, on_epoch_end=callback)`.

Knows nothing of Ray. Every hyperparameter lives in `TrainConfig` with its default and why.
Run one config on the real data: `python -m fmnist.train --model cnn --epochs 5`.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # the CLI: every mistake is one line, before Keras is imported
    from fmnist.cli import prepare

    _PREPARED = prepare(sys.argv[1:])
    if isinstance(_PREPARED, int):
        sys.exit(_PREPARED)

from fmnist.startup import import_keras  # noqa: E402

import_keras()  # before `import keras`: TensorFlow's start-up lines, filtered
import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import ops  # noqa: E402

from fmnist.cli import (  # noqa: E402,F401
    RESUME_MAY_CHANGE,
    Prepared,
    prepare,
    resumed_config,
    sigterm_as_ctrl_c,
)
from fmnist.config import (  # noqa: E402,F401
    METRIC,
    MODE,
    RUNTIME_KEYS,
    ConfigError,
    TrainConfig,
    auto_precision,
    bf16_cpu,
    load_yaml,
)
from fmnist.data import DATA_KEYS  # noqa: E402
from fmnist.models import build_model  # noqa: E402


@keras.saving.register_keras_serializable(package="fmnist")
class LRSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Constant, cosine or step decay, with optional linear warmup, in optimizer steps."""

    def __init__(self, base_lr: float, kind: str, total_steps: int, warmup_steps: int = 0,
                 step_every: int = 1, gamma: float = 0.1):
        self.base_lr = float(base_lr)
        self.kind = kind
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.step_every = int(step_every)
        self.gamma = float(gamma)

    def __call__(self, step):
        step = ops.cast(step, "float32")
        base = ops.cast(self.base_lr, "float32")
        if self.kind == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            progress = ops.clip((step - self.warmup_steps) / span, 0.0, 1.0)
            lr = base * 0.5 * (1.0 + ops.cos(math.pi * progress))
        elif self.kind == "step":
            lr = base * ops.power(self.gamma, ops.floor(step / self.step_every))
        else:
            lr = base
        if self.warmup_steps > 0:
            lr = ops.where(step < self.warmup_steps, base * (step + 1.0) / self.warmup_steps, lr)
        return lr

    def get_config(self) -> dict[str, Any]:
        return {"base_lr": self.base_lr, "kind": self.kind, "total_steps": self.total_steps,
                "warmup_steps": self.warmup_steps, "step_every": self.step_every,
                "gamma": self.gamma}


def make_optimizer(cfg: TrainConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    schedule = LRSchedule(
        cfg.learning_rate,
        cfg.lr_schedule,
        total_steps=cfg.epochs * steps_per_epoch,
        warmup_steps=round(cfg.warmup_epochs * steps_per_epoch),
        step_every=cfg.step_every * steps_per_epoch,
        gamma=cfg.step_gamma,
    )
    if cfg.optimizer == "sgd":
        return keras.optimizers.SGD(schedule, momentum=cfg.momentum, nesterov=cfg.nesterov)
    if cfg.optimizer == "adamw":
        return keras.optimizers.AdamW(schedule, weight_decay=cfg.weight_decay)
    return keras.optimizers.Adam(schedule)


def configure_threads(intra_op: int, inter_op: int) -> bool:
    """Set TensorFlow's thread pools; True if applied.

    Trials that share a machine must not each start a pool as wide as the machine. This only
    works before TensorFlow runs its first op, so a process that already trained keeps its pools.
    Other backends take their threads from the environment (e.g. XLA_FLAGS for JAX).
    """
    if keras.backend.backend() != "tensorflow" or (intra_op <= 0 and inter_op <= 0):
        return False
    import tensorflow as tf  # thread pools have no Keras API

    try:
        if intra_op > 0:
            tf.config.threading.set_intra_op_parallelism_threads(intra_op)
        if inter_op > 0:
            tf.config.threading.set_inter_op_parallelism_threads(inter_op)
    except RuntimeError:
        return (tf.config.threading.get_intra_op_parallelism_threads() == intra_op or intra_op <= 0)
    return True


def resolve_precision(precision: str) -> str:
    """The Keras dtype policy a run trains with: `precision`, with "auto" decided here.

    auto is mixed_bfloat16 (bfloat16 compute, float32 weights and outputs) only where it was
    measured to pay off: TensorFlow with oneDNN on a CPU with bfloat16 instructions, where
    one-thread epochs of 8 `cnn` configs took 0.60-1.0x as long (median 0.726) and reached
    the same validation accuracy within noise (bench/precision.py). Everywhere else, GPUs
    included (not measured), float32.
    """
    if precision != "auto":
        return precision
    return auto_precision(keras.backend.backend(), gpus_visible, bf16_cpu)[0]


def gpus_visible() -> bool:
    """Whether the Keras backend (TensorFlow, where auto precision asks) sees a GPU here."""
    return backend_gpus() > 0


# How each Keras backend gets its GPU build: what a "sees no GPU" error tells the user to do.
GPU_BUILDS = {
    "tensorflow": "pip install -e '.[gpu]', which adds tensorflow[and-cuda] and its CUDA libraries",
    "jax": "pip install 'jax[cuda12]'",
    "torch": "a CUDA build of PyTorch",
}


def backend_gpus() -> int:
    """How many GPUs the loaded Keras backend can train on in this process."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf  # device lists have no Keras API

        return len(tf.config.list_physical_devices("GPU"))
    if backend == "jax":
        import jax

        return len([d for d in jax.devices() if d.platform == "gpu"])
    if backend == "torch":
        import torch

        return torch.cuda.device_count()
    return 0


def build_with_precision(cfg: TrainConfig, policy: str) -> keras.Model:
    """`build_model(cfg)` with every layer under `policy`; the global policy is left as it was."""
    before = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        return build_model(cfg)
    finally:
        keras.config.set_dtype_policy(before)


def _arrays(data: Any) -> dict[str, np.ndarray]:
    """Accept `fmnist.data.Splits` or a mapping with exactly the train and validation arrays."""
    if hasattr(data, "arrays"):
        data = data.arrays()
    keys = set(data)
    if keys != set(DATA_KEYS):
        raise ValueError(
            f"training data must have exactly {', '.join(DATA_KEYS)}; got {', '.join(sorted(keys))}"
        )
    return {k: data[k] for k in DATA_KEYS}


def keras_feed(x: np.ndarray, y: np.ndarray, batch_size: int) -> dict[str, Any]:
    """The arrays as they are: Keras builds its own pipeline (autotuned, on TensorFlow)."""
    return {"x": x, "y": y, "batch_size": batch_size}


def feed(x: np.ndarray, y: np.ndarray, batch_size: int) -> dict[str, Any]:
    """The arguments that give Keras' `fit`/`evaluate` these arrays in order, in batches.

    On TensorFlow: a `tf.data` pipeline with autotuning off. Keras' own pipeline for arrays
    autotunes, and TensorFlow's autotuner thread sleeps for a period that doubles from 10 ms
    (0.01, 0.03, ... 2.55, 5.11, 10.23 s after the pipeline starts); when `fit` ends, the
    pipeline waits for that thread, which here often did not wake until its sleep was over.
    A 7 s one-thread epoch then took 10.3 s, 3 s of it idle (bench/input_pipeline.py measures
    it). A fixed prefetch of one batch keeps reading ahead of the step. Other backends get
    the arrays as they are.
    """
    if keras.backend.backend() != "tensorflow":
        return keras_feed(x, y, batch_size)
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    batches = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size).prefetch(1)
    return {"x": batches.with_options(options)}


def seed_states(model: keras.Model) -> list[Any]:
    """The state variables of the model's random streams (dropout, augmentation), in the
    model's own order, which a model loaded from the same config has too."""
    return [v for v in model.variables if v.name == "seed_generator_state"]


class TrainingRun:
    """A model, its optimizer and its data, trained one epoch at a time; saves and restores."""

    def __init__(self, cfg: TrainConfig, data: Any,
                 checkpoint: str | os.PathLike | None = None):
        """Build `cfg`'s model, or with `checkpoint` load the one `save` wrote there instead
        (as `restore` does, without building a model first only to replace it)."""
        self.cfg = cfg
        arrays = _arrays(data)
        self.x_train, self.y_train = arrays["x_train"], arrays["y_train"]
        self.x_val, self.y_val = arrays["x_val"], arrays["y_val"]
        if cfg.label_smoothing > 0:  # smoothing needs one-hot targets
            self.y_train = keras.utils.to_categorical(self.y_train, 10).astype("float32")
            self.y_val = keras.utils.to_categorical(self.y_val, 10).astype("float32")
        self.steps_per_epoch = math.ceil(len(self.x_train) / cfg.batch_size)
        self.epoch = 0  # epochs completed
        self.attempt = 0  # how many times this run was restored from a checkpoint
        keras.utils.set_random_seed(cfg.seed)
        if checkpoint is not None:
            self.restore(checkpoint)
        else:
            self.model = build_with_precision(cfg, resolve_precision(cfg.precision))
            self.model.compile(
                optimizer=make_optimizer(cfg, self.steps_per_epoch),
                loss=self._loss(),
                metrics=["accuracy"],
                jit_compile=cfg.jit_compile,
            )
            self._build_state()
        # validation batches never change: built once, not every epoch
        self._val_feed = (feed(self.x_val, self.y_val, cfg.eval_batch_size)
                          if len(self.x_val) else None)

    def _build_state(self) -> None:
        """Create the optimizer's and metrics' variables now, not inside the first traced step.

        On the TensorFlow backend Keras defers them to the first `fit`, and a `tf.function` that
        creates variables is traced twice. Built here, a small CNN's first epoch costs about
        2.4 s more than the next ones where it cost 3.0 s, and 2.1 s where it cost 3.4 s after a
        restore (bench/first_epoch.py, one thread). Every trial pays it at its start and after
        each restore, so it is a large share of a 1-epoch ASHA rung. Keras' JAX and PyTorch
        trainers make this same call in every fit; skipped if a Keras version lacks it.
        """
        build = getattr(self.model, "_symbolic_build", None)
        if build is None or keras.backend.backend() != "tensorflow":
            return
        n = min(len(self.x_train), 2)
        build(data_batch=(self.x_train[:n], self.y_train[:n]))

    def _loss(self) -> keras.losses.Loss:
        if self.cfg.label_smoothing > 0:
            return keras.losses.CategoricalCrossentropy(label_smoothing=self.cfg.label_smoothing)
        return keras.losses.SparseCategoricalCrossentropy()

    def fit_epoch(self) -> dict[str, float]:
        """Train one epoch and validate; return the epoch's metrics (epoch counted from 1)."""
        cfg = self.cfg
        # Batch order depends only on (seed, epoch), so a restored run sees the same batches.
        order = np.random.default_rng([cfg.seed, self.epoch]).permutation(len(self.x_train))
        t0 = time.perf_counter()
        history = self.model.fit(
            **feed(self.x_train[order], self.y_train[order], cfg.batch_size), epochs=1,
            shuffle=False, verbose=0,
        )
        t1 = time.perf_counter()
        if self._val_feed is not None:
            val = self.model.evaluate(**self._val_feed, verbose=0, return_dict=True)
        else:  # a final retrain on train+validation has nothing left to validate on
            val = {"loss": math.nan, "accuracy": math.nan}
        t2 = time.perf_counter()
        self.epoch += 1
        return {
            "epoch": self.epoch,
            "loss": float(history.history["loss"][-1]),
            "accuracy": float(history.history["accuracy"][-1]),
            "val_loss": float(val["loss"]),
            "val_accuracy": float(val["accuracy"]),
            "lr": self.current_lr(),
            "epoch_time_s": t2 - t0,
            "train_time_s": t1 - t0,
            "train_samples_per_s": len(self.x_train) / (t1 - t0),
            "precision": self.precision,
        }

    @property
    def precision(self) -> str:
        """The dtype policy the model's layers compute with (a restored model keeps its own).

        Read from the layers: a loaded model's own policy is the global one, whatever its
        layers were saved with. The classifier is float32 under every policy (fmnist.models).
        """
        mixed = sorted({layer.dtype_policy.name for layer in self.model.layers
                        if layer.dtype_policy.name.startswith("mixed_")})
        return mixed[0] if mixed else "float32"

    def current_lr(self) -> float:
        opt = self.model.optimizer
        return float(ops.convert_to_numpy(opt.learning_rate))

    def save(self, directory: str | os.PathLike) -> Path:
        """Write model + optimizer state (`model.keras`) and the epoch (`state.json`).

        Each file is written whole under a temporary name, then renamed over the last one, so
        a Ctrl+C, a kill or a full disk in the middle of a save (`--save` rewrites one folder
        every epoch) leaves the previous checkpoint, not a torn `model.keras`.
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        model_tmp, state_tmp = directory / ".model.tmp.keras", directory / ".state.json.tmp"
        self.model.save(model_tmp)
        state = {"epoch": self.epoch, "attempt": self.attempt, "config": self.cfg.to_dict(),
                 "seed_states": [ops.convert_to_numpy(v).tolist()
                                 for v in seed_states(self.model)]}
        state_tmp.write_text(json.dumps(state))
        os.replace(model_tmp, directory / "model.keras")
        os.replace(state_tmp, directory / "state.json")
        return directory

    def restore(self, directory: str | os.PathLike) -> None:
        """Continue from a checkpoint written by `save` (loaded with safe_mode=True)."""
        directory = Path(directory)
        state = json.loads((directory / "state.json").read_text())
        self.model = keras.saving.load_model(directory / "model.keras", safe_mode=True)
        self._build_state()
        # The random streams (dropout, augmentation) are not in model.keras: Keras starts a
        # loaded model's anew, so until checkpoints carried them a restored run drew the masks
        # and shifts of its first epochs again instead of going on. (Older checkpoints lack
        # them: their streams still start anew.)
        saved = state.get("seed_states")
        variables = seed_states(self.model)
        if saved is not None and len(saved) == len(variables):
            for variable, value in zip(variables, saved, strict=True):
                variable.assign(np.asarray(value, dtype=variable.dtype))
        self.epoch = int(state["epoch"])
        self.attempt = int(state.get("attempt", 0)) + 1


EpochCallback = Callable[[dict[str, float]], Any]


def train(
    cfg: TrainConfig,
    data: Any,
    on_epoch_end: EpochCallback | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume_from: str | os.PathLike | None = None,
) -> TrainingRun:
    """Train `cfg` on `data` (train + validation arrays) for `cfg.epochs` epochs.

    `on_epoch_end(metrics)` is called after every epoch; returning False stops training.
    With `checkpoint_dir`, a checkpoint is written after every epoch (before the callback).
    With `resume_from`, training continues from that checkpoint's epoch; `cfg` must be the
    checkpoint's config but for RESUME_MAY_CHANGE (ConfigError, as `resumed_config` says).
    """
    if resume_from is not None:
        resumed_config(str(resume_from), cfg.to_dict())
    configure_threads(cfg.intra_op_threads, cfg.inter_op_threads)
    run = TrainingRun(cfg, data, checkpoint=resume_from)
    while run.epoch < cfg.epochs:
        metrics = run.fit_epoch()
        if checkpoint_dir is not None:
            run.save(checkpoint_dir)
        if on_epoch_end is not None and on_epoch_end(metrics) is False:
            break
    return run


# ----------------------------------------------------------------------------- CLI


def run_prepared(prepared: Prepared) -> int:
    """Train a command line that `fmnist.cli.prepare` checked, printing every epoch."""
    cfg, data = prepared.cfg, prepared.data
    print(f"{cfg.model}: train {len(data.y_train)}, val {len(data.y_val)}, "
          f"{cfg.epochs} epochs, batch {cfg.batch_size}, {cfg.optimizer} lr {cfg.learning_rate}")

    def show(m: dict[str, float]) -> None:
        print(f"epoch {m['epoch']:3d}  loss {m['loss']:.4f}  acc {m['accuracy']:.4f}  "
              f"val_loss {m['val_loss']:.4f}  val_acc {m['val_accuracy']:.4f}  "
              f"lr {m['lr']:.2e}  {m['epoch_time_s']:.1f}s  "
              f"{m['train_samples_per_s']:.0f} img/s", flush=True)

    try:
        with sigterm_as_ctrl_c():
            run = train(cfg, data, on_epoch_end=show, checkpoint_dir=prepared.save,
                        resume_from=prepared.resume)
    except KeyboardInterrupt:  # Ctrl+C or SIGTERM: the epochs above are what it trained
        again = (f"; --resume {prepared.save} continues from its last checkpoint"
                 if prepared.save else "")
        print(f"interrupted{again}", file=sys.stderr)
        return 130
    except OSError as exc:  # a full disk under --save: the epochs above are what it trained
        where = f" (checkpoints go to {prepared.save})" if prepared.save else ""
        print(f"error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1
    device = "GPU" if backend_gpus() else "CPU"  # a GPU build missing its CUDA libraries: CPU
    print(f"params {run.model.count_params():,}, precision {run.precision}, on the {device}")
    return 0


if __name__ == "__main__":
    sys.exit(run_prepared(_PREPARED))
