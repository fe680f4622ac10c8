"""The storage edge: paths to filesystems, run folders that exist exactly when resuming, atomic writes."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from raycontrast import storage
from raycontrast.config import ConfigError


def test_open_storage(tmp_path, monkeypatch):
    s3 = storage.open_storage("s3://bucket/a/b/", s3_endpoint="127.0.0.1:9", s3_scheme="http")
    path, fs = s3.ray_path, s3.ray_fs
    assert path == "bucket/a/b" and fs.type_name == "s3"
    assert (s3.fs, s3.root) == (fs, "bucket/a/b") and s3.shown == "s3://bucket/a/b"
    gs = storage.open_storage("gs://bucket/x/")
    assert (gs.ray_path, gs.ray_fs) == ("gs://bucket/x", None)
    monkeypatch.chdir(tmp_path)
    rel = storage.open_storage("rel")
    assert (rel.ray_path, rel.ray_fs) == (str(tmp_path / "rel"), None)
    assert rel.is_local and rel.path("run", "x") == str(tmp_path / "rel" / "run" / "x")
    assert storage.locate(str(tmp_path))[1] == str(tmp_path)
    assert storage.is_uri("s3://b/p") and not storage.is_uri("/data/results")
    assert storage.absolute("s3://b/p") == "s3://b/p" and storage.absolute("x") == str(tmp_path / "x")


def test_run_dir_exists_exactly_when_resuming(tmp_path):
    st = storage.open_storage(str(tmp_path))
    with pytest.raises(storage.RunMissingError, match="no experiment named 'e'.*does not exist") as missing:
        storage.check_run_dir(st, "e", resume=True, noun="experiment")
    assert isinstance(missing.value, FileNotFoundError) and isinstance(missing.value, ConfigError)
    assert missing.value.key == "run.name"
    assert storage.check_run_dir(st, "e", resume=False) == str(tmp_path / "e")
    (tmp_path / "e").mkdir()
    with pytest.raises(
        storage.RunExistsError, match="a run named 'e' already exists .* pass --resume"
    ) as found:
        storage.check_run_dir(st, "e", resume=False)
    assert isinstance(found.value, FileExistsError) and found.value.key == "run.name"
    assert storage.check_run_dir(st, "e", resume=True) == str(tmp_path / "e")


@pytest.mark.parametrize("payload", [b"new bytes", lambda f: f.write(b"new bytes")])
def test_write_atomic_replaces_and_leaves_no_temp(tmp_path, payload):
    target = tmp_path / "sub" / "file.bin"
    fs = pafs.LocalFileSystem()
    storage.write_atomic(fs, str(target), b"old")
    storage.write_atomic(fs, str(target), payload)
    assert target.read_bytes() == b"new bytes" and sorted(p.name for p in target.parent.iterdir()) == [
        "file.bin"
    ]


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "file.bin"
    storage.write_atomic(pafs.LocalFileSystem(), str(target), b"old")

    def boom(f):
        f.write(b"half")
        raise RuntimeError("writer died")

    with pytest.raises(RuntimeError, match="writer died"):
        storage.write_atomic(pafs.LocalFileSystem(), str(target), boom)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["file.bin"]


def test_absolute_paths_of_a_config(tmp_path, monkeypatch):
    from conftest import tiny_config

    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tmp_path, **{"run.storage_path": "rel", "data.root": "s3://b/cache"})
    fixed = storage.absolute_paths(cfg)
    assert fixed.run.storage_path == str(tmp_path / "rel") and fixed.data.root == "s3://b/cache"
    assert storage.absolute_paths(fixed) is fixed  # nothing to fix: the same object
