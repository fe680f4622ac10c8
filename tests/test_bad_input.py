"""Bad-input catalogue: every case runs the real CLI and must exit 2 with a message naming the key or file
and what to do, before Ray is imported, leaving no result table or checkpoint behind.

How "Ray never started" is proven:
- in-process cases (`cli.main([...])`) run with `sys.modules["ray"]` (and every loaded `ray.*`, plus the
  Ray-facing `raycontrast.train` / `raycontrast.tune`) set to None, so any import of them raises
  ImportError, which `main` does not catch: the test would see a traceback instead of exit code 2;
- a few cases per kind also run `python -m raycontrast.cli` in a subprocess whose PYTHONPATH starts with a
  folder holding a fake `ray/__init__.py` that raises `ImportError("ray imported")`. A control case with a
  valid config shows that the trick does catch the first Ray import once the checks pass.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from raycontrast import cli, preflight
from raycontrast.config import load_config
from raycontrast.models.hrnet import HRNetBackbone

REPO = Path(__file__).resolve().parents[1]
SMOKE = str(REPO / "configs" / "smoke.yaml")
CS = ("--set", "data.dataset=cityscapes", "--set", "data.root=cs")
STEM = "aachen_000000_000019"


# ------------------------------------------------------------------------------------------ fixtures


def write_pair(root: Path, split: str, *, ids: int = 7, label_shape: tuple[int, ...] = (16, 32)) -> None:
    """One Cityscapes image (16x32 RGB noise) and its labelIds map (constant `ids`) in the official layout."""
    img_dir, lab_dir = root / "leftImg8bit" / split / "aachen", root / "gtFine" / split / "aachen"
    img_dir.mkdir(parents=True, exist_ok=True)
    lab_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (16, 32, 3), dtype=np.uint8)).save(
        img_dir / f"{STEM}_leftImg8bit.png"
    )
    Image.fromarray(np.full(label_shape, ids, np.uint8)).save(lab_dir / f"{STEM}_gtFine_labelIds.png")


def image(tmp: Path, split: str = "val") -> Path:
    return tmp / "cs" / "leftImg8bit" / split / "aachen" / f"{STEM}_leftImg8bit.png"


def label(tmp: Path, split: str = "val") -> Path:
    return tmp / "cs" / "gtFine" / split / "aachen" / f"{STEM}_gtFine_labelIds.png"


def cityscapes(tmp: Path, **val: object) -> None:
    """A valid train split plus a val split built with `val` (see `write_pair`)."""
    write_pair(tmp / "cs", "train")
    write_pair(tmp / "cs", "val", **val)  # type: ignore[arg-type]


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def save_backbone(path: Path, variant: str, drop: tuple[str, ...] = ()) -> None:
    sd = {k: v for k, v in HRNetBackbone(variant).state_dict().items() if k not in drop}
    torch.save(sd, path)


# --------------------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    command: str
    args: tuple[str, ...]  # after the subcommand; relative paths are relative to the test's tmp folder
    expect: tuple[str, ...]  # substrings of the message: the key or file, and what to do
    setup: Callable[[Path], None] | None = None
    config: str | None = SMOKE  # None: `args` carries its own --config


def _write(name: str, text: str) -> Callable[[Path], None]:
    return lambda tmp: (tmp / name).write_text(text)


CASES: dict[str, Case] = {
    # ---- config
    "unknown key": Case(
        "train", ("--set", "loss.temprature=0.2"), ("loss.temprature", "did you mean 'loss.temperature'")
    ),
    "unknown section in file": Case(
        "train",
        ("--config", "typo.yaml"),
        ("unknown config key 'trian'", "known sections"),
        _write("typo.yaml", "trian: {iterations: 5}\n"),
        config=None,
    ),
    "removed key: ignore label": Case(
        "train",
        ("--set", "loss.ignore_index=254", "--set", "train.workers=0"),
        ("loss.ignore_index", "was removed", "a fact of the dataset", "delete the key"),
    ),
    "removed key in a file": Case(
        "train",
        ("--config", "old.yaml"),
        ("loss.ignore_index", "was removed", "delete the key"),
        _write("old.yaml", "loss: {ignore_index: 255}\n"),
        config=None,
    ),
    "wrong type": Case(
        "train", ("--set", "train.iterations=many"), ("train.iterations", "valid integer", "'many'")
    ),
    "temperature out of range": Case(
        "train", ("--set", "loss.temperature=0"), ("loss.temperature", "greater than 0")
    ),
    "loss weight out of range": Case(
        "train", ("--set", "loss.weight=-0.5"), ("loss.weight", "greater than or equal to 0")
    ),
    "memory size out of range": Case(
        "train", ("--set", "memory.size=-1"), ("memory.size", "greater than or equal to 0")
    ),
    "max_views out of range": Case(
        "train", ("--set", "loss.max_views=0"), ("loss.max_views", "greater than or equal to 1")
    ),
    "empty search space": Case(
        "tune",
        ("--set", "tune.space={}"),
        ("tune.space", "search space is empty", "declare at least one key"),
    ),
    "search range outside valid values": Case(
        "tune",
        ("--set", "tune.space={loss.temperature: {uniform: [-0.1, 0.5]}}"),
        ("tune.space['loss.temperature']", "not a valid 'loss.temperature'", "greater than 0"),
    ),
    "unsearchable key": Case(
        "tune",
        ("--set", "tune.space={run.seed: {choice: [0, 1]}}"),
        ("tune.space['run.seed']", "cannot be searched"),
    ),
    "initial point outside the space": Case(
        "tune",
        ("--set", "tune.points_to_evaluate=[{loss.temperature: 0.9}]"),
        ("tune.points_to_evaluate[0]", "loss.temperature=0.9", "widen the space or drop the point"),
    ),
    "confirmation seed the search uses": Case(
        "tune",
        ("--set", "tune.confirm.top_k=2", "--set", "tune.confirm.seeds=[0, 1]"),
        ("tune.confirm.seeds", "includes run.seed (0)", "choose other seeds"),
    ),
    "too many GPUs per trial": Case(
        "tune",
        ("--set", "train.use_gpu=true", "--set", "train.workers=2"),
        ("train.use_gpu", "2 worker(s) x 1 GPU", "has 0 GPU", "set train.use_gpu=false"),
    ),
    "GPU asked in-process, none here": Case(
        "train",
        ("--set", "train.use_gpu=true", "--set", "train.workers=0"),
        ("train.use_gpu", "train.workers=0", "set train.use_gpu=false"),
    ),
    "more CPUs than the machine": Case(
        "train",
        ("--set", "train.workers=2", "--set", "train.cpus_per_worker=100000"),
        ("train.workers=2 x train.cpus_per_worker=100000", "lower train.workers or train.cpus_per_worker"),
    ),
    "search without Train workers": Case(
        "tune", ("--set", "train.workers=0"), ("train.workers", "set train.workers to 1 or more")
    ),
    "YAML syntax error": Case(
        "train",
        ("--config", "broken.yaml"),
        ("broken.yaml", "is not valid YAML"),
        _write("broken.yaml", "run: {name: [unclosed\n"),
        config=None,
    ),
    "missing config file": Case(
        "train",
        ("--config", "nope.yaml"),
        ("nope.yaml", "config file not found", "pass an existing YAML file"),
        config=None,
    ),
    # ---- data (Cityscapes trees under ./cs)
    "missing data root": Case(
        "train", CS, ("data.root", "/cs does not exist", "point it at the folder holding leftImg8bit/")
    ),
    "missing split": Case(
        "train",
        CS,
        ("leftImg8bit/val does not exist", "splits found: ['train']"),
        lambda tmp: write_pair(tmp / "cs", "train"),
    ),
    "empty split": Case(
        "train",
        CS,
        ("leftImg8bit/val holds no", "check the extraction"),
        lambda tmp: (write_pair(tmp / "cs", "train"), image(tmp).parent.mkdir(parents=True)),
    ),
    "image without label": Case(
        "train",
        CS,
        (f"{STEM}_gtFine_labelIds.png", "is missing", "extract gtFine_trainvaltest.zip"),
        lambda tmp: (cityscapes(tmp), label(tmp).unlink()),
    ),
    "corrupt PNG": Case(
        "train",
        CS,
        (f"val/aachen/{STEM}_leftImg8bit.png", "unreadable", "re-extract", "check-data"),
        lambda tmp: (cityscapes(tmp), image(tmp).write_bytes(b"not a png at all")),
    ),
    "truncated PNG": Case(
        "train",
        CS,
        (f"train/aachen/{STEM}_leftImg8bit.png", "truncated", "re-extract"),
        lambda tmp: (cityscapes(tmp), truncate(image(tmp, "train"))),
    ),
    "label ids outside the table": Case(
        "train",
        CS,
        (f"{STEM}_gtFine_labelIds.png", "label ids [40]", "use the *_gtFine_labelIds.png"),
        lambda tmp: cityscapes(tmp, ids=40),
    ),
    "label map of the wrong size": Case(
        "train",
        CS,
        (f"{STEM}_gtFine_labelIds.png", "label size 16x8 differs from image", "does not belong"),
        lambda tmp: cityscapes(tmp, label_shape=(8, 16)),
    ),
    "label map with colour channels": Case(
        "train",
        CS,
        (f"{STEM}_gtFine_labelIds.png", "must be single-channel"),
        lambda tmp: cityscapes(tmp, label_shape=(16, 32, 3)),
    ),
    "canvas cache under a file": Case(
        "train",
        ("--set", "data.root=afile/cache"),
        ("data.root", "afile is a file", "choose a folder path"),
        _write("afile", "x"),
    ),
    # ---- weights
    "missing weights file": Case(
        "train",
        ("--set", "model.pretrained=nope.pth"),
        ("model.pretrained", "nope.pth", "not found", "model.pretrained=null"),
    ),
    "weights of another architecture": Case(
        "train",
        ("--set", "model.pretrained=v2.pth"),
        ("model.pretrained", "v2.pth", "shape mismatch", "pick the matching variant"),
        lambda tmp: save_backbone(tmp / "v2.pth", "w18_small_v2"),  # smoke.yaml: w18_small
    ),
    "weights missing backbone keys": Case(
        "train",
        ("--set", "model.pretrained=part.pth"),
        ("part.pth", "lacks 1 backbone key", "conv1.weight", "model.variant"),
        lambda tmp: save_backbone(tmp / "part.pth", "w18_small", drop=("conv1.weight",)),
    ),
    "not a checkpoint": Case(
        "train",
        ("--set", "model.pretrained=notes.pth"),
        ("notes.pth", "could not be read", "re-export it"),
        _write("notes.pth", "these are not weights\n"),
    ),
    "unknown weights extension": Case(
        "train",
        ("--set", "model.pretrained=w.ckpt"),
        ("w.ckpt", "unknown extension", "use .pth, .pt or .safetensors"),
        _write("w.ckpt", "x"),
    ),
    # ---- storage
    "unwritable storage path": Case(
        "tune",
        ("--set", "run.storage_path=afile/results"),
        ("run.storage_path", "afile is a file", "choose a folder path"),
        _write("afile", "x"),
    ),
    "storage path is a file": Case(
        "train",
        ("--set", "run.storage_path=afile"),
        ("run.storage_path", "afile is a file", "choose a folder path"),
        _write("afile", "x"),
    ),
    "run exists, no --resume": Case(
        "train",
        (),
        ("run.name", "a run named 'smoke' already exists", "pass --resume"),
        lambda tmp: (tmp / "results" / "smoke").mkdir(parents=True),
    ),
    "--resume of a missing search": Case(
        "tune",
        ("--resume",),
        ("run.name", "no experiment named 'smoke'", "does not exist; run without --resume"),
    ),
}

SUBPROCESS_CASES = [
    "unknown key",
    "corrupt PNG",
    "weights of another architecture",
    "unwritable storage path",
]


def argv(case: Case) -> list[str]:
    head = [case.command] + (["--config", case.config] if case.config else [])
    return head + ["--set", "run.storage_path=results", *case.args]


def prepare(case: Case, tmp: Path) -> None:
    if case.setup is not None:
        case.setup(tmp)


def assert_nothing_left(tmp: Path, name: str) -> None:
    """No result table, checkpoint or probe file anywhere; no run folder unless the case made one."""
    leftovers = [
        p
        for p in tmp.rglob("*")
        if p.name == "tables" or p.name.startswith(("checkpoint_", ".raycontrast-probe"))
    ]
    assert leftovers == []
    if name != "run exists, no --resume":
        assert not (tmp / "results").exists()  # storage was only probed


def assert_message(err: str, case: Case) -> None:
    assert err.startswith("raycontrast: error: "), err
    assert "Traceback" not in err, err
    for part in case.expect:
        assert part in err, f"{part!r} not in {err!r}"


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any import of Ray or of the Ray-facing modules raises ImportError during the test."""
    for name in [n for n in sys.modules if n == "ray" or n.startswith("ray.")]:
        monkeypatch.setitem(sys.modules, name, None)
    for name in ("ray", "raycontrast.train", "raycontrast.tune"):
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)  # the GPU cases hold on GPU machines too


# --------------------------------------------------------------------------------------------- tests


def test_catalogue_is_complete() -> None:
    assert len(CASES) >= 20
    assert set(SUBPROCESS_CASES) <= set(CASES)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_exits_2_before_ray(
    name: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    no_ray: None,
) -> None:
    case = CASES[name]
    prepare(case, tmp_path)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv(case))
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert_message(err, case)
    assert sys.modules["ray"] is None  # nothing imported Ray behind the test's back
    assert_nothing_left(tmp_path, name)


def _run_cli(args: list[str], tmp: Path) -> subprocess.CompletedProcess[str]:
    fake = tmp / "fake_site"
    (fake / "ray").mkdir(parents=True)
    (fake / "ray" / "__init__.py").write_text('raise ImportError("ray imported")\n')
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(fake), str(REPO), env.get("PYTHONPATH", "")])
    env["RAY_AUTH_MODE"] = "disabled"
    env["CUDA_VISIBLE_DEVICES"] = ""  # the GPU-less machine the cases assume
    cmd = [sys.executable, "-m", "raycontrast.cli", *args]
    return subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.parametrize("name", SUBPROCESS_CASES)
def test_bad_input_in_a_fresh_process_never_imports_ray(name: str, tmp_path: Path) -> None:
    case = CASES[name]
    prepare(case, tmp_path)
    proc = _run_cli(argv(case), tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "ray imported" not in proc.stderr
    assert_message(proc.stderr, case)
    assert_nothing_left(tmp_path, name)


def test_fake_ray_catches_the_first_ray_import(tmp_path: Path) -> None:
    """Control: a valid config passes every check and then hits the fake Ray, so the trick is live."""
    proc = _run_cli(["tune", "--config", SMOKE, "--set", "run.storage_path=results"], tmp_path)
    assert proc.returncode != 0
    assert "ImportError: ray imported" in proc.stderr


# ----------------------------------------------------------------------------- checks that pass, pure


def test_valid_inputs_pass_and_leave_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_ray: None
) -> None:
    monkeypatch.chdir(tmp_path)
    cityscapes(tmp_path)
    save_backbone(tmp_path / "w18s.pth", "w18_small")
    sets = {
        "data.dataset": "cityscapes",
        "data.root": str(tmp_path / "cs"),
        "run.storage_path": "out/results",
    }
    cfg = load_config(SMOKE, {**sets, "model.pretrained": str(tmp_path / "w18s.pth")})
    for command in ("train", "tune"):
        preflight.check(cfg, command)
    # The storage folder was only probed: nothing was created for a run that never started.
    assert not (tmp_path / "out").exists()
    preflight.check(load_config(SMOKE, {"run.storage_path": "out/results"}), "tune")
    assert not (tmp_path / ".cache").exists() and not (tmp_path / "out").exists()


def test_check_data_full_scan_decodes_every_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], no_ray: None
) -> None:
    monkeypatch.chdir(tmp_path)
    cityscapes(tmp_path)
    extra = tmp_path / "cs" / "leftImg8bit" / "val" / "zurich" / "zurich_000000_000019_leftImg8bit.png"
    extra.parent.mkdir()
    lab = tmp_path / "cs" / "gtFine" / "val" / "zurich" / "zurich_000000_000019_gtFine_labelIds.png"
    lab.parent.mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(extra)
    Image.fromarray(np.full((4, 4), 7, np.uint8)).save(lab)
    assert preflight.check_data("cityscapes", "cs") == {"train": 1, "val": 2}
    cli.run(["check-data", "--config", SMOKE, *CS])
    assert "val: 2/2 image/label pairs decoded" in capsys.readouterr().out
    lab.write_bytes(lab.read_bytes()[:20])  # the second val pair: only the full scan reaches it
    preflight.check_data("cityscapes", "cs")
    with pytest.raises(SystemExit) as exc:
        cli.main(["check-data", "--config", SMOKE, *CS])
    assert exc.value.code == 2
    assert "zurich_000000_000019_gtFine_labelIds.png" in capsys.readouterr().err


def test_resources_follow_the_numbers_and_skip_clusters() -> None:
    kw = {"workers": 4, "use_gpu": True, "cpus_per_worker": 1.0}
    with pytest.raises(preflight.PreflightError, match="4 worker\\(s\\) x 1 GPU.*has 2 GPU.*to 2") as exc:
        preflight.check_resources("train", **kw, num_gpus=2, num_cpus=64)
    assert exc.value.key == "train.use_gpu"
    preflight.check_resources("train", **kw, num_gpus=4, num_cpus=4)
    with pytest.raises(preflight.PreflightError, match="= 4 CPUs, but this machine has 3"):
        preflight.check_resources("train", **kw, num_gpus=4, num_cpus=3)
    # A cluster address defers to the check after connecting; in-process training still needs a local GPU.
    preflight.check_resources("tune", **kw, num_gpus=0, num_cpus=1, address="ray://head:10001")
    with pytest.raises(preflight.PreflightError, match="train.workers=0"):
        preflight.check_resources("train", **{**kw, "workers": 0}, num_gpus=0, address="ray://head:10001")


def test_multi_node_search_with_a_local_path_is_refused() -> None:
    """Known only after connecting: `tune.run_search` calls this with the live node count."""
    from raycontrast.config import ConfigError
    from raycontrast.storage import check_shared_storage

    with pytest.raises(
        ConfigError, match="cluster has 3 nodes.*local path.*shared mount \\(NFS\\) or s3://"
    ) as exc:
        check_shared_storage("/home/me/results", 3, "ext4")
    assert exc.value.key == "run.storage_path"
    check_shared_storage("/home/me/results", 1, "ext4")  # one node: local is fine
    check_shared_storage("/mnt/shared/results", 3, "nfs4")
    check_shared_storage("s3://bucket/results", 3, None)


def test_probe_reports_unwritable_folders_and_removes_what_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Permission bits do not stop root, so the write failure itself is simulated."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(preflight.tempfile, "mkstemp", refuse)
    with pytest.raises(preflight.PreflightError, match="cannot create or write .*fix its permissions") as exc:
        preflight.probe_writable(tmp_path / "a" / "b", "run.storage_path")
    assert exc.value.key == "run.storage_path"
    assert list(tmp_path.iterdir()) == []  # a/ and a/b/ were made for the probe only
