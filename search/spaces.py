"""Search spaces: YAML files in search/spaces/, validated against TrainConfig before Ray starts.

    model: vgg                               # fixed values are plain scalars (or lists)
    blocks: {choice: [2, 3, 4]}              # sampled values are one-key mappings
    learning_rate: {loguniform: [1.0e-3, 1.0e-1]}

Distributions: choice, uniform, loguniform, randint (upper bound exclusive), quniform,
qloguniform (`[low, high, q]`), grid (every value, crossed with the other grid keys).
This module imports no Ray: Tune objects are built by `to_tune` only when asked.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fmnist.config import (
    RUNTIME_KEYS,
    ConfigError,
    TrainConfig,
    load_yaml,
    unread_deciders,
    unread_problem,
)

SPACES_DIR = Path(__file__).resolve().parent / "spaces"
ARITY = {"choice": None, "grid": None, "uniform": 2, "loguniform": 2, "randint": 2,
         "quniform": 3, "qloguniform": 3}
LOG_SCALED = ("loguniform", "qloguniform")


class SpaceError(ValueError):
    """A search space file or override is not valid."""


@dataclass(frozen=True)
class Dist:
    """One sampled hyperparameter."""

    kind: str
    args: tuple[Any, ...]

    @property
    def log(self) -> bool:
        return self.kind in LOG_SCALED

    def describe(self) -> str:
        return f"{self.kind}{list(self.args)}"


@dataclass
class Space:
    """A named search space: fixed values and distributions over TrainConfig fields."""

    name: str
    source: str
    fixed: dict[str, Any] = field(default_factory=dict)
    dists: dict[str, Dist] = field(default_factory=dict)

    @property
    def epochs(self) -> int:
        return self.fixed.get("epochs", TrainConfig().epochs)

    @property
    def grid_keys(self) -> list[str]:
        return [k for k, d in self.dists.items() if d.kind == "grid"]

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.fixed)
        out.update({k: {d.kind: list(d.args)} for k, d in self.dists.items()})
        return out

    def sample(self, rng: np.random.Generator) -> dict[str, Any]:
        """One configuration drawn without Ray (tests, dry runs)."""
        values = dict(self.fixed)
        for key, d in self.dists.items():
            values[key] = _draw(d, rng)
        return values

    def config(self, sampled: dict[str, Any]) -> TrainConfig:
        return TrainConfig.from_dict({**self.fixed, **sampled})


def _draw(d: Dist, rng: np.random.Generator) -> Any:
    a = d.args
    if d.kind in ("choice", "grid"):
        return a[int(rng.integers(len(a)))]
    if d.kind == "uniform":
        return float(rng.uniform(a[0], a[1]))
    if d.kind == "loguniform":
        return float(math.exp(rng.uniform(math.log(a[0]), math.log(a[1]))))
    if d.kind == "randint":
        return int(rng.integers(a[0], a[1]))
    value = rng.uniform(a[0], a[1]) if d.kind == "quniform" else math.exp(
        rng.uniform(math.log(a[0]), math.log(a[1])))
    return float(np.round(value / a[2]) * a[2])


def list_spaces() -> list[str]:
    return sorted(p.stem for p in SPACES_DIR.glob("*.yaml"))


def is_space_file(name_or_path: str) -> bool:
    """A path to a space file (ends in .yaml/.yml or has a '/'), not a shipped space's name."""
    return name_or_path.endswith((".yaml", ".yml")) or "/" in name_or_path


def space_path(name_or_path: str) -> Path:
    """`vgg` -> search/spaces/vgg.yaml; anything ending in .yaml/.yml is a path."""
    if is_space_file(name_or_path):
        path = Path(name_or_path).expanduser()
        if path.is_dir():
            raise SpaceError(f"space file {path} is a folder, not a YAML file")
        if not path.exists():
            raise SpaceError(f"space file {path} does not exist")
        if not path.is_file():
            raise SpaceError(f"space file {path} is not a regular file")
        return path
    path = SPACES_DIR / f"{name_or_path}.yaml"
    if not path.is_file():
        raise SpaceError(
            f"unknown space {name_or_path!r}; available: {', '.join(list_spaces())} "
            "(or pass a path to a .yaml file)"
        )
    return path


def load_space(name_or_path: str, overrides: dict[str, Any] | None = None,
               check_read: bool = True) -> Space:
    """Load, check and return a space; `overrides` pin keys (`--set key=value`).

    `check_read` refuses keys the space's model, optimizer or schedule does not read
    (`fmnist.config.READ_ONLY_WITH`, `READ_ONLY_WHERE_NONZERO`); off for an experiment
    searched before that check."""
    path = space_path(name_or_path)
    try:
        raw = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        detail = str(exc).splitlines()[0]
        raise SpaceError(f"{path}: not valid YAML ({detail})") from None
    except UnicodeDecodeError as exc:
        raise SpaceError(f"{path}: not a text file (not UTF-8 at byte {exc.start})") from None
    except OSError as exc:
        raise SpaceError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if not isinstance(raw, dict) or not raw:
        raise SpaceError(f"{path}: expected a mapping of TrainConfig keys to values")
    if not overrides:
        return parse_space(raw, name=path.stem, source=str(path), check_read=check_read)
    combined, set_keys = {**raw, **overrides}, set(overrides)
    try:
        return parse_space(combined, name=path.stem, source=str(path), set_keys=set_keys,
                           check_read=check_read, file_keys=set(raw))
    except SpaceError as error:
        try:  # which is at fault: a file that is valid alone makes it the --set's doing
            parse_space(raw, name=path.stem, source=str(path), check_read=check_read)
        except SpaceError:
            raise error from None  # the combination's error, as first reported
    return parse_space(combined, name=path.stem, source=str(path), set_keys=set_keys,
                       file_ok=True, check_read=check_read, file_keys=set(raw))


def parse_space(raw: dict[str, Any], name: str, source: str,
                set_keys: set[str] = frozenset(), file_ok: bool = False,
                check_read: bool = True, file_keys: set[str] = frozenset()) -> Space:
    """A checked Space; a mistake in a key of `set_keys` is blamed on its `--set`, and so is
    one between keys when the file alone was valid (`file_ok`). `file_keys`: the keys the
    space file gives (where `raw` is the file with the --set values on top)."""
    known = {f.name for f in fields(TrainConfig)}
    space = Space(name=name, source=source)
    for key, value in raw.items():
        where = f"--set {key}" if key in set_keys else f"{source}: {key}"
        if key not in known:
            raise SpaceError(f"{where}: unknown key (not a TrainConfig field)")
        if isinstance(value, dict):
            space.dists[key] = _parse_dist(where, value)
        else:
            space.fixed[key] = value
    if "model" not in space.fixed:
        raise SpaceError(f"{source}: model: must be a fixed value (one family per space)")
    if "epochs" in space.dists:
        raise SpaceError(f"{source}: epochs: must be fixed (it is the scheduler's max_t)")
    _check_values(space, set_keys, file_ok)
    if check_read:
        _check_read(space, set_keys, file_ok, file_keys)
    return space


def _check_read(space: Space, set_keys: set[str] = frozenset(), file_ok: bool = False,
                file_keys: set[str] = frozenset()) -> None:
    """Every key given must be one the space's configs can read: a sampled key that none reads
    is a dimension the search would explore for nothing, a fixed one is recorded and ignored
    (so is a thread count: each trial's comes from --cpus-per-trial)."""
    possible: dict[str, tuple[Any, ...]] = {k: (v,) for k, v in space.fixed.items()}
    for key, d in space.dists.items():
        if d.kind in ("choice", "grid"):
            possible[key] = d.args
    for key in (*space.fixed, *space.dists):
        where = f"--set {key}" if key in set_keys else f"{space.source}: {key}"
        if key in RUNTIME_KEYS:  # search.trainable sets them for each trial
            raise SpaceError(f"{where}: a search sets each trial's threads from "
                             "--cpus-per-trial; leave it out")
        problem = unread_problem(key, possible)
        if problem is None:
            continue
        fix = "leave it out" if key in set_keys else "leave it out of the space"
        if key in set_keys and key in file_keys:  # without the --set, the file's comes back
            fix = "the space file gives it too: use one without it"
        by_set = [on for on in unread_deciders(key) if on in set_keys]
        if key not in set_keys and by_set and file_ok:  # unread because of a --set
            where, fix = f"--set {by_set[0]}: {where}", "use a space file without it"
        raise SpaceError(f"{where}: {problem}; {fix}")


def _parse_dist(where: str, value: dict[str, Any]) -> Dist:
    if len(value) != 1:
        raise SpaceError(f"{where}: a distribution has exactly one of {', '.join(ARITY)}")
    kind, args = next(iter(value.items()))
    if kind not in ARITY:
        raise SpaceError(f"{where}: unknown distribution {kind!r}; use one of {', '.join(ARITY)}")
    if not isinstance(args, list):
        raise SpaceError(f"{where}: {kind} takes a list, got {args!r}")
    if ARITY[kind] is None:
        if not args:
            raise SpaceError(f"{where}: empty {kind}")
        return Dist(kind, tuple(tuple(a) if isinstance(a, list) else a for a in args))
    if len(args) != ARITY[kind]:
        shape = "[low, high]" if ARITY[kind] == 2 else "[low, high, q]"
        raise SpaceError(f"{where}: {kind} takes {shape}, got {args!r}")
    if not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args):
        raise SpaceError(f"{where}: {kind} bounds must be numbers, got {args!r}")
    low, high = args[0], args[1]
    if not low < high:
        raise SpaceError(f"{where}: {kind} lower bound {low} must be below upper bound {high}")
    if kind in LOG_SCALED and low <= 0:
        raise SpaceError(f"{where}: {kind} lower bound must be > 0, got {low}")
    if kind in ("quniform", "qloguniform") and args[2] <= 0:
        raise SpaceError(f"{where}: {kind} step q must be > 0, got {args[2]}")
    if kind == "randint" and not all(isinstance(a, int) for a in args):
        raise SpaceError(f"{where}: randint bounds must be integers, got {args!r}")
    return Dist(kind, tuple(args))


def _check_values(space: Space, set_keys: set[str] = frozenset(),
                  file_ok: bool = False) -> None:
    """Every fixed value and every distribution's extremes must make a valid TrainConfig,
    one that fmnist.models can build."""
    given = ", ".join(sorted(set_keys))
    # The sampled keys' defaults may not fit the fixed values where no draw would be wrong
    # (3 fixed VGG conv counts, blocks {choice: [3]}, and blocks' default 2): then the base
    # takes each sampled key's first value.
    firsts = {k: d.args[0] for k, d in space.dists.items()}
    try:
        base = _first_valid(space.fixed, {**space.fixed, **firsts})
    except (ConfigError, TypeError) as exc:
        for key in sorted(set_keys & space.fixed.keys()):  # a bad value on its own
            try:
                TrainConfig.from_dict({key: space.fixed[key]})
            except (ConfigError, TypeError) as own:
                raise SpaceError(f"--set {key}: {own}") from None
        where = f"--set {given}" if set_keys and file_ok else space.source
        raise SpaceError(f"{where}: {exc}") from None
    for key, d in space.dists.items():
        candidates = d.args if d.kind in ("choice", "grid") else d.args[:2]
        for value in candidates:
            if d.kind == "randint":
                value = value if value == d.args[0] else value - 1
            try:
                base.replace(**{key: value})
            except (ConfigError, TypeError) as exc:
                if key in set_keys:
                    where = f"--set {key}"
                elif set_keys and file_ok:  # the file's distribution, broken by a --set
                    where = f"--set {given}: {space.source}: {key}"
                else:
                    where = f"{space.source}: {key}"
                raise SpaceError(f"{where}: {value!r} is not valid ({exc})") from None


def _first_valid(*candidates: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of the first candidate that makes one; else the first one's error."""
    error = None
    for values in candidates:
        try:
            return TrainConfig.from_dict(values)
        except (ConfigError, TypeError) as exc:
            error = error or exc
    raise error


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with the value parsed as YAML (`lr=0.1`, `blocks={choice: [2, 3]}`)."""
    if "=" not in text:
        raise SpaceError(f"--set {text!r}: expected key=value")
    key, _, value = text.partition("=")
    try:
        return key.strip(), load_yaml(value)
    except yaml.YAMLError:
        raise SpaceError(f"--set {text!r}: value is not valid YAML") from None


def check_searcher(space: Space, searcher: str) -> None:
    """Optuna and HyperOpt have no notion of a grid: refuse a space with `grid` keys for them."""
    if searcher in ("optuna", "hyperopt", "tpe-rungs") and space.grid_keys:
        raise SpaceError(
            f"{space.source}: grid keys ({', '.join(space.grid_keys)}) need --searcher grid "
            f"or random, not {searcher}"
        )


def to_tune(space: Space, searcher: str) -> dict[str, Any]:
    """The sampled part as a Ray Tune param_space (fixed values travel separately).

    With the grid searcher every `choice` becomes a grid axis too.
    """
    from ray import tune

    check_searcher(space, searcher)
    out: dict[str, Any] = {}
    for key, d in space.dists.items():
        a = d.args
        if d.kind == "grid" or (d.kind == "choice" and searcher == "grid"):
            out[key] = tune.grid_search(list(a))
        elif d.kind == "choice":
            out[key] = tune.choice(list(a))
        elif d.kind == "uniform":
            out[key] = tune.uniform(a[0], a[1])
        elif d.kind == "loguniform":
            out[key] = tune.loguniform(a[0], a[1])
        elif d.kind == "randint":
            out[key] = tune.randint(a[0], a[1])
        elif d.kind == "quniform":
            out[key] = tune.quniform(*a)
        else:
            out[key] = tune.qloguniform(*a)
    return out


def grid_points(space: Space, searcher: str) -> int:
    """Number of grid points Tune will cross with num_samples (1 when there is no grid)."""
    keys = [k for k, d in space.dists.items()
            if d.kind == "grid" or (d.kind == "choice" and searcher == "grid")]
    return math.prod(len(space.dists[k].args) for k in keys)


def space_json(space: Space) -> str:
    return json.dumps(space.to_json(), sort_keys=True, default=list)
