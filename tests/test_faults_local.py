"""Failures without Ray, each checked on the files left behind: a writer process SIGKILLed in the middle of
writing a result table, a checkpoint or a canvas cache leaves the previous file intact; a local run resumes
past a truncated checkpoint. (With Ray: test_faults_ray.py.)
The machine may be loaded: every wait has a generous timeout and nothing asserts on wall time.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from raycontrast import checkpoint as ck
from raycontrast import train
from raycontrast.data.canvases import CanvasDataset, save_npz_atomic
from raycontrast.results import ResultsWriter, load_results

from conftest import ROOT, tiny_config
from fault_hooks import FaultHooks

KILL_TIMEOUT = 180  # s: waits for a child to reach its kill point on a loaded machine

# ------------------------------------------------------------------------ SIGKILL of a writer mid-write

# The child rewrites one file with the project's own writer; its storage is slowed down (512-byte chunks, a
# pause before each once 2 KiB are out) and it prints MID-WRITE at that point, so the test's SIGKILL lands
# with the temporary file half-written.
WRITER_CHILD = r"""
import os, sys, time
import numpy as np
mode, target = sys.argv[1], sys.argv[2]
CHUNK = 512

class Slow:
    def __init__(self, f):
        self._f, self._n, self._said = f, 0, False
    def __getattr__(self, name):
        return getattr(self._f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        self._f.close()
    def write(self, data):
        data = memoryview(data).cast("B")
        for i in range(0, len(data), CHUNK):
            if self._n >= 2048:
                if not self._said:
                    print("MID-WRITE", flush=True)
                    self._said = True
                time.sleep(0.05)
            self._f.write(data[i : i + CHUNK])
            self._f.flush()
            self._n += len(data[i : i + CHUNK])
        return len(data)

class SlowFS:
    def __init__(self, fs):
        self._fs = fs
    def __getattr__(self, name):
        return getattr(self._fs, name)
    def open_output_stream(self, path):
        return Slow(self._fs.open_output_stream(path))

import pyarrow.fs as pafs
fs = SlowFS(pafs.LocalFileSystem())
if mode in ("npz", "dataset"):  # the data cache opens its own local filesystem: make that one slow too
    pafs.LocalFileSystem = lambda *a, **k: fs
if mode == "table":
    from raycontrast.results import ResultsWriter
    w = ResultsWriter(target, class_names=["a", "b"], searched_keys=["x.y"])
    w.load_existing()  # a resumed search: the old rows, then many new ones written to slow storage
    w.fs = fs
    for t in range(200):
        w.on_report(f"new{t}", {"x.y": float(t)}, {"iteration": 2, "val_miou": 0.5, "val_class_iou": [0.5, 0.5]})
    w.flush()
elif mode == "checkpoint":
    import torch
    from raycontrast.checkpoint import capture_rng_state, save_state
    state = {"model": {"w": torch.zeros(10**5)}, "optimizer": {}, "scheduler": {}, "iteration": 4,
             "rng": capture_rng_state()}
    save_state(fs, target, state)
elif mode == "npz":
    from raycontrast.data.canvases import save_npz_atomic
    save_npz_atomic(target, a=np.arange(10**5))
elif mode == "dataset":
    from raycontrast.data.canvases import CanvasDataset
    CanvasDataset(target, "train", num_images=8, height=64, width=128)
print("DONE", flush=True)
"""


def _kill_when_mid_write(mode: str, target: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER_CHILD, mode, str(target)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        end, line = time.time() + KILL_TIMEOUT, ""
        while time.time() < end and line != "MID-WRITE":
            ready, _, _ = select.select([proc.stdout], [], [], 1.0)
            if ready:
                line = proc.stdout.readline().strip()
                if not line and proc.poll() is not None:
                    break
        assert line == "MID-WRITE", f"child never reached the write ({line!r}): {proc.stderr.read()[-2000:]}"
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
        proc.stderr.close()


def _partial_temps(d: Path) -> list[Path]:
    """The killed writer's temporary files: there must be one, half-written (proves the kill was mid-write)."""
    temps = [p for p in d.iterdir() if "tmp" in p.name]
    assert len(temps) == 1 and temps[0].stat().st_size >= 1024, temps
    return temps


def test_sigkill_mid_table_write_keeps_previous_tables(tmp_path):
    w = ResultsWriter(tmp_path, class_names=["a", "b"], searched_keys=["x.y"])
    w.on_report("old", {"x.y": 1.0}, {"iteration": 2, "val_miou": 0.25, "val_class_iou": [0.25, 0.25]})
    w.on_trial_end("old", "TERMINATED")
    before = {n: (tmp_path / f"{n}.parquet").read_bytes() for n in ("trials", "curves", "class_iou")}
    _kill_when_mid_write("table", tmp_path)
    for name, data in before.items():
        assert (tmp_path / f"{name}.parquet").read_bytes() == data, name
    (temp,) = _partial_temps(tmp_path)
    assert temp.name.startswith("trials.parquet.tmp-")  # trials is written first
    with pytest.raises(Exception):  # noqa: B017 - any parquet error: the file is cut short
        pq.read_table(temp)
    tables = load_results(tmp_path)
    assert tables["trials"]["trial_id"].tolist() == ["old"] and len(tables["curves"]) == 1


def test_sigkill_mid_checkpoint_write_keeps_previous_state(tmp_path):
    fs, ckdir = pafs.LocalFileSystem(), tmp_path / "run" / "checkpoint_00000004"
    state = {"model": {"w": torch.ones(3)}, "optimizer": {}, "scheduler": {}, "iteration": 2, "rng": {}}
    ck.save_state(fs, str(ckdir), state)
    before = (ckdir / "state.pt").read_bytes()
    _kill_when_mid_write("checkpoint", ckdir)
    assert (ckdir / "state.pt").read_bytes() == before
    _partial_temps(ckdir)
    loaded = ck.load_latest(fs, str(tmp_path / "run"))
    assert loaded.state["iteration"] == 2 and loaded.skipped == []


def test_sigkill_mid_npz_write_keeps_previous_file(tmp_path):
    path = tmp_path / "cache.npz"
    save_npz_atomic(path, a=np.arange(10))
    before = path.read_bytes()
    _kill_when_mid_write("npz", path)
    assert path.read_bytes() == before
    _partial_temps(tmp_path)
    with np.load(path) as z:
        np.testing.assert_array_equal(z["a"], np.arange(10))


def test_sigkill_while_caching_canvases_leaves_no_cache(tmp_path):
    _kill_when_mid_write("dataset", tmp_path)
    (temp,) = _partial_temps(tmp_path)
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".npz")]  # nothing at the final name
    with warnings.catch_warnings():  # a half-written cache is never found, so never warned about
        warnings.simplefilter("error")
        ds = CanvasDataset(tmp_path, "train", num_images=8, height=64, width=128)
    with np.load(ds.cache_path) as z:
        assert np.array_equal(z["images"], ds.images)


# ------------------------------------------------------------------- truncated checkpoint, local mode


def _local_config(tmp_path, name: str):
    return tiny_config(tmp_path, name, **{"train.num_to_keep": 3})


def test_local_resume_skips_truncated_checkpoint(tmp_path, capsys):
    dumps = {k: tmp_path / f"dump_{k}" for k in ("ref", "resumed")}
    for d in dumps.values():
        d.mkdir()
    train.fit(_local_config(tmp_path, "reference"), hooks=FaultHooks(dump_dir=str(dumps["ref"])))
    cfg = _local_config(tmp_path, "damaged")
    out = train.fit(cfg)
    run = Path(out.run_path)
    assert sorted(p.name for p in run.iterdir()) == [f"checkpoint_{i:08d}" for i in (2, 4, 6)] + [
        "experiment.json"
    ]
    state = run / "checkpoint_00000006" / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 3])  # e.g. a copy cut short
    capsys.readouterr()
    out = train.fit(cfg, resume=True, hooks=FaultHooks(dump_dir=str(dumps["resumed"])))
    said = capsys.readouterr().out
    assert f"checkpoint {state} is incomplete or corrupt (" in said
    assert f"; resuming from {run / 'checkpoint_00000004'} instead" in said
    assert "resumed at iteration 4/6" in said
    ref, got = (torch.load(d / "rank0.pt", weights_only=True) for d in (dumps["ref"], dumps["resumed"]))
    assert got["start_iteration"] == 4 and out.metrics["iteration"] == 6
    for k, v in ref["model"].items():  # iterations 5 and 6 replayed exactly
        assert torch.equal(got["model"][k], v), k
    assert torch.equal(got["losses"], ref["losses"][4:])
    # The damaged checkpoint was rewritten, complete, by the resumed run.
    assert ck.load_state(pafs.LocalFileSystem(), str(state.parent))["iteration"] == 6
