"""difa's T-GATE preset against the real `tgate` package (1.0.0, the T-GATE authors' code) on the bundled
PixArt: the same images, bit for bit, including the schedule details a re-implementation gets wrong (the
self-attention interval counted from step 0, not from warm_up; the CFG mean cached at gate_step - 1 and reused
by self-attention after the gate). Skipped without the `conformance` extra."""

from __future__ import annotations

import pytest
import torch

import difa
from difa.cli.common import call_kwargs, load_model, model_config, take_inputs
from difa.presets import tgate as tgate_preset

tgate = pytest.importorskip("tgate")
pytestmark = pytest.mark.usefixtures("one_thread")
STEPS = 20


@pytest.mark.parametrize("params", [
    dict(gate_step=15, sp_interval=3, fi_interval=1, warm_up=2),  # T-GATE's PixArt defaults
    dict(gate_step=13, sp_interval=3, fi_interval=2, warm_up=2),  # self-attention reuses the gate's CFG mean
])
def test_tgate_preset_is_the_tgate_package(params):
    m = model_config("fmnist_pixart")
    pipe = load_model(m, "cpu", "float32")
    pipe.set_progress_bar_config(disable=True)
    prompts, guidance = list(take_inputs(m.inputs, 2)), float(m.guidance_scale)

    def generate(call, **extra):
        return call(prompt=prompts, num_inference_steps=STEPS, guidance_scale=guidance, output_type="latent",
                    generator=torch.Generator().manual_seed(3), **call_kwargs(m), **extra).images

    reference = generate(pipe)
    difa.apply_plan(pipe, tgate_preset(pipe, steps=STEPS, guidance_scale=guidance, **params))
    ours = generate(pipe)
    difa.remove_plan(pipe)
    theirs = generate(tgate.TgatePixArtAlphaLoader(pipe).tgate, **params)  # patches the pipe: last use of it
    assert (theirs - reference).abs().sum() / reference.abs().sum() > 0.1  # T-GATE really changes the images
    assert torch.equal(ours, theirs)
