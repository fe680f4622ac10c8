"""From a run to a model in hand, without Ray: model sources, evaluation with test-time augmentation,
export and prediction, and their commands."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from raycontrast import cli, train
from raycontrast.checkpoint import list_checkpoints, load_state
from raycontrast.data.cityscapes import label_to_train, train_to_label
from raycontrast.engine import segment_logits
from raycontrast.evaluation import evaluate_model, write_eval
from raycontrast.inference import export_model, find_model, load_model
from raycontrast.models.hrnet import HRNetV2
from raycontrast.models.pretrained import load_pretrained
from raycontrast.predict import predict
from raycontrast.results import ResultsWriter, load_results

from conftest import tiny_config

FS = pafs.LocalFileSystem()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A finished in-process run: 6 iterations, evaluated and checkpointed every 2, all checkpoints kept."""
    root = tmp_path_factory.mktemp("model")
    cfg = tiny_config(root, "tiny", **{"train.num_to_keep": 3})
    out = train.fit(cfg)
    return Path(out.run_path)


def _states(run: Path) -> dict[str, dict]:
    return {p: load_state(FS, p) for p in list_checkpoints(FS, str(run))}


def test_a_run_folder_names_its_best_checkpoint(run):
    states = _states(run)
    best_it = states[max(states)]["best_iteration"]
    chosen = find_model(FS, str(run))
    assert load_state(FS, chosen)["iteration"] == best_it
    assert find_model(FS, chosen) == chosen and find_model(FS, f"{chosen}/state.pt") == chosen
    with pytest.raises(FileNotFoundError, match="not a model source"):
        find_model(FS, str(run.parent))


def test_eval_reproduces_the_recorded_val_miou(run):
    """Every checkpoint written at an evaluation, evaluated as trained: the val mIoU of its report."""
    for path, state in _states(run).items():
        model = load_model(FS, path)
        assert model.iteration == state["iteration"] and state["metrics"]["iteration"] == state["iteration"]
        result = evaluate_model(model, progress=False)
        assert abs(result.miou - state["metrics"]["val_miou"]) <= 1e-6
        assert result.class_iou == pytest.approx(state["metrics"]["val_class_iou"], abs=1e-6, nan_ok=True)


def test_tta_averages_scaled_and_mirrored_logits_at_full_resolution():
    torch.manual_seed(0)
    net = HRNetV2("w18_small", 5, proj_dim=8).eval()
    x = torch.randn(2, 3, 48, 64)
    size = (48, 64)

    def up(t):
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False)

    with torch.inference_mode():
        got = segment_logits(net, x, out_size=size, scales=(0.5, 1.0, 1.5), flip=True)
        views = []
        for s in (0.5, 1.0, 1.5):
            xs = x if s == 1.0 else F.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)
            views += [up(net.forward_seg(xs)), up(net.forward_seg(xs.flip(-1)).flip(-1))]
        want = torch.stack(views).mean(0)
        single = segment_logits(net, x, out_size=size)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(single, up(net.forward_seg(x)), rtol=0, atol=0)


def test_eval_table_is_written_with_its_settings(run, tmp_path):
    model = load_model(FS, str(run))
    result = evaluate_model(model, scales=(0.75, 1.0), flip=True, progress=False)
    path = write_eval(result, FS)
    assert path == f"{model.source}/eval-val-whole-ms-flip.parquet"
    table = pq.read_table(path)
    assert table.column("class_name").to_pylist() == list(model.info.class_names)
    meta = {k.decode(): v.decode() for k, v in table.schema.metadata.items()}
    assert meta["scales"] == "0.75,1.0" and meta["flip"] == "True" and float(meta["miou"]) == result.miou
    assert sum(table.column("pixels").to_pylist()) == int(result.confusion.sum())
    assert "mIoU" in result.describe()


def test_export_holds_inference_weights_and_loads_back(run, tmp_path):
    model = load_model(FS, str(run))
    out = str(tmp_path / "tiny.safetensors")
    export_model(model, FS, out)
    from safetensors import safe_open

    with safe_open(out, "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    assert keys == {k for k in model.net.state_dict() if not k.startswith("proj_head.")}
    assert json.loads(meta["class_names"]) == list(model.info.class_names)
    assert json.loads(meta["config"]) == model.config.model_dump(mode="json")
    assert json.loads(meta["val_miou"]) == model.val_miou
    again = load_model(FS, out)
    x = torch.randn(1, 3, 64, 128)
    with torch.inference_mode():
        assert torch.equal(again.net.forward_seg(x), model.net.forward_seg(x))
    assert evaluate_model(again, progress=False).miou == evaluate_model(model, progress=False).miou
    # model.pretrained takes its backbone; the segmentation head is outside the backbone and ignored
    fresh = HRNetV2(model.config.model.variant, model.info.num_classes, proj_dim=8)
    report = load_pretrained(fresh, out)
    assert report.unexpected and all(k.startswith("seg_head.") for k in report.unexpected)
    sd = model.net.backbone.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in fresh.backbone.state_dict().items())


def test_a_plain_safetensors_file_is_not_taken_for_an_export(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ValueError, match="not a raycontrast export"):
        load_model(FS, str(tmp_path / "other.safetensors"))


def _canvas_images(model, folder: Path, n: int = 2) -> list[np.ndarray]:
    from raycontrast.predict import split_images

    folder.mkdir()
    images = [img for _, img in split_images(model, "val", n)]
    for i, img in enumerate(images):
        Image.fromarray(img).save(folder / f"img{i}.png")
    return images


def test_predict_writes_masks_overlays_and_names_an_unreadable_file(run, tmp_path):
    model = load_model(FS, str(run))
    images = _canvas_images(model, tmp_path / "in")
    Image.fromarray(images[0][:40, :90]).save(tmp_path / "in" / "small.jpg")  # another size
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG not really")
    summary = predict(model, [str(tmp_path / "in")], tmp_path / "out", progress=False)
    assert sorted(summary.written) == ["img0", "img1", "small"]
    assert len(summary.failed) == 1 and "broken.png" in summary.failed[0][1]
    ids = np.array(Image.open(tmp_path / "out" / "img0_trainIds.png"))
    colour = np.array(Image.open(tmp_path / "out" / "img0_color.png"))
    assert ids.shape == images[0].shape[:2] and ids.max() < model.info.num_classes
    assert (colour == np.asarray(model.info.palette, dtype=np.uint8)[ids]).all()
    assert np.array(Image.open(tmp_path / "out" / "small_overlay.png")).shape == (40, 90, 3)
    want = evaluate_like_predict(model, images[0])
    assert (ids == want).all()
    assert not (tmp_path / "out" / "labelIds").exists()  # canvases have no official label ids


def evaluate_like_predict(model, img: np.ndarray) -> np.ndarray:
    from raycontrast.data.transforms import Normalize

    x = Normalize()(img, img[..., 0])[0][None]
    with torch.inference_mode():
        logits = model.net.forward_seg(x)
        return (
            F.interpolate(logits, size=img.shape[:2], mode="bilinear", align_corners=False)
            .argmax(1)[0]
            .numpy()
        )


def test_cityscapes_label_ids_invert_the_train_id_table():
    train_ids = np.arange(19, dtype=np.uint8)
    assert (label_to_train(train_to_label(train_ids)) == train_ids).all()


def test_an_experiment_names_its_best_trials_best_checkpoint(run, tmp_path):
    states = _states(run)
    good = min(states)  # not the newest: the table, not the folder, decides
    w = ResultsWriter(tmp_path / "exp" / "tables", class_names=["a"], searched_keys=["loss.temperature"])
    for tid, miou in (("t1", 0.2), ("t2", 0.5)):
        w.on_trial_start(tid, {"loss.temperature": 0.1})
        w.on_report(tid, None, {"iteration": 2, "val_miou": miou, "checkpoint_path": f"{tid}-ckpt"})
        w.on_disk_use(tid, 1, best_checkpoint=good if tid == "t2" else None)
        w.on_trial_end(tid, "TERMINATED")
    trials = load_results(tmp_path / "exp")["trials"].set_index("trial_id")
    assert trials.loc["t2", "best_checkpoint"] == good and pd.isna(trials.loc["t1", "best_checkpoint"])
    curves = load_results(tmp_path / "exp")["curves"]
    assert set(curves["checkpoint_path"]) == {"t1-ckpt", "t2-ckpt"}
    assert find_model(FS, str(tmp_path / "exp")) == good


def test_the_commands_end_to_end(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", str(run), "--no-progress", "--out", str(tmp_path / "eval.parquet")])
    assert e.value.code == 0 and (tmp_path / "eval.parquet").is_file()
    printed = capsys.readouterr().out
    assert "val mIoU" in printed and "digit 0" in printed and "mIoU" in printed
    out = tmp_path / "m.safetensors"
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(run), "--out", str(out)])
    assert e.value.code == 0 and out.is_file()
    with pytest.raises(SystemExit) as e:
        cli.main(
            [
                "predict",
                str(out),
                "--split",
                "val",
                "--limit",
                "2",
                "--out",
                str(tmp_path / "p"),
                "--no-progress",
            ]
        )
    assert e.value.code == 0 and len(list((tmp_path / "p").glob("*_overlay.png"))) == 2
    (tmp_path / "bad.png").write_bytes(b"junk")
    with pytest.raises(SystemExit) as e:
        cli.main(
            ["predict", str(out), str(tmp_path / "bad.png"), "--out", str(tmp_path / "q"), "--no-progress"]
        )
    assert e.value.code == 1 and "bad.png" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", str(tmp_path), "--no-progress"])
    assert e.value.code == 2 and "not a model source" in capsys.readouterr().err
