"""`TrainConfig`: every hyperparameter of one training run, with its default and why.

Imports neither Keras nor TensorFlow, so configs and search spaces are checked in milliseconds,
before anything heavy starts. `fmnist.train` re-exports it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

METRIC = "val_accuracy"  # what the search optimizes (Keras's own metric name)
MODE = "max"
FAMILIES = ("mlp", "cnn", "vgg", "resnet")  # fmnist.models.MODELS has one builder for each
OPTIMIZERS = ("sgd", "adam", "adamw")
LR_SCHEDULES = ("constant", "cosine", "step")
# auto: mixed_bfloat16 where it was measured to pay off (a CPU with bfloat16 instructions, on
# TensorFlow), float32 everywhere else; fmnist.train.resolve_precision decides, in the trial.
PRECISIONS = ("auto", "float32", "mixed_bfloat16")


def bf16_cpu(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX-BF16).

    `cpuinfo` is the text of /proc/cpuinfo (read when not given). Other systems count as no:
    without those instructions oneDNN emulates bfloat16, which is slower than float32.
    """
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
                cpuinfo = f.read()
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return bool({"avx512_bf16", "amx_bf16"} & set(line.partition(":")[2].split()))
    return False


def keras_backend(environ: Mapping[str, str] | None = None) -> str:
    """The backend `import keras` will load, found as Keras finds it, without importing it:
    `KERAS_BACKEND` when set and not empty, else "backend" in `keras.json` under `KERAS_HOME`
    (or `~/.keras`, `/tmp/.keras` when home is not writable), else tensorflow."""
    return _keras_backend_and_source(os.environ if environ is None else environ)[0]


def _keras_backend_and_source(environ: Mapping[str, str]) -> tuple[str, str]:
    if environ.get("KERAS_BACKEND"):
        return environ["KERAS_BACKEND"], "KERAS_BACKEND"
    if "KERAS_HOME" in environ:
        home = environ["KERAS_HOME"]
    else:
        base = os.path.expanduser("~")
        home = os.path.join(base if os.access(base, os.W_OK) else "/tmp", ".keras")
    path = os.path.join(os.path.expanduser(home), "keras.json")
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError):  # no file, or one Keras too ignores (not JSON)
        return "tensorflow", "Keras' default"
    if isinstance(config, dict) and "backend" in config:
        return str(config["backend"]), path
    return "tensorflow", "Keras' default"


TRAINING_BACKENDS = ("tensorflow", "jax", "torch")  # Keras 3's numpy and openvino only infer


def keras_backend_problem(environ: Mapping[str, str] | None = None) -> str | None:
    """Why Keras could not train here with the backend it would load, or None. Checked without
    importing Keras, so a wrong backend is one line before anything starts, not a traceback
    (or, in a search, every trial failing on `import keras`)."""
    backend, where = _keras_backend_and_source(os.environ if environ is None else environ)
    if backend not in TRAINING_BACKENDS:
        return (f"Keras backend {backend!r} (from {where}) cannot train models here; use one of "
                f"{', '.join(TRAINING_BACKENDS)}")
    if importlib.util.find_spec(backend) is None:
        return (f"Keras backend {backend!r} (from {where}) is not installed here; install it or "
                "use KERAS_BACKEND=tensorflow")
    return None


def auto_precision(backend: str, gpu: Callable[[], bool],
                   bf16: Callable[[], bool] = bf16_cpu) -> tuple[str, str]:
    """What precision "auto" trains with, and why: mixed_bfloat16 only where it was measured to
    pay off (TensorFlow with oneDNN, no GPU, a CPU with bfloat16 instructions), else float32.

    `gpu` and `bf16` are asked only when the answer still depends on them (a GPU check may
    import TensorFlow). fmnist.train decides in the trial; search/run.py predicts for its plan.
    """
    if backend != "tensorflow":
        return "float32", "not the TensorFlow backend"
    if os.environ.get("TF_ENABLE_ONEDNN_OPTS", "1").strip().lower() in ("0", "false", "no"):
        return "float32", "TF_ENABLE_ONEDNN_OPTS turns oneDNN off"  # it has the bf16 kernels
    if gpu():
        return "float32", "a GPU; bfloat16 not measured there"
    if bf16():
        return "mixed_bfloat16", "this CPU has bfloat16 instructions"
    return "float32", "this CPU has no bfloat16 instructions"


# Fields that say how a run uses the machine, not what it trains: a search sets them per trial
# (its --cpus-per-trial), and a retrain or a resumed run may set them anew.
RUNTIME_KEYS = ("intra_op_threads", "inter_op_threads")


class ConfigError(ValueError):
    """A configuration key or value is not valid."""


@dataclass(frozen=True)
class TrainConfig:
    """Every hyperparameter of one training run, with its default."""

    # --- model family and architecture (fmnist.models) ---
    model: str = "cnn"  # one of MODELS: mlp, cnn, vgg, resnet
    hidden_layers: int = 2  # mlp: the notebooks' baselines used 1-3 hidden layers
    units: int = 256  # mlp: width of each hidden layer
    blocks: int = 2  # cnn/vgg: conv blocks, each followed by 2x2 pooling (at most 4 on 28x28)
    convs_per_block: int | tuple[int, ...] = 2  # vgg: one number, or one per block (2,2,3,3)
    base_filters: int = 32  # cnn/vgg/resnet: filters of the first block, doubled per block
    max_filters: int = 256  # cap on the doubling, as in the notebooks' VGG (32..256)
    kernel_size: int = 3  # cnn: 3 or 5
    stages: int = 4  # resnet: 4 stages x 1 block = the notebook's ResNet-10
    blocks_per_stage: int = 1  # resnet: basic residual blocks per stage
    batch_norm: bool = False  # BN allows higher lrs but doubles a CPU epoch; spaces search it
    dropout: float = 0.25  # before the classifier (cnn blocks get half of it)
    dense_units: int = 64  # cnn/vgg: hidden dense layer before the classifier (0 = none)
    augment_flip: bool = False  # random horizontal flip: clothes are left-right symmetric
    augment_translate: float = 0.0  # random shift as a fraction of the size (0.1 = ~3 px)
    # --- optimization ---
    optimizer: str = "adam"  # adam at 1e-3 is the least sensitive default; sgd for long runs
    learning_rate: float = 1e-3
    momentum: float = 0.9  # sgd only
    nesterov: bool = False  # sgd only
    weight_decay: float = 5e-4  # L2 on kernels (decoupled in the optimizer for adamw)
    lr_schedule: str = "constant"  # constant, cosine (over `epochs`) or step
    warmup_epochs: float = 0.0  # linear warmup from ~0, helps large batches and high sgd lrs
    step_every: int = 10  # step schedule: epochs between decays
    step_gamma: float = 0.1  # step schedule: decay factor
    label_smoothing: float = 0.0  # 0.1 often helps a little on Fashion-MNIST's shirt classes
    batch_size: int = 128  # small enough to generalize, large enough to keep a CPU busy
    epochs: int = 10  # the search's max_t; cosine decays over exactly this many
    # --- runtime ---
    seed: int = 0  # weights, dropout, augmentation and batch order
    eval_batch_size: int = 1024  # validation has no gradients: larger batches are faster
    jit_compile: bool = False  # XLA; measured on this CPU it did not pay off (see bench/)
    precision: str = "auto"  # float32, mixed_bfloat16 (bf16 compute, float32 weights) or auto
    intra_op_threads: int = 0  # threads inside one op; 0 = TensorFlow's default (all cores)
    inter_op_threads: int = 0  # ops in parallel; 0 = default. Set both when trials share cores

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(TrainConfig)
        for f in fields(self):
            object.__setattr__(self, f.name, _coerce(f.name, getattr(self, f.name), hints[f.name]))
        self.validate()

    def validate(self) -> None:
        checks = [
            (self.model in FAMILIES, f"model must be one of {', '.join(FAMILIES)}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {', '.join(OPTIMIZERS)}"),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (self.lr_schedule in LR_SCHEDULES,
             f"lr_schedule must be one of {', '.join(LR_SCHEDULES)}"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (0 <= self.seed < 2**32, "seed must be between 0 and 4294967295"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.eval_batch_size >= 1, "eval_batch_size must be >= 1"),
            (self.learning_rate > 0, "learning_rate must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (0 <= self.label_smoothing < 1, "label_smoothing must be in [0, 1)"),
            (0 <= self.augment_translate < 0.5, "augment_translate must be in [0, 0.5)"),
            (0 <= self.momentum < 1, "momentum must be in [0, 1)"),
            (self.warmup_epochs >= 0, "warmup_epochs must be >= 0"),
            (self.step_every >= 1, "step_every must be >= 1"),
            (0 < self.step_gamma <= 1, "step_gamma must be in (0, 1]"),
            (self.base_filters >= 1 and self.max_filters >= 1, "filters must be >= 1"),
            (self.units >= 1, "units must be >= 1"),
            (self.dense_units >= 0, "dense_units must be >= 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        problem = self.architecture_problem()
        if problem:
            raise ConfigError(problem)

    def architecture_problem(self) -> str | None:
        """Why fmnist.models cannot build this config's model family, or None. Checked with
        the rest, so a space or a flag that names an unbuildable model is refused before any
        training (before a search starts Ray), not in every trial that draws it."""
        if self.model in ("cnn", "vgg") and not 1 <= self.blocks <= 4:
            # 28 -> 14 -> 7 -> 3 -> 1: a fifth 2x2 pooling would leave nothing.
            return f"blocks must be between 1 and 4 for 28x28 inputs, got {self.blocks}"
        if self.model == "cnn" and self.kernel_size not in (3, 5):
            return f"kernel_size must be 3 or 5, got {self.kernel_size}"
        if self.model == "vgg":
            convs = self.convs_per_block
            counts = convs if isinstance(convs, tuple) else (convs,)
            if isinstance(convs, tuple) and len(convs) != self.blocks:
                return (f"convs_per_block has {len(convs)} entries but blocks={self.blocks}: "
                        "give one number, or one per block")
            if min(counts, default=0) < 1:
                return f"convs_per_block must be >= 1, got {convs}"
        if self.model == "mlp" and not 1 <= self.hidden_layers <= 5:
            return f"hidden_layers must be between 1 and 5, got {self.hidden_layers}"
        if self.model == "resnet" and not 1 <= self.stages <= 4:
            return f"stages must be between 1 and 4, got {self.stages}"
        if self.model == "resnet" and self.blocks_per_stage < 1:
            return f"blocks_per_stage must be >= 1, got {self.blocks_per_stage}"
        return None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """Like `TrainConfig(**values)` but with one clear message for unknown keys."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            valid = ", ".join(sorted(known))
            raise ConfigError(f"unknown config key(s) {', '.join(unknown)}; valid keys: {valid}")
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)


# Fields that only some values of another field read (fmnist.models builds each family from
# its own fields; the optimizer and the schedule read theirs). A search that samples one of
# them where none of those values can come up explores a dimension that changes nothing, and
# a flag or a pin of one is recorded with the run and ignored: both are refused.
READ_ONLY_WITH: dict[str, tuple[str, tuple[str, ...]]] = {
    "hidden_layers": ("model", ("mlp",)),
    "units": ("model", ("mlp",)),
    "blocks": ("model", ("cnn", "vgg")),
    "convs_per_block": ("model", ("vgg",)),
    "kernel_size": ("model", ("cnn",)),
    "base_filters": ("model", ("cnn", "vgg", "resnet")),
    "max_filters": ("model", ("cnn", "vgg", "resnet")),
    "stages": ("model", ("resnet",)),
    "blocks_per_stage": ("model", ("resnet",)),
    "dense_units": ("model", ("cnn", "vgg")),
    "momentum": ("optimizer", ("sgd",)),
    "nesterov": ("optimizer", ("sgd",)),
    "step_every": ("lr_schedule", ("step",)),
    "step_gamma": ("lr_schedule", ("step",)),
}
# Fields one model reads only where a number of it is not 0 (the other models always read
# them): field -> (model, the number, why).
READ_ONLY_WHERE_NONZERO: dict[str, tuple[str, str, str]] = {
    "dropout": ("vgg", "dense_units",
                "vgg's dropout is in its dense layer, which dense_units 0 leaves out"),
}


_DEFAULTS = {f.name: f.default for f in fields(TrainConfig)}


def unread_deciders(key: str) -> tuple[str, ...]:
    """The fields whose values decide whether `key` is read (`unread_problem`)."""
    if key in READ_ONLY_WHERE_NONZERO:
        return ("model", READ_ONLY_WHERE_NONZERO[key][1])
    return (READ_ONLY_WITH[key][0],) if key in READ_ONLY_WITH else ()


def unread_problem(key: str, possible: Mapping[str, Sequence[Any]]) -> str | None:
    """Why `key` can change nothing when each field takes only the values in `possible`
    (a field left out: its default), or None."""
    def values(field: str) -> list[Any]:
        return list(possible.get(field, (_DEFAULTS[field],)))

    if key in READ_ONLY_WHERE_NONZERO:
        model, number, why = READ_ONLY_WHERE_NONZERO[key]
        if set(values("model")) == {model} and all(v == 0 for v in values(number)):
            return f"model {model} with {number} 0 does not read it ({why})"
        return None
    if key not in READ_ONLY_WITH:
        return None
    on, readers = READ_ONLY_WITH[key]
    taken = values(on)
    if any(v in readers for v in taken):
        return None
    return (f"{on} {' or '.join(map(str, taken))} does not read it ({key} is for {on} "
            f"{' or '.join(readers)})")


# PyYAML reads YAML 1.1, where a float needs a dot: `1e-4` is the string "1e-4" there (YAML
# 1.2 and Python read it as a number). Such strings are taken as the numbers they spell.
_EXPONENT = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+")


def load_yaml(text: str) -> Any:
    """What `yaml.safe_load` reads (PyYAML's safe loader, the same steps), except that a plain
    `1e-4` (or `-2E3`, `5.e-1`) is a float, and a key given twice in one mapping is an error
    (PyYAML keeps the last one without a word). Raises yaml.YAMLError."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        stack, visited = [node], set()  # an alias can make the node graph cyclic
        while stack:
            node_now = stack.pop()
            if id(node_now) in visited:
                continue
            visited.add(id(node_now))
            if isinstance(node_now, yaml.MappingNode):
                seen = set()
                for key, value in node_now.value:
                    if isinstance(key, yaml.ScalarNode):
                        if key.value in seen:
                            raise yaml.constructor.ConstructorError(
                                None, None, f"{key.value!r} is given twice "
                                f"(line {key.start_mark.line + 1})", key.start_mark)
                        seen.add(key.value)
                    stack += [key, value]
            elif isinstance(node_now, yaml.SequenceNode):
                stack += node_now.value
            elif (node_now.tag == "tag:yaml.org,2002:str" and node_now.style is None
                  and _EXPONENT.fullmatch(node_now.value)):
                node_now.tag = "tag:yaml.org,2002:float"  # unquoted: the number it spells
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Accept what searchers hand over (numpy scalars, 3.0 for 3, lists for tuples)."""
    if isinstance(value, np.generic):
        value = value.item()
    options = typing.get_args(hint) or (hint,)
    if isinstance(value, list | tuple) and any(typing.get_origin(o) is tuple for o in options):
        return tuple(_coerce(name, v, int) for v in value)
    if bool in options:
        if isinstance(value, bool):
            return value
        if value in (0, 1):
            return bool(value)
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if int in options:
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if float in options:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if str in options and not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value
