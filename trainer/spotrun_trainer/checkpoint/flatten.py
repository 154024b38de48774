"""Nested training state <-> a flat map of tensors plus a JSON-able tree of everything else."""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from .errors import UnsupportedStateError

# A tree node is a one-key dict naming its kind, so that the JSON round trip keeps
# every Python type exactly: tuples stay tuples, int dict keys (optimizer state) stay
# ints, floats keep every bit (hex form also carries nan/inf, which strict JSON lacks).


def _escape(key: str) -> str:
    # JSON-pointer escaping keeps tensor names unambiguous when a key contains "/".
    return key.replace("~", "~0").replace("/", "~1")


def _scalar(value: Any, path: str) -> dict[str, Any]:
    if value is None:
        return {"none": None}
    if isinstance(value, bool):  # before int: bool is an int subclass
        return {"bool": value}
    if isinstance(value, int):
        return {"int": int(value)}
    if isinstance(value, float):
        return {"float": float(value).hex()}
    if isinstance(value, str):
        return {"str": value}
    if isinstance(value, bytes):
        return {"bytes": base64.b64encode(value).decode("ascii")}
    if isinstance(value, np.generic) and not isinstance(value, np.ndarray):
        return _scalar(value.item(), path)
    raise UnsupportedStateError(f"cannot checkpoint a {type(value).__name__} at {path or '/'!r}")


def flatten(state: Mapping[Any, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``state`` into ``{name: tensor}`` and a JSON-able tree that refers to the names.

    Plain values are serialised here, at call time, so a later mutation of the caller's
    dicts or lists cannot change what is saved.
    """
    if not isinstance(state, Mapping):
        raise UnsupportedStateError(f"state must be a mapping, not {type(state).__name__}")
    tensors: dict[str, torch.Tensor] = {}

    def unique(name: str) -> str:
        # keys 1 and "1" of one dict map to the same path; suffix the second one
        if name not in tensors:
            return name
        n = 1
        while f"{name}#{n}" in tensors:
            n += 1
        return f"{name}#{n}"

    def child(path: str, part: str) -> str:
        # "model/0.weight": state_dict keys keep their dots, nesting levels get a slash
        return f"{path}/{part}" if path else part

    def walk(obj: Any, path: str) -> dict[str, Any]:
        if isinstance(obj, torch.Tensor):
            name = unique(path)
            tensors[name] = obj
            return {"tensor": name}
        if isinstance(obj, np.ndarray):
            if obj.dtype == object:
                raise UnsupportedStateError(f"cannot checkpoint an object array at {path!r}")
            name = unique(path)
            tensors[name] = torch.from_numpy(np.ascontiguousarray(obj).copy())
            return {"ndarray": name}
        if isinstance(obj, Mapping):
            items = []
            for key, value in obj.items():
                items.append([_scalar(key, path), walk(value, child(path, _escape(str(key))))])
            return {"dict": items}
        if isinstance(obj, tuple):
            return {"tuple": [walk(v, child(path, str(i))) for i, v in enumerate(obj)]}
        if isinstance(obj, list):
            return {"list": [walk(v, child(path, str(i))) for i, v in enumerate(obj)]}
        return _scalar(obj, path)

    tree = walk(state, "")
    return tensors, tree


def _unscalar(node: dict[str, Any]) -> Any:
    ((kind, value),) = node.items()
    if kind == "none":
        return None
    if kind in ("bool", "int", "str"):
        return value
    if kind == "float":
        return float.fromhex(value)
    if kind == "bytes":
        return base64.b64decode(value)
    raise ValueError(f"unknown tree node {kind!r}")


def unflatten(tree: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> Any:
    """Rebuild the nested state from the tree and the tensors it names."""

    def build(node: dict[str, Any]) -> Any:
        ((kind, value),) = node.items()
        if kind == "tensor":
            return tensors[value]
        if kind == "ndarray":
            return tensors[value].numpy()
        if kind == "dict":
            return {_unscalar(k): build(v) for k, v in value}
        if kind == "tuple":
            return tuple(build(v) for v in value)
        if kind == "list":
            return [build(v) for v in value]
        return _unscalar(node)

    return build(tree)


def tensor_names(tree: dict[str, Any]) -> list[str]:
    """Names of the tensors a tree refers to, in tree order."""
    names: list[str] = []

    def visit(node: dict[str, Any]) -> None:
        ((kind, value),) = node.items()
        if kind in ("tensor", "ndarray"):
            names.append(value)
        elif kind == "dict":
            for _, v in value:
                visit(v)
        elif kind in ("tuple", "list"):
            for v in value:
                visit(v)

    visit(tree)
    return names
