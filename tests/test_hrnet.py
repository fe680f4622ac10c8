"""HRNetV2: shapes, parameter counts, public key layout, checkpoint loading, channels_last/bf16, SyncBN."""

from __future__ import annotations

import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raycontrast.models.hrnet import HighResolutionModule, HRNetV2, convert_sync_bn
from raycontrast.models.pretrained import load_pretrained

K = 19


def _grid(n: int) -> int:
    # Two stride-2 3x3 convs with padding 1: n -> (n + 1) // 2, twice == ceil(n / 4).
    return math.ceil(n / 4)


@pytest.fixture(scope="module")
def small() -> HRNetV2:
    torch.manual_seed(0)
    return HRNetV2("w18_small", K, proj_dim=32)


@pytest.mark.parametrize(
    ("variant", "expected_m", "channels"),
    [("w18_small", 1.541, 240), ("w18_small_v2", 3.940, 270), ("w18", 9.641, 270), ("w48", 65.859, 720)],
)
def test_parameter_counts(variant: str, expected_m: float, channels: int) -> None:
    model = HRNetV2(variant, K)
    n = sum(p.numel() for m in (model.backbone, model.seg_head) for p in m.parameters())
    assert round(n / 1e6, 3) == pytest.approx(expected_m, abs=1e-9)
    assert model.feat_channels == channels
    # Projection head: C*C + C (conv1) + 2C (BN) + C*256 + 256 (conv2).
    c = channels
    assert sum(p.numel() for p in model.proj_head.parameters()) == c * c + c + 2 * c + c * 256 + 256


@pytest.mark.parametrize("variant", ["w18_small", "w18_small_v2", "w18"])
def test_forward_shapes_each_variant(variant: str) -> None:
    torch.manual_seed(0)
    model = HRNetV2(variant, K, proj_dim=16).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 96))
    assert out["seg"].shape == (1, K, 16, 24)
    assert out["embed"].shape == (1, 16, 16, 24)


def test_w48_forward_shape() -> None:
    torch.manual_seed(0)
    model = HRNetV2("w48", 5, proj_dim=8).eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64))
    assert out["seg"].shape == (1, 5, 16, 16) and out["embed"].shape == (1, 8, 16, 16)


@pytest.mark.parametrize(("h", "w"), [(250, 500), (97, 131), (33, 17)])
def test_odd_sizes_train_mode(small: HRNetV2, h: int, w: int) -> None:
    small.train()
    out = small(torch.randn(2, 3, h, w))
    assert out["seg"].shape == (2, K, _grid(h), _grid(w))
    assert out["embed"].shape == (2, 32, _grid(h), _grid(w))
    norms = out["embed"].norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms), atol=1e-5, rtol=0)


def test_backward_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    model = HRNetV2("w18_small", K, proj_dim=8)
    out = model(torch.randn(2, 3, 40, 56))
    (out["seg"].square().mean() + out["embed"][:, 0].mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def _reference_fuse(mod: HighResolutionModule, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Out-of-place HRNet fusion, written directly from the definition (no in-place accumulation)."""
    xs = [b(x) for b, x in zip(mod.branches, xs, strict=True)]
    out = []
    for i, row in enumerate(mod.fuse_layers):
        terms = []
        for j, f in enumerate(row):
            if j == i:
                terms.append(xs[j])
            elif j > i:
                terms.append(
                    F.interpolate(f(xs[j]), size=xs[i].shape[-2:], mode="bilinear", align_corners=False)
                )
            else:
                terms.append(f(xs[j]))
        out.append(torch.relu(torch.stack(terms).sum(0)))
    return out


def test_fusion_matches_out_of_place_reference(small: HRNetV2) -> None:
    mod = small.backbone.stage4[0].eval()
    torch.manual_seed(1)
    # Branch sizes as the backbone makes them: ceil-halving of a 13x19 grid.
    sizes = [(13, 19), (7, 10), (4, 5), (2, 3)]
    xs = [torch.randn(2, c, h, w) for c, (h, w) in zip((16, 32, 64, 128), sizes, strict=True)]
    with torch.no_grad():
        got = mod([x.clone() for x in xs])
        want = _reference_fuse(mod, [x.clone() for x in xs])
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_deterministic_init() -> None:
    torch.manual_seed(3)
    a = HRNetV2("w18_small", K, proj_dim=8).state_dict()
    torch.manual_seed(3)
    b = HRNetV2("w18_small", K, proj_dim=8).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    bn = HRNetV2("w18_small", K).backbone.bn1
    assert torch.equal(bn.weight, torch.ones(64)) and torch.equal(bn.bias, torch.zeros(64))


def test_public_key_layout() -> None:
    sd = HRNetV2("w18", K).backbone.state_dict()
    tops = {k.split(".")[0] for k in sd}
    assert tops == {
        "conv1",
        "bn1",
        "conv2",
        "bn2",
        "layer1",
        "transition1",
        "stage2",
        "transition2",
        "stage3",
    } | {
        "transition3",
        "stage4",
    }
    # Shapes as in the public hrnetv2_w18 ImageNet checkpoint.
    expected = {
        "conv1.weight": (64, 3, 3, 3),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.3.conv3.weight": (256, 64, 1, 1),
        "transition1.0.0.weight": (18, 256, 3, 3),
        "transition1.1.0.0.weight": (36, 256, 3, 3),
        "transition2.2.0.0.weight": (72, 36, 3, 3),
        "transition3.3.0.0.weight": (144, 72, 3, 3),
        "stage2.0.branches.0.0.conv1.weight": (18, 18, 3, 3),
        "stage2.0.fuse_layers.0.1.0.weight": (18, 36, 1, 1),
        "stage2.0.fuse_layers.1.0.0.0.weight": (36, 18, 3, 3),
        "stage3.3.branches.2.3.bn2.running_var": (72,),
        "stage4.2.fuse_layers.3.0.0.0.weight": (18, 18, 3, 3),
        "stage4.2.fuse_layers.3.0.2.0.weight": (144, 18, 3, 3),
        "stage4.2.fuse_layers.3.0.1.1.weight": (18,),
        "stage4.2.fuse_layers.0.3.1.weight": (18,),
    }
    for key, shape in expected.items():
        assert tuple(sd[key].shape) == shape, key
    # Unchanged branches have no transition (None entries), and the last stage keeps all four outputs.
    assert not any(k.startswith(("transition2.0.", "transition2.1.", "transition3.0.")) for k in sd)
    assert any(k.startswith("stage4.2.fuse_layers.3.") for k in sd)
    # Ends of down chains have BN only (no ReLU module index 2).
    assert "stage4.2.fuse_layers.3.0.2.2" not in {k.rsplit(".", 1)[0] for k in sd}


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_save_load_roundtrip(tmp_path, fmt: str) -> None:
    torch.manual_seed(0)
    src = HRNetV2("w18_small", K, proj_dim=8)
    torch.manual_seed(1)
    dst = HRNetV2("w18_small", K, proj_dim=8)
    sd = src.backbone.state_dict()
    path = tmp_path / f"ckpt.{fmt}"
    if fmt == "pth":
        torch.save({"state_dict": {f"module.backbone.{k}": v for k, v in sd.items()}}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    report = load_pretrained(dst, path)
    assert report.missing == [] and report.unexpected == []
    got = dst.backbone.state_dict()
    assert all(torch.equal(got[k], v) for k, v in sd.items())


def test_imagenet_style_checkpoint_reports_extras(tmp_path, caplog) -> None:
    torch.manual_seed(0)
    model = HRNetV2("w18_small", K, proj_dim=8)
    sd = {k: v for k, v in model.backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    sd["incre_modules.0.0.conv1.weight"] = torch.zeros(32, 16, 1, 1)
    sd["final_layer.0.weight"] = torch.zeros(2048, 1024, 1, 1)
    sd["classifier.weight"] = torch.zeros(1000, 2048)
    torch.save(sd, tmp_path / "imagenet.pth")
    with caplog.at_level(logging.INFO, logger="raycontrast.models.pretrained"):
        report = load_pretrained(model.backbone, tmp_path / "imagenet.pth")
    assert report.unexpected == [
        "classifier.weight",
        "final_layer.0.weight",
        "incre_modules.0.0.conv1.weight",
    ]
    assert report.missing and all(k.endswith("num_batches_tracked") for k in report.missing)
    assert "final_layer.0.weight" in caplog.text


def test_missing_key_is_named(tmp_path) -> None:
    model = HRNetV2("w18_small", K, proj_dim=8)
    sd = model.backbone.state_dict()
    del sd["stage3.0.branches.1.0.conv2.weight"]
    torch.save(sd, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"stage3\.0\.branches\.1\.0\.conv2\.weight") as e:
        load_pretrained(model, tmp_path / "broken.pt")
    assert "broken.pt" in str(e.value)


def test_wrong_width_is_explained(tmp_path) -> None:
    # w18 has every w18_small key name (more blocks and modules) but different widths.
    sd = HRNetV2("w18", K).backbone.state_dict()
    torch.save(sd, tmp_path / "w18.pth")
    with pytest.raises(ValueError, match="different HRNet width"):
        load_pretrained(HRNetV2("w18_small", K, proj_dim=8), tmp_path / "w18.pth")


def test_wrong_width_names_the_variant_the_file_fits(tmp_path) -> None:
    torch.save(HRNetV2("w18", K).backbone.state_dict(), tmp_path / "w18.pth")
    with pytest.raises(ValueError, match=r"the file fits model\.variant: w18\)"):
        load_pretrained(HRNetV2("w18_small", K, proj_dim=8), tmp_path / "w18.pth")


def test_a_deeper_variant_of_the_same_width_is_refused_not_half_loaded(tmp_path) -> None:
    """A W18 file fits w18_small_v2's keys and shapes (same widths, fewer blocks): it would load with the
    extra blocks silently dropped. Keys under the backbone's own prefixes that it lacks mean another variant."""
    sd = HRNetV2("w18", K).backbone.state_dict()
    sd["classifier.weight"] = torch.zeros(1000, 2048)  # classification-only: ignored, never the reason
    torch.save(sd, tmp_path / "w18.pth")
    with pytest.raises(
        ValueError,
        match=r"is HRNet w18, not w18_small_v2: \d+ of its backbone keys .*"
        r"set model\.variant: w18",
    ) as e:
        load_pretrained(HRNetV2("w18_small_v2", K, proj_dim=8), tmp_path / "w18.pth")
    assert "classifier" not in str(e.value)
    report = load_pretrained(HRNetV2("w18", K, proj_dim=8), tmp_path / "w18.pth")
    want = len(HRNetV2("w18", K).backbone.state_dict())
    assert report.loaded == want and report.unexpected == ["classifier.weight"]
    line = report.describe(tmp_path / "w18.pth", "w18")
    assert line == (
        f"model.pretrained: {want} tensors loaded into the w18 backbone from {tmp_path / 'w18.pth'}; "
        "1 key outside the backbone ignored (classifier)"
    )


def test_bad_files(tmp_path) -> None:
    model = HRNetV2("w18_small", K, proj_dim=8)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_pretrained(model, tmp_path / "nope.pth")
    (tmp_path / "w.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match="unknown extension"):
        load_pretrained(model, tmp_path / "w.bin")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="could not be read"):
        load_pretrained(model, tmp_path / "junk.pth")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(ValueError, match="could not be read"):
        load_pretrained(model, tmp_path / "junk.safetensors")


def test_channels_last_bf16_autocast(small: HRNetV2) -> None:
    model = small.train().to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 48, 80).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out["seg"].shape == (2, K, 12, 20)
    assert torch.isfinite(out["seg"].float()).all() and torch.isfinite(out["embed"].float()).all()
    out["seg"].float().mean().backward()
    assert model.backbone.conv1.weight.grad is not None
    small.to(memory_format=torch.contiguous_format).zero_grad(set_to_none=True)


def test_sync_bn_conversion() -> None:
    torch.manual_seed(0)
    model = HRNetV2("w18_small", K, proj_dim=8).eval()
    n_bn = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        before = model(x)["seg"]
    model = convert_sync_bn(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in model.modules()) == n_bn
    with torch.no_grad():
        torch.testing.assert_close(model(x)["seg"], before)


def test_unknown_variant() -> None:
    with pytest.raises(ValueError, match="w18_small"):
        HRNetV2("w32", K)  # type: ignore[arg-type]
