"""Ray stays at the edge: the core imports without it (DESIGN.md rule 7)."""

import subprocess
import sys

CORE = [
    "raycontrast.config",
    "raycontrast.space",
    "raycontrast.plan",
    "raycontrast.loss",
    "raycontrast.memory",
    "raycontrast.models.hrnet",
    "raycontrast.data.loader",
    "raycontrast.metrics",
    "raycontrast.engine",
    "raycontrast.loop",
    "raycontrast.checkpoint",
    "raycontrast.results",
    "raycontrast.analyze",
    "raycontrast.preflight",
    "raycontrast.cli",
]


def test_core_modules_never_import_ray() -> None:
    code = (
        "import importlib, sys\n"
        f"for m in {CORE!r}: importlib.import_module(m)\n"
        "leaked = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "print(leaked[:5]); sys.exit(1 if leaked else 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"ray was imported by the core: {out.stdout}{out.stderr}"
