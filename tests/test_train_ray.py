"""Ray Train tests: 2-worker CPU DDP against a single-process twin, worker recovery, resume, resources.

One module-scoped local Ray instance (2 CPUs, conftest.ray_cluster). All runs use the same tiny config: 2 workers x
batch 2 on 8 training canvases (2 steps per epoch), 4 iterations, evaluation + checkpoint every 2, a memory
bank of 20 slots per class. The uninterrupted run (`reference`) is shared by the equivalence, recovery and
resume tests.
"""

from __future__ import annotations

import os

import pyarrow.fs as pafs
import pytest
import torch
from torch import nn
from torch.utils.data import default_collate

from raycontrast import checkpoint as ck
from raycontrast.build import build_criterion
from raycontrast.config import Config
from raycontrast.data.info import dataset_info
from raycontrast.data.loader import build_dataset
from raycontrast.engine import build_optimizer, build_scheduler, seed_everything, train_step
from raycontrast.memory import PixelMemory
from raycontrast.models.hrnet import HRNetV2
from raycontrast.models.projection import PixelEmbedding
from raycontrast.plan import InsufficientResourcesError
from raycontrast.sampling import SeededItems, ShardSampler, step_seed

from conftest import DDP, tiny_config
from fault_hooks import FaultHooks

ray = pytest.importorskip("ray")
train = pytest.importorskip("raycontrast.train")

pytestmark = pytest.mark.ray

WORLD = 2
# float32 on CPU: DDP averages gradients with a gloo all-reduce, the twin by backpropagating the mean of the
# two half-batch losses, so results may differ in summation order. Measured after 4 steps on a 2-core x86
# machine: bitwise identical losses, parameters and memory; the tolerance allows for other BLAS/thread
# setups without hiding a wrong batch, sample order, generator or enqueue order (those change losses by >1e-2).
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("train_ray")


def make_config(workdir, name: str, **overrides) -> Config:
    return tiny_config(workdir, name, **{**DDP, "train.iterations": 4, **overrides})


def load_dumps(path) -> list[dict]:
    return [torch.load(path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference(ray_cluster, workdir):
    """The uninterrupted 2-worker run: (config, per-rank dumps, outcome)."""
    dump = workdir / "dump_reference"
    dump.mkdir()
    cfg = make_config(workdir, "reference")
    outcome = train.fit(cfg, hooks=FaultHooks(dump_dir=str(dump)))
    return cfg, load_dumps(dump), outcome


# ----------------------------------------------------------------------------- single-process twin


class _HalvesEmbedding(PixelEmbedding):
    """The ranks' sparse projection heads side by side: the memory's keys of the whole batch."""

    def __init__(self, halves: list[PixelEmbedding]) -> None:
        self.halves = halves
        first = halves[0]
        self.shape = torch.Size((sum(h.shape[0] for h in halves), *first.shape[1:]))
        self.device, self.dtype = first.device, first.dtype

    def full(self) -> torch.Tensor:
        return torch.cat([h.full() for h in self.halves])


def _half(value, r: int):
    return value.halves[r] if isinstance(value, _HalvesEmbedding) else value.chunk(WORLD)[r]


class _Halves(nn.Module):
    """Runs the model on each rank's half-batch separately, like DDP without SyncBN (per-rank BN stats)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x):
        outs = [self.model(h) for h in x.chunk(WORLD)]
        if isinstance(outs[0]["embed"], PixelEmbedding):  # model.sparse_proj: one head per rank's half
            return {
                "seg": torch.cat([o["seg"] for o in outs]),
                "embed": _HalvesEmbedding([o["embed"] for o in outs]),
            }
        return {k: torch.cat([o[k] for o in outs]) for k in outs[0]}


class _HalvesLoss(nn.Module):
    """Per-rank losses on each half with that rank's generator, averaged (= DDP's gradient average)."""

    def __init__(self, criterion: nn.Module, gens: list[torch.Generator]) -> None:
        super().__init__()
        self.criterion, self.gens, self.last = criterion, gens, []

    def forward(self, outputs, labels, *, iteration, memory=None, generator=None):
        results = [
            self.criterion(
                {k: _half(v, r) for k, v in outputs.items()},
                labels.chunk(WORLD)[r],
                iteration=iteration,
                memory=memory,
                generator=self.gens[r],
            )
            for r in range(WORLD)
        ]
        self.last = [loss.detach() for loss, _ in results]
        parts = {k: sum(p[k] for _, p in results) / WORLD for k in results[0][1]}
        return sum(loss for loss, _ in results) / WORLD, parts


class _HalvesMemory:
    """Enqueues rank 0's half, then rank 1's, each with its rank's generator (the all-gather's order)."""

    def __init__(self, memory: PixelMemory, gens: list[torch.Generator]) -> None:
        self.memory, self.gens = memory, gens

    def contrast_set(self):
        return self.memory.contrast_set()

    def enqueue(self, keys, labels, generator=None):
        for r in range(WORLD):
            self.memory.enqueue(keys.chunk(WORLD)[r], labels.chunk(WORLD)[r], generator=self.gens[r])

    def fill(self):
        return self.memory.fill()


def twin_run(cfg: Config):
    """Single process over the same global batches: returns (losses [iters, WORLD], params, memory)."""
    d, t = cfg.data, cfg.train
    info = dataset_info(d.dataset)
    k = info.num_classes
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seed_everything(cfg.run.seed)
        model = HRNetV2(cfg.model.variant, k, proj_dim=cfg.model.proj_dim, sparse_proj=cfg.model.sparse_proj)
        gens = [torch.Generator() for _ in range(WORLD)]
        memory = PixelMemory(k, cfg.model.proj_dim, cfg.memory.size, cfg.memory.pixel_update_freq)
        criterion = _HalvesLoss(build_criterion(cfg, info), gens)
        optimizer = build_optimizer(
            model, lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
        )
        scheduler = build_scheduler(optimizer, max_iters=t.iterations, power=cfg.optim.poly_power)
        canvas = {
            "height": d.canvases.height,
            "width": d.canvases.width,
            "seed": d.canvases.seed,
            "num_images": d.canvases.train_images,
        }
        dataset = build_dataset(
            d.dataset,
            "train",
            root=d.root,
            crop_size=d.crop_size,
            scale_range=d.scale_range,
            train=True,
            canvas_args=canvas,
        )
        items = SeededItems(dataset, cfg.run.seed)
        samplers = [
            ShardSampler(dataset, num_replicas=WORLD, rank=r, seed=cfg.run.seed) for r in range(WORLD)
        ]
        per_epoch = samplers[0].num_samples // t.batch_size
        net, mem = _Halves(model).train(), _HalvesMemory(memory, gens)
        losses = []
        for it in range(t.iterations):
            j = it % per_epoch
            batch = []
            for r, s in enumerate(samplers):
                s.set_epoch(it // per_epoch)
                batch += [items[key] for key in list(s)[j * t.batch_size : (j + 1) * t.batch_size]]
                gens[r].manual_seed(step_seed(cfg.run.seed, r, it))
            images, labels = default_collate(batch)
            labels = labels.long()  # as the loop casts on the device
            stats = train_step(net, criterion, optimizer, scheduler, images, labels, iteration=it, memory=mem)
            assert bool(stats["finite"])
            losses.append(torch.stack(criterion.last))
        return torch.stack(losses), dict(model.named_parameters()), memory.state_dict()
    finally:
        torch.set_num_threads(threads)


def assert_same_params(a: dict, b: dict, *, exact: bool) -> None:
    for name, p in b.items():
        if exact:
            assert torch.equal(a[name], p.detach()), name
        else:
            torch.testing.assert_close(a[name], p.detach(), rtol=RTOL, atol=ATOL, msg=name)


# ----------------------------------------------------------------------------- tests


def test_ddp_matches_single_process_twin(reference):
    cfg, dumps, outcome = reference
    assert outcome.metrics["iteration"] == cfg.train.iterations
    assert len(outcome.metrics["val_class_iou"]) == 13
    assert outcome.checkpoint_path is not None
    losses, params, memory = twin_run(cfg)
    for r, dump in enumerate(dumps):
        assert dump["start_iteration"] == 0
        torch.testing.assert_close(dump["losses"].float(), losses[:, r], rtol=RTOL, atol=ATOL)
    # DDP keeps the ranks' parameters bitwise identical; the twin agrees up to summation order.
    # (Buffers differ: each rank's BN running statistics see only its own half-batches.)
    assert_same_params(dumps[0]["model"], {k: dumps[1]["model"][k] for k in params}, exact=True)
    assert_same_params(dumps[0]["model"], params, exact=False)
    # The all-gathered memory is identical on every rank and equals the twin's rank-ordered enqueues.
    for key in ("feats", "ptr", "count"):
        assert torch.equal(dumps[0]["memory"][key], dumps[1]["memory"][key]), key
    assert torch.equal(dumps[0]["memory"]["count"], memory["count"])
    assert int(memory["count"].sum()) > 0
    torch.testing.assert_close(dumps[0]["memory"]["feats"], memory["feats"], rtol=RTOL, atol=ATOL)


def test_worker_failure_recovers_to_same_result(reference, workdir):
    ref_cfg, ref_dumps, _ = reference
    dump = workdir / "dump_recovery"
    dump.mkdir()
    marker = workdir / "recovery.marker"
    cfg = make_config(workdir, "recovery")
    outcome = train.fit(cfg, hooks=FaultHooks(dump_dir=str(dump), fail_at=3, fail_marker=str(marker)))
    assert marker.exists()  # the failure happened
    assert outcome.metrics["iteration"] == cfg.train.iterations
    for r, got in enumerate(load_dumps(dump)):
        assert got["start_iteration"] == 2  # restarted from the iteration-2 checkpoint, mid-epoch
        assert_same_params(got["model"], ref_dumps[r]["model"], exact=True)
        for key in ("feats", "ptr", "count"):
            assert torch.equal(got["memory"][key], ref_dumps[r]["memory"][key]), key
        torch.testing.assert_close(got["losses"], ref_dumps[r]["losses"][2:], rtol=0, atol=0)


def test_stopped_run_resumes_from_checkpoint(reference, workdir):
    _, ref_dumps, _ = reference
    marker = workdir / "resume.marker"
    cfg = make_config(workdir, "resume", **{"train.max_failures": 0})
    with pytest.raises(ray.train.TrainingFailedError, match="injected failure at iteration 3"):
        train.fit(cfg, hooks=FaultHooks(fail_at=3, fail_marker=str(marker)))
    with pytest.raises(FileExistsError, match="--resume"):
        train.fit(cfg)  # never silently mixes runs
    dump = workdir / "dump_resume"
    dump.mkdir()
    outcome = train.fit(cfg, resume=True, hooks=FaultHooks(dump_dir=str(dump)))
    assert outcome.metrics["iteration"] == cfg.train.iterations
    for r, got in enumerate(load_dumps(dump)):
        assert got["start_iteration"] == 2
        assert_same_params(got["model"], ref_dumps[r]["model"], exact=True)
        assert torch.equal(got["memory"]["feats"], ref_dumps[r]["memory"]["feats"])


def test_unregistered_newest_checkpoint_is_used(reference, workdir):
    """A checkpoint complete on storage but never registered by Ray (the controller died first, or it was
    written just in time) counts: here Ray registered none at all, and the resume takes it on every rank."""
    ref_cfg, ref_dumps, ref_out = reference
    fs = pafs.LocalFileSystem()
    at2 = next(p for p in ck.list_checkpoints(fs, ref_out.run_path) if ck.load_state(fs, p)["iteration"] == 2)
    cfg = make_config(workdir, "unregistered", **{"train.max_failures": 0})
    with pytest.raises(ray.train.TrainingFailedError, match="injected failure at iteration 1"):
        train.fit(cfg, hooks=FaultHooks(fail_at=1, fail_marker=str(workdir / "unregistered.marker")))
    run = os.path.join(cfg.run.storage_path, cfg.run.name)
    assert ck.list_checkpoints(fs, run) == []
    fs.create_dir(f"{run}/{os.path.basename(at2)}")
    fs.copy_file(f"{at2}/state.pt", f"{run}/{os.path.basename(at2)}/state.pt")  # behind Ray's back
    dump = workdir / "dump_unregistered"
    dump.mkdir()
    outcome = train.fit(cfg, resume=True, hooks=FaultHooks(dump_dir=str(dump)))
    assert outcome.metrics["iteration"] == cfg.train.iterations
    for r, got in enumerate(load_dumps(dump)):
        assert got["start_iteration"] == 2, r
        assert_same_params(got["model"], ref_dumps[r]["model"], exact=True)
        assert torch.equal(got["memory"]["feats"], ref_dumps[r]["memory"]["feats"])
        torch.testing.assert_close(got["losses"], ref_dumps[r]["losses"][2:], rtol=0, atol=0)


def test_too_many_workers_fails_fast(ray_cluster, workdir):
    cfg = make_config(workdir, "too_big", **{"train.workers": 3})
    with pytest.raises(InsufficientResourcesError, match=r"3 CPUs.*cluster has 2"):
        train.fit(cfg)
    cfg = make_config(workdir, "no_gpu", **{"train.workers": 1, "train.use_gpu": True})
    with pytest.raises(InsufficientResourcesError, match=r"1 GPUs.*cluster has 0"):
        train.fit(cfg)
