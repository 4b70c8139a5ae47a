"""Tiny real diffusers pipelines (random weights from config, CPU) and helpers to run them."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from difa.adapters import adapter_for  # noqa: E402
from difa.models import build_tiny_pipeline, pipeline_call_kwargs  # noqa: E402

FAMILIES = ("dit", "pixart", "sd")
STEPS = 6
INPUTS = {"dit": [1, 7], "pixart": ["a red bird", "a blue car"], "sd": ["a red bird", "a blue car"]}
GUIDANCE = {"dit": 4.0, "pixart": 4.5, "sd": 7.5}
SAMPLE_SIZE = {"dit": 16, "pixart": 16, "sd": 8}  # latent side: 64 image tokens in every family


def tiny(family: str):
    pipe = build_tiny_pipeline(family, seed=0, sample_size=SAMPLE_SIZE[family])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, family: str, *, steps: int = STEPS, guidance: float | None = None, seed: int = 3) -> torch.Tensor:
    """Final latents (DiT: decoded images) of one seeded generation."""
    adapter = adapter_for(pipe)
    out = adapter.call_pipeline(
        pipe, INPUTS[family], steps=steps, guidance_scale=GUIDANCE[family] if guidance is None else guidance,
        generator=torch.Generator().manual_seed(seed), output_type=adapter.calib_output_type,
        extra=pipeline_call_kwargs(family),
    )
    return out.images


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`): tiny models and
    Inception gain nothing from two threads on a 2-core machine, and two OpenMP threads slow ~20x under other load."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(params=FAMILIES)
def family(request) -> str:
    return request.param
