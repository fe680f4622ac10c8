"""Rank-consistent resume without Ray: transient storage errors are retried and never taken for damage, a
persistent one fails clearly, and every rank of a 2-process gloo group resumes from the same checkpoint
that rank 0 chose (`train.resume_consistently`; the Ray tests cover it inside Ray Train workers)."""

from __future__ import annotations

import uuid

import pyarrow.fs as pafs
import pytest
import torch

from raycontrast import checkpoint as ck

from conftest import toy_state


def _run(root, iterations=(2, 4, 6)) -> str:
    run = str(root / "run")
    for it in iterations:
        ck.save_state(pafs.LocalFileSystem(), f"{run}/checkpoint_{it:08d}", toy_state(it))
    return run


class FlakyFS:
    """Reads through a real filesystem but the first `failures` opens of a state.pt raise OSError (an S3
    503, an NFS EIO); `failures=-1`: every open fails. Not "local", so reads are streamed through it."""

    type_name = "flaky"

    def __init__(self, failures: int) -> None:
        self._fs, self.failures, self.opens = pafs.LocalFileSystem(), failures, 0

    def __getattr__(self, name):
        return getattr(self._fs, name)

    def _open(self, path, how):
        if path.endswith("state.pt"):
            self.opens += 1
            if self.failures < 0 or self.opens <= self.failures:
                raise OSError(f"When reading {path}: AWS Error SLOW_DOWN (simulated)")
        return getattr(self._fs, how)(path)

    def open_input_file(self, path):
        return self._open(path, "open_input_file")

    def open_input_stream(self, path):
        return self._open(path, "open_input_stream")


def test_transient_read_errors_are_retried(tmp_path):
    run = _run(tmp_path)
    fs, waits = FlakyFS(failures=3), []
    loaded = ck.load_latest(fs, run, sleep=waits.append)
    assert loaded.state["iteration"] == 6 and loaded.skipped == []  # the newest, not an older one
    assert waits and waits == [ck.READ_BACKOFF_S * 2**i for i in range(len(waits))]  # doubling backoff


def test_a_persistent_read_error_fails_clearly_instead_of_falling_back(tmp_path):
    run = _run(tmp_path)
    with pytest.raises(
        ck.CheckpointReadError, match=r"checkpoint .*checkpoint_00000006/state.pt could not be "
    ):
        ck.load_latest(FlakyFS(failures=-1), run, sleep=lambda s: None)


def test_bytes_that_torch_reports_as_oserror_are_damage_not_storage(tmp_path):
    run = _run(tmp_path)
    newest = tmp_path / "run" / "checkpoint_00000006" / "state.pt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # torch: OSError(EINVAL)
    loaded = ck.load_latest(pafs.LocalFileSystem(), run, sleep=lambda s: pytest.fail("no retry for damage"))
    assert loaded.state["iteration"] == 4 and "incomplete or corrupt" in loaded.skipped[0][1]


# ------------------------------------------------------------------------ 2 ranks (gloo, no Ray)


def _rank_worker(rank: int, world: int, init_file: str, run: str, out_dir: str, failures: dict) -> None:
    import torch.distributed as dist

    from raycontrast.train import resume_consistently

    ck.READ_BACKOFF_S = 0.01
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        fs = FlakyFS(failures.get(rank, 0))
        state = resume_consistently(fs, run, rank, world, torch.device("cpu"))
        torch.save({"iteration": -1 if state is None else state.iteration}, f"{out_dir}/rank{rank}.pt")
    except Exception as exc:
        with open(f"{out_dir}/rank{rank}.err", "w") as f:
            f.write(f"{type(exc).__name__}: {exc}")
        raise
    finally:
        dist.destroy_process_group()


def _spawn(tmp_path, run: str, failures: dict) -> list[int]:
    import torch.multiprocessing as mp

    # A fresh rendezvous file per group: a file left by the previous group names its ports, long closed.
    init = tmp_path / f"init-{uuid.uuid4().hex[:8]}"
    mp.spawn(_rank_worker, args=(2, str(init), run, str(tmp_path), failures), nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True)["iteration"] for r in (0, 1)]


def test_every_rank_resumes_from_rank_0s_choice(tmp_path, capfd):
    run = _run(tmp_path)
    # A transient error on rank 1 only: it retries and loads the same checkpoint as rank 0.
    assert _spawn(tmp_path, run, {1: 2}) == [6, 6]
    # A damaged newest checkpoint: both ranks fall back to the same one, and both say so.
    newest = tmp_path / "run" / "checkpoint_00000006" / "state.pt"
    newest.write_bytes(b"\0" * 100)
    capfd.readouterr()
    assert _spawn(tmp_path, run, {}) == [4, 4]
    said = capfd.readouterr().out
    for rank in (0, 1):
        assert f"rank {rank}: checkpoint {newest} is incomplete or corrupt" in said
    # No checkpoint at all: both start from scratch.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _spawn(tmp_path, str(empty), {}) == [-1, -1]


def test_a_persistent_error_on_one_rank_fails_the_group(tmp_path):
    run = _run(tmp_path)
    with pytest.raises(Exception):  # noqa: B017 - whichever rank's error torch reports first
        _spawn(tmp_path, run, {1: -1})
    said = (tmp_path / "rank1.err").read_text()
    assert (
        said.startswith("CheckpointReadError: checkpoint ") and "could not be read after 5 attempts" in said
    )
