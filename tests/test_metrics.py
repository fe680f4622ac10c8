"""Confusion matrix / IoU / mIoU against a hand-written evaluator and the official Cityscapes script."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from raycontrast.metrics import all_reduce_confusion, confusion_matrix, iou, miou, pixel_accuracy

IGNORE = 255


def _numpy_scores(pred: np.ndarray, target: np.ndarray, k: int) -> tuple[list[float], float, float]:
    """Per-class IoU from explicit TP / FP / FN masks (no confusion matrix), their nanmean, pixel accuracy."""
    valid = target != IGNORE
    ious = []
    for c in range(k):
        tp = np.sum(valid & (target == c) & (pred == c))
        fp = np.sum(valid & (target != c) & (pred == c))
        fn = np.sum(valid & (target == c) & (pred != c))
        ious.append(tp / (tp + fp + fn) if tp + fp + fn > 0 else math.nan)
    present = [v for v in ious if not math.isnan(v)]
    mean = sum(present) / len(present) if present else math.nan
    acc = np.sum(valid & (pred == target)) / np.sum(valid)
    return ious, mean, float(acc)


def _random_case(seed: int, k: int, shape=(3, 17, 23)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    target = rng.integers(0, k, size=shape)
    pred = np.where(rng.random(shape) < 0.6, target, rng.integers(0, k, size=shape))
    target[rng.random(shape) < 0.15] = IGNORE
    return pred, target


def test_confusion_matrix_layout() -> None:
    target = torch.tensor([0, 0, 1, 2, 2, 2, IGNORE])
    pred = torch.tensor([0, 1, 1, 2, 0, 2, 1])
    cm = confusion_matrix(pred, target, 3, IGNORE)
    assert cm.dtype == torch.int64
    # Rows = target, columns = prediction; the ignored pixel is dropped.
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    assert pixel_accuracy(cm) == pytest.approx(4 / 6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_numpy_evaluator(seed: int) -> None:
    k = 7
    pred, target = _random_case(seed, k)
    # Make classes 5 and 6 absent from both labels and predictions.
    pred[pred >= 5] = 0
    target[(target >= 5) & (target != IGNORE)] = 1
    # Predictions on ignored pixels must not matter, even for classes otherwise absent.
    pred_noisy = pred.copy()
    pred_noisy[target == IGNORE] = 6
    cm = confusion_matrix(torch.from_numpy(pred_noisy), torch.from_numpy(target), k, IGNORE)
    ref_iou, ref_miou, ref_acc = _numpy_scores(pred, target, k)
    got = iou(cm)
    assert got.dtype == torch.float64
    np.testing.assert_allclose(got.numpy(), np.array(ref_iou), rtol=0, atol=1e-12)
    assert torch.isnan(got[5:]).all() and not torch.isnan(got[:5]).any()
    assert miou(cm) == pytest.approx(ref_miou, abs=1e-12)
    assert pixel_accuracy(cm) == pytest.approx(ref_acc, abs=1e-12)


def test_class_only_predicted_counts_as_zero() -> None:
    target = torch.tensor([[0, 0], [1, 1]])
    pred = torch.tensor([[0, 2], [1, 1]])
    cm = confusion_matrix(pred, target, 4)
    scores = iou(cm)
    assert scores[2].item() == 0.0 and math.isnan(scores[3].item())
    assert miou(cm) == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_accumulation_is_additive() -> None:
    pred, target = _random_case(5, 4, shape=(4, 9, 11))
    p, t = torch.from_numpy(pred), torch.from_numpy(target)
    whole = confusion_matrix(p, t, 4)
    parts = sum(confusion_matrix(p[i], t[i], 4) for i in range(4))
    assert torch.equal(whole, parts)


def test_all_ignored_and_empty() -> None:
    cm = confusion_matrix(torch.zeros(2, 3, dtype=torch.long), torch.full((2, 3), IGNORE), 3)
    assert cm.sum() == 0 and cm.shape == (3, 3)
    assert math.isnan(miou(cm)) and math.isnan(pixel_accuracy(cm))
    assert torch.isnan(iou(cm)).all()


def test_bad_values_raise() -> None:
    t = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="prediction value 3 outside"):
        confusion_matrix(torch.tensor([0, 3, 1]), t, 3)
    with pytest.raises(ValueError, match="prediction value -1"):
        confusion_matrix(torch.tensor([0, -1, 1]), t, 3)
    with pytest.raises(ValueError, match="target value 7"):
        confusion_matrix(torch.tensor([0, 1, 1]), torch.tensor([0, 7, 1]), 3)
    with pytest.raises(ValueError, match="shape"):
        confusion_matrix(torch.tensor([0, 1]), t, 3)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(torch.tensor([0.0, 1.0, 1.0]), t, 3)
    # An out-of-range prediction on an ignored pixel is irrelevant.
    cm = confusion_matrix(torch.tensor([0, 9, 1]), torch.tensor([0, IGNORE, 1]), 3)
    assert cm.sum() == 2


def test_all_reduce_single_process_is_identity() -> None:
    assert not dist.is_initialized()
    cm = torch.arange(9).reshape(3, 3)
    out = all_reduce_confusion(cm)
    assert torch.equal(out, cm) and out is not cm


def _all_reduce_worker(rank: int, world: int, init_file: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        cm = torch.full((3, 3), rank + 1, dtype=torch.long)
        results[rank] = all_reduce_confusion(cm).tolist()
        assert cm.tolist() == [[rank + 1] * 3] * 3  # input untouched
    finally:
        dist.destroy_process_group()


def test_all_reduce_sums_across_two_processes(tmp_path) -> None:
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(
            _all_reduce_worker, args=(2, str(tmp_path / "pg"), results), nprocs=2, start_method="spawn"
        )
        assert results[0] == results[1] == [[3] * 3] * 3


# --- official Cityscapes evaluation -------------------------------------------------------------------


def test_matches_official_cityscapes_evaluation(tmp_path) -> None:
    pytest.importorskip("cityscapesscripts")
    import cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling as cs
    from cityscapesscripts.helpers.labels import labels as cs_labels
    from PIL import Image

    # labelId -> trainId; ignoreInEval classes (and unlabeled etc.) map to 255.
    lut = np.full(256, IGNORE, dtype=np.uint8)
    for lab in cs_labels:
        if lab.id >= 0 and not lab.ignoreInEval:
            lut[lab.id] = lab.trainId
    train_to_label = {lab.trainId: lab.id for lab in cs_labels if lab.id >= 0 and not lab.ignoreInEval}
    name_of_train = {lab.trainId: lab.name for lab in cs_labels if lab.id >= 0 and not lab.ignoreInEval}
    assert sorted(train_to_label) == list(range(19))

    rng = np.random.default_rng(0)
    gt_ids = [i for i in range(34) if i not in (train_to_label[15], train_to_label[16], train_to_label[17])]
    pred_train = [t for t in range(19) if t not in (15, 16)]  # bus, train absent everywhere -> NaN
    gt_files, pred_files, preds, gts = [], [], [], []
    for n in range(3):
        shape = (24 + 4 * n, 40)
        gt = rng.choice(gt_ids, size=shape).astype(np.uint8)  # includes ignored labelIds (0-6, 9, 10, ...)
        gt[:, :5] = 7  # a block of road so one class has a large IoU
        rand_pred = np.vectorize(train_to_label.get)(rng.choice(pred_train, size=shape)).astype(np.uint8)
        pred = np.where(rng.random(shape) < 0.5, gt, rand_pred)
        # Where the label is ignored the copied labelId is not an eval class: predict an eval class instead.
        pred = np.where(lut[pred] == IGNORE, rand_pred, pred).astype(np.uint8)
        gf, pf = tmp_path / f"img{n}_gtFine_labelIds.png", tmp_path / f"img{n}_pred.png"
        Image.fromarray(gt).save(gf)
        Image.fromarray(pred).save(pf)
        gt_files.append(str(gf))
        pred_files.append(str(pf))
        gts.append(lut[gt])
        preds.append(lut[pred])
    assert all((p != IGNORE).all() for p in preds)

    args = copy.copy(cs.args)
    args.evalInstLevelScore = False  # instance scores need instanceIds PNGs (and break under numpy 2)
    args.quiet = True
    args.JSONOutput = False
    args.evalPixelAccuracy = False
    result = cs.evaluateImgLists(pred_files, gt_files, args)

    cm = torch.zeros(19, 19, dtype=torch.long)
    for p, g in zip(preds, gts, strict=True):
        cm += confusion_matrix(torch.from_numpy(p.astype(np.int64)), torch.from_numpy(g.astype(np.int64)), 19)
    ours = iou(cm)
    for t in range(19):
        official = result["classScores"][name_of_train[t]]
        if math.isnan(official):
            assert math.isnan(ours[t].item()), name_of_train[t]
        else:
            assert ours[t].item() == pytest.approx(official, abs=1e-6), name_of_train[t]
    assert math.isnan(ours[15].item()) and math.isnan(ours[16].item())
    assert ours[17].item() == 0.0  # motorcycle: predicted, never labelled
    assert miou(cm) == pytest.approx(result["averageScoreClasses"], abs=1e-6)
