"""The seed methods as published, as ordinary plans (no calibration): same engine, same saving, same experiments.

    tomesd       ToMe for SD: every self-attention layer merges `ratio` of its tokens at every step
    agentsd      AgentSD's two phases: agent attention (sx=sy=4, ratio 0.4, agent_ratio 0.95) for the first
                 40% of the steps (20 of 50), then plain ToMe (sx=sy=2, ratio 0.4; AgentSD's size check turns
                 the agents off there)
    tgate        T-GATE: cross-attention computed until `gate_step`, then its CFG mean is reused (and the
                 engine runs one CFG half); self-attention cached at `warm_up`, recomputed every
                 `sp_interval` steps before the gate and every `fi_interval` steps after it
    deepcache    DeepCache (UNets): every `cache_interval`-th step in full, between them the deep branch's
                 units return their cached outputs (`cache_branch_id` picks the cut; defaults 3 and 0)
    tgate+deepcache  both, as tgate's DeepCache loaders combine them (DeepCache restarts at the gate)
    ditfastattn  DiTFastAttn is its calibration: `difa.calibrate_pipeline` (`python -m difa.calibrate`)

Steps are denoiser calls (= num_inference_steps for DPM-Solver and DDIM).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

from difa.adapters import adapter_for
from difa.calibration import calibrate_pipeline, denoiser_calls, fixed_plan
from difa.apply import plan_layers
from difa.errors import DifaError
from difa.plan import Plan
from difa.techniques import agent, deepcache, kind_of, tome, unfit
from difa.techniques.protocol import FULL

AGENT, AST, TGATE, TOME = "agent", "ast", "tgate", "tome"  # (presets name the methods they schedule)
DITFASTATTN_CANDIDATES = ("ast", "wars", "asc", "wars+asc")  # the DiTFastAttn preset's greedy candidates


# T-GATE's published settings per family (its README and main.py): gate_step, sp_interval, fi_interval, warm_up.
# SD / SD-XL / Playground / SVD at 25 steps: gate 10; PixArt-alpha/Sigma at 25 steps: gate 15; the LCMs at 4 steps:
# gate 1 (or 2), nothing cached before it. A family not listed takes SD's.
TGATE_SETTINGS = {"sd": (10, 5, 1, 2), "sdxl": (10, 5, 1, 2), "playground_v25": (10, 5, 1, 2), "svd": (10, 5, 1, 2),
                  "pixart": (15, 3, 1, 2), "lcm_sdxl": (1, 1, 1, 0), "lcm_pixart": (1, 1, 1, 0)}
# Token merging's max_downsample per family: the finest level that has attention. SD-XL has none at full latent
# resolution, so ToMe's default of 1 would merge nothing there (tomesd's own default is then a silent no-op).
MERGE_DOWNSAMPLE = {"sdxl": 2, "playground_v25": 2, "lcm_sdxl": 2}


def _merge_downsample(pipe: Any, given: int | None) -> int:
    return int(given) if given is not None else MERGE_DOWNSAMPLE.get(adapter_for(pipe).family, 1)


def tomesd(pipe: Any, *, steps: int, guidance_scale: float, ratio: float = 0.5, sx: int = 2, sy: int = 2,
           max_downsample: int | None = None, use_rand: bool = True, seed: int = 0, name: str = "") -> Plan:
    max_downsample = _merge_downsample(pipe, max_downsample)
    params = dict(ratio=ratio, sx=sx, sy=sy, max_downsample=max_downsample, use_rand=use_rand, seed=seed)
    tome.config({TOME: params})  # one-line errors and the ratio-cap warning before anything runs
    return _tag(fixed_plan(pipe, lambda i, t: TOME, steps=steps, guidance_scale=guidance_scale, name=name,
                           techniques={TOME: params}, kinds=("attn1",)), "tomesd", params)


def agentsd(pipe: Any, *, steps: int, guidance_scale: float, ratio: float = 0.4, agent_ratio: float = 0.95,
            sx: int = 4, sy: int = 4, late_sx: int = 2, late_sy: int = 2, switch: float = 0.4,
            k_scale2: float = 0.3, k_shortcut: float = 0.075, fp32: bool = False, max_downsample: int | None = None,
            use_rand: bool = True, seed: int = 0, name: str = "") -> Plan:
    max_downsample = _merge_downsample(pipe, max_downsample)
    if not 0 <= switch <= 1:
        raise DifaError(f"agentsd switch must be a fraction of the steps in [0, 1], got {switch}")
    early = dict(ratio=ratio, agent_ratio=agent_ratio, sx=sx, sy=sy, k_scale2=k_scale2, k_shortcut=k_shortcut,
                 fp32=fp32, max_downsample=max_downsample, use_rand=use_rand, seed=seed)
    late = dict(ratio=ratio, sx=late_sx, sy=late_sy, max_downsample=max_downsample, use_rand=use_rand, seed=seed)
    tome.config({AGENT: early}, AGENT, agent.Config)
    tome.config({TOME: late})
    cut = round(switch * steps)  # AgentSD: steps 0-19 of 50
    return _tag(fixed_plan(pipe, lambda i, t: AGENT if t < cut else TOME, steps=steps, guidance_scale=guidance_scale,
                           name=name, techniques={AGENT: early, TOME: late}, kinds=("attn1",)),
                "agentsd", {**early, "late_sx": late_sx, "late_sy": late_sy, "switch": switch})


def tgate(pipe: Any, *, steps: int, guidance_scale: float, gate_step: int | None = None,
          sp_interval: int | None = None, fi_interval: int | None = None, warm_up: int | None = None,
          name: str = "") -> Plan:
    """T-GATE; a setting not given is the family's published one (TGATE_SETTINGS; SD's: gate_step 10, sp_interval 5,
    fi_interval 1, warm_up 2). Without a CFG batch (the LCMs) the gated output is reused as it is, which is what
    T-GATE's lcm=True does."""
    published = TGATE_SETTINGS.get(adapter_for(pipe).family, TGATE_SETTINGS["sd"])
    gate_step, sp_interval, fi_interval, warm_up = (p if g is None else g for g, p in
                                                    zip((gate_step, sp_interval, fi_interval, warm_up), published))
    for key, v in dict(gate_step=gate_step, sp_interval=sp_interval, fi_interval=fi_interval).items():
        if int(v) != v or v < 1:
            raise DifaError(f"tgate {key} must be an integer >= 1, got {v}")
    if int(warm_up) != warm_up or warm_up < 0:
        raise DifaError(f"tgate warm_up must be an integer >= 0, got {warm_up}")
    adapter, _, layers = plan_layers(pipe)
    joint = [n for n, _ in layers if kind_of(n, adapter) == "joint"]
    if joint:
        raise DifaError(f"{unfit('tgate', joint[0], adapter)}; use calibration (block reuse / forecast, ast) instead")
    if not any(kind_of(n) == "attn2" for n, _ in layers):
        raise DifaError(f"tgate gates cross-attention, and {type(pipe).__name__} has none (class-conditional "
                        "models condition through adaLN); use tomesd, agentsd or calibration instead")

    def self_attention(t: int) -> str:
        # T-GATE's tgate_scheduler (tgate 1.0.0), absolute step indices: before gate_step - 1, computed up to and
        # at warm_up, then when t % sp_interval == 0 (counted from 0, not from warm_up); always at gate_step - 1;
        # after it, when t % fi_interval == 0. In between, the last computed output is reused (`ast`).
        if t < gate_step - 1:
            return FULL if t <= warm_up or t % sp_interval == 0 else AST
        if t == gate_step - 1:
            return FULL
        # after the gate T-GATE's self-attention cache is the CFG mean taken at gate_step - 1 (or a later one-half
        # output): `tgate` reuses exactly that
        return FULL if t % fi_interval == 0 else TGATE

    def method(i: int, t: int) -> str:
        if kind_of(layers[i][0]) == "attn2":
            return TGATE if t >= gate_step else FULL
        return self_attention(t)

    params = dict(gate_step=gate_step, sp_interval=sp_interval, fi_interval=fi_interval, warm_up=warm_up)
    return _tag(fixed_plan(pipe, method, steps=steps, guidance_scale=guidance_scale, name=name), "tgate", params)


def _deepcache_rows(pipe: Any, steps: int, cache_interval: int, cache_branch_id: int,
                    fresh: Callable[[int], bool] | None = None) -> Callable[[int, int], str]:
    """block(j, t) for fixed_plan(..., cache_units=True): transformer blocks full, DeepCache units on its schedule."""
    for key, v, low in (("cache_interval", cache_interval, 1), ("cache_branch_id", cache_branch_id, 0)):
        if isinstance(v, bool) or int(v) != v or v < low:
            raise DifaError(f"deepcache {key} must be an integer >= {low}, got {v}")
    adapter = adapter_for(pipe)
    model = adapter.denoiser(pipe)
    units = adapter.cache_units(model)
    if not units:
        raise DifaError(f"deepcache caches a UNet's deep branch and {type(model).__name__} has no down/mid/up blocks; "
                        "use a difa plan (block reuse / forecast) instead")
    if deepcache.branch(int(cache_branch_id))[0] >= len(model.down_blocks):
        raise DifaError(f"deepcache cache_branch_id {cache_branch_id} is past the UNet's {len(model.down_blocks)} down "
                        f"blocks; use 0..{3 * len(model.down_blocks) - 1}")
    n_blocks = len(adapter.block_layers(model))
    calls = denoiser_calls(pipe.scheduler, steps)
    rows = deepcache.schedule([c for _, _, c in units], calls, int(cache_interval), int(cache_branch_id), fresh)
    return lambda j, t: FULL if j < n_blocks else rows[j - n_blocks][t]


def deepcache_preset(pipe: Any, *, steps: int, guidance_scale: float, cache_interval: int = 3,
                     cache_branch_id: int = 0, name: str = "") -> Plan:
    """DeepCache's defaults (cache_interval 3, cache_branch_id 0), as its DeepCacheSDHelper runs them."""
    block = _deepcache_rows(pipe, steps, cache_interval, cache_branch_id)
    plan = fixed_plan(pipe, lambda i, t: FULL, steps=steps, guidance_scale=guidance_scale, name=name, block=block,
                      cache_units=True)
    return _tag(plan, "deepcache", dict(cache_interval=cache_interval, cache_branch_id=cache_branch_id))


def tgate_deepcache(pipe: Any, *, steps: int, guidance_scale: float, gate_step: int = 10, sp_interval: int = 1,
                    fi_interval: int = 1, warm_up: int = 0, cache_interval: int = 3, cache_branch_id: int = 0,
                    name: str = "") -> Plan:
    """T-GATE with DeepCache, as tgate's TgateSDDeepCacheLoader / TgateSDXLDeepCacheLoader run them: DeepCache
    restarts at gate_step - 1 and at gate_step (both computed in full), so its cached outputs are remade at the
    one-half batch after the gate. Defaults: the T-GATE README's SD-XL + DeepCache example (gate_step 10,
    sp_interval 1, fi_interval 1, warm_up 0; DeepCache interval 3, branch 0)."""
    gated = tgate(pipe, steps=steps, guidance_scale=guidance_scale, gate_step=gate_step, sp_interval=sp_interval,
                  fi_interval=fi_interval, warm_up=warm_up, name=name)

    def fresh(t: int) -> bool:
        if t < gate_step - 1:
            return t % cache_interval == 0
        return t == gate_step - 1 or (t - gate_step) % cache_interval == 0

    block = _deepcache_rows(pipe, steps, cache_interval, cache_branch_id, fresh)
    layers = gated.model.layers
    plan = fixed_plan(pipe, lambda i, t: gated.methods[i][t], steps=steps, guidance_scale=guidance_scale, name=name,
                      block=block, cache_units=True, kinds=tuple({kind_of(n) for n in layers}))
    return _tag(plan, "tgate+deepcache", {**gated.calibration["params"], "cache_interval": cache_interval,
                                          "cache_branch_id": cache_branch_id})


def ditfastattn(pipe: Any, *, steps: int, guidance_scale: float, inputs, threshold: float = 0.05,
                 name: str = "", **kw) -> Plan:
    """DiTFastAttn is its greedy calibration with its four candidates, its loss (on both CFG halves, unguided) and
    its residual rule (an `asc` step also refreshes the window residual a later `wars` reads)."""
    techniques = {k: dict(v) for k, v in (kw.pop("techniques", None) or {}).items()}
    techniques["wars"] = {"residual_from": "full+asc", **techniques.get("wars", {})}
    return calibrate_pipeline(pipe, inputs, threshold=threshold, steps=steps, guidance_scale=guidance_scale,
                              candidates=DITFASTATTN_CANDIDATES, name=name, techniques=techniques,
                              **{"loss_on": "halves", "search": "greedy", **kw})


PRESETS: dict[str, Callable[..., Plan]] = {"tomesd": tomesd, "agentsd": agentsd, "tgate": tgate,
                                           "ditfastattn": ditfastattn, "deepcache": deepcache_preset,
                                           "tgate+deepcache": tgate_deepcache}


PASSED_ON = ("inputs", "call_kwargs", "techniques", "latency_cache", "seed", "progress", "latency_batch", "dtype")


def check_preset(preset: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """The model-free checks of a preset and its parameters (the CLIs call this before the model loads,
    preset_plan before it builds): a known preset, keys it takes, each value of its default's type (a setting
    whose default is the family's published one: an integer >= 0), in range. Returns the given (not None) ones."""
    import inspect

    from difa import checks

    if preset not in PRESETS:
        raise DifaError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    sig = inspect.signature(PRESETS[preset]).parameters
    accepted = {k for k, p in sig.items() if p.kind is not p.VAR_KEYWORD} - {"pipe"}
    open_ended = any(p.kind is p.VAR_KEYWORD for p in sig.values())  # ditfastattn passes the rest to calibration
    given = {k: v for k, v in params.items() if v is not None}
    bad = sorted(set(given) - accepted - (set(PASSED_ON) if open_ended else set()))
    if bad:
        raise DifaError(f"preset {preset} does not take {', '.join(bad)}; it takes "
                        f"{', '.join(sorted(accepted - {'steps', 'guidance_scale', 'name', 'inputs'}))}")
    for key, v in given.items():
        default = sig[key].default if key in sig else None
        if key in ("steps", "guidance_scale", "name", "inputs") or (key in PASSED_ON and key not in sig):
            continue
        if default is None:  # the family's published setting unless given
            checks.count(f"{preset} {key}", v, checks.MAX_STEPS, low=0)
        else:
            checks.like_default(f"{preset} {key}", v, default)
    merge = {k: given[k] for k in ("ratio", "sx", "sy", "use_rand", "seed") if k in given}
    if preset in ("tomesd", "agentsd") and merge:
        tome.config({TOME: merge})
    if preset == "agentsd" and not 0 <= given.get("switch", 0) <= 1:
        raise DifaError(f"agentsd switch must be a fraction of the steps in [0, 1], got {given['switch']}")
    for key in ("gate_step", "sp_interval", "fi_interval", "cache_interval"):
        if key in given and given[key] < 1:
            raise DifaError(f"{preset} {key} must be an integer >= 1, got {given[key]}")
    if preset == "ditfastattn" and "threshold" in given:
        checks.threshold(given["threshold"])
    return given


def preset_plan(preset: str, pipe: Any, *, steps: int, guidance_scale: float, **params) -> Plan:
    """Build the named preset's plan; `params` are the preset's keyword arguments (None values are dropped)."""
    from difa import checks

    given = check_preset(preset, params)
    checks.count("steps", steps, checks.MAX_STEPS, example="steps=20")
    checks.number("guidance_scale", guidance_scale, example="guidance_scale=4.0")
    return PRESETS[preset](pipe, steps=steps, guidance_scale=guidance_scale, **given)


def _tag(plan: Plan, preset: str, params: Mapping[str, Any]) -> Plan:
    return plan.with_(calibration={"preset": preset, "params": dict(params)})
