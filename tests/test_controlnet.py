"""A plan on a ControlNet pipeline (README "Works with"): the SD UNet ControlNet and SD3's transformer ControlNet,
tiny from config, their zero-initialised output layers given random weights so the control matters.

What a skipped block does with the control residuals: nothing, because none is added inside a block. SD3 adds
its ControlNet's residual to the hidden states between blocks (SD3Transformer2DModel.forward), so a skipped
block's stand-in output gets the step's residual like a computed one; the SD UNet adds them to the down blocks'
skip features and to the mid block's output, outside its transformer blocks. (DeepCache units, which skip whole
deep UNet blocks, leave the residuals of the skipped levels unused at the skipped steps, as DeepCache does.)
The tests check this against a naive reference: forward hooks that replace the block outputs."""

from __future__ import annotations

import pytest
import torch

import difa
from difa.models import build_tiny_pipeline, pipeline_call_kwargs
from tests.conftest import GUIDANCE, INPUTS, SAMPLE_SIZE, STEPS, tiny
from tests.test_blocks import naive
from tests.test_stack import skip_plan

pytestmark = pytest.mark.usefixtures("one_thread")
INPUTS = {**INPUTS, "sd3": INPUTS["sd"]}
GUIDANCE = {**GUIDANCE, "sd3": 5.0}


def _randomise(model: torch.nn.Module, prefixes: tuple[str, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(prefixes):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def controlnet_pipe(family: str):
    """(the plain tiny pipeline, its ControlNet pipeline sharing every component, the control image)."""
    pipe = tiny(family) if family in SAMPLE_SIZE else build_tiny_pipeline(family, seed=0)
    pipe.set_progress_bar_config(disable=True)
    c = pipe.components
    if family == "sd":
        from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

        torch.manual_seed(0)
        cn = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(8,) * len(pipe.vae.config.block_out_channels))
        _randomise(cn, ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out"))
        cpipe = StableDiffusionControlNetPipeline(**{k: c[k] for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
                                                  controlnet=cn, safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)
        side = pipe.unet.config.sample_size * pipe.vae_scale_factor
    else:
        from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline

        torch.manual_seed(0)
        cn = SD3ControlNetModel.from_transformer(pipe.transformer, num_layers=2, num_extra_conditioning_channels=0)
        _randomise(cn, ("controlnet_blocks",))
        cpipe = StableDiffusion3ControlNetPipeline(**c, controlnet=cn)
        side = pipe.transformer.config.sample_size * pipe.vae_scale_factor
    cpipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, side, side, generator=torch.Generator().manual_seed(5))
    return pipe, cpipe, image


def gen(pipe, family, image=None, seed=3):
    kw = {} if image is None else {"control_image" if family == "sd3" else "image": image}
    return pipe(INPUTS[family], num_inference_steps=STEPS, guidance_scale=GUIDANCE[family], output_type="latent",
                generator=torch.Generator().manual_seed(seed), **pipeline_call_kwargs(family), **kw).images


def naive_joint(pipe, method, run):
    """tests/test_blocks.naive for SD3's two-stream blocks: per stream (text, image: the order SD3's blocks return
    them), the residual output - input of the computed steps; reuse adds the last, forecast extrapolates the last two.
    The last block returns no text (None), and none is made up."""
    from difa.apply import plan_blocks

    blocks = [m for _, m in plan_blocks(pipe)]
    step = [-1]
    cache: dict[int, list] = {j: [] for j in range(len(blocks))}  # j -> [(step, (text residual, image residual))]
    handles = [pipe.transformer.register_forward_pre_hook(lambda m, a: step.__setitem__(0, step[0] + 1))]

    def on_block(j):
        def hook(module, args, kwargs, out):
            x = args[0] if args else kwargs["hidden_states"]
            e = args[1] if len(args) > 1 else kwargs["encoder_hidden_states"]
            ins, s = (e, x), step[0]
            if s % 2 and j > 0:  # skipped
                pts = cache[j]
                if method == "reuse" or len(pts) < 2:
                    return tuple(None if o is None else i + r for o, i, r in zip(out, ins, pts[-1][1]))
                (s0, r0), (s1, r1) = pts[-2], pts[-1]
                return tuple(None if o is None else i + b + (b - a) * ((s - s1) / (s1 - s0))
                             for o, i, a, b in zip(out, ins, r0, r1))
            cache[j] = [*cache[j][-1:], (s, tuple(None if o is None else o - i for o, i in zip(out, ins)))]
            return out
        return hook

    handles += [b.register_forward_hook(on_block(j), with_kwargs=True) for j, b in enumerate(blocks)]
    try:
        return run(pipe)
    finally:
        for h in handles:
            h.remove()


@pytest.mark.parametrize("family", ["sd", "sd3"])
def test_a_plan_honours_the_controlnet(family):
    pipe, cpipe, image = controlnet_pipe(family)
    base, controlled = gen(pipe, family), gen(cpipe, family, image)
    assert (controlled - base).abs().mean() > 1e-2  # the ControlNet changes the images
    difa.apply_plan(cpipe, skip_plan(pipe, family, "full"))
    assert torch.equal(gen(cpipe, family, image), controlled)  # all-full: bit-exact
    for method in ("reuse", "forecast"):
        difa.remove_plan(cpipe)
        if family == "sd":
            expected = naive(cpipe, family, method, run=lambda p, f: gen(p, f, image))
        else:
            expected = naive_joint(cpipe, method, run=lambda p: gen(p, family, image))
        difa.apply_plan(cpipe, skip_plan(pipe, family, method))
        torch.testing.assert_close(gen(cpipe, family, image), expected, rtol=1e-5, atol=1e-5)
    difa.remove_plan(cpipe)
    assert torch.equal(gen(cpipe, family, image), controlled)


def test_cfg_collapse_is_not_taken_where_the_controlnet_splits_the_halves():
    """T-GATE's CFG collapse runs one half when the halves see the same inputs. A ControlNet under CFG gives the
    halves different residuals (it reads the text), so the engine keeps the whole batch at those steps: the plan's
    images equal those of its run without the collapse."""
    pipe, cpipe, image = controlnet_pipe("sd")
    plan = difa.calibration.fixed_plan(pipe, lambda i, t: "tgate" if t >= 3 else "full", steps=STEPS,
                                       guidance_scale=GUIDANCE["sd"], kinds=("attn2",))
    engine = difa.apply_plan(cpipe, plan, collapse_cfg=False)
    whole = gen(cpipe, "sd", image)
    engine = difa.apply_plan(cpipe, plan)
    collapsed = gen(cpipe, "sd", image)
    assert engine.forwards == STEPS
    torch.testing.assert_close(collapsed, whole, rtol=0, atol=1e-5)
    difa.remove_plan(cpipe)
