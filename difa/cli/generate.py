"""`python -m difa.generate plan=plans/<file>.json [+model=<name>] [seed=0] [n=8]`: images with a plan applied."""

from __future__ import annotations

import math
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from difa.adapters import get_adapter
from difa.cli.common import (CONF_DIR, PRESET, PRESET_KEYS, call_kwargs, check_class_inputs, check_known_keys,
                             check_model, check_no_preset_keys, check_settings, hook_from_cfg, is_preset, load_model,
                             model_config, plan_model_config, precheck, prepare_hook, preset_from_cfg, report_errors,
                             take_inputs, transfer, user_inputs)
from difa.apply import apply_plan, remove_plan
from difa.errors import DifaError
from difa.files import check_folder, check_target
from difa.peers import is_hook
from difa.plan import CFG_METHODS, Plan, load_plan
from difa.presets import check_preset

NO_PLAN = "none"
def resolve(cfg: DictConfig) -> tuple[Plan | None, DictConfig]:
    given = cfg.model if "model" in cfg and cfg.model is not None else None
    if str(cfg.plan) == NO_PLAN or is_preset(cfg.plan) or is_hook(cfg.plan):
        return None, given if given is not None else model_config(cfg.get("default_model") or "fmnist_dit")
    plan = load_plan(cfg.plan)
    if given is not None:
        return plan, given
    return plan, plan_model_config(plan)


def run(cfg: DictConfig) -> tuple[list, Path]:
    check_known_keys(cfg, "generate")
    check_settings(cfg)
    plan, m = resolve(cfg)
    check_model(m, cfg)
    adapter = get_adapter(m.family)
    steps = int(cfg.steps if cfg.steps is not None else plan.inference_steps if plan else m.steps)
    default_scale = plan.guidance_scale if plan and plan.guidance_scale is not None else m.guidance_scale
    guidance = float(cfg.guidance_scale if cfg.guidance_scale is not None else default_scale)
    if plan is not None and plan.cfg_enabled != adapter.runs_cfg(guidance):
        uses = [m_ for m_ in plan.counts() if m_ in CFG_METHODS]
        if uses:
            raise DifaError(f"the plan uses {', '.join(uses)} (CFG sharing) but guidance_scale={guidance} turns CFG off; use guidance_scale > 1")
    given = user_inputs(cfg)
    inputs = take_inputs(given if given is not None else m.inputs, cfg.n, key="n")
    check_no_preset_keys(cfg)
    if is_preset(cfg.plan):
        check_preset(str(cfg.plan)[len(PRESET):], {k: cfg.get(k) for k in PRESET_KEYS})
        if cfg.get("save_plan"):
            check_target(cfg.save_plan, "save_plan")
    hook = hook_from_cfg(cfg) if is_hook(cfg.plan) else None  # the peer's parameters checked here
    name = (str(cfg.plan).replace(":", "_") if is_preset(cfg.plan) or is_hook(cfg.plan)
            else Path(str(cfg.plan)).stem if plan is not None else f"{m.name}_full")
    out = Path(cfg.out) if cfg.out else Path("outputs") / "generate" / name
    check_folder(out, "out")  # before the model loads and any image is made
    pipe = load_model(m, cfg.device, cfg.dtype)
    check_class_inputs(pipe, inputs)
    if is_preset(cfg.plan):
        plan = preset_from_cfg(cfg, pipe, m, steps, guidance, inputs)
    elif plan is not None and steps != plan.inference_steps:
        plan = transfer(plan, pipe, steps)
    if plan is not None:
        apply_plan(pipe, plan)
    if hook is not None:
        note = prepare_hook(hook, pipe, adapter, m, inputs, steps=steps, guidance=guidance, seed=int(cfg.seed))
        if note:
            print(note)
        hook.apply(pipe)
    generator = torch.Generator(device="cpu").manual_seed(int(cfg.seed))
    t0 = time.perf_counter()
    try:
        images = adapter.outputs(adapter.call_pipeline(pipe, inputs, steps=steps, guidance_scale=guidance,
                                                       generator=generator, output_type="pil", extra=call_kwargs(m)))
    finally:
        remove_plan(pipe)
        if hook is not None:
            hook.remove(pipe)
    wall = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    images = save_outputs(images, out)
    print(f"{len(images)} {'videos' if adapter.output_attr == 'frames' else 'images'} ({m.name}, {steps} steps, guidance {guidance}, plan {cfg.plan}) in {wall:.2f} s "
          f"({wall / len(images):.3f} s/{'video' if adapter.output_attr == 'frames' else 'image'}) -> {out}/")
    if plan is not None and plan.latency:
        print(latency_line(plan, len(inputs), wall))
    return images, out


def save_outputs(images: list, out: Path) -> list:
    """Images as 000.png ... and grid.png; videos (lists of frames) as 000.gif plus 000_f00.png ... per frame, and
    grid.png of their first frames. Returns the images, or the first frame of each video."""
    firsts = []
    for i, item in enumerate(images):
        if isinstance(item, (list, tuple)):  # a video: its frames
            for f, frame in enumerate(item):
                frame.save(out / f"{i:03d}_f{f:02d}.png")
            item[0].save(out / f"{i:03d}.gif", save_all=True, append_images=list(item[1:]), duration=125, loop=0)
            firsts.append(item[0])
        else:
            item.save(out / f"{i:03d}.png")
            firsts.append(item)
    grid(firsts).save(out / "grid.png")
    return images


def grid(images: list):
    from PIL import Image

    cols = math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    sheet = Image.new("RGB", (cols * w, rows * h))
    for i, img in enumerate(images):
        sheet.paste(img, ((i % cols) * w, (i // cols) * h))
    return sheet


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="generate")
def _hydra_main(cfg: DictConfig) -> None:
    report_errors(lambda: run(cfg))


def plus_model(argv: list[str]) -> list[str]:
    """`model=<name>` -> `+model=<name>`: the issue's own example is `python -m difa.generate model=... plan=...`."""
    return [("+" + a) if a.startswith("model=") else a for a in argv]


@contextmanager
def _argv(argv: list[str]):
    """Hydra's @main reads sys.argv: hand it `argv` for the call and put the caller's list back afterwards."""
    saved = sys.argv
    sys.argv = argv
    try:
        yield
    finally:
        sys.argv = saved


def main() -> None:
    argv = plus_model(sys.argv)
    precheck("generate", argv[1:])
    with _argv(argv):  # both spellings accepted; the process-wide sys.argv is left as it was
        _hydra_main()


def latency_line(plan: Plan, batch: int, wall: float) -> str:
    """The plan's predicted seconds for this call (its latency curve at this batch) against the measured ones, and a
    warning when the batch lies outside the batches its latency was timed at."""
    from difa.calibration.timing import predicted_at

    at = predicted_at(plan.latency, batch)
    line = (f"latency    predicted {at['predicted_s']:.3g} s ({at['fraction']:.3f} of full) at batch {batch}, measured "
            f"{wall:.3g} s ({wall / at['predicted_s']:.2f}x the prediction; one call: first-call and machine noise "
            "included, python -m difa.evaluate times side by side)")
    if not at["inside"]:
        line += (f"\nwarning    batch {batch} lies outside the batches the plan was timed at "
                 f"({', '.join(map(str, at['timed']))}); the prediction is extrapolated")
    return line
