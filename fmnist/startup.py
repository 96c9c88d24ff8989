"""Import Keras without TensorFlow's native start-up lines on stderr.

TF_CPP_MIN_LOG_LEVEL (2 here, TensorFlow's info and warnings out, unless set) no longer reaches
what TensorFlow 2.21 logs while it loads: absl prints those lines before TensorFlow reads the
variable (`WARNING: All log messages before absl::InitializeLog() is called ...`, oneDNN,
"Could not find cuda drivers", twice), and a machine without a GPU gets `E0000 ...
cuda_platform.cc] failed call to cuInit` when the GPUs are first listed. `import_keras` loads
Keras and lists the GPUs with stderr caught (under JAX or PyTorch it loads TensorFlow, where
installed, as Keras does at a run's first seed), then writes back every line but those the
variable would have hidden, so Python warnings, tracebacks and real errors still show.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from types import ModuleType

# absl's prefix: severity letter, date, time, thread id, file:line]
_ABSL_LINE = re.compile(rb"^([IWEF])\d{4} [\d:.]+ +\d+ (\S+):\d+\] ")
_BANNER = b"WARNING: All log messages before absl::InitializeLog() is called"
_SEVERITY = {b"I": 0, b"W": 1, b"E": 2, b"F": 3}


def hidden(line: bytes, min_level: int) -> bool:
    """Whether TF_CPP_MIN_LOG_LEVEL=`min_level` would have kept this stderr line out."""
    if min_level <= 0:
        return False
    if line.startswith(_BANNER):
        return True
    match = _ABSL_LINE.match(line)
    if match is None:
        return False
    severity = _SEVERITY[match.group(1)]
    # TensorFlow up to 2.15 logged a failed cuInit (no GPU or no driver) as a warning; 2.21
    # says "error" on every machine without a GPU. Left to the level of a warning.
    if match.group(2).startswith(b"cuda_platform.cc") and b"failed call to cuInit" in line:
        severity = 1
    return severity < min_level


def _min_level() -> int:
    try:
        return int(os.environ.get("TF_CPP_MIN_LOG_LEVEL", "0"))
    except ValueError:
        return 0


@contextlib.contextmanager
def quiet_native_logs() -> Iterator[None]:
    """Catch file descriptor 2 for the block, then write back what the log level keeps."""
    level = _min_level()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):  # no stderr to catch
        yield
        return
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            with contextlib.suppress(OSError, ValueError):
                sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = b"".join(line for line in caught if not hidden(line, level))
            while kept:
                kept = kept[os.write(2, kept):]


def import_keras() -> ModuleType:
    """Import Keras and let its backend look for GPUs, without the start-up chatter."""
    if "keras" in sys.modules:
        return sys.modules["keras"]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet_native_logs():
        import keras

        # Keras loads TensorFlow wherever it is installed, whatever the backend
        # (`keras.utils.set_random_seed`, which every run calls, seeds it too): loaded here,
        # its lines are filtered under JAX or PyTorch as under TensorFlow.
        if importlib.util.find_spec("tensorflow") is not None:
            import tensorflow as tf

            if keras.backend.backend() == "tensorflow":
                tf.config.list_physical_devices("GPU")  # where cuInit speaks; threads unset
    return keras
