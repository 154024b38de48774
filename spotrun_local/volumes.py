"""EBS volumes and snapshots as folders that follow moto's EC2 records.

moto keeps the records (ids, AZs, tags, attachments, states); this module wraps
its in-process EBS methods so the bytes follow at the moment of each call:
``CreateVolume`` makes ``<root>/volumes/<vol-id>`` (a copy of the snapshot's
folder when created from one), ``CreateSnapshot`` copies the volume's folder as
it is at that instant into ``<root>/snapshots/<snap-id>``, deletes remove.

Copies use ``cp --reflink=auto``: a reflink where the filesystem has them, a
real copy otherwise. Hard links would be cheaper but are not safe here: a
writer that changes a file in place would change the snapshot with it.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_WRAPPED = (
    "create_volume",
    "delete_volume",
    "create_snapshot",
    "create_snapshots",
    "copy_snapshot",
    "delete_snapshot",
)


def copy_tree(source: Path, destination: Path) -> None:
    """Copy a folder's contents, with reflinks where possible; metadata kept."""
    destination.mkdir(parents=True, exist_ok=True)
    if source.is_dir() and any(source.iterdir()):
        subprocess.run(
            ["cp", "-a", "--reflink=auto", f"{source}/.", f"{destination}/"],
            check=True,
            capture_output=True,
        )


@dataclass
class VolumeFolders:
    """Keeps ``<root>/volumes`` and ``<root>/snapshots`` in step with moto's EBS backend."""

    root: Path
    _originals: dict[str, Any] = field(default_factory=dict)

    @property
    def volume_root(self) -> Path:
        return self.root / "volumes"

    @property
    def snapshot_root(self) -> Path:
        return self.root / "snapshots"

    def volume_dir(self, volume_id: str) -> Path:
        return self.volume_root / volume_id

    def snapshot_dir(self, snapshot_id: str) -> Path:
        return self.snapshot_root / snapshot_id

    def install(self, backend: Any) -> VolumeFolders:
        """Wrap ``backend``'s EBS methods (that object only; moto's classes stay as they are)."""
        self.volume_root.mkdir(parents=True, exist_ok=True)
        self.snapshot_root.mkdir(parents=True, exist_ok=True)
        self._backend = backend
        for name in _WRAPPED:
            self._originals[name] = getattr(backend, name)
            setattr(backend, name, getattr(self, f"_{name}"))
        return self

    def uninstall(self) -> None:
        for name in self._originals:
            delattr(self._backend, name)  # the instance attribute shadowed the method
        self._originals.clear()

    # -- wrappers (each calls moto first: a refused call changes no folder) -------------

    def _create_volume(self, *args: Any, **kwargs: Any) -> Any:
        volume = self._originals["create_volume"](*args, **kwargs)
        snapshot_id = kwargs.get("snapshot_id") or (args[2] if len(args) > 2 else None)
        target = self.volume_dir(volume.id)
        if snapshot_id:
            copy_tree(self.snapshot_dir(snapshot_id), target)
        else:
            target.mkdir(parents=True, exist_ok=True)
        log.debug("volume %s: folder %s (from %s)", volume.id, target, snapshot_id)
        return volume

    def _delete_volume(self, volume_id: str) -> Any:
        volume = self._originals["delete_volume"](volume_id)
        shutil.rmtree(self.volume_dir(volume_id), ignore_errors=True)
        return volume

    def _create_snapshot(self, volume_id: str, *args: Any, **kwargs: Any) -> Any:
        snapshot = self._originals["create_snapshot"](volume_id, *args, **kwargs)
        copy_tree(self.volume_dir(volume_id), self.snapshot_dir(snapshot.id))
        return snapshot

    def _create_snapshots(self, *args: Any, **kwargs: Any) -> Any:
        snapshots = self._originals["create_snapshots"](*args, **kwargs)
        for snapshot in snapshots:
            copy_tree(self.volume_dir(snapshot.volume.id), self.snapshot_dir(snapshot.id))
        return snapshots

    def _copy_snapshot(self, source_snapshot_id: str, *args: Any, **kwargs: Any) -> Any:
        snapshot = self._originals["copy_snapshot"](source_snapshot_id, *args, **kwargs)
        copy_tree(self.snapshot_dir(source_snapshot_id), self.snapshot_dir(snapshot.id))
        return snapshot

    def _delete_snapshot(self, snapshot_id: str) -> Any:
        snapshot = self._originals["delete_snapshot"](snapshot_id)
        shutil.rmtree(self.snapshot_dir(snapshot_id), ignore_errors=True)
        return snapshot
