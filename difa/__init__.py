"""difa: one planner for post-training attention compression of diffusion models.

    plan = difa.calibrate_pipeline(pipe, inputs, threshold=0.05, steps=20, guidance_scale=4.0)
    plan.save("plans/my.json")
    difa.apply_plan(pipe, difa.load_plan("plans/my.json"))   # then call pipe(...) as usual
    difa.remove_plan(pipe)                                   # exact undo
    difa.compile_blocks(pipe)                                # regional torch.compile that a plan keeps

    difa.enable(pipe, budget=0.5)   # or: a plan per call settings, calibrated on first use and cached
    difa.disable(pipe)              # exact undo
"""

from difa.calibration import calibrate_pipeline, retime_plan
from difa.apply import apply_plan, compile_blocks, remove_plan
from difa.enable import disable, enable
from difa.errors import DifaError
from difa.plan import Plan, load_plan

__all__ = ["Plan", "DifaError", "apply_plan", "calibrate_pipeline", "compile_blocks", "disable", "enable", "load_plan", "remove_plan",
           "retime_plan"]
__version__ = "0.1.0"
