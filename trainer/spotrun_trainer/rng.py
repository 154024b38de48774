"""Capture and restore every random number generator a training step may draw from.

Python ``random``, NumPy's global generator, torch CPU and, when CUDA is in use,
every CUDA device. The captured state holds only tensors and plain values, as the
checkpoint store requires.
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import torch


def capture() -> dict[str, Any]:
    """The current state of every generator."""
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": {
            "version": version,
            "internal": torch.tensor(internal, dtype=torch.int64),
            "gauss": gauss,
        },
        "torch": torch.get_rng_state(),
        "cuda": None,
        "numpy": None,
    }
    # Only when CUDA is already initialised: capturing must not create a context.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    try:
        import numpy as np
    except ImportError:
        return state
    numpy_state = np.random.get_state(legacy=False)
    state["numpy"] = {
        "bit_generator": numpy_state["bit_generator"],
        "key": torch.from_numpy(numpy_state["state"]["key"].astype(np.int64)),
        "pos": int(numpy_state["state"]["pos"]),
        "has_gauss": int(numpy_state["has_gauss"]),
        "gauss": float(numpy_state["gauss"]),
    }
    return state


def restore(state: Mapping[str, Any]) -> None:
    """Put every generator back to ``state`` (from :func:`capture`)."""
    python = state["python"]
    internal = tuple(int(x) for x in python["internal"].tolist())
    random.setstate((int(python["version"]), internal, python["gauss"]))
    torch.set_rng_state(_byte_tensor(state["torch"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([_byte_tensor(s) for s in cuda])
    numpy_state = state.get("numpy")
    if numpy_state is not None:
        import numpy as np

        np.random.set_state(
            {
                "bit_generator": numpy_state["bit_generator"],
                "state": {
                    "key": numpy_state["key"].numpy().astype(np.uint32),
                    "pos": int(numpy_state["pos"]),
                },
                "has_gauss": int(numpy_state["has_gauss"]),
                "gauss": float(numpy_state["gauss"]),
            }
        )


def _byte_tensor(value: Any) -> torch.Tensor:
    # set_rng_state insists on a contiguous CPU uint8 tensor.
    return torch.as_tensor(value, dtype=torch.uint8).cpu().contiguous()
