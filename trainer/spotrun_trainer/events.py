"""The trainer's standard output: one JSON object per line (docs/contracts.md).

Standard output belongs to these lines only; diagnostics go to logging (stderr), so
the local cloud and CloudWatch Logs Insights can parse every stdout line.
"""

from __future__ import annotations

import json
import math
import sys
import threading
from typing import Any, TextIO

# Re-entrant because a signal handler on the main thread may emit mid-emit.
_lock = threading.RLock()


def _plain(value: Any) -> Any:
    """Make a value JSON-safe: NaN/inf become null, unknown objects their str()."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):  # a numpy or torch scalar
        return _plain(value.item())
    return str(value)


def emit(event: str, stream: TextIO | None = None, **fields: Any) -> None:
    """Write ``{"event": event, **fields}`` as one line and flush it at once."""
    line = json.dumps({"event": event, **_plain(fields)}, separators=(",", ":"))
    out = stream if stream is not None else sys.stdout
    # Threads (the watcher, the saver) emit too: keep each line whole.
    with _lock:
        out.write(line + "\n")
        out.flush()
