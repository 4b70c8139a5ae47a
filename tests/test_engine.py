"""Engine: exactness of `full`, undo, idempotence, per-generation reset, and clear errors."""

from __future__ import annotations

import pytest
import torch

import difa
from difa.calibration import fixed_plan
from difa.calls import PlanProcessor
from difa.engine import ENGINE_ATTR
from difa.errors import DifaError
from tests.conftest import GUIDANCE, STEPS, generate, tiny


def plan_of(pipe, family, method, **kw):
    return fixed_plan(pipe, method, steps=STEPS, guidance_scale=kw.pop("guidance", GUIDANCE[family]), **kw)


def test_all_full_plan_is_bit_exact(family):
    pipe = tiny(family)
    ref = generate(pipe, family)
    difa.apply_plan(pipe, plan_of(pipe, family, lambda i, t: "full"))
    assert torch.equal(generate(pipe, family), ref)


def test_remove_restores_exactly_and_apply_twice_is_safe(family):
    pipe = tiny(family)
    ref = generate(pipe, family)
    plan = plan_of(pipe, family, lambda i, t: ("ast", "wars", "asc", "wars+asc")[(i + t) % 4])
    difa.apply_plan(pipe, plan)
    once = generate(pipe, family)
    assert not torch.equal(once, ref)  # the plan really changes something
    difa.apply_plan(pipe, plan)  # replaces, never stacks
    model = pipe.transformer if family != "sd" else pipe.unet
    procs = [m.processor for n, m in model.named_modules() if n.endswith("attn1")]
    assert all(isinstance(p, PlanProcessor) and not isinstance(p.original, PlanProcessor) for p in procs)
    assert torch.equal(generate(pipe, family), once)
    assert difa.remove_plan(pipe) is True
    assert difa.remove_plan(pipe) is False
    assert not hasattr(model, ENGINE_ATTR) and "set_timesteps" not in vars(pipe.scheduler)
    assert all(not isinstance(m.processor, PlanProcessor) for m in model.modules() if hasattr(m, "processor"))
    assert torch.equal(generate(pipe, family), ref)


def test_caches_reset_between_generations(family):
    """Every cache is empty when a generation starts (a valid plan writes before it reads, so equal outputs alone
    would not show a missing reset: the caches are inspected at the first denoiser call of the next generation)."""
    pipe = tiny(family)
    plan = plan_of(pipe, family, lambda i, t: "ast" if t % 2 else "wars",
                   block=lambda j, t: "forecast" if t >= 3 and j == 0 else "full")
    engine = difa.apply_plan(pipe, plan)
    a = generate(pipe, family)
    seen = []

    def inspect(module, args, kwargs):  # runs after the engine's own pre-hook
        if not seen:
            seen.append([[v or None if isinstance(v, list) else v for v in s.slots.values()]
                         for s in (*engine.states, *engine.block_states)])

    model = pipe.unet if family == "sd" else pipe.transformer
    handle = model.register_forward_pre_hook(inspect, with_kwargs=True)
    try:
        b = generate(pipe, family)
    finally:
        handle.remove()
    assert torch.equal(a, b)
    assert seen and all(x is None for cells in seen[0] for x in cells)


def test_an_interrupted_generation_does_not_shift_the_next_one():
    """A generation that dies at step 2 leaves the step counter there; the next one must still start at step 0."""
    pipe = tiny("dit")
    plan = plan_of(pipe, "dit", lambda i, t: ("full", "ast", "wars", "ast")[t % 4])
    difa.apply_plan(pipe, plan)
    clean = generate(pipe, "dit")
    calls = []

    def die(module, args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt

    handle = pipe.transformer.register_forward_pre_hook(die)
    with pytest.raises(KeyboardInterrupt):
        generate(pipe, "dit")
    handle.remove()
    assert torch.equal(generate(pipe, "dit"), clean)


def test_engine_misuse_is_a_clear_error(tmp_path):
    """A path or dict is accepted by apply_plan; a swapped scheduler and calibrating a planned pipeline refuse."""
    from diffusers import DPMSolverMultistepScheduler

    from difa.calibration import calibrate_pipeline

    pipe = tiny("dit")
    plan = plan_of(pipe, "dit", lambda i, t: "ast" if t else "full")
    difa.apply_plan(pipe, plan)
    want = generate(pipe, "dit")
    path = plan.save(tmp_path / "p.json")
    for given in (str(path), path, plan.to_dict()):
        difa.apply_plan(pipe, given)
        assert torch.equal(generate(pipe, "dit"), want)
    with pytest.raises(DifaError, match="takes a Plan, a path to a plan file or a plan dict, not int"):
        difa.apply_plan(pipe, 3)
    with pytest.raises(DifaError, match="has a plan applied; .*remove_plan"):
        calibrate_pipeline(pipe, [1], threshold=0.05, steps=STEPS, guidance_scale=4.0, latency_cache=None)
    assert torch.equal(generate(pipe, "dit"), want)  # still applied, unchanged
    original = pipe.scheduler
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config)
    with pytest.raises(DifaError, match="pipe.scheduler was replaced after apply_plan"):
        generate(pipe, "dit", steps=STEPS + 2)  # used to run, silently wrong
    difa.apply_plan(pipe, plan)  # re-applied on the new scheduler
    assert torch.equal(generate(pipe, "dit"), want)


def test_bare_model_counter_wraps_each_generation():
    """Without a pipeline the engine counts denoiser calls and starts over after `steps` of them."""
    pipe = tiny("dit")
    plan = plan_of(pipe, "dit", lambda i, t: "ast")
    model = pipe.transformer
    x = torch.randn(2, 4, 16, 16)
    labels = torch.tensor([1, 1000])

    def gen():
        return [model(x, timestep=torch.tensor([t, t]), class_labels=labels).sample for t in range(plan.steps)]

    ref = gen()
    engine = difa.apply_plan(model, plan)
    first, second = gen(), gen()
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert torch.equal(first[0], ref[0])  # step 0 is full
    engine.remove()
    assert all(torch.equal(a, b) for a, b in zip(gen(), ref))


def test_wrong_step_count_is_a_clear_error():
    pipe = tiny("dit")
    difa.apply_plan(pipe, plan_of(pipe, "dit", lambda i, t: "full"))
    with pytest.raises(DifaError, match=f"num_inference_steps={STEPS}") as e:
        generate(pipe, "dit", steps=STEPS + 2)
    assert "\n" not in str(e.value)


def test_cfg_sharing_without_cfg_is_a_clear_error(family):
    pipe = tiny(family)
    difa.apply_plan(pipe, plan_of(pipe, family, lambda i, t: "asc"))
    with pytest.raises(DifaError, match="guidance_scale > 1") as e:
        generate(pipe, family, guidance=1.0)
    assert "\n" not in str(e.value)


def test_plan_for_another_model_is_rejected():
    dit, pixart = tiny("dit"), tiny("pixart")
    plan = plan_of(dit, "dit", lambda i, t: "full")
    with pytest.raises(DifaError, match="PixArtTransformer2DModel"):
        difa.apply_plan(pixart, plan)
    from difa.models import build_tiny_pipeline

    other = build_tiny_pipeline("dit", seed=0, sample_size=8)  # same class and layers, other config
    with pytest.raises(DifaError, match="config hash"):
        difa.apply_plan(other, plan)
