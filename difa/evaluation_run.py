"""One evaluation run as a library call with plain values (`evaluate`, re-exported by difa.evaluation): check the
settings, load the model, build the plan or caching peer on it, generate the baseline's and the method's images on
the same seeds, score them, and return the table, the CSV record and the notes (`Evaluation`). The Hydra CLI
(`difa/cli/evaluate.py`) turns its config into these arguments, then writes and prints what comes back."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from difa import checks, evaluation, fid as fid_metrics, metrics  # the module's functions by attribute: tests patch evaluation.score
from difa.errors import DifaError
from difa.evaluation import BASELINE, COLUMNS, FMNIST, IMAGE_COLUMNS, MAX_REFERENCE, NO_PLAN, Method
from difa.peers import hook_from_spec, is_hook
from difa.plan import CFG_METHODS, Plan, load_plan

PRESET = "preset:"  # plan="preset:<name>": difa's implementation of a published method (difa.presets)


@dataclass
class Evaluation:
    """What one run measured. `table`: one row per method (the baseline first), the COLUMNS that have a value;
    `record`: the table plus the run's settings (the CSV); `images`: one row per image of every method
    (IMAGE_COLUMNS, the CSV next to it); `notes`: what was skipped, reused or calibrated, printed under the table."""

    model: str
    n: int
    steps: int
    guidance: float
    mem: str  # how peak_mem_mb was measured (a key of metrics.MEMORY_MEASURES)
    name: str  # <model>_<method or full>_n<n>_s<steps>_g<guidance>_seed<seed>: the CLI's default file name
    table: Any  # pandas.DataFrame
    record: Any  # pandas.DataFrame
    images: Any  # pandas.DataFrame
    notes: list[str]
    schedule: list | None = None  # smoothcache:calibrate: the calibrated schedule

    def save(self, out: str | Path) -> Path:
        """Write the record to `out`, the per-image rows to <out>_images.csv and a calibrated SmoothCache schedule
        to <out>_smoothcache.json (adding a note that says so); returns `out`."""
        out = Path(out)
        if self.schedule:
            import json  # SmoothCache's calibrated schedule, in its own JSON format

            target = side_files(out)[1]
            metrics.save_atomic(target, lambda f: f.write(json.dumps(self.schedule).encode()), follow=False,
                                what="the SmoothCache schedule next to out")
            self.notes.append(f"SmoothCache schedule written to {target} (reuse it with plan=smoothcache:{target})")
        metrics.save_atomic(side_files(out)[0], lambda f: f.write(self.images.to_csv(index=False).encode()),
                            follow=False, what="the per-image CSV next to out")
        metrics.save_atomic(out, lambda f: f.write(self.record.to_csv(index=False).encode()), what="out")
        return out

    def report(self, out: str | Path) -> str:
        """What the CLI prints: the table, what its columns mean, the notes, where it was written."""
        return evaluation.report(self.table, self.model, self.n, self.steps, self.guidance, self.mem, self.notes, out)


def side_files(out: Path) -> tuple[Path, Path]:
    """The files Evaluation.save writes beside `out`: the per-image rows and a calibrated SmoothCache schedule."""
    return out.with_name(f"{out.stem}_images.csv"), out.with_name(f"{out.stem}_smoothcache.json")


def check_out(out: str | Path) -> Path:
    """`out` and its side files can be written (difa.files.check_target), checked before any image is made: a CSV
    path, not a folder, a device or a name too long; the side files not links."""
    from difa.files import check_target

    out = Path(out)
    if out.suffix.lower() != ".csv":
        raise DifaError(f"out={str(out)!r}: evaluate writes a CSV table; name it .csv, e.g. out=results/run.csv")
    check_target(out, "out", example="results.csv")
    for side in side_files(out):
        check_target(side, "a file next to out", follow=False)
    return out


def is_preset(spec: Any) -> bool:
    return str(spec).startswith(PRESET)


def check_counts(n: Any, batch: Any, ref_n: Any, *, fid: bool, fid_source: str) -> tuple[int, int, int]:
    """(n, batch, ref_n) checked; ref_n None: n, at most MAX_REFERENCE."""
    n = checks.count("n", n, checks.MAX_INPUTS, example="n=2000 for FID")
    batch = checks.count("batch", batch, checks.MAX_BATCH, example="batch=50")
    ref_n = checks.count("ref_n", ref_n, MAX_REFERENCE, low=2) if ref_n is not None else min(n, MAX_REFERENCE)
    if fid and (n < 2 or not 2 <= ref_n <= MAX_REFERENCE):
        raise DifaError(f"FID needs n >= 2 and 2 <= ref_n <= {MAX_REFERENCE} (got n={n}, ref_n={ref_n}); or pass fid=false")
    if fid_source not in fid_metrics.FID_SOURCES:
        raise DifaError(f"unknown fid_source {fid_source!r}; use one of {', '.join(fid_metrics.FID_SOURCES)}")
    return n, batch, ref_n


def run_settings(model: Mapping[str, Any], plan: Plan | None, steps: int | None,
                 guidance_scale: float | None) -> tuple[int, float]:
    """(steps, guidance): as given, else the plan's, else the model config's."""
    steps = int(steps if steps is not None else plan.inference_steps if plan else model["steps"])
    default_scale = plan.guidance_scale if plan and plan.guidance_scale is not None else model["guidance_scale"]
    guidance = float(guidance_scale if guidance_scale is not None else default_scale)
    if plan is not None and guidance <= 1 and any(x in CFG_METHODS for x in (*plan.counts(), *plan.block_counts())):
        raise DifaError(f"the plan shares work across the CFG halves but guidance_scale={guidance} turns CFG off; "
                        "use guidance_scale > 1")
    return steps, guidance


def evaluate(*, model: Mapping[str, Any], pipe: Any = None, load: Callable[[], Any] | None = None,
             plan: Plan | str | Path | None = None, params: Mapping[str, Any] | None = None, label: str | None = None,
             n: int = 2000, seed: int = 0, steps: int | None = None, guidance_scale: float | None = None,
             batch: int = 50, warmup: bool = True, fid: bool = True, fid_source: str = "fid-helper",
             ref_n: int | None = None, cache_dir: str | Path = "runs/cache",
             classifier: str | Path = "data/models/fmnist-classifier", baseline_cache: str | Path | None = None,
             time_batches: int | None = 2, device: str = "cpu", dtype: str = "float32",
             save_plan: str | Path | None = None, inputs: Any = None) -> Evaluation:
    """The uncompressed model next to a plan or caching peer on the same seeds; the settings and their defaults are
    conf/evaluate.yaml's (except baseline_cache: off).

    model: the model config as a dict (conf/model/*.yaml: name, family, steps, guidance_scale, dataset,
    call_kwargs); pipe: its loaded pipeline, or load: a function of no arguments that loads it once the arguments
    are checked. plan: a Plan, a plan file, "none" / None (the baseline alone), "preset:<name>" or a peer spec
    ("diffusers:<name>", "cachedit:dbcache", "smoothcache:<schedule.json|calibrate>"); params: the preset's or the
    peer's parameters; label: the method's row (default: the file's stem, the spec with ':' as '_', or "plan").
    save_plan: a preset's plan is also saved there. inputs: class ids or prompts (e.g. prompts the calibration never
    saw), cycled to n images; None: for a model with the Fashion-MNIST reference set, class ids 0..9 cycled (a text
    model: one caption per class), for any other model its config's `inputs`.
    Errors are one-line DifaErrors, raised before the model loads wherever the arguments alone show them."""
    import pandas as pd
    import torch

    from difa import apply_plan, remove_plan
    from difa.adapters import get_adapter
    from difa.models import pipeline_call_kwargs

    if (pipe is None) == (load is None):
        raise ValueError("pass exactly one of pipe= (a loaded pipeline) and load= (a function that loads it)")
    spec = (label or "plan") if isinstance(plan, Plan) else NO_PLAN if plan is None else str(plan)
    if not isinstance(plan, Plan):
        plan = None if spec == NO_PLAN or is_preset(spec) or is_hook(spec) else load_plan(spec)
    params = dict(params or {})
    if params and not (is_preset(spec) or is_hook(spec)):
        raise DifaError(f"{', '.join(params)} do not apply to a plan file or none; they are a preset's or a peer's")
    extra = {**pipeline_call_kwargs(model["family"]), **(model.get("call_kwargs") or {})}  # what the family needs
    adapter = get_adapter(model["family"])
    fmnist = model.get("dataset") == FMNIST
    fid, warmup, seed = checks.boolean("fid", fid), checks.boolean("warmup", warmup), checks.seed(seed)
    n, batch, ref_n = check_counts(n, batch, ref_n, fid=fid and fmnist, fid_source=fid_source)
    steps, guidance = run_settings(model, plan, steps, guidance_scale)
    given = None if inputs is None else checks.input_list(inputs)
    own = given is None and not fmnist and model.get("inputs")  # a model without a reference set: its own inputs
    if own:
        given = checks.input_list(list(model["inputs"]))
    if load is not None:
        from difa.models import check_model_config

        check_model_config(model, dtype)
    for key, folder in (("baseline_cache", baseline_cache), ("cache_dir", cache_dir if fid and fmnist else None)):
        if folder and Path(str(folder)).exists() and not Path(str(folder)).is_dir():
            raise DifaError(f"{key}={str(folder)!r} is not a folder; give a folder (or null)")
    if is_preset(spec):
        from difa.presets import check_preset

        check_preset(spec[len(PRESET):], params)
    notes = []
    clf_dir = evaluation.classifier_dir(str(classifier)) if fmnist else None
    if not fmnist:
        notes.append(f"FID and class accuracy skipped: model {model['name']} has no reference set (model.dataset is not {FMNIST})")
    else:
        if not fid:
            notes.append("FID skipped (fid=false)")
        if clf_dir is None:
            notes.append(f"class accuracy skipped: no classifier at {classifier} (train it or pass classifier=<dir>)")
    notes.append("CLIP score skipped: no CLIP weights are available offline (torchmetrics would download them)")
    if time_batches is not None:
        checks.count("time_batches", time_batches, checks.MAX_INPUTS, example="time_batches=4")

    if given is None:
        labels, inputs = evaluation.class_inputs(adapter, n, seed)
    else:  # the user's class ids are the labels; prompts carry none (-1), so class accuracy is skipped
        inputs = [given[i % len(given)] for i in range(n)]
        labels = torch.tensor([x if isinstance(x, int) else -1 for x in inputs])
        notes.append(f"inputs: the {len(given)} {'inputs of the model config' if own else 'given'} "
                     f"{'prompts' if isinstance(given[0], str) else 'class ids'}, cycled to {n} images")
        if isinstance(given[0], str) and clf_dir is not None:
            clf_dir = None
            notes.append("class accuracy skipped: the given prompts carry no class label")
    hook = hook_from_spec(spec, params) if is_hook(spec) else None
    pipe = load() if load is not None else pipe
    checks.inputs(pipe, inputs[:len(given)] if given is not None else inputs[:10])  # ids in range, prompts for text
    pipe.set_progress_bar_config(disable=True)
    if is_preset(spec):
        plan = preset(spec[len(PRESET):], pipe, model, params, steps=steps, guidance=guidance, extra=extra,
                      inputs=list(dict.fromkeys(inputs))[:10], save_plan=save_plan)
    elif plan is not None and steps != plan.inference_steps:
        plan = transfer(plan, pipe, steps)
    if plan is not None:  # fail before generating anything if the plan does not fit the model
        apply_plan(pipe, plan)
        remove_plan(pipe)
    if hook is not None:
        note = prepare_peer(hook, pipe, adapter, inputs, steps=steps, guidance=guidance, seed=seed, extra=extra)
        if note:
            notes.append(note)
        hook.apply(pipe)
        hook.remove(pipe)
    label = label or (spec.replace(":", "_") if is_preset(spec) or is_hook(spec) else Path(spec).stem)
    base = Method(BASELINE, None)
    methods = [base] + ([Method(label, plan, hook)] if plan is not None or hook is not None else [])
    cache = feature_cache = None
    if baseline_cache:
        key = evaluation.baseline_key(pipe, adapter, model["family"], extra, inputs, seed=seed, steps=steps,
                                      guidance=guidance, batch=batch, device=device, dtype=dtype)
        cache = Path(str(baseline_cache)) / f"{model['name']}_{key}.pt"
        feature_cache = cache.with_name(f"{cache.stem}_{fid_source}.npy")
        if evaluation.load_baseline(cache, base):
            notes.append(f"baseline images from {cache}; latency of both timed side by side on the first "
                         f"{time_batches or 'all'} batches")
    evaluation.generate_all(pipe, adapter, methods, inputs, seed=seed, steps=steps, guidance=guidance, batch=batch,
                            extra=extra, device=device, warmup=bool(warmup),
                            time_batches=time_batches if base.cached else None)
    evaluation.save_baseline(cache, base)
    del pipe

    net = fid_ref = classifier_net = None
    if fmnist and fid:
        net = fid_metrics.load_fid_inception(fid_source, device)
        fid_ref = fid_metrics.reference_features(ref_n, cache_dir, net, batch_size=batch, progress=True)
        if net.logit_weight is None:
            notes.append(f"Inception Score not available from fid_source={fid_source} (no softmax layer)")
    if clf_dir is not None:
        from difa.zoo import FMNISTClassifier

        classifier_net = FMNISTClassifier.from_pretrained(str(clf_dir)).to(device).eval()
    rows, image_rows = evaluation.score(methods, labels, fid_ref=fid_ref, net=net, classifier=classifier_net,
                                        batch=batch, feature_cache=feature_cache)

    if plan is not None and plan.latency:
        notes.append(latency_note(plan, batch))
    mem = metrics.PeakMemory(device).kind
    table = pd.DataFrame(rows, columns=COLUMNS).dropna(axis=1, how="all")
    record = table.assign(model=model["name"], plan=spec, n=n, ref_n=ref_n if fid_ref is not None else None,
                          steps=steps, guidance_scale=guidance, seed=seed, batch=batch, device=device,
                          dtype=dtype, mem_measure=mem, timed_images=[x.timed for x in methods],
                          threads=torch.get_num_threads())
    calibrated = hook is not None and getattr(hook, "calibration", None)
    if calibrated:  # a peer's own calibration (MagCache, SmoothCache)
        record = record.assign(calib_forwards=[0, hook.calibration["forwards"]],
                               calib_s=[0.0, hook.calibration["seconds"]])
    name = f"{model['name']}_{methods[-1].name if len(methods) > 1 else 'full'}_n{n}_s{steps}_g{guidance}_seed{seed}"
    per_image = pd.DataFrame(image_rows).reindex(columns=[c for c in IMAGE_COLUMNS if any(c in r for r in image_rows)])
    return Evaluation(model=model["name"], n=n, steps=steps, guidance=guidance, mem=mem, name=name, table=table,
                      record=record, images=per_image, notes=notes,
                      schedule=getattr(hook, "schedule", None) if calibrated else None)


def preset(name: str, pipe: Any, model: Mapping[str, Any], params: Mapping[str, Any], *, steps: int,
           guidance: float, extra: dict, inputs: list, save_plan: str | Path | None = None) -> Plan:
    """The preset's plan on `pipe` (difa.presets.preset_plan) with the model config recorded in it; also saved to
    `save_plan` when given. ditfastattn calibrates on `inputs` with the call kwargs `extra`."""
    from difa.presets import preset_plan

    given = {**params, **(dict(inputs=inputs, call_kwargs=extra) if name == "ditfastattn" else {})}
    plan = preset_plan(name, pipe, steps=steps, guidance_scale=guidance, name=model["name"], **given)
    plan = plan.with_(calibration={**plan.calibration, "model_config": dict(model)})
    if save_plan:
        print(f"preset plan written to {plan.save(save_plan)}")
    return plan


def transfer(plan: Plan, pipe: Any, steps: int) -> Plan:
    """A plan calibrated at another step count, mapped to `steps` (difa.retime_plan), with a warning naming both."""
    from difa.calibration import retime_plan

    logging.getLogger("difa").warning(
        "the plan was calibrated at %d steps and runs at %d: each cell takes the method of the nearest normalized "
        "step, not recalibrated (recalibrate with steps=%d for a measured plan)", plan.inference_steps, steps, steps)
    return retime_plan(plan, pipe, steps)


def prepare_peer(hook: Any, pipe: Any, adapter: Any, inputs: list, *, steps: int, guidance: float, seed: int,
                 extra: dict) -> str | None:
    """Calibrate a peer that needs it (diffusers:magcache, smoothcache:calibrate) on one generation of its first
    distinct inputs at the run's settings; the note of what it cost, or None for a peer that needs nothing."""
    if not getattr(hook, "needs_calibration", False):
        return None
    take = list(dict.fromkeys(inputs))[:getattr(hook, "calibration_inputs", 1)]  # MagCache: 1; SmoothCache: 10
    hook.prepare(pipe, steps, lambda: evaluation.call(pipe, adapter, take, seed=seed, steps=steps, guidance=guidance,
                                                      extra=extra))
    hook.calibration["images"] = len(take)
    c = hook.calibration
    return (f"{hook.label} calibrated on {c['images']} image(s) in one batch: {c['forwards']} denoiser forwards, "
            f"{c['seconds']:.2f} s (not in the latency)")


def latency_note(plan: Plan, batch: int) -> str:
    """pred_latency is the plan's prediction at this run's batch; say which batches it was timed at, and warn when
    this batch lies outside them (the prediction is then extrapolated)."""
    from difa.calibration.timing import predicted_at

    at = predicted_at(plan.latency, batch)
    timed = ", ".join(map(str, at["timed"]))
    if at["inside"]:
        return f"pred_latency: the plan's prediction at batch {batch}, between the batches it was timed at ({timed})"
    return (f"warning: batch {batch} lies outside the batches the plan's latency was timed at ({timed}); pred_latency "
            f"is extrapolated (recalibrate with latency_batch={batch} to time it)")
