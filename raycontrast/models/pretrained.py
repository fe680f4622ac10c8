"""Loading local ImageNet / segmentation HRNet checkpoints into the backbone (downloads nothing).

The backbone keeps the public key layout (``conv1``, ``layer1``, ``transition1``, ``stage2``, ...), so such a
checkpoint loads into ``HRNetV2.backbone``; its classification-only keys (``incre_modules``,
``downsamp_modules``, ``final_layer``, ``classifier``) and a segmentation model's heads are ignored and
counted. A key under one of the backbone's own prefixes (``stage*``, ``transition*``, ``layer1``, ...) that the
backbone lacks means another variant, and is an error naming the variant the file fits.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from raycontrast.models.hrnet import VARIANTS, HRNetBackbone

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadReport:
    """Result of :func:`load_pretrained`.

    missing: backbone keys absent from the checkpoint that were tolerated (only BN ``num_batches_tracked``
    counters, which old checkpoints lack); any other missing key is an error.
    unexpected: checkpoint keys that are not part of the backbone (e.g. the ImageNet classifier).
    """

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    loaded: int = 0  # tensors copied into the backbone

    def describe(self, path: str | Path, variant: str) -> str:
        """One line for the console: what was loaded and what was ignored."""
        line = f"model.pretrained: {self.loaded} tensors loaded into the {variant} backbone from {path}"
        if self.unexpected:
            heads = sorted({k.split(".")[0] for k in self.unexpected})
            n = len(self.unexpected)
            line += f"; {n} key{'s' * (n != 1)} outside the backbone ignored ({', '.join(heads)})"
        return line


_PREFIXES = ("module.", "model.", "backbone.")


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(
            f"pretrained checkpoint {str(path)!r} not found; give a local .pth/.pt/.safetensors"
        )
    suffix = path.suffix.lower()
    if suffix not in (".pth", ".pt", ".safetensors"):
        raise ValueError(
            f"pretrained checkpoint {str(path)!r}: unknown extension {suffix!r}; "
            "use .pth, .pt or .safetensors"
        )
    try:
        if suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any parse failure: corrupt, truncated, or not a tensor-only pickle
        raise ValueError(
            f"pretrained checkpoint {str(path)!r} could not be read ({type(e).__name__}: {e}); "
            "re-export it as a plain state dict of tensors"
        ) from e
    if isinstance(obj, dict):
        for k in ("state_dict", "model"):
            if isinstance(obj.get(k), dict):
                obj = obj[k]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ValueError(
            f"pretrained checkpoint {str(path)!r} is not a state dict of tensors "
            "(expected a bare dict or one under 'state_dict' / 'model')"
        )
    out = {}
    for k, v in obj.items():
        changed = True
        while changed:  # strip e.g. "module.backbone."
            changed = False
            for p in _PREFIXES:
                if k.startswith(p):
                    k, changed = k[len(p) :], True
        out[k] = v
    return out


def load_pretrained(model_or_backbone: nn.Module, path: str | Path) -> LoadReport:
    """Load a local HRNet checkpoint into ``model.backbone`` (or the backbone itself); downloads nothing.

    Raises FileNotFoundError / ValueError naming the file for: a missing file, an unknown extension, an
    unreadable file, missing backbone keys, or shape mismatches. Unexpected keys are logged and returned.
    """
    path = Path(path)
    backbone = getattr(model_or_backbone, "backbone", model_or_backbone)
    sd = _read_state_dict(path)
    expected = backbone.state_dict()

    missing = [k for k in expected if k not in sd]
    tolerated = [k for k in missing if k.endswith("num_batches_tracked")]
    fatal = [k for k in missing if not k.endswith("num_batches_tracked")]
    if fatal:
        raise ValueError(
            f"pretrained checkpoint {str(path)!r} lacks {len(fatal)} backbone key(s), e.g. {fatal[:5]}; "
            "it must be an HRNet (ImageNet or segmentation) checkpoint with the public key layout"
            + _fit_hint(sd)
        )
    bad = [
        (k, tuple(sd[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in sd and sd[k].shape != v.shape
    ]
    if bad:
        k, got, want = bad[0]
        raise ValueError(
            f"pretrained checkpoint {str(path)!r} does not fit this backbone: {len(bad)} shape mismatch(es), "
            f"e.g. {k!r} is {list(got)} but the model expects {list(want)}; the checkpoint looks like a "
            "different HRNet width/variant - pick the matching variant" + _fit_hint(sd)
        )
    unexpected = sorted(k for k in sd if k not in expected)
    own = {k.split(".")[0] for k in expected}  # conv1, bn1, layer1, transition1, stage2, ...
    foreign = [k for k in unexpected if k.split(".")[0] in own]
    if foreign:
        fits = _variants_fitting(sd)
        name = f"HRNet {' / '.join(fits)}" if fits else "an HRNet backbone of no known variant"
        variant = getattr(backbone, "variant", "this")
        raise ValueError(
            f"pretrained checkpoint {str(path)!r} is {name}, not {variant}: {len(foreign)} of its backbone "
            f"keys have no place in a {variant} backbone (e.g. {foreign[:3]})"
            + (f"; set model.variant: {fits[0]}" if fits else "")
        )
    if unexpected:
        logger.info(
            "pretrained checkpoint %s: ignoring %d key(s) not in the backbone, e.g. %s",
            path,
            len(unexpected),
            unexpected[:5],
        )
    backbone.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False)
    loaded = sum(1 for k in sd if k in expected)
    return LoadReport(missing=tolerated, unexpected=unexpected, loaded=loaded)


def _fit_hint(sd: dict[str, Tensor]) -> str:
    fits = _variants_fitting(sd)
    return f" (the file fits model.variant: {fits[0]})" if fits else ""


def _variants_fitting(sd: dict[str, Tensor]) -> list[str]:
    """The variants whose backbone takes every backbone-prefixed key of `sd`, each at its shape (built on
    the meta device: shapes only)."""
    out = []
    for variant in VARIANTS:
        with torch.device("meta"):
            want = {k: tuple(v.shape) for k, v in HRNetBackbone(variant).state_dict().items()}  # type: ignore[arg-type]
        own = {k.split(".")[0] for k in want}
        mine = {k: tuple(v.shape) for k, v in sd.items() if k.split(".")[0] in own}
        needed = {k for k in want if not k.endswith("num_batches_tracked")}
        if needed <= set(mine) and all(want.get(k) == shape for k, shape in mine.items()):
            out.append(variant)
    return out
