"""The CPU side of the GPU benchmark and of the cuDNN switch: a clear exit without CUDA, the peak table,
the FLOP convention that compares the counted forward with the HRNet authors' figure, and CPU runs left
alone by `cudnn_autotune`. The measurement itself is in test_gpu.py (marker gpu)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from raycontrast.build import cudnn_autotune
from raycontrast.models.hrnet import HRNetV2

from conftest import load_benchmark

bench = load_benchmark("bench_gpu")


def test_without_cuda_it_says_so_and_exits_non_zero(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        bench.main(["--quick"])
    assert isinstance(exc.value.code, str) and "no CUDA device" in exc.value.code  # exit status 1
    assert capsys.readouterr().out == ""  # nothing measured, nothing printed as if it were


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("Tesla V100-SXM2-16GB", None),
    ],
)
def test_default_peak_from_the_device_name(name: str, peak: float | None) -> None:
    assert bench.default_peak_tflops(name) == peak


def test_counted_forward_matches_the_authors_table() -> None:
    """FlopCounterMode counts 2 FLOPs per multiply-add; the authors' tool counts multiply-adds / 2**30.
    Shapes only: the model runs on the meta device."""
    with torch.device("meta"):
        net = HRNetV2("w48", 19, proj_dim=256).eval()
        images = torch.empty(1, 3, 512, 1024)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net.forward_seg(images)
    assert counter.get_total_flops() / 1e9 == pytest.approx(bench.table_forward_gflop(512, 1024), rel=1e-3)


def test_cudnn_autotune_leaves_cpu_runs_alone(monkeypatch) -> None:
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    cudnn_autotune(torch.device("cpu"))
    assert not torch.backends.cudnn.benchmark
