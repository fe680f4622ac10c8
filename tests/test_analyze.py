"""analyze(): best trial and config, top-k, importance, plots and report from hand-made tables."""

from __future__ import annotations

import io
import math
from collections.abc import Collection
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pytest
from PIL import Image

from raycontrast.analyze import analyze, importance_values, param_importance
from raycontrast.config import apply_overrides, flatten, load_config
from raycontrast.results import ResultsWriter, load_results

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke.yaml"
SEARCHED = ["loss.temperature", "loss.weight", "memory.size"]
CLASSES = [f"class{i}" for i in range(13)]
T_LOW, T_HIGH = 0.05, 0.5


def _miou(temperature: float) -> float:
    """The value is set by the temperature alone: 0.2 at T_LOW rising to 0.7 at T_HIGH (log scale)."""
    return 0.2 + 0.5 * math.log(temperature / T_LOW) / math.log(T_HIGH / T_LOW)


def build_search(
    tables_dir: Path, n: int, *, errored: int | None = None, stopped: Collection[int] = ()
) -> dict:
    """n trials `t00`..; trial `errored` fails with a non-finite loss, the `stopped` ones report one window only.

    loss.weight and memory.size are noise: drawn independently of the temperature.
    Returns {trial_id: (temperature, expected best mIoU)}.
    """
    base = load_config(SMOKE)  # 6 iterations, eval every 2 -> reports at 2, 4, 6
    rng = np.random.default_rng(1)
    clock = [1000.0]
    w = ResultsWriter(
        tables_dir,
        class_names=CLASSES,
        searched_keys=SEARCHED,
        target_iterations=base.train.iterations,
        clock=lambda: clock[0],
    )
    temps = np.exp(np.linspace(math.log(T_LOW), math.log(T_HIGH), n))[rng.permutation(n)]
    expected = {}
    for i, t in enumerate(temps):
        tid = f"t{i:02d}"
        cfg = apply_overrides(
            base,
            {
                "loss.temperature": float(t),
                "loss.weight": float(rng.uniform(0.05, 1.0)),
                "memory.size": int(rng.choice([0, 50])),
            },
        )
        flat, top = flatten(cfg), _miou(float(t))
        clock[0] += 10.0
        w.on_trial_start(tid, flat)
        iters, reported = ([2] if i in stopped else [2, 4, 6]), []
        for it in iters:
            clock[0] += 3.0
            # peak at iteration 4 for odd trials (then a dip), at the last one for even trials
            v = top * (it / 6) if i % 2 == 0 or it < 4 else (top if it == 4 else top - 0.05)
            if i == errored:
                v = 0.99  # a high value before failing must not make it the best
            w.on_report(tid, flat, _metrics(it, v, i))
            reported.append(v)
        if i == errored:
            w.on_trial_end(
                tid, "ERROR", error="Traceback ...\nNonFiniteLossError: non-finite loss: 3 steps at it 6"
            )
        else:
            w.on_trial_end(tid, "TERMINATED")
            expected[tid] = (float(t), max(reported))
    return expected


def _metrics(it: int, miou: float, i: int) -> dict:
    ious = [miou + 0.02 * (c - 6) for c in range(12)] + [float("nan")]
    return {
        "iteration": it, "epoch": it // 2, "lr": 0.01 * (1 - it / 7), "loss": 2.0 / it, "ce_loss": 1.5 / it,
        "contrast_loss": 5.0 / it + 0.1 * i, "val_miou": miou, "val_pixel_acc": 0.5 + miou / 2,
        "val_class_iou": ious, "time_s": 1.0 * it, "worker_seconds": 3.0 * it, "peak_rss_mb": 900.0 + it,
        "nonfinite_steps": 0, "images_per_s": 4.0,
    }  # fmt: skip


@pytest.fixture(scope="module")
def search(tmp_path_factory):
    exp = tmp_path_factory.mktemp("store") / "smoke"
    expected = build_search(exp / "tables", 6, errored=2, stopped=(5,))
    report = analyze(exp, top_k=3)
    return exp, expected, report


def test_best_trial_and_config(search):
    exp, expected, report = search
    best_id = max(expected, key=lambda k: expected[k][1])
    assert report.best_trial_id == best_id
    assert report.best_val_miou == pytest.approx(expected[best_id][1])
    cfg = load_config(report.paths["best_config"])
    assert cfg.loss.temperature == pytest.approx(expected[best_id][0])
    trials = load_results(exp)["trials"].set_index("trial_id")
    assert cfg.loss.weight == pytest.approx(trials.loc[best_id, "loss.weight"])
    assert cfg.memory.size == trials.loc[best_id, "memory.size"]
    assert cfg.tune.space == load_config(SMOKE).tune.space  # tune/run sections come through as in the table
    assert cfg.run.name == "smoke-best"  # retraining it does not collide with the search's own run folder
    assert report.best_config["loss"]["temperature"] == pytest.approx(expected[best_id][0])
    assert Path(report.paths["best_config"]).parent == exp / "analysis"


def test_top_k_order_excludes_errors(search):
    _, expected, report = search
    order = sorted(expected, key=lambda k: -expected[k][1])
    assert report.top_trials == order[:3]
    assert "t02" not in report.top_trials  # errored, despite reporting 0.99
    trials = load_results(search[0])["trials"].set_index("trial_id")
    assert trials.loc["t05", "status"] == "STOPPED_EARLY"
    assert trials.loc["t02", "status"] == "ERROR"


def test_importance_on_fixture(search):
    _, _, report = search
    assert report.importance is not None, report.importance_note
    assert set(report.importance) == set(SEARCHED)
    assert sum(report.importance.values()) == pytest.approx(1.0)
    assert report.importance["loss.temperature"] > report.importance["loss.weight"]
    assert report.importance["loss.temperature"] > report.importance["memory.size"]


def test_importance_compares_trials_on_one_budget(search, tmp_path):
    """With 3 trials or more that ran the full budget, those alone by best val mIoU; with fewer, every
    finished trial at the latest evaluation all of them reached (a stopped trial's budget is no full one)."""
    _, _, report = search
    assert report.importance_note.startswith("fANOVA (seed 0) over 4 trials that ran the full budget")
    build_search(tmp_path / "tables", 6, stopped=(0, 1, 2, 3))
    tables = load_results(tmp_path)
    rows, what = importance_values(tables["trials"], tables["curves"])
    assert what.startswith("finished trials (val mIoU at iteration 2,") and len(rows) == 6
    at_2 = tables["curves"].query("iteration == 2").set_index("trial_id")["val_miou"]
    assert rows.set_index("trial_id")["value"].to_dict() == pytest.approx(at_2.to_dict())
    rows, what = importance_values(tables["trials"])  # no curves: the full-budget trials, however few
    assert sorted(rows["trial_id"]) == ["t04", "t05"] and what.startswith("trials that ran the full budget")
    imp, note = param_importance(tables["trials"], tables["curves"])
    assert imp is not None and note.startswith(
        "fANOVA (seed 0) over 6 finished trials (val mIoU at iteration 2"
    )
    assert max(imp, key=imp.get) == "loss.temperature"


def test_importance_deterministic(tmp_path):
    build_search(tmp_path / "tables", 10)
    trials = load_results(tmp_path)["trials"]
    first, _ = param_importance(trials)
    second, _ = param_importance(trials)
    assert first == second
    assert max(first, key=first.get) == "loss.temperature"


def test_plots_are_pngs(search):
    _, _, report = search
    for name in ("history", "params", "curves", "losses", "class_iou"):
        data = Path(report.paths[name]).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n", name
        assert len(data) > 10_000, name
        with Image.open(io.BytesIO(data)) as im:
            im.verify()  # a complete, decodable PNG
            assert im.size[0] >= 400 and im.size[1] >= 200
    assert not [p for p in (search[0] / "analysis").iterdir() if ".tmp-" in p.name]


def test_report_mentions_best_and_failure(search):
    _, _, report = search
    text = Path(report.paths["report"]).read_text()
    assert report.best_trial_id in text
    assert "non-finite loss: 3 steps at it 6" in text
    assert "t02" in text.split("## Failures")[1]
    assert "fANOVA" in text
    # each trial: start, +3 s, first report whose run clock reads 2 s -> 1 s of start-up
    assert "median time from trial start to first report 3.0 s, of which 1.0 s before" in text
    for name in ("history.png", "params.png", "best_config.yaml"):
        assert f"({name})" in text


def test_single_trial_says_importance_unavailable(tmp_path):
    build_search(tmp_path / "exp" / "tables", 1)
    report = analyze(tmp_path / "exp", out_dir=tmp_path / "out")
    assert report.importance is None
    assert "importance unavailable" in report.importance_note
    assert "importance unavailable" in (tmp_path / "out" / "report.md").read_text()
    assert report.best_trial_id == "t00"


def test_no_finished_trial_does_not_crash(tmp_path):
    w = ResultsWriter(tmp_path / "tables", class_names=CLASSES, searched_keys=SEARCHED)
    w.on_report("a", flatten(load_config(SMOKE)), _metrics(2, 0.3, 0))
    w.flush()  # still running
    report = analyze(tmp_path)
    assert report.best_trial_id is None and report.importance is None
    assert "No finished trial" in Path(report.paths["report"]).read_text()


def test_tables_on_a_pyarrow_filesystem(tmp_path):
    sub = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    build_search(tmp_path / "exp" / "tables", 3)
    report = analyze("exp/tables", filesystem=sub)  # paths are relative to the filesystem's root
    assert report.paths["report"] == "exp/analysis/report.md"
    assert (tmp_path / "exp" / "analysis" / "best_config.yaml").is_file()


def test_configs_run_with_several_seeds_are_ranked_by_their_mean(tmp_path):
    """`tune.confirm`'s runs: the best config is the best mean over seeds, not the luckiest single run; the
    report gives mean ± std and says whether the lead exceeds the seeds' spread."""
    base = load_config(SMOKE)
    w = ResultsWriter(
        tmp_path / "exp" / "tables", class_names=CLASSES, searched_keys=SEARCHED, target_iterations=6
    )
    runs = {"a": (0.1, [0.50, 0.40, 0.42]), "b": (0.2, [0.48, 0.47, 0.49]), "c": (0.3, [0.45])}
    for name, (t, values) in runs.items():
        for seed, v in enumerate(values):
            sets = {"loss.temperature": t, "loss.weight": 0.5, "memory.size": 0, "run.seed": seed}
            flat = flatten(apply_overrides(base, sets))
            tid = f"{name}{seed}"
            w.on_trial_start(tid, flat)
            for it in (2, 4, 6):
                w.on_report(tid, flat, _metrics(it, v * it / 6, 0))
            w.on_trial_end(tid, "TERMINATED")
    from raycontrast.analyze import best_trials, confirmation_verdict, rank_configs

    trials = load_results(tmp_path / "exp")["trials"]
    configs = rank_configs(trials)
    assert configs["trial_ids"].tolist() == [["b0", "b1", "b2"], ["a0", "a1", "a2"]]  # c ran once only
    assert configs["mean"].tolist() == pytest.approx([0.48, 0.44])
    assert configs["std"].tolist() == pytest.approx([0.01, np.std([0.50, 0.40, 0.42], ddof=1)])
    assert best_trials(trials)["trial_id"].tolist()[:3] == ["b2", "b0", "b1"]  # a0 is the best single run
    assert "within the seeds' spread" in confirmation_verdict(configs)
    assert "more than the seeds' spread" in confirmation_verdict(configs.assign(std=[0.001, 0.002]))
    report = analyze(tmp_path / "exp")
    assert report.best_trial_id == "b2" and load_config(report.paths["best_config"]).loss.temperature == 0.2
    md = Path(report.paths["report"]).read_text()
    assert "## Confirmed across seeds" in md and "| 1 | 0.2 | 0.5 | 0 | 0.4800 ± 0.0100 | [0, 1, 2] |" in md
    assert rank_configs(trials[trials["run.seed"] == 0]).empty  # one seed per config: nothing to rank


def test_a_search_is_unfinished_until_its_samples_and_confirmations_end(tmp_path):
    """What the summary calls interrupted: fewer ended search trials than tune.num_samples, or a
    (top config, seed) of tune.confirm without an ended trial, whatever else ran (an extended search keeps
    the confirmations of its old top configs)."""
    from raycontrast.summary import search_unfinished

    base = load_config(SMOKE, {"tune.num_samples": 3, "tune.confirm.top_k": 1, "tune.confirm.seeds": [1]})
    w = ResultsWriter(
        tmp_path / "exp" / "tables", class_names=CLASSES, searched_keys=SEARCHED, target_iterations=6
    )

    def trial(tid: str, t: float, v: float, seed: int = 0, status: str = "TERMINATED") -> None:
        flat = flatten(apply_overrides(base, {"loss.temperature": t, "run.seed": seed}))
        w.on_trial_start(tid, flat)
        w.on_report(tid, flat, _metrics(6, v, 0))
        if status != "RUNNING":
            w.on_trial_end(tid, status)
        w.flush()

    def unfinished() -> bool:
        return search_unfinished(base, load_results(tmp_path / "exp")["trials"], SEARCHED)

    trial("s0", 0.1, 0.4)
    trial("s1", 0.2, 0.5)
    trial("s2", 0.3, 0.3, status="RUNNING")
    assert unfinished()  # 2 of 3 search trials ended
    trial("s2", 0.3, 0.3)
    trial("c0", 0.1, 0.6, seed=1)  # a confirmation of an old top config (0.1), not of today's (0.2)
    assert unfinished()
    trial("c1", 0.2, 0.45, seed=1, status="RUNNING")
    assert unfinished()
    trial("c1", 0.2, 0.45, seed=1)
    assert not unfinished()
