"""The local cloud: spotrun on one machine (moto as AWS, trainers as processes).

Public names: :class:`LocalCloud` and :class:`CloudConfig` (``spotrun_local.cloud``),
:class:`Fault` (chaos), :class:`CapacityFault`. They load lazily, so importing
``spotrun_local.template`` (as the control-plane tests do) does not start moto.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

_EXPORTS = {
    "LocalCloud": "spotrun_local.cloud",
    "CloudConfig": "spotrun_local.cloud",
    "Fault": "spotrun_local.chaos",
    "CapacityFault": "spotrun_local.capacity",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'spotrun_local' has no attribute {name!r}")
