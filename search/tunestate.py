"""Ray Tune's search algorithms, keeping each experiment snapshot whole in the store.

Tune snapshots an experiment by writing its state files (the trials, the search algorithm's
count of trials drawn, the searcher's own state) to a staging folder on the driver, one after
the other and all at once, then uploads that folder to `ray/` in the background, file by file.
A driver killed during an upload leaves `ray/` holding files from two snapshots: the trials of
the new one with the count of the old one, say; `--resume` then draws trials that were drawn
already (seen: 10 trials for `--num-samples 6`), and the restored searcher does not know the
trials it did not draw.

The search algorithms here are Tune's own with one step added: once Tune has written a
snapshot, they copy its files into one file in the store (`ExperimentStore.keep_tune_state`,
written whole), before Tune's upload begins. `--resume` puts those files back in `ray/`
(`restore_tune_state`) before Tune reads them.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, ClassVar

from ray.tune.search import BasicVariantGenerator, SearchGenerator

from results.store import ExperimentStore


def keep_snapshots_in(store: ExperimentStore | None) -> None:
    """Where the driver's search algorithms keep their snapshots (None: nowhere)."""
    _KeepsSnapshots.store = store


class _KeepsSnapshots:
    """Mixin for a Tune SearchAlgorithm: keep the snapshot once `save_to_dir` has written it.

    Tune calls the search algorithm's `save_to_dir` right after it writes the experiment state;
    only its callbacks' state comes later, and this project's callbacks keep none."""

    store: ClassVar[ExperimentStore | None] = None  # keep_snapshots_in
    _warned: ClassVar[bool] = False

    def save_to_dir(self, dirpath: str, session_str: str) -> Any:
        saved = super().save_to_dir(dirpath, session_str)  # type: ignore[misc]
        store = _KeepsSnapshots.store
        if store is None:
            return saved
        try:
            files = {p.name: p.read_bytes() for p in Path(dirpath).iterdir()
                     if p.is_file() and not p.name.startswith(".") and session_str in p.name}
            store.keep_tune_state(session_str, files)
        except OSError as exc:
            # The search goes on; --resume falls back to what Tune's upload left in ray/, so
            # the snapshot kept before (now older than that) must not come back.
            store.drop_tune_state()
            if not _KeepsSnapshots._warned:
                _KeepsSnapshots._warned = True
                print(f"warning: could not keep Ray Tune's snapshot whole in {store.uri()} "
                      f"({exc}); a --resume after a hard kill may draw extra trials",
                      file=sys.stderr, flush=True)
        return saved


class KeptSearchGenerator(_KeepsSnapshots, SearchGenerator):
    """Tune's SearchGenerator (what it wraps a Searcher in), keeping its snapshots."""


class KeptVariantGenerator(_KeepsSnapshots, BasicVariantGenerator):
    """Tune's BasicVariantGenerator (random and grid search), keeping its snapshots."""
