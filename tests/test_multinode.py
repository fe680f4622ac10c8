"""What clusters do to a search, on a simulated cluster on this machine (`ray.cluster_utils.Cluster`): a head
with no CPUs that carries the trial-driver resource, worker nodes added per test, and storage on the
loopback S3 server, so no node depends on the driver's disk. Every process started is stopped; every wait
is bounded. Tests: a node killed during a Train run and during a search, a preemption notice, placement,
and a node that cannot read the data."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from raycontrast import checkpoint as ck
from raycontrast.config import ConfigError, apply_overrides, load_config
from raycontrast.plan import DRIVER_RESOURCE
from raycontrast.results import load_results
from raycontrast.rungs import Rungs

from conftest import DDP, S3_CREDENTIALS, SMOKE, free_port, moto_s3, s3_filesystem, tiny_config
from fault_hooks import FaultHooks

ray = pytest.importorskip("ray")
train = pytest.importorskip("raycontrast.train")
tune_mod = pytest.importorskip("raycontrast.tune")
from ray.cluster_utils import Cluster  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.ray]
RAY = str(Path(sys.executable).with_name("ray"))
BUCKET = "multinode"


class Harness:
    """The simulated cluster: `add` / `kill` worker nodes, storage overrides for a run on the S3 bucket."""

    def __init__(self, cluster: Cluster, endpoint: str) -> None:
        self.cluster, self.endpoint, self.address = cluster, endpoint, cluster.address
        self.fs = s3_filesystem(endpoint)

    def add(self, **node_args) -> object:
        return self.cluster.add_node(**{"num_cpus": 1, **node_args})

    def kill(self, node) -> None:
        self.cluster.remove_node(node, allow_graceful=False)  # hard: its processes are killed

    def clear(self) -> None:
        for node in list(self.cluster.worker_nodes):
            self.cluster.remove_node(node, allow_graceful=False)
        deadline = time.time() + 60
        while len([n for n in ray.nodes() if n["Alive"]]) > 1 and time.time() < deadline:
            time.sleep(0.5)

    def storage(self, prefix: str) -> dict:
        return {
            "run.storage_path": f"s3://{BUCKET}/{prefix}",
            "run.s3_endpoint": self.endpoint,
            "run.s3_scheme": "http",
        }

    def node_of(self, node_id: str):
        return next(n for n in self.cluster.worker_nodes if n.node_id == node_id)


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    with moto_s3(BUCKET, tmp_path_factory.mktemp("moto")) as endpoint:
        port = free_port()
        env = {
            **S3_CREDENTIALS,
            "RAY_AUTH_MODE": "disabled",
            "RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}",
            # Ray Train's drain watcher polls every 5 s by default: long against this module's short steps.
            "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5",
        }
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # before any node starts: its processes inherit it
        head = {
            "num_cpus": 0, "resources": {DRIVER_RESOURCE: 8}, "include_dashboard": True,
            "dashboard_host": "127.0.0.1", "dashboard_port": port,
        }  # fmt: skip
        cluster = Cluster(initialize_head=True, head_node_args=head)
        try:
            ray.init(address=cluster.address, log_to_driver=False)
            import fault_hooks

            ray.cloudpickle.register_pickle_by_value(fault_hooks)
            yield Harness(cluster, endpoint)
        finally:
            ray.shutdown()
            cluster.shutdown()
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


@pytest.fixture
def cluster(harness):
    yield harness
    harness.clear()


def _dumps(d: Path, world: int = 2) -> list[dict]:
    return [torch.load(d / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _in_thread(fn):
    box: dict = {}

    def run():
        try:
            box["result"] = fn()
        except BaseException as e:  # surfaced by the test
            box["error"] = e

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


# ------------------------------------------------------------------------------------ node loss, Train


def test_a_node_dies_during_a_train_run(cluster, tmp_path):
    """Two workers on two nodes; one node is killed hard (not drained) after the iteration-4 checkpoint
    reached storage; a replacement joins; the run resumes from the newest complete checkpoint and ends
    with the parameters and memory of an uninterrupted run."""
    a, _ = cluster.add(), cluster.add()
    base = tiny_config(tmp_path, "ref", **DDP, **cluster.storage("train"), **{"train.iterations": 8})
    ref = tmp_path / "ref"
    ref.mkdir()
    train.fit(base, address=cluster.address, hooks=FaultHooks(dump_dir=str(ref)))
    cfg, dump, pid_file = apply_overrides(base, {"run.name": "killed"}), tmp_path / "killed", tmp_path / "pid"
    dump.mkdir()
    hooks = FaultHooks(dump_dir=str(dump), pause_at=5, pause_file=str(pid_file))
    thread, box = _in_thread(lambda: train.fit(cfg, address=cluster.address, hooks=hooks))
    deadline = time.time() + 300
    while not pid_file.exists():  # rank 0 paused at iteration 5: the iteration-4 checkpoint is on storage
        assert thread.is_alive() and time.time() < deadline, box.get("error", "timed out")
        time.sleep(0.5)
    cluster.kill(a)
    cluster.add()  # the replacement
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    for r, (got, want) in enumerate(zip(_dumps(dump), _dumps(ref), strict=True)):
        assert got["start_iteration"] == 4, r
        for k, v in want["model"].items():
            assert torch.equal(got["model"][k], v), (r, k)
        assert all(torch.equal(got["memory"][k], want["memory"][k]) for k in want["memory"]), r
        assert torch.equal(got["losses"], want["losses"][4:]), r


# ----------------------------------------------------------------------------------- node loss, search


def _asha_replay(trials, curves, cfg) -> dict[str, int]:
    """The last iteration each trial should reach under ASHA, replaying the curves in start order (one
    trial at a time, as run): an independent check that early stopping was not disturbed."""
    grace, max_t, rf = tune_mod.asha_schedule(cfg)
    rungs, last = Rungs(grace, max_t, rf), {}
    for tid in trials.sort_values("started_at")["trial_id"]:
        rows = curves[curves["trial_id"] == tid].sort_values("iteration")
        for it, v in zip(rows["iteration"], rows["val_miou"], strict=True):
            last[tid] = int(it)
            if rungs.judge(tid, int(it), float(v)):
                break
    return last


def test_a_node_dies_during_a_search(cluster, tmp_path):
    cluster.add(), cluster.add()
    sets = {
        **cluster.storage("search"),
        "data.root": str(tmp_path / "cache"),
        "tune.max_concurrent_trials": 1,
    }
    cfg = load_config(SMOKE, sets)
    exp = f"{BUCKET}/search/smoke"
    killed: dict = {}

    def kill_when_second_trial_reports():
        from ray.util.state import list_actors

        deadline = time.time() + 400
        while time.time() < deadline:
            try:
                t = load_results(exp, filesystem=cluster.fs)
            except (FileNotFoundError, OSError):
                t = None
            if t is not None and t["curves"]["trial_id"].nunique() >= 2:
                live = list_actors(filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
                if live:
                    killed["node"] = live[0]["node_id"]
                    cluster.kill(cluster.node_of(live[0]["node_id"]))  # the other node carries on
                    return
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGINT)  # bounded: Tune stops gracefully and the asserts below fail

    killer = threading.Thread(target=kill_when_second_trial_reports, daemon=True)
    killer.start()
    out = tune_mod.run_search(cfg, address=cluster.address)  # the main thread: Tune installs signal handlers
    killer.join(timeout=60)
    assert killed, "no node was killed"
    tables = load_results(exp, filesystem=cluster.fs)
    trials, curves = tables["trials"], tables["curves"]
    assert len(trials) == 3 and trials["trial_id"].is_unique and out.num_errors == 0
    assert trials["status"].isin(["TERMINATED", "STOPPED_EARLY"]).all()
    assert not curves.duplicated(["trial_id", "iteration"]).any()
    replay = _asha_replay(trials, curves, cfg)
    assert trials.set_index("trial_id")["last_iteration"].to_dict() == replay


# --------------------------------------------------------------------------------------- preemption


def _checkpoints(fs, run: str) -> list[int]:
    return [ck.checkpoint_iteration(p) for p in ck.list_checkpoints(fs, run)]


def test_a_preemption_notice_saves_a_checkpoint_at_once(cluster, tmp_path):
    """`ray drain-node --reason PREEMPTION` marks a node as about to be reclaimed: the run checkpoints at
    its next poll and trains on; the node then goes; the restart, counted by Ray as a preemption (with
    train.max_failures=0 a failure would end the run), resumes from that checkpoint."""
    a, _ = cluster.add(), cluster.add()
    poll, every, total = 2, 25, 50  # regular checkpoints at 25 and 50 only: the notice comes between them
    sets = {"train.iterations": total, "train.eval_interval": every, "train.checkpoint_interval": every}
    sets |= {"train.preemption_poll_interval": poll, "train.max_failures": 0}
    cfg = tiny_config(tmp_path, "preempt", **DDP, **cluster.storage("preempt"), **sets)
    dump, steps = tmp_path / "dump", tmp_path / "steps"
    dump.mkdir()
    steps.mkdir()
    hooks = FaultHooks(dump_dir=str(dump), step_sleep_s=0.4, step_log=str(steps))
    thread, box = _in_thread(lambda: train.fit(cfg, address=cluster.address, hooks=hooks))
    run, deadline = f"{BUCKET}/preempt/preempt", time.time() + 300

    def wait(done, why: str) -> None:
        while not done():
            assert thread.is_alive() and time.time() < deadline, box.get("error", f"timed out: {why}")
            time.sleep(0.2)

    def iteration() -> int:
        lines = (steps / "rank0").read_text().split("\n") if (steps / "rank0").exists() else []
        return max((int(x.split()[0]) for x in lines if x), default=-1)

    def just_in_time() -> list[int]:
        return [i for i in _checkpoints(cluster.fs, run) if i % every]

    wait(lambda: iteration() > every, "the run did not pass its first checkpoint")
    drain = [RAY, "drain-node", "--address", cluster.address, "--node-id", a.node_id, "--reason",
             "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", "spot reclaim", "--deadline-remaining-seconds", "120"]  # fmt: skip
    before = iteration()
    assert subprocess.run(drain, capture_output=True, text=True, timeout=60).returncode == 0
    noticed_at = iteration()  # the notice exists once the command returns (its start-up takes seconds)
    wait(just_in_time, "no checkpoint for the notice")
    (jit,) = just_in_time()
    wait(lambda: iteration() > jit, "rank 0 did not train on")  # its folder shows before its file lands
    cluster.kill(a)  # the reclaim
    cluster.add()
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    # At its next poll once Ray's watcher (polling every 0.5 s here) has passed the notice on: a few steps.
    assert jit % poll == 0 and before < jit <= noticed_at + 12 and jit < total, (before, noticed_at, jit)
    for r, got in enumerate(_dumps(dump)):
        assert got["start_iteration"] == jit, r  # not the iteration-25 checkpoint: at most `poll` steps lost


# ---------------------------------------------------------------------------------------- placement


def _nodes_used(steps: Path, world: int) -> list[str]:
    return [(steps / f"rank{r}").read_text().split("\n")[0].split()[2] for r in range(world)]


def test_placement_keeps_workers_together_or_spreads_them(cluster, tmp_path):
    """auto: both workers on the node they fit on (STRICT_PACK); spread: one per node."""
    big, small = cluster.add(num_cpus=2), cluster.add()
    for placement, together in (("auto", True), ("spread", False)):
        steps = tmp_path / placement
        steps.mkdir()
        sets = {"run.name": placement, "train.iterations": 2, "train.placement": placement}
        cfg = tiny_config(tmp_path, **DDP, **cluster.storage("placement"), **sets)
        train.fit(cfg, address=cluster.address, hooks=FaultHooks(step_log=str(steps)))
        used = _nodes_used(steps, 2)
        if together:  # auto: the 2-CPU node holds both workers, so they stay on it (STRICT_PACK)
            assert used == [big.node_id, big.node_id], used
        else:
            assert sorted(used) == sorted([big.node_id, small.node_id]), used


# ---------------------------------------------------------------------------------- per-node checks


def test_a_node_that_cannot_read_the_data_is_named_then_left_out(cluster, tmp_path):
    """A node started with a broken environment (its Python finds an image library that does not import)
    fails the per-node check: the search refuses to start and names it, or leaves it out when asked. The
    trial drivers run on the head, which offers the driver resource."""
    fake = tmp_path / "broken_site" / "PIL"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text('raise ImportError("PIL is broken on this node")\n')
    path = os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")])
    good, bad = cluster.add(), cluster.add(env_vars={"PYTHONPATH": path})
    sets = {**cluster.storage("nodes"), "data.root": str(tmp_path / "cache"), "tune.num_samples": 1}
    sets |= {"train.iterations": 2, "tune.scheduler": "fifo"}
    with pytest.raises(
        ConfigError, match=rf"1 of 3 nodes cannot run this search:\n  node {bad.node_id[:12]} .*PIL is broken"
    ) as err:
        tune_mod.run_search(load_config(SMOKE, sets), address=cluster.address)
    assert err.value.key == "tune.bad_nodes"
    from ray.util.state import list_actors

    before = {a["actor_id"] for a in list_actors(limit=10_000)}  # the module's earlier tests' actors
    out = tune_mod.run_search(
        load_config(SMOKE, {**sets, "run.name": "excluded", "tune.bad_nodes": "exclude"}),
        address=cluster.address,
    )
    assert out.num_finished == 1
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")])
    assert (
        workers
        and bad.node_id not in {w["node_id"] for w in workers}
        and good.node_id in {w["node_id"] for w in workers}
    )
    assert json.loads(json.dumps(out.status_counts)) == {"TERMINATED": 1}
    # Trial drivers go to the head, which offers the driver resource (and so do their Train controllers).
    # This search's trial actors: Ray names the class `ImplicitFunc` or by its qualified name
    # (`wrap_function.<locals>.ImplicitFunc`), depending on what the driver process created before.
    trial_actors = [
        a
        for a in list_actors(limit=10_000)
        if a["actor_id"] not in before and a["class_name"].endswith("ImplicitFunc")
    ]
    assert trial_actors and {a["node_id"] for a in trial_actors} == {cluster.cluster.head_node.node_id}
