"""Shared CLI plumbing: model configs, pipeline loading, error reporting. Hydra stays in this package."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from omegaconf import DictConfig, OmegaConf

from difa.errors import DifaError
from difa.paths import conf_dir

CONF_DIR = conf_dir()  # the Hydra configs: conf/ in a checkout, difa/conf in an installed wheel
MODEL_DIR = CONF_DIR / "model"
# The source checkout's root, for tests and experiments run from a checkout; library code never resolves files
# against it (bundled models: difa.models.resolve_path).
REPO_ROOT = Path(__file__).resolve().parents[2]


TECHNIQUES_NODE = "difa_techniques"  # in the defaults list of calibrate.yaml


def register_technique_defaults() -> None:
    """Put each technique's Config defaults under `techniques` (ConfigStore node TECHNIQUES_NODE), so that Hydra
    merges `techniques={tome: {ratio: 0.3}}` and `techniques.wars.window=0.25` and refuses unknown names and keys."""
    from hydra.core.config_store import ConfigStore

    from difa.techniques import default_params

    ConfigStore.instance().store(name=TECHNIQUES_NODE, node={"techniques": default_params()})


register_technique_defaults()  # on import: calibrate.yaml's defaults list names the node


def model_names() -> list[str]:
    return sorted(p.stem for p in MODEL_DIR.glob("*.yaml"))


def model_config(name: str) -> DictConfig:
    """A known model config by name. The name is looked up among the configs' names, never joined into a path: a
    plan or `default_model` naming `../x` or an absolute path cannot make difa read another YAML (and so load the
    weights it names)."""
    if not isinstance(name, str) or name not in model_names():
        raise DifaError(f"no model config {str(name)[:80]!r}; choose one of: {', '.join(model_names())}")
    return OmegaConf.load(MODEL_DIR / f"{name}.yaml")


def plan_model_config(plan: Any) -> DictConfig:
    """The model config of the model a plan names, from the known configs only: a plan never decides which weights
    get loaded or how big a model is built (its recorded config may name a folder or a resolution). Where the
    recorded config differs, a warning says how to load that one on purpose (+model=<name> model.path=...)."""
    import logging

    name = plan.model.name
    if not name or name not in model_names():  # (a name, never a path: see model_config)
        raise DifaError(f"the plan names model {name!r}, which has no model config here; choose the model to load "
                        f"with +model=<name> (one of: {', '.join(model_names())}) and model.path=<folder> if needed")
    known = model_config(name)
    recorded = plan.calibration.get("model_config")
    if isinstance(recorded, Mapping):
        differ = sorted(k for k in set(recorded) | set(known)
                        if k in ("path", "tiny", "resolution", "pipeline", "family", "scheduler") and str(recorded.get(k)) != str(known.get(k)))
        if differ:
            logging.getLogger("difa").warning(
                "the plan was calibrated with %s; loading the known config %s instead (pass +model=%s %s to load "
                "what the plan names)", ", ".join(f"model.{k}={recorded.get(k)!r}" for k in differ), name, name,
                " ".join(f"model.{k}={recorded.get(k)}" for k in differ))
    return known


# Free labels the sweeps attach to jobs with a plus (`+tag=...`); experiments/collect.py reads them back.
LABEL_KEYS = ("tag", "variant", "delta", "technique", "budget")


def check_known_keys(cfg: DictConfig, app: str) -> None:
    """Refuse keys the app's config does not define (`+threshhold=0.9` would otherwise be ignored silently)."""
    defined = set(OmegaConf.load(CONF_DIR / f"{app}.yaml")) - {"defaults", "hydra"}
    unknown = sorted(set(cfg) - defined - {"model", "techniques", "hydra", *LABEL_KEYS})
    if unknown:
        raise DifaError(f"unknown key(s) {', '.join(unknown)} for difa.{app}; check the spelling (keys: "
                        f"{', '.join(sorted(defined))}; free labels: {', '.join('+' + k for k in LABEL_KEYS)})")


def _settings() -> dict[str, Callable[[str, Any], Any]]:
    """Settings the CLIs share -> their check (difa.checks); a key a command lacks is skipped, null means the
    default wherever a key allows it (booleans and counts never null)."""
    from difa import checks
    from difa.evaluation import MAX_REFERENCE

    def within(high: int, low: int = 1) -> Callable[[str, Any], Any]:
        return lambda key, v: checks.count(key, v, high, low)

    finite = lambda key, v: checks.number(key, v)  # noqa: E731
    return {"steps": within(checks.MAX_STEPS), "seed": lambda key, v: checks.seed(v),
            "n_calib": within(checks.MAX_INPUTS), "n": within(checks.MAX_INPUTS), "ref_n": within(MAX_REFERENCE, 2),
            "batch": within(checks.MAX_BATCH), "latency_batch": within(checks.MAX_BATCH),
            "time_batches": within(checks.MAX_INPUTS), "guidance_scale": finite, "threshold": finite,
            "max_cache_mb": finite, "window": lambda key, v: checks.window(v),
            "warmup": checks.boolean, "fid": checks.boolean}


NULL_NOT_ALLOWED = ("seed", "batch", "warmup", "fid")


def check_settings(cfg: DictConfig) -> None:
    """One-line errors for settings of the wrong type or out of range (`steps=2.5`, `seed=abc`, `steps=10**12`,
    `guidance_scale=nan`, `fid=maybe`, `device=cuda` without CUDA, ...) before anything runs."""
    import torch

    for key, check in _settings().items():
        if key not in cfg:
            continue
        v = cfg.get(key)
        if v is not None or key in NULL_NOT_ALLOWED:
            check(key, v)
    device = str(cfg.get("device", "cpu"))
    kind = device.split(":", 1)[0]
    if kind not in ("cpu", "cuda", "mps") or (":" in device and not device.split(":", 1)[1].isdigit()):
        raise DifaError(f"unknown device {device!r}; use cpu, cuda or cuda:<index>")
    if kind == "cuda" and not torch.cuda.is_available():
        raise DifaError(f"device={device} but this machine has no CUDA device (torch {torch.__version__}); use device=cpu")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise DifaError("device=mps but MPS is not available here; use device=cpu")


def check_model(m: DictConfig, cfg: DictConfig) -> None:
    """The model config and dtype, before the model loads (difa.models.check_model_config)."""
    from difa.models import check_model_config

    check_model_config(OmegaConf.to_container(m, resolve=True), str(cfg.get("dtype", "float32")))


def check_class_inputs(pipe: Any, inputs: Sequence) -> None:
    """The inputs fit the model: class ids in its range, or prompts for a text model (difa.checks.inputs)."""
    from difa import checks

    checks.inputs(pipe, inputs)


def user_inputs(cfg: DictConfig) -> list | None:
    """The inputs the user gave: `inputs=[...]` (class ids or prompts) or `prompts=<file, one per line>`; None if
    neither."""
    from difa import checks

    inputs, prompts = cfg.get("inputs"), cfg.get("prompts")
    if inputs is not None and prompts is not None:
        raise DifaError("give inputs=[...] or prompts=<file>, not both")
    if prompts is not None:
        return checks.prompts_file(prompts)
    if inputs is None:
        return None
    if not OmegaConf.is_list(inputs):
        raise DifaError(f"inputs must be a list, got {str(inputs)[:40]!r}; e.g. inputs=[0,1,2] or "
                        "'inputs=[a red bird,a blue car]' (or prompts=<file>)")
    return checks.input_list(OmegaConf.to_container(inputs, resolve=True))


def take_inputs(inputs: Any, n: int | None, key: str = "n_calib") -> list:
    """The first n inputs, cycling through the list when n is larger than it (`key`: the setting n came from)."""
    from difa import checks

    items = checks.input_list(OmegaConf.to_container(inputs, resolve=True) if OmegaConf.is_list(inputs) else inputs)
    n = len(items) if n is None else checks.count(key, n, checks.MAX_INPUTS, example=f"{key}=4")
    return [items[i % len(items)] for i in range(n)]


def load_model(m: DictConfig, device: str, dtype: str) -> Any:
    import diffusers

    from difa.models import load_pipeline

    pipe = load_pipeline(OmegaConf.to_container(m, resolve=True), device=device, dtype=dtype)
    scheduler = m.get("scheduler")
    if scheduler:
        cls = getattr(diffusers, scheduler, None)
        if cls is None:
            raise DifaError(f"diffusers has no scheduler {scheduler!r}; fix model.scheduler")
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
    return pipe


def call_kwargs(m: DictConfig) -> dict:
    from difa.models import pipeline_call_kwargs

    kw = pipeline_call_kwargs(m.family)  # what the family needs offline; the model config may override
    kw.update(OmegaConf.to_container(m.get("call_kwargs") or OmegaConf.create({}), resolve=True))
    return kw


def reject_unplussed_model(argv: Sequence[str], command: str) -> None:
    """`model` is not in the defaults list, so Hydra needs +model=...; say so in one line instead of Hydra's."""
    for a in argv:
        hit = re.match(r"^model=(.*)$", a)
        if hit:
            sys.stderr.write(
                f"difa: error: write +model={hit.group(1)} (with a plus): `model` is chosen with +model=<name> "
                f"in `python -m {command}`; available: {', '.join(model_names())}\n"
            )
            raise SystemExit(2)


HYDRA_FLAGS = ("-m", "--multirun", "--help", "-h", "--hydra-help", "--cfg", "-c", "--info", "--resolve", "--package",
               "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--shell-completion",
               "-sc", "--experimental-rerun", "--version")


def precheck(app: str, argv: Sequence[str]) -> None:
    """Compose the command's config from its overrides once before Hydra runs it, so that an override Hydra cannot
    parse or merge (`threshold=[`, `techniques.foo.x=1`, `+model=nope`) or a missing mandatory key (generate's
    `plan=`) is one line and exit 2, not Hydra's multi-line report and exit 1. Sweeps and Hydra's own flags are
    left to Hydra."""
    if any(a.split("=", 1)[0] in HYDRA_FLAGS for a in argv):
        return
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name=app, overrides=list(argv))
        missing = sorted(OmegaConf.missing_keys(cfg))
    except (HydraException, OmegaConfBaseException, ValueError) as e:
        first = lambda x: (str(x).strip().splitlines() or [type(x).__name__])[0].rstrip(".")  # noqa: E731
        why = first(e) + (f" ({first(e.__cause__)})" if e.__cause__ is not None else "")
        hint = f"; models: {', '.join(model_names())}" if "model/" in why else ""
        sys.stderr.write(f"difa: error: bad override for difa.{app}: {why}{hint}\n")
        raise SystemExit(2) from None
    if missing:
        sys.stderr.write(f"difa: error: difa.{app} needs {', '.join(k + '=...' for k in missing)}; e.g. "
                         f"plan=plans/<file>.json, plan=none or plan=preset:<name>\n")
        raise SystemExit(2)


def report_errors(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except DifaError as e:
        sys.stderr.write(f"difa: error: {e}\n")
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        sys.stderr.write("difa: interrupted; nothing was written that was not complete\n")
        raise SystemExit(130) from None


PRESET = "preset:"
PRESET_KEYS = ("ratio", "sx", "sy", "max_downsample", "use_rand", "agent_ratio", "switch", "gate_step", "sp_interval",
               "fi_interval", "warm_up", "threshold", "cache_interval", "cache_branch_id")
HOOK_KEYS = ("skip", "cross_skip", "timestep_range", "threshold",  # plan=diffusers:<name> (difa.peers.PARAMS)
             "cache_interval", "order", "targets", "max_skip_steps", "retention_ratio", "uncond_skip",
             "fn_blocks", "bn_blocks", "warmup_steps", "taylorseer",  # plan=cachedit:dbcache
             "lookahead")  # plan=smoothcache:calibrate


def is_preset(plan_arg: Any) -> bool:
    return str(plan_arg).startswith(PRESET)


def check_no_preset_keys(cfg: DictConfig) -> None:
    """Preset keys only with plan=preset:<name>; diffusers hook keys only with plan=diffusers:<hook>."""
    from difa.peers import is_hook, peer_keys

    allowed = set(PRESET_KEYS) if is_preset(cfg.plan) else set()
    if is_hook(cfg.plan):
        allowed = set(peer_keys(cfg.plan))
    stray = [k for k in dict.fromkeys(PRESET_KEYS + HOOK_KEYS) if cfg.get(k) is not None and k not in allowed]
    if stray:
        where = f"{cfg.plan}" if is_preset(cfg.plan) or is_hook(cfg.plan) else "a plan file or none"
        hint = (f"{cfg.plan} takes {', '.join(sorted(allowed))}" if is_hook(cfg.plan) else
                "preset keys need plan=preset:<name>, peer keys plan=diffusers:<name> or cachedit:dbcache")
        raise DifaError(f"{', '.join(stray)} do not apply to {where}; drop them ({hint})")


def hook_from_cfg(cfg: DictConfig):
    """`plan=diffusers:<pab|fbc>` plus its keys -> DiffusersHook."""
    from difa.peers import hook_from_spec

    params = {k: OmegaConf.to_container(v) if OmegaConf.is_config(v) else v  # timestep_range: a plain list
              for k in HOOK_KEYS if (v := cfg.get(k)) is not None}
    return hook_from_spec(str(cfg.plan), params)


def prepare_hook(hook: Any, pipe: Any, adapter: Any, m: DictConfig, inputs: list, *, steps: int, guidance: float,
                 seed: int) -> str | None:
    """A peer that calibrates (diffusers:magcache, smoothcache:calibrate) does it here, on one generation of its
    calibration inputs (the first distinct inputs) at the run's settings; returns a note of what that cost (None:
    nothing to do)."""
    if not getattr(hook, "needs_calibration", False):
        return None
    import torch

    take = list(dict.fromkeys(inputs))[:getattr(hook, "calibration_inputs", 1)]  # MagCache: 1; SmoothCache: 10
    hook.prepare(pipe, steps, lambda: adapter.call_pipeline(
        pipe, take, steps=steps, guidance_scale=guidance, output_type="pt",
        generator=torch.Generator(device="cpu").manual_seed(seed), extra=call_kwargs(m)))
    c = hook.calibration
    c["images"] = len(take)
    return (f"{hook.label} calibrated on {c['images']} image(s) in one batch: {c['forwards']} denoiser forwards, "
            f"{c['seconds']:.2f} s (not in the latency)")


def transfer(plan: Any, pipe: Any, steps: int) -> Any:
    """A plan calibrated at another step count, mapped to `steps` (difa.retime_plan), with a warning naming both."""
    import logging

    from difa.calibration import retime_plan

    logging.getLogger("difa").warning(
        "the plan was calibrated at %d steps and runs at %d: each cell takes the method of the nearest normalized "
        "step, not recalibrated (recalibrate with steps=%d for a measured plan)", plan.inference_steps, steps, steps)
    return retime_plan(plan, pipe, steps)


def preset_from_cfg(cfg: DictConfig, pipe: Any, m: DictConfig, steps: int, guidance: float, inputs: list):
    """`plan=preset:<name>` plus the preset keys of `cfg` -> Plan (saved to `save_plan` when given)."""
    from difa.presets import preset_plan

    name = str(cfg.plan)[len(PRESET):]
    params = {k: cfg.get(k) for k in PRESET_KEYS if cfg.get(k) is not None}
    if name == "ditfastattn":
        params.update(inputs=inputs, call_kwargs=call_kwargs(m))
    plan = preset_plan(name, pipe, steps=steps, guidance_scale=guidance, name=m.name, **params)
    plan = plan.with_(calibration={**plan.calibration, "model_config": OmegaConf.to_container(m, resolve=True)})
    if cfg.get("save_plan"):
        print(f"preset plan written to {plan.save(cfg.save_plan)}")
    return plan
