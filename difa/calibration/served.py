"""What a served call costs beyond the denoiser calls the latency model times (calibration/latency.py): the
captured inputs grown or cut to the batch the user will serve (`retile`), and the VAE decode that a call with
output_type="pil" adds where the calibration ran with latent output (`decode_seconds`)."""

from __future__ import annotations

import inspect
from typing import Any, Mapping

import torch

from difa.calibration.latency import Capture, median_time


def tile(obj: Any, b: int, nb: int) -> Any:
    """Every tensor of batch size b in `obj` (nested args / kwargs) grown or cut to batch nb, cycling its rows."""
    if b == nb:
        return obj
    if torch.is_tensor(obj):
        return obj[torch.arange(nb) % b] if obj.ndim >= 1 and obj.shape[0] == b else obj
    if isinstance(obj, dict):
        return {k: tile(v, b, nb) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(tile(v, b, nb) for v in obj)
    return obj


def retile(capture: Capture, scale: float) -> None:
    """Scale every captured input's batch by `scale` (time the batch the user will serve, not the calibration's)."""
    if scale == 1 or capture.model_in is None:
        return
    b = int(capture.adapter.latent_input(*capture.model_in).shape[0])
    nb = max(1, round(b * scale))
    capture.model_in = tile(capture.model_in, b, nb)
    for d in (capture.block_in, capture.ff_in, capture.attn_in):
        for k in d:
            d[k] = tile(d[k], b, nb)


def decode_seconds(pipe: Any, capture: Capture, images: int, final: torch.Tensor | None = None,
                   call_kwargs: Mapping | None = None) -> float:
    """The VAE decode a pipeline call with output_type="pil" adds, when calibration ran with latent output.
    Video (adapter.frame_dim): the pipeline's own `decode_latents` on `images` copies of the first video of `final`,
    the latents the calibration run returned (its frame-chunked or 3-D decode is the pipeline's, not difa's)."""
    vae = getattr(pipe, "vae", None)
    if vae is None or capture.model_in is None:
        return 0.0
    if capture.adapter.frame_dim is not None:
        return _video_decode_seconds(pipe, capture.adapter.frame_dim, final, images, call_kwargs or {})
    if capture.adapter.packed_latents:
        return _packed_decode_seconds(pipe, final, images, call_kwargs or {})
    latents = capture.adapter.latent_input(*capture.model_in)[:1].detach()  # (1, C, H, W)
    latents = latents[:, : getattr(vae.config, "latent_channels", latents.shape[1])].repeat(images, 1, 1, 1)
    return median_time(lambda: vae.decode(latents / vae.config.scaling_factor), reps=3)


def _packed_decode_seconds(pipe: Any, final: torch.Tensor | None, images: int, call_kwargs: Mapping) -> float:
    """FLUX: its own `_unpack_latents` of `images` copies of the first returned packed latent (1, N, 4C) to
    (images, C, H/8, W/8), then the VAE decode of (latents / scaling_factor) + shift_factor, as FluxPipeline does."""
    vae = pipe.vae
    if final is None or not torch.is_tensor(final) or not hasattr(pipe, "_unpack_latents"):
        return 0.0
    side = pipe.default_sample_size * pipe.vae_scale_factor  # the pipeline's height / width when none is given
    height, width = call_kwargs.get("height") or side, call_kwargs.get("width") or side
    latents = pipe._unpack_latents(final[:1].detach().repeat(images, 1, 1), height, width, pipe.vae_scale_factor)
    latents = latents / vae.config.scaling_factor + vae.config.shift_factor
    return median_time(lambda: vae.decode(latents), reps=3)


# decode_latents' frame-count argument: SVD num_frames, Latte video_length (CogVideoX reads it from the latents)
_FRAME_ARGS = ("num_frames", "video_length")


def _video_decode_seconds(pipe: Any, frame_dim: int, final: torch.Tensor | None, videos: int,
                          call_kwargs: Mapping) -> float:
    decode = getattr(pipe, "decode_latents", None)
    if decode is None or final is None or not torch.is_tensor(final):
        return 0.0
    latents = final[:1].detach().repeat(videos, *[1] * (final.ndim - 1))  # (videos, ...) in the pipeline's layout
    frames = final.shape[frame_dim]
    params = inspect.signature(decode).parameters
    kw = {a: frames for a in _FRAME_ARGS if a in params}
    if "decode_chunk_size" in params:  # what the pipeline's __call__ passes: the user's, else its own default
        default = inspect.signature(type(pipe).__call__).parameters.get("decode_chunk_size")
        chunk = call_kwargs.get("decode_chunk_size", default.default if default is not None else None)
        kw["decode_chunk_size"] = chunk if chunk is not None else frames  # SVD: None means all frames at once
    return median_time(lambda: decode(latents, **kw), reps=3)
