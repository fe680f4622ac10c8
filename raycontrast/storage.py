"""The one storage edge: where runs and experiments live, and how files get there (no Ray).

A storage path is a local folder, an NFS mount, or a URI (`s3://bucket/prefix`; `gs://`, `hdfs://` through
pyarrow). `open_storage` turns it into a `Storage`: a pyarrow filesystem, the root on it, and the two values
Ray Train / Tune take (`storage_path`, `storage_filesystem`). Nothing else in raycontrast parses `://`.

Writes are atomic: readers see the old file or the complete new one, never a partial one. On local disks
and NFS a temporary sibling `<name>.tmp-<random>` is written, flushed and renamed over the target; on object
stores (S3, GCS, ABFS) one upload to the final key, which becomes visible only once complete.

Run and experiment folders are claimed with `check_run_dir`: one that exists without `--resume`, or is
missing with it, is a `ConfigError` on `run.name` (also a `FileExistsError` / `FileNotFoundError`); and
held with a `lease.Lease`, so only one driver works on a run or an experiment at a time.
"""

from __future__ import annotations

import contextlib
import os
import posixpath
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

import pyarrow.fs as pafs

from raycontrast.config import Config, ConfigError, apply_overrides

__all__ = [
    "SHARED_FS_TYPES",
    "RunExistsError",
    "RunMissingError",
    "Storage",
    "absolute",
    "absolute_paths",
    "check_run_dir",
    "check_shared_storage",
    "disk_use",
    "exists",
    "is_uri",
    "locate",
    "path_on",
    "shown_path",
    "mount_fs_type",
    "open_storage",
    "run_storage",
    "write_atomic",
]

_OBJECT_STORES = frozenset({"s3", "gcs", "abfs"})
# Filesystems that several machines can mount at the same path (network / cluster / FUSE object stores).
SHARED_FS_TYPES = frozenset(
    ["nfs", "nfs4", "cifs", "smb3", "smbfs", "lustre", "gpfs", "ceph", "glusterfs", "beegfs", "wekafs"]
)  # fmt: skip
Payload = bytes | Callable[[BinaryIO], None]  # the bytes, or a function that writes them to a file


def is_uri(path: str) -> bool:
    """`s3://...`, `gs://...`, `file://...`: a path that names its own filesystem."""
    return "://" in path


def path_on(path: str) -> str:
    """A path as its own filesystem spells it: `s3://bucket/key` -> `bucket/key`, `file:///x` -> `/x`;
    local paths unchanged."""
    if not is_uri(path):
        return path
    scheme, rest = path.split("://", 1)
    return ("/" + rest.lstrip("/")) if scheme == "file" else rest


def shown_path(fs: pafs.FileSystem, path: str) -> str:
    """A path on `fs` as a user passes it back to the CLI: `s3://bucket/key` on S3, `gs://...` on GCS,
    the path itself elsewhere."""
    scheme = {"s3": "s3", "gcs": "gs", "abfs": "abfs"}.get(fs.type_name)
    return f"{scheme}://{path.lstrip('/')}" if scheme else path


def absolute(path: str) -> str:
    """Local paths absolute (`~` expanded): Ray workers and job drivers do not share the caller's cwd.
    URIs are returned unchanged."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def locate(
    path: str | os.PathLike[str],
    filesystem: pafs.FileSystem | None = None,
    *,
    s3_endpoint: str | None = None,
    s3_scheme: str = "https",
) -> tuple[pafs.FileSystem, str]:
    """`(filesystem, path on it)`: a given `filesystem` is used as is; `s3://` gets an `S3FileSystem`
    (`s3_endpoint` for MinIO/Ceph, credentials from the usual AWS variables); other URIs go through
    pyarrow's `from_uri`; local paths become absolute."""
    p = os.fspath(path)
    if filesystem is not None:
        return filesystem, p.rstrip("/") or "/"
    if p.startswith("s3://"):
        kwargs = {"endpoint_override": s3_endpoint} if s3_endpoint else {}
        return pafs.S3FileSystem(scheme=s3_scheme, **kwargs), p[len("s3://") :].rstrip("/")
    if is_uri(p):
        fs, on_fs = pafs.FileSystem.from_uri(p)
        return fs, on_fs.rstrip("/")
    return pafs.LocalFileSystem(), absolute(p)


@dataclass(frozen=True)
class Storage:
    """A storage root. `fs` + `root` address files; `ray_path` + `ray_fs` are what Ray Train and Tune take
    as `storage_path` / `storage_filesystem` (Ray resolves other URIs itself, so `ray_fs` is then None)."""

    fs: pafs.FileSystem
    root: str
    ray_path: str
    ray_fs: pafs.FileSystem | None
    shown: str  # the root as the user wrote it (absolute), for messages

    @property
    def is_local(self) -> bool:
        return self.fs.type_name == "local"

    def path(self, *parts: str) -> str:
        """A path under the root, on `fs`."""
        return posixpath.join(self.root, *parts)

    def ray(self, *parts: str) -> str:
        """A path under the root, in Ray's spelling (what `Tuner.restore` and Train run paths use)."""
        return posixpath.join(self.ray_path, *parts)

    def exists(self, path: str) -> bool:
        return exists(self.fs, path)

    def uri(self, path: str) -> str:
        """A path on `fs` as users write it (`s3://bucket/key` for S3): what tables record and the CLI
        reads back."""
        if not is_uri(self.shown):
            return path
        scheme = self.shown.split("://", 1)[0]
        return f"file://{path}" if scheme == "file" else f"{scheme}://{path.lstrip('/')}"


def open_storage(storage_path: str, *, s3_endpoint: str | None = None, s3_scheme: str = "https") -> Storage:
    """`Storage` of a `run.storage_path` (with `run.s3_endpoint` / `run.s3_scheme` for S3)."""
    fs, root = locate(storage_path, s3_endpoint=s3_endpoint, s3_scheme=s3_scheme)
    if storage_path.startswith("s3://"):
        return Storage(fs, root, root, fs, storage_path.rstrip("/"))
    if is_uri(storage_path):
        return Storage(fs, root, storage_path.rstrip("/"), None, storage_path.rstrip("/"))
    return Storage(fs, root, root, None, root)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def disk_use(fs: pafs.FileSystem, path: str) -> int:
    """Bytes of all files under `path` (0 when it does not exist)."""
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File)


# ------------------------------------------------------------------------------------------ run folders


class RunExistsError(ConfigError, FileExistsError):
    """A run or experiment of that name exists and `--resume` was not given."""


class RunMissingError(ConfigError, FileNotFoundError):
    """`--resume` of a run or experiment that does not exist."""


def check_run_dir(storage: Storage, name: str, *, resume: bool, noun: str = "run") -> str:
    """The folder of run (or experiment, `noun`) `name`, which must exist exactly when resuming: runs
    never mix. Returns its path on `storage.fs`."""
    path = storage.path(name)
    found = storage.exists(path)
    if found and not resume:
        article = "an" if noun[0] in "aeiou" else "a"
        raise RunExistsError(
            f"run.name: {article} {noun} named '{name}' already exists at {storage.ray(name)}; pass --resume "
            "to continue it, or choose another run.name",
            "run.name",
        )
    if resume and not found:
        raise RunMissingError(
            f"run.name: --resume: no {noun} named '{name}' under {storage.shown}: {storage.ray(name)} does not "
            "exist; run without --resume to start it, or set run.name / run.storage_path to the one to continue",
            "run.name",
        )
    return path


def mount_fs_type(path: str) -> str | None:
    """Filesystem type of the mount holding local `path` (Linux /proc/mounts; None elsewhere)."""
    try:
        with open("/proc/mounts") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return None
    path = os.path.realpath(path)
    best, fs_type = "", None
    for mnt, typ in mounts:
        mnt = mnt.replace("\\040", " ")
        inside = path == mnt or path.startswith(mnt.rstrip("/") + "/")
        if inside and len(mnt) > len(best):
            best, fs_type = mnt, typ
    return fs_type


def check_shared_storage(storage_path: str, alive_nodes: int, fs_type: str | None = None) -> None:
    """Multi-node runs need storage every node sees; a node-local path is a `ConfigError` saying why.

    `fs_type`: the mount type of a local path (`mount_fs_type`); URIs other than `file://` are shared.
    """
    if alive_nodes <= 1 or (is_uri(storage_path) and not storage_path.startswith("file://")):
        return
    if fs_type and (fs_type in SHARED_FS_TYPES or fs_type.startswith("fuse.")):
        return
    raise ConfigError(
        f"run.storage_path: the cluster has {alive_nodes} nodes but '{storage_path}' is a local path "
        f"(filesystem {fs_type or 'unknown'}): each node would write its own checkpoints and trials could "
        "not resume on another node. Use a shared mount (NFS) or s3://bucket/prefix (with run.s3_endpoint "
        "for S3-compatible stores)",
        "run.storage_path",
    )


# ---------------------------------------------------------------------------------------- atomic writes


def _is_object_store(fs: pafs.FileSystem) -> bool:
    while isinstance(fs, pafs.SubTreeFileSystem):
        fs = fs.base_fs
    return fs.type_name in _OBJECT_STORES


def _emit(f: BinaryIO, data: Payload) -> None:
    if callable(data):
        data(f)
    else:
        f.write(data)


def write_atomic(fs: pafs.FileSystem, path: str, data: Payload) -> None:
    """Write `data` (bytes, or a function writing to a binary file) to `path` on `fs` atomically.

    Object stores: one upload stream to the final key. Disks, NFS, HDFS: a temporary sibling
    `<name>.tmp-<random>` moved over `path` (rename(2) replaces atomically, also on NFS). A failed write
    removes its temporary file.
    """
    if _is_object_store(fs):
        with fs.open_output_stream(path) as out:
            _emit(out, data)
        return
    parent = posixpath.dirname(path)
    if parent:
        fs.create_dir(parent, recursive=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    try:
        with fs.open_output_stream(tmp) as out:
            _emit(out, data)
        fs.move(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            fs.delete_file(tmp)
        raise


# ------------------------------------------------------------------------------------------- config paths


def absolute_paths(cfg: Config) -> Config:
    """`cfg` with its local storage, data and weights paths absolute (URIs untouched): Ray workers and job
    drivers do not share the caller's working directory."""
    fixes = {
        key: absolute(value)
        for key, value in (
            ("run.storage_path", cfg.run.storage_path),
            ("data.root", cfg.data.root),
            ("model.pretrained", cfg.model.pretrained),
        )
        if value and absolute(value) != value
    }
    return apply_overrides(cfg, fixes) if fixes else cfg


def run_storage(cfg: Config) -> Storage:
    """`Storage` of a config's `run.storage_path` (with its S3 endpoint and scheme)."""
    r = cfg.run
    return open_storage(r.storage_path, s3_endpoint=r.s3_endpoint, s3_scheme=r.s3_scheme)
