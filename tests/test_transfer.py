"""Plans that transfer across step counts (difa.retime_plan): each new cell takes the method of the nearest
normalized step, cells that cannot run as mapped stay `full`; the result equals a fixed plan built with that
mapping written out here, bit for bit, and runs at the new step count."""

from __future__ import annotations

import pytest
import torch

import difa
from difa.calibration import fixed_plan, retime_plan
from difa.errors import DifaError
from tests.conftest import GUIDANCE, generate, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def nearest(t: int, old: int, new: int) -> int:
    return round(t * (old - 1) / (new - 1))


@pytest.mark.parametrize("new", [4, 13])
def test_retimed_plan_is_the_nearest_step_schedule(new):
    pipe = tiny("dit")
    old = 7
    block = lambda j, t: "full" if t % 2 == 0 or j == 0 else ("forecast" if j % 2 else "reuse")  # noqa: E731
    attention = lambda i, t: "ast" if t % 3 == 2 else "full"  # noqa: E731
    plan = fixed_plan(pipe, attention, steps=old, guidance_scale=GUIDANCE["dit"], block=block)
    moved = retime_plan(plan, pipe, new)
    want = fixed_plan(pipe, lambda i, t: plan.methods[i][nearest(t, old, new)], steps=new, guidance_scale=GUIDANCE["dit"],
                      block=lambda j, t: plan.blocks[j][nearest(t, old, new)])
    assert moved.methods == want.methods and moved.blocks == want.blocks
    assert moved.num_inference_steps == new and moved.calibration["retimed_from"]["steps"] == old
    difa.apply_plan(pipe, moved)
    try:
        got = generate(pipe, "dit", steps=new)
    finally:
        difa.remove_plan(pipe)
    difa.apply_plan(pipe, want)
    try:
        assert torch.equal(got, generate(pipe, "dit", steps=new))
    finally:
        difa.remove_plan(pipe)
    assert retime_plan(plan, pipe, old) is plan


def test_a_mapped_cell_with_nothing_cached_stays_full():
    pipe = tiny("dit")
    plan = fixed_plan(pipe, lambda i, t: "full", steps=6, guidance_scale=GUIDANCE["dit"],
                      block=lambda j, t: "reuse" if t == 1 else "full")
    moved = retime_plan(plan, pipe, 2)  # new step 0 <- old 0, new step 1 <- old 5: all full
    assert all(set(r) == {"full"} for r in moved.blocks)
    up = retime_plan(plan, pipe, 11)  # old step 1 is new steps 1 and 2 (0.5*... nearest): reuse stays where valid
    assert all(r[0] == "full" for r in up.blocks) and any("reuse" in r for r in up.blocks)


def test_a_schedule_that_cannot_be_mapped_is_refused():
    from diffusers import DDIMScheduler

    pipe = tiny("dit")
    plan = fixed_plan(pipe, lambda i, t: "ast" if t else "full", steps=6, guidance_scale=GUIDANCE["dit"])
    for bad in (0, 2.5, True):
        with pytest.raises(DifaError, match=r"steps must be an integer in \[1, 10000\]"):
            retime_plan(plan, pipe, bad)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(DifaError, match="calibrated with DPMSolverMultistepScheduler and the pipeline uses "
                                        "DDIMScheduler, so its steps cannot be mapped"):
        retime_plan(plan, pipe, 10)
