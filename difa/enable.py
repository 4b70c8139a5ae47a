"""difa in one line for a diffusers user: `difa.enable(pipe, budget=0.5)` (or `threshold=`), `difa.disable(pipe)`.

After `enable`, `pipe(...)` is called as usual. The first call with some settings (the model, the scheduler, the
number of steps, the guidance scale, the resolution and the batch: everything that shapes what the denoiser sees,
not the prompts or class ids) calibrates a plan for those settings with the default search on that call itself
(`calibrate_pipeline(call=...)`): every generation of the calibration replays the call with a copy of its
generator, and the call returns the recorded all-full generation, so its images are the pipeline's own and the
calibration costs no generation more than it would alone. The plan goes into a plan cache, one
file per settings key (`DIFA_CACHE`, else ~/.cache/difa), written atomically: a killed calibration leaves no plan
behind. Later calls with the same settings apply the cached plan (in this process, or any later one); a call with
other settings calibrates again. The calibration's cost is logged once per plan (logger "difa", INFO).

`disable(pipe)` removes the applied plan and the call hook: the pipeline is the object it was, bit for bit.

How the call is hooked: `pipe.__class__` becomes a subclass of its class whose `__call__` looks the plan up first
(Python finds `pipe(...)` on the type, not the instance); `disable` sets the class back.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from difa.adapters import INPUT_KEYS, adapter_for
from difa.apply import apply_plan, remove_plan
from difa.errors import DifaError
from difa.plan import VERSION as PLAN_VERSION
from difa.plan import Plan, config_hash, load_plan

LOG = logging.getLogger("difa")
STATE_ATTR = "_difa_enabled"
# call arguments that change what the denoiser computes on (besides the inputs): part of the settings key
SHAPING = ("num_inference_steps", "guidance_scale", "max_guidance_scale", "height", "width", "num_images_per_prompt",
           "num_frames")
# the caller's per-step callbacks: they run in the generation the first call returns, not in the calibration's
# other generations (their side effects - progress, saved previews, an interrupt - are the caller's, once). A
# callback that changes the latents changes only the returned generation: the plan is then calibrated on the
# trajectory without it (pass no such callback to the first call, or calibrate with difa.calibrate_pipeline).
STEP_CALLBACKS = ("callback", "callback_steps", "callback_on_step_end", "callback_on_step_end_tensor_inputs")
# call arguments that are not settings: the inputs' noise, what is returned, the step callbacks (every other
# argument the caller passes, e.g. negative_prompt or clean_caption, is one: part of the key and passed to the
# calibration's calls)
NOT_SETTINGS = {"generator", "latents", "output_type", "return_dict", "num_inference_steps", *STEP_CALLBACKS}


@dataclass
class Enabled:
    """What `enable` keeps on the pipeline (STATE_ATTR): the goal, the plan cache and the class it replaced."""

    cls: type
    budget: float | None
    threshold: float | None
    cache: Path
    plans: dict[str, Plan] = field(default_factory=dict)  # settings key -> plan, this process
    applied: str | None = None  # the key of the plan applied now
    busy: bool = False  # calibrating: the calibration's own pipeline calls pass straight through


def cache_dir() -> Path:
    """The plan cache: $DIFA_CACHE, else the user's cache directory (~/.cache/difa)."""
    root = os.environ.get("DIFA_CACHE")
    return Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "difa"


def enable(pipe: Any, *, budget: float | None = None, threshold: float | None = None,
           cache: str | os.PathLike | None = None) -> Any:
    """Make `pipe(...)` run a plan calibrated for each call's settings (see the module doc); returns `pipe`.
    Enabling again replaces the goal (plans already made for the old goal stay in the cache under their key)."""
    if (budget is None) == (threshold is None):
        raise DifaError("difa.enable needs one of budget= (a fraction of full latency, e.g. 0.5) or threshold= "
                        "(a final-output relative L1, e.g. 0.05)")
    from difa.checks import budget as check_budget  # (the same checks as the CLI's)

    if budget is not None:
        check_budget(budget)
    elif not (isinstance(threshold, (int, float)) and threshold >= 0):
        raise DifaError(f"threshold must be a number >= 0, got {threshold!r}")
    adapter_for(pipe)  # a pipeline difa knows, or a one-line error now
    state = getattr(pipe, STATE_ATTR, None)
    if state is None:
        cls = type(pipe)
        hooked = type(cls.__name__, (cls,), {"__call__": _call, "__module__": cls.__module__,
                                              "__qualname__": cls.__qualname__})
        state = Enabled(cls, budget, threshold, Path(cache) if cache is not None else cache_dir())
        object.__setattr__(pipe, STATE_ATTR, state)
        pipe.__class__ = hooked
    else:
        state.budget, state.threshold, state.plans = budget, threshold, {}
        state.cache = Path(cache) if cache is not None else state.cache
    return pipe


def disable(pipe: Any) -> bool:
    """Undo `enable`: the plan removed, the class and attributes as they were. False if it was not enabled."""
    state = getattr(pipe, STATE_ATTR, None)
    if state is None:
        return False
    remove_plan(pipe)
    pipe.__class__ = state.cls
    object.__delattr__(pipe, STATE_ATTR)
    return True


def _given(pipe: Any, state: Enabled, args: tuple, kwargs: Mapping) -> dict:
    """The call's arguments by name, the pipeline's defaults filled in."""
    bound = inspect.signature(state.cls.__call__).bind(pipe, *args, **kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def settings(pipe: Any, state: Enabled, given: Mapping, kwargs: Mapping) -> tuple[str, dict]:
    """(key, settings) of a call: the model (class, config, a fingerprint of its weights), the scheduler, the
    shaping arguments as given or defaulted by the pipeline's signature, the batch, and the goal."""
    adapter = adapter_for(pipe)
    model = adapter.denoiser(pipe)
    inputs = given.get(INPUT_KEYS[adapter.inputs_kind])
    batch = len(inputs) if isinstance(inputs, (list, tuple)) else 1
    s = {"model": type(model).__name__, "config": config_hash(model.config), "weights": _fingerprint(model),
         "family": adapter.family, "scheduler": type(pipe.scheduler).__name__, "batch": batch,
         **{k: _plain(given[k]) for k in SHAPING if k in given},
         "passed": {k: _plain(v) for k, v in sorted(_passed(adapter, kwargs).items())},
         "budget": state.budget, "threshold": state.threshold, "plan_version": PLAN_VERSION}
    key = hashlib.sha256(json.dumps(s, sort_keys=True).encode()).hexdigest()[:20]
    return key, s


def _call(self: Any, *args: Any, **kwargs: Any) -> Any:
    """The hooked `pipe(...)`: the settings' plan applied (calibrated on this very call if there is none yet)."""
    state: Enabled = getattr(self, STATE_ATTR)
    call = state.cls.__call__
    if state.busy:
        return call(self, *args, **kwargs)
    given = _given(self, state, args, kwargs)
    key, s = settings(self, state, given, kwargs)
    plan = state.plans.get(key) or _cached(state.cache / f"{key}.json")
    if plan is None:  # first call with these settings: calibrate, its recorded all-full generation being this call
        remove_plan(self)
        state.applied = None
        bound = inspect.signature(call).bind(self, *args, **kwargs)
        gen = bound.arguments.get("generator")
        if gen is None:  # (the calibration replays the call: its noise must come from a generator it can copy)
            gen = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,)).item()))
        first = _states(gen)
        outputs = []

        def replay():
            bound.arguments["generator"] = _copies(gen, first)  # the call's noise, every time
            if outputs:  # the caller's step callbacks run in the returned (first) generation only
                _drop(bound, STEP_CALLBACKS)
            out = call(*bound.args, **bound.kwargs)
            outputs.append(out)
            return out

        state.busy = True
        try:
            state.plans[key] = _calibrate(self, state, key, s, given, kwargs, replay)
        finally:
            state.busy = False
        return outputs[0]  # the recorded generation: every block computed, no plan applied
    state.plans[key] = plan
    if state.applied != key:
        apply_plan(self, plan)
        state.applied = key
    return call(self, *args, **kwargs)


def _calibrate(pipe: Any, state: Enabled, key: str, s: Mapping, given: Mapping, kwargs: Mapping, replay) -> Plan:
    from difa.calibration import calibrate_pipeline

    adapter = adapter_for(pipe)
    inputs = given[INPUT_KEYS[adapter.inputs_kind]]
    inputs = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
    steps = given.get("num_inference_steps")
    guidance = given.get(adapter.guidance_arg)
    if steps is None or guidance is None:
        raise DifaError(f"difa.enable could not read the steps or {adapter.guidance_arg} of this call; pass "
                        f"num_inference_steps= and {adapter.guidance_arg}=")
    extra = {**{k: given[k] for k in ("height", "width", "num_images_per_prompt", "num_frames")
                if given.get(k) is not None}, **_passed(adapter, kwargs)}
    t0 = time.perf_counter()
    plan = calibrate_pipeline(pipe, inputs, steps=int(steps), guidance_scale=float(guidance), seed=0,
                              call_kwargs=extra, name=f"enable-{key}", latency_cache=state.cache / "latency",
                              threshold=state.threshold if state.threshold is not None else 0.0,
                              budget=state.budget, call=replay)  # (a budget overrides the threshold)
    plan = plan.with_(calibration={**plan.calibration, "enable_settings": dict(s)})
    path = plan.save(state.cache / f"{key}.json")  # atomic: a kill leaves no half-written plan
    LOG.info("difa: calibrated a plan for these settings in %.1f s (%s model forwards), predicted %.3f of full "
             "latency, final-output relative L1 %s on the call's inputs; cached at %s", time.perf_counter() - t0,
             plan.calibration.get("forwards"), plan.latency.get("predicted_fraction", float("nan")),
             plan.calibration.get("measured_error"), path)
    return plan


def _drop(bound: inspect.BoundArguments, names: tuple[str, ...]) -> None:
    """Remove `names` from a bound call, as named parameters or inside its **kwargs."""
    for name, param in bound.signature.parameters.items():
        if param.kind is inspect.Parameter.VAR_KEYWORD and isinstance(bound.arguments.get(name), dict):
            bound.arguments[name] = {k: v for k, v in bound.arguments[name].items() if k not in names}
        elif name in names:
            bound.arguments.pop(name, None)


def _passed(adapter: Any, kwargs: Mapping) -> dict:
    """The keyword arguments the caller passed that are settings (neither the inputs, the guidance, nor NOT_SETTINGS)."""
    skip = NOT_SETTINGS | {INPUT_KEYS[adapter.inputs_kind], adapter.guidance_arg}
    return {k: v for k, v in kwargs.items() if k not in skip}


def _states(gen: Any) -> Any:
    """The state of a generator, or of each of a list of them (one per image)."""
    return [g.get_state() for g in gen] if isinstance(gen, (list, tuple)) else gen.get_state()


def _copies(gen: Any, states: Any) -> Any:
    """Fresh generators on the devices of `gen`, in `states`."""
    if isinstance(gen, (list, tuple)):
        return [torch.Generator(device=g.device).set_state(st) for g, st in zip(gen, states)]
    return torch.Generator(device=gen.device).set_state(states)


def _cached(path: Path) -> Plan | None:
    """A plan from the cache, or None (absent, or unreadable: calibrated again and overwritten)."""
    if not path.is_file():
        return None
    try:
        return load_plan(path)
    except DifaError:
        return None


def _fingerprint(model: torch.nn.Module) -> str:
    """A cheap hash of the weights (the first 256 values of each parameter): another fine-tune of the same
    architecture gets its own plans."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in model.named_parameters():
            h.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
            if p.device.type == "meta" or type(p.detach()) is not torch.Tensor:
                continue  # offloaded (accelerate's sequential offload) or a quantized tensor subclass (torchao)
            h.update(p.detach().reshape(-1)[:256].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _plain(v: Any) -> Any:
    """A call argument as it enters the settings key. An image or tensor argument (a ControlNet's control image, an
    image-to-image input) counts by its type and shape, like the prompts by their number: its pixels change what is
    generated, not the work the denoiser does."""
    if isinstance(v, (int, float, str, bool, type(None))):
        return v
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    shape = getattr(v, "shape", None)
    if shape is None and type(v).__module__.startswith("PIL"):
        shape = getattr(v, "size", None)  # PIL images: (width, height)
    return f"{type(v).__name__}{tuple(shape)}" if shape is not None else repr(v)
