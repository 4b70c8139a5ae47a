"""A PNG grid of samples from a bundled Fashion-MNIST model: one row per class, `--per-class` columns.

    python experiments/sample_grid.py --model fmnist_dit --out docs/fmnist_dit_grid.png
    python experiments/sample_grid.py --model fmnist_pixart --out docs/fmnist_pixart_grid.png
    python experiments/sample_grid.py --model fmnist_dit --plan plans/fmnist_dit_d0.05_s20.json --out docs/x.png

DiT rows are class ids 0-9; PixArt rows are prompted with "a photo of a <class name>". Seeded (--seed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from difa.adapters import get_adapter  # noqa: E402
from difa.cli.common import call_kwargs, load_model, model_config, report_errors  # noqa: E402
from difa.data import FMNIST_CLASSES  # noqa: E402
from difa.apply import apply_plan, remove_plan  # noqa: E402
from difa.plan import load_plan  # noqa: E402


def grid(model: str, *, per_class: int = 10, seed: int = 0, steps: int | None = None, guidance: float | None = None,
         plan: str | None = None, path: str | None = None):
    from PIL import Image

    m = model_config(model)
    if path:
        m.path = path
    adapter = get_adapter(m.family)
    pipe = load_model(m, "cpu", "float32")
    pipe.set_progress_bar_config(disable=True)
    if plan:
        apply_plan(pipe, load_plan(plan))
    rows = []
    for c, name in enumerate(FMNIST_CLASSES):
        inputs = [c] * per_class if adapter.inputs_kind == "classes" else [f"a photo of a {name}"] * per_class
        out = adapter.call_pipeline(pipe, inputs, steps=int(steps or m.steps), guidance_scale=float(guidance or m.guidance_scale),
                                    generator=torch.Generator().manual_seed(seed + c), output_type="pil",
                                    extra=call_kwargs(m))
        rows.append(out.images)
    remove_plan(pipe)
    w, h = rows[0][0].size
    sheet = Image.new("RGB", (per_class * w, len(rows) * h))
    for r, images in enumerate(rows):
        for i, img in enumerate(images):
            sheet.paste(img, (i * w, r * h))
    return sheet


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="fmnist_dit")
    p.add_argument("--out", required=True)
    p.add_argument("--per-class", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--guidance", type=float, default=None)
    p.add_argument("--plan", default=None)
    p.add_argument("--path", default=None, help="override the model config's path (a save_pretrained dir)")
    p.add_argument("--scale", type=int, default=2, help="pixel upscaling for viewing")
    a = p.parse_args(argv)
    sheet = grid(a.model, per_class=a.per_class, seed=a.seed, steps=a.steps, guidance=a.guidance, plan=a.plan,
                 path=a.path)
    if a.scale > 1:
        sheet = sheet.resize((sheet.width * a.scale, sheet.height * a.scale), resample=0)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    sheet.save(a.out)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    report_errors(main)
