"""What both calibration drivers share: the measured latency model at the served batch, its record in the plan,
and the shapes of the captured calls."""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Mapping, Sequence

from difa.calibration.latency import Capture, LatencyModel, measure
from difa.calibration.served import decode_seconds, retile
from difa.cost import collapsed_steps
from difa.techniques import REGISTRY
from difa.techniques.protocol import FULL
from difa.calls import shape as _shape


def sampled_channels(model) -> int | None:
    """Learned-sigma denoisers output (epsilon, variance); the pipelines' samplers read only epsilon."""
    cfg = getattr(model, "config", {})
    c_in, c_out = cfg.get("in_channels"), cfg.get("out_channels")
    return int(c_in) if c_in and c_out and int(c_out) == 2 * int(c_in) else None


# The latency model is timed at the latency batch b (the search's seconds) and at these multiples of it, so that a
# plan's prediction holds at the batch it is served at: a plan's fraction of full time changes with the batch (fixed
# costs such as the VAE and the sampler amortize differently, and small batches are dominated by per-call overhead).
SERVE_FACTORS = (0.25, 4.0)


def latency_model(pipe, adapter, model, blocks, layers, capture: Capture, params, cands, traj, images: int,
                  latency_batch: int | None, dtype: str, cache, call_kwargs: Mapping | None = None,
                  own_calls: bool = True) -> LatencyModel:
    """The measured cost model at `latency_batch` images per call (default: the calibration's `images`). Outside the
    denoiser: the calibration run's own remainder (scaled with the batch), plus the VAE decode where calibration
    skipped it (latent output)."""
    batch = latency_batch or images
    retile(capture, batch / getattr(capture, "images", images))  # (the capture may hold another batch already)
    capture.images = batch
    fixed = 0.0
    if traj is not None:
        fixed = traj.outside_s * batch / images
        if own_calls and adapter.calib_output_type == "latent":  # (a caller's own calls: the time they spend)
            fixed += decode_seconds(pipe, capture, batch, traj.final, call_kwargs)
    return measure(model, adapter, blocks, layers, capture, params, cands, fixed, dtype=dtype, cache_dir=cache,
                   images=batch)


def latency_curve(pipe, adapter, model, blocks, layers, capture: Capture, params, cands, traj, images: int,
                  latency_batch: int | None, dtype: str, cache, call_kwargs: Mapping | None = None,
                  own_calls: bool = True) -> tuple[LatencyModel, dict[int, LatencyModel]]:
    """(the model at the latency batch b, {batch: model} at b and SERVE_FACTORS x b). The capture is left at b."""
    b = latency_batch or images
    main = latency_model(pipe, adapter, model, blocks, layers, capture, params, cands, traj, images, b, dtype, cache,
                         call_kwargs, own_calls)
    curve = {b: main}
    # Attention methods are timed at b only; at the other batches their differences to full attention are b's,
    # scaled with the batch (attention work is linear in it): timing every attention method on every layer at 4b
    # took minutes at 4096 tokens
    blocks_only = [c for c in cands if REGISTRY[c].is_block]
    for f in SERVE_FACTORS:
        nb = max(1, round(b * f))
        if nb not in curve:
            at = latency_model(pipe, adapter, model, blocks, layers, capture, params, blocks_only, traj, images, nb,
                               dtype, cache, call_kwargs, own_calls)
            curve[nb] = replace(at, attn_s=_scaled(at.attn_s, main.attn_s, nb / b))
    retile(capture, b / capture.images)  # back to b: the plan's shapes and slot sizes are read there
    capture.images = b
    forwards = sum(m.forwards for m in curve.values())
    return replace(main, forwards=forwards), dict(sorted(curve.items()))


def latency_record(latency: LatencyModel, layers: Sequence[str], methods, block_methods, calls: int,
                   batch: int | None = None, cfg: bool = False, curve: Mapping[int, LatencyModel] | None = None) -> dict:
    """The plan's latency record: its predicted fraction of full at the latency batch, and `by_batch`, the same at
    every timed batch (predicted_at interpolates between them)."""
    collapsed = collapsed_steps(methods, layers, cfg)
    p = latency.predict(layers, methods, block_methods, calls, collapsed)
    record = {"batch": batch, "predicted_fraction": round(p["fraction"], 4), "predicted_s": round(p["seconds"], 4),
              "full_s": round(p["full_seconds"], 4), "step_s": round(latency.step_s, 5),
              "fixed_s": round(latency.fixed_s, 5), "model": "measured microbenchmark (difa.calibration.latency)"}
    if curve:
        record["by_batch"] = {}
        for b, model in curve.items():
            q = model.predict(layers, methods, block_methods, calls, collapsed)
            record["by_batch"][str(b)] = {"predicted_fraction": round(q["fraction"], 4),
                                          "predicted_s": round(q["seconds"], 6), "full_s": round(q["full_seconds"], 6)}
    return record


def predicted_at(latency: Mapping[str, Any], batch: int) -> dict[str, Any] | None:
    """A plan's predicted seconds and fraction of full at `batch` images per call, from its latency record: linear in
    the batch between the two nearest timed batches (extrapolated beyond them, `inside` False). None: no record."""
    points = sorted((int(b), v) for b, v in (latency.get("by_batch") or {}).items())
    if not points and "predicted_fraction" in latency:  # (a plan made before by_batch): one timed batch
        points = [(int(latency.get("batch") or batch), latency)]
    if not points:
        return None
    timed = [b for b, _ in points]
    exact = dict(points).get(batch)
    if exact is not None and "predicted_fraction" in exact:  # a timed batch: its own record
        return {"batch": batch, "predicted_s": exact["predicted_s"], "full_s": exact["full_s"],
                "fraction": exact["predicted_fraction"], "inside": True, "timed": timed}
    if len(points) == 1:
        (b0, v0), = points
        seconds, full = v0["predicted_s"] * batch / b0, v0["full_s"] * batch / b0  # (proportional: a guess)
    else:
        k = min(max(sum(b <= batch for b in timed) - 1, 0), len(points) - 2)  # the segment holding (or nearest) it
        (b0, v0), (b1, v1) = points[k], points[k + 1]
        w = (batch - b0) / (b1 - b0)
        seconds = v0["predicted_s"] + w * (v1["predicted_s"] - v0["predicted_s"])
        full = v0["full_s"] + w * (v1["full_s"] - v0["full_s"])
    return {"batch": batch, "predicted_s": seconds, "full_s": full, "fraction": seconds / full if full else 1.0,
            "inside": timed[0] <= batch <= timed[-1], "timed": timed}


def shape_of(capture: Capture, i: int, layers) -> Any:
    args, kwargs = capture.attn_in[i]
    x = args[0] if args else kwargs["hidden_states"]
    context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    return _shape(layers[i][1], x, context, capture.grid(x, context, layers[i][0]))


def _scaled(at: Mapping[str, Mapping[str, float]], main: Mapping[str, Mapping[str, float]],
            k: float) -> dict[str, dict[str, float]]:
    """Attention timings at k times the batch: full attention as timed there (`at`), each method's difference to
    full at the latency batch (`main`) times k."""
    out = {}
    for n, t in main.items():
        full = at.get(n, {}).get(FULL)
        if full is None or FULL not in t:
            continue
        out[n] = {FULL: full, **{m: full + k * (v - t[FULL]) for m, v in t.items() if m != FULL}}
    return out
