"""Checkpoint files: atomic state writes, damage detection and the fall-back to the newest complete one."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest
import torch

from raycontrast import checkpoint as ck
from raycontrast.session import LocalSession

from conftest import toy_state


def _run(tmp_path, iterations=(2, 4, 6)) -> tuple[pafs.FileSystem, str]:
    fs, run = pafs.LocalFileSystem(), str(tmp_path / "run")
    for it in iterations:
        ck.save_state(fs, f"{run}/checkpoint_{it:08d}", toy_state(it))
    return fs, run


def test_save_is_atomic_and_round_trips(tmp_path):
    fs, run = _run(tmp_path, [2])
    d = tmp_path / "run" / "checkpoint_00000002"
    assert sorted(p.name for p in d.iterdir()) == ["state.pt"]  # no temp file left behind
    got = ck.load_state(fs, str(d))
    assert got["iteration"] == 2 and torch.equal(got["model"]["w"], torch.full((3,), 2.0))
    # the file is a plain torch checkpoint, loadable with weights_only=True
    assert torch.load(d / "state.pt", weights_only=True)["iteration"] == 2


@pytest.mark.parametrize("damage", ["truncated", "missing", "garbage", "not_ours"])
def test_damaged_checkpoint_is_named(tmp_path, damage):
    fs, run = _run(tmp_path, [2])
    f = tmp_path / "run" / "checkpoint_00000002" / "state.pt"
    if damage == "truncated":
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "missing":
        f.unlink()
    elif damage == "garbage":
        f.write_bytes(b"\0" * 100)
    else:
        torch.save({"model": {}}, f)
    word = "missing" if damage == "missing" else "incomplete or corrupt"
    with pytest.raises(ValueError, match=rf"checkpoint .*checkpoint_00000002/state.pt is {word}"):
        ck.load_state(fs, str(f.parent))


def test_list_checkpoints_oldest_first(tmp_path):
    fs, run = _run(tmp_path, [10, 2, 4])
    (tmp_path / "run" / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray's file: not a checkpoint
    (tmp_path / "run" / "other").mkdir()
    names = [p.rsplit("/", 1)[1] for p in ck.list_checkpoints(fs, run)]
    assert names == ["checkpoint_00000002", "checkpoint_00000004", "checkpoint_00000010"]
    assert ck.list_checkpoints(fs, str(tmp_path / "nowhere")) == []


def test_load_latest_falls_back_to_newest_complete(tmp_path):
    fs, run = _run(tmp_path)
    newest = tmp_path / "run" / "checkpoint_00000006" / "state.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # e.g. a copy cut short
    loaded = ck.load_latest(fs, run)
    assert loaded.state["iteration"] == 4 and loaded.path.endswith("checkpoint_00000004")
    assert [p.rsplit("/", 1)[1] for p, _ in loaded.skipped] == ["checkpoint_00000006"]
    msg = loaded.describe()
    assert msg.startswith(f"checkpoint {newest} is incomplete or corrupt (")
    assert msg.endswith(f"; resuming from {tmp_path / 'run' / 'checkpoint_00000004'} instead")


def test_load_latest_takes_the_newest_iteration_whatever_the_clocks(tmp_path):
    fs, run = pafs.LocalFileSystem(), str(tmp_path / "run")
    # Ray Train run names: iteration first, then the writer's clock (here running backwards, as on two
    # nodes whose clocks disagree); a registered or an unregistered checkpoint alike.
    for it, stamp in ((2, "20261201-120000"), (4, "20261201-110000"), (6, "20261201-100000")):
        ck.save_state(fs, f"{run}/checkpoint_{it:08d}_{stamp}-000000000", toy_state(it))
    loaded = ck.load_latest(fs, run)
    assert loaded.state["iteration"] == 6 and loaded.skipped == [] and loaded.describe() is None
    (tmp_path / "run" / "checkpoint_00000006_20261201-100000-000000000" / "state.pt").unlink()
    loaded = ck.load_latest(fs, run)
    assert loaded.state["iteration"] == 4 and len(loaded.skipped) == 1


def test_no_complete_checkpoint_starts_from_scratch(tmp_path):
    fs, run = _run(tmp_path, [2])
    (tmp_path / "run" / "checkpoint_00000002" / "state.pt").write_bytes(b"PK")
    loaded = ck.load_latest(fs, run)
    assert loaded.state is None and loaded.path is None
    assert loaded.describe().endswith("; starting from scratch instead")
    assert ck.load_latest(fs, str(tmp_path / "empty")) == ck.Loaded(None, None, [])


def test_local_session_skips_a_damaged_checkpoint(tmp_path):
    fs, run = _run(tmp_path)
    (tmp_path / "run" / "checkpoint_00000006" / "state.pt").write_bytes(b"")
    lines = []
    session = LocalSession(run, fs, num_to_keep=5, log=lines.append)
    assert session.load_checkpoint().iteration == 4
    assert len(lines) == 1 and "checkpoint_00000006/state.pt is incomplete or corrupt" in lines[0]


def test_retention_keeps_the_best_checkpoint_by_val_miou(tmp_path):
    fs, run = _run(tmp_path, [2, 4, 6, 8])
    scores = {2: 0.3, 4: 0.5, 6: 0.5, 8: float("nan")}  # a tie goes to the earliest; NaN never wins
    paths = ck.list_checkpoints(fs, run)
    assert ck.best_checkpoint(paths, scores).endswith("checkpoint_00000004")
    assert ck.checkpoint_iteration(f"{run}/checkpoint_00000012_20261201-000000-000000000") == 12
    assert ck.checkpoint_iteration(f"{run}/checkpoint_2026-12-01_00-00-00") == -1
    assert ck.retain_checkpoints(fs, run, scores, "all").endswith("checkpoint_00000004")
    assert len(ck.list_checkpoints(fs, run)) == 4
    kept = ck.retain_checkpoints(fs, run, scores, "best")
    assert (
        [p.rsplit("/", 1)[1] for p in ck.list_checkpoints(fs, run)]
        == ["checkpoint_00000004"]
        == [kept.rsplit("/", 1)[1]]
    )
    assert ck.retain_checkpoints(fs, run, scores, "none") is None and ck.list_checkpoints(fs, run) == []
