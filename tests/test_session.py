"""The session contract: both sessions conform to `session.Session` (as torchtitan tests its Protocols)."""

from __future__ import annotations

import inspect

import pyarrow.fs as pafs
import pytest
import torch

from raycontrast.session import LocalSession, Session

MEMBERS = ("prepare_model", "load_checkpoint", "report", "redeliver", "preempted", "checkpoint_now")


def _same_parameters(cls: type, name: str) -> bool:
    got, want = inspect.signature(getattr(cls, name)), inspect.signature(getattr(Session, name))
    return [(p.name, p.kind) for p in got.parameters.values()] == [
        (p.name, p.kind) for p in want.parameters.values()
    ]


def test_local_session_conforms(tmp_path) -> None:
    session = LocalSession(str(tmp_path / "run"), pafs.LocalFileSystem(), num_to_keep=1)
    assert isinstance(session, Session)
    assert (session.rank, session.world, session.device) == (0, 1, torch.device("cpu"))
    assert all(_same_parameters(LocalSession, m) for m in MEMBERS)


def test_ray_session_conforms(monkeypatch) -> None:
    """Built outside a worker with Ray Train's context faked: the members the loop uses, their signatures."""
    ray_train = pytest.importorskip("ray.train")
    ray_torch = pytest.importorskip("ray.train.torch")
    from raycontrast.train import _RaySession

    class Context:
        def get_world_rank(self) -> int:
            return 1

        def get_world_size(self) -> int:
            return 2

        def get_storage(self):
            class Storage:
                storage_filesystem, experiment_fs_path = pafs.LocalFileSystem(), "/nowhere/run"

            return Storage()

    monkeypatch.setattr(ray_train, "get_context", lambda: Context())
    monkeypatch.setattr(ray_torch, "get_device", lambda: torch.device("cpu"))
    session = _RaySession()
    assert isinstance(session, Session)
    assert (session.rank, session.world, session.device) == (1, 2, torch.device("cpu"))
    assert all(_same_parameters(_RaySession, m) for m in MEMBERS)
