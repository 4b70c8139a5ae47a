"""Conformance: difa's `tome` next to the real `tomesd` package (dbolya/tomesd) on a tiny SD UNet.

    pip install tomesd==0.1.3 && python experiments/conformance_tomesd.py

Both run with use_rand=False (top-left destinations, so no random stream to match), ratio 0.5, sx = sy = 2,
max_downsample 1, on the same UNet inputs; prints the maximum absolute difference of the UNet outputs.
Not part of CI: it needs the extra package. Expected: float32 rounding only (the two order the merged tokens
differently, which changes the summation order inside attention).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import difa  # noqa: E402
from difa.calibration import fixed_plan  # noqa: E402
from difa.models import build_tiny_pipeline  # noqa: E402


def compare(ratio: float = 0.5, sample_size: int = 16, seed: int = 0) -> dict[str, float]:
    import tomesd

    pipe = build_tiny_pipeline("sd", seed=seed, sample_size=sample_size)
    unet = pipe.unet
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, sample_size, sample_size, generator=g)
    t = torch.tensor(500)
    ctx = torch.randn(2, 77, unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        ref = unet(x, t, encoder_hidden_states=ctx).sample
        tomesd.apply_patch(unet, ratio=ratio, max_downsample=1, sx=2, sy=2, use_rand=False)
        theirs = unet(x, t, encoder_hidden_states=ctx).sample
        tomesd.remove_patch(unet)
        restored = unet(x, t, encoder_hidden_states=ctx).sample
        plan = fixed_plan(pipe, lambda i, s: "tome", steps=1, guidance_scale=1.0, kinds=("attn1",),
                          techniques={"tome": {"ratio": ratio, "sx": 2, "sy": 2, "max_downsample": 1, "use_rand": False}})
        difa.apply_plan(unet, plan)
        ours = unet(x, t, encoder_hidden_states=ctx).sample
        difa.remove_plan(unet)
    return {
        "max |difa - tomesd|": float((ours - theirs).abs().max()),
        "max |tomesd - unpatched|": float((theirs - ref).abs().max()),
        "max |output|": float(theirs.abs().max()),
        "tomesd remove_patch exact": float(torch.equal(restored, ref)),
    }


if __name__ == "__main__":
    try:
        import tomesd  # noqa: F401
    except ImportError:
        raise SystemExit("this check needs the real package: pip install tomesd==0.1.3")
    for ratio in (0.3, 0.5, 0.75):
        r = compare(ratio)
        print(f"ratio {ratio}: " + ", ".join(f"{k} {v:.3g}" for k, v in r.items()))
