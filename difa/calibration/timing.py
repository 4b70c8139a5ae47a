"""What both calibration drivers share: the measured latency model at the served batch, its record in the plan,
and the shapes of the captured calls."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

from difa.calibration.latency import Capture, LatencyModel, decode_seconds, measure, retile
from difa.cost import collapsed_steps
from difa.calls import shape as _shape


def sampled_channels(model) -> int | None:
    """Learned-sigma denoisers output (epsilon, variance); the pipelines' samplers read only epsilon."""
    cfg = getattr(model, "config", {})
    c_in, c_out = cfg.get("in_channels"), cfg.get("out_channels")
    return int(c_in) if c_in and c_out and int(c_out) == 2 * int(c_in) else None


def latency_model(pipe, adapter, model, blocks, layers, capture: Capture, params, cands, traj, images: int,
             latency_batch: int | None, dtype: str, cache, call_kwargs: Mapping | None = None) -> LatencyModel:
    """The measured cost model at `latency_batch` images per call. Outside the denoiser: the calibration run's own
    remainder (scaled with the batch), plus the VAE decode where calibration skipped it (latent output)."""
    batch = latency_batch or images
    retile(capture, batch / images)
    fixed = 0.0
    if traj is not None:
        fixed = max(traj.wall_s - traj.denoiser_s, 0.0) * batch / images
        if adapter.calib_output_type == "latent":
            fixed += decode_seconds(pipe, capture, batch, traj.final, call_kwargs)
    return measure(model, adapter, blocks, layers, capture, params, cands, fixed, dtype=dtype, cache_dir=cache)


def latency_record(latency: LatencyModel, layers: Sequence[str], methods, block_methods, calls: int,
                    batch: int | None = None, cfg: bool = False) -> dict:
    p = latency.predict(layers, methods, block_methods, calls, collapsed_steps(methods, layers, cfg))
    return {"batch": batch,"predicted_fraction": round(p["fraction"], 4), "predicted_s": round(p["seconds"], 4),
            "full_s": round(p["full_seconds"], 4), "step_s": round(latency.step_s, 5),
            "fixed_s": round(latency.fixed_s, 5), "model": "measured microbenchmark (difa.calibration.latency)"}


def shape_of(capture: Capture, i: int, layers) -> Any:
    args, kwargs = capture.attn_in[i]
    x = args[0] if args else kwargs["hidden_states"]
    context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    return _shape(layers[i][1], x, context, capture.grid(x, context, layers[i][0]))
