"""A plan inside the user's stack (README "Works with"): batching, LoRA (peft), offloading hooks (accelerate), a
model loaded with device_map, int8 quantization (torchao). Each test compares against the same stack without the
plan, or against the plan without the stack, and checks that undo leaves the stack in place."""

from __future__ import annotations

import pytest
import torch

import difa
from difa.adapters import adapter_for
from difa.models import pipeline_call_kwargs
from difa.planning import fixed_plan
from tests.conftest import GUIDANCE, INPUTS, STEPS, generate, tiny

pytestmark = pytest.mark.usefixtures("one_thread")


def skip_plan(pipe, family, method="forecast", attention=lambda i, t: "full"):
    """Every second step skips every block but the first (a plan with block cells and, optionally, attention cells)."""
    return fixed_plan(pipe, attention, steps=STEPS, guidance_scale=GUIDANCE.get(family, 5.0),
                      block=lambda j, t: method if t % 2 and j > 0 else "full")


# -- batching ---------------------------------------------------------------------------------------------------------
def _call(pipe, family, inputs, seeds, **kw):
    adapter = adapter_for(pipe)
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    return adapter.call_pipeline(pipe, inputs, steps=STEPS, guidance_scale=GUIDANCE[family], generator=gens,
                                 output_type="pt" if family == "dit" else "latent",
                                 extra={**pipeline_call_kwargs(family), **kw}).images


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_a_batch_under_a_plan_gives_the_images_of_single_calls(family):
    """A static plan has no data-dependent branch: a batch of 4 gives each image as its own call does, within the
    float noise of the stock model's own batch-vs-single difference (batched matmuls sum in another order; 4e-4 on
    PixArt's latents, 0 on DiT's images here): at most twice it, and at most 1e-3."""
    pipe = tiny(family)
    inputs, seeds = (INPUTS[family] * 2)[:4], [3, 4, 5, 6]
    batch = _call(pipe, family, inputs, seeds)
    single = torch.cat([_call(pipe, family, [x], [s]) for x, s in zip(inputs, seeds)])
    noise = float((batch - single).abs().max())
    tol = max(2 * noise, 1e-5)
    assert tol <= 1e-3
    difa.apply_plan(pipe, skip_plan(pipe, family, "forecast", lambda i, t: "wars" if t % 2 == 0 and t > 0 else "full"))
    planned = _call(pipe, family, inputs, seeds)
    assert (planned - batch).abs().max() > 1e-3  # the plan changes the images
    single = torch.cat([_call(pipe, family, [x], [s]) for x, s in zip(inputs, seeds)])
    torch.testing.assert_close(planned, single, rtol=0, atol=tol)
    if family == "pixart":  # num_images_per_prompt: each prompt's images, as a batch of the prompt repeated
        two = _call(pipe, family, inputs[:2], seeds, num_images_per_prompt=2)
        torch.testing.assert_close(two, _call(pipe, family, [inputs[0]] * 2 + [inputs[1]] * 2, seeds), rtol=0, atol=tol)
    difa.remove_plan(pipe)


# -- LoRA (peft) ------------------------------------------------------------------------------------------------------
def _save_tiny_lora(pipe, path, seed: int) -> None:
    """A rank-4 LoRA on the UNet's attention projections, with random (non-zero) B matrices, saved as diffusers does."""
    peft = pytest.importorskip("peft")
    from diffusers import StableDiffusionPipeline

    unet = pipe.unet
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False)
    unet.add_adapter(config, adapter_name="scratch")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    layers = peft.get_peft_model_state_dict(unet, adapter_name="scratch")
    StableDiffusionPipeline.save_lora_weights(path, unet_lora_layers=layers)
    unet.delete_adapters("scratch")


def test_lora_loaded_before_or_after_a_plan(tmp_path):
    pipe = tiny("sd")
    _save_tiny_lora(pipe, tmp_path / "a", 1)
    _save_tiny_lora(pipe, tmp_path / "b", 2)
    base = generate(pipe, "sd")
    plan, full = skip_plan(pipe, "sd"), skip_plan(pipe, "sd", "full")
    pipe.load_lora_weights(tmp_path / "a", adapter_name="a")
    with_lora = generate(pipe, "sd")
    assert (with_lora - base).abs().max() > 1e-3  # the LoRA changes the images
    difa.apply_plan(pipe, full)
    assert torch.equal(generate(pipe, "sd"), with_lora)  # all-full plan: bit-exact with the LoRA
    difa.apply_plan(pipe, plan)
    lora_then_plan = generate(pipe, "sd")
    difa.remove_plan(pipe)
    assert torch.equal(generate(pipe, "sd"), with_lora)  # undo leaves the LoRA in place
    pipe.unload_lora_weights()
    assert torch.equal(generate(pipe, "sd"), base)

    difa.apply_plan(pipe, plan)  # the other order: plan first, then the LoRA
    pipe.load_lora_weights(tmp_path / "a", adapter_name="a")
    pipe.load_lora_weights(tmp_path / "b", adapter_name="b")
    pipe.set_adapters(["a"])
    assert torch.equal(generate(pipe, "sd"), lora_then_plan)
    pipe.set_adapters(["b"])  # between generations
    b_plan = generate(pipe, "sd")
    pipe.fuse_lora(adapter_names=["b"])
    torch.testing.assert_close(generate(pipe, "sd"), b_plan, rtol=0, atol=1e-4)  # fused: the same sums, reordered
    difa.remove_plan(pipe)
    pipe.unfuse_lora()
    pipe.set_adapters(["b"])
    difa.apply_plan(pipe, full)
    b_full = generate(pipe, "sd")
    difa.remove_plan(pipe)
    assert torch.equal(generate(pipe, "sd"), b_full) and not torch.equal(b_full, with_lora)


# -- offloading (accelerate hooks) and device_map ---------------------------------------------------------------------
@pytest.mark.parametrize("offload", ["model", "sequential"])
@pytest.mark.parametrize("order", ["plan_first", "offload_first"])
def test_a_plan_under_accelerate_offload_hooks(family, offload, order):
    """enable_model_cpu_offload / enable_sequential_cpu_offload install these accelerate hooks (they need an
    accelerator to move to; here the execution device is the CPU: the hooks' path, weights on the meta device
    between calls for `sequential`). The GPU check is in benchmarks/gpu_check.sh."""
    from accelerate import cpu_offload, cpu_offload_with_hook
    from accelerate.hooks import remove_hook_from_module

    pipe = tiny(family)
    model = adapter_for(pipe).denoiser(pipe)
    plan = skip_plan(pipe, family, "forecast", lambda i, t: "wars" if t % 2 == 0 and t > 0 else "full")
    base = generate(pipe, family)
    difa.apply_plan(pipe, plan)
    expected = generate(pipe, family)
    difa.remove_plan(pipe)

    def hook():
        if offload == "model":
            cpu_offload_with_hook(model, execution_device=torch.device("cpu"))
        else:
            cpu_offload(model, execution_device=torch.device("cpu"))

    first, then = (hook, lambda: difa.apply_plan(pipe, plan))[:: 1 if order == "offload_first" else -1]
    first()
    then()
    assert "forward" in vars(model) or offload == "sequential"
    torch.testing.assert_close(generate(pipe, family), expected, rtol=0, atol=0)
    difa.remove_plan(pipe)
    assert torch.equal(generate(pipe, family), base)  # the hooks still run the model
    assert hasattr(model, "_hf_hook") or any(hasattr(m, "_hf_hook") for m in model.modules())
    remove_hook_from_module(model, recurse=True)
    assert torch.equal(generate(pipe, family), base)


def test_a_model_loaded_with_device_map(tmp_path):
    from diffusers import DiTTransformer2DModel

    pipe = tiny("dit")
    plan = skip_plan(pipe, "dit")
    difa.apply_plan(pipe, plan)
    expected = generate(pipe, "dit")
    difa.remove_plan(pipe)
    pipe.transformer.save_pretrained(tmp_path)
    pipe.transformer = DiTTransformer2DModel.from_pretrained(tmp_path, device_map="cpu")
    assert getattr(pipe.transformer, "hf_device_map", None) is not None
    difa.apply_plan(pipe, plan)
    assert torch.equal(generate(pipe, "dit"), expected)
    difa.remove_plan(pipe)


# -- quantization (torchao) -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["int8_weight_only", "int8_dynamic"])
def test_a_plan_on_a_torchao_int8_model(scheme):
    """The plan runs on the quantized denoiser. Its error against the quantized uncompressed model: weight-only, that
    of the float plan against the float model (the same skips) within 10%; dynamic int8 (activations quantized per
    token, which moves this tiny random model's output by more than the plan does), below the quantization's own
    error against the float model. (Measured: README "Works with".)"""
    torchao = pytest.importorskip("torchao.quantization")
    config = {"int8_weight_only": torchao.Int8WeightOnlyConfig,
              "int8_dynamic": torchao.Int8DynamicActivationInt8WeightConfig}[scheme]()
    pipe = tiny("pixart")
    plan = skip_plan(pipe, "pixart")
    float_full = generate(pipe, "pixart")
    difa.apply_plan(pipe, plan)
    float_err = (generate(pipe, "pixart") - float_full).abs().mean()
    difa.remove_plan(pipe)
    torchao.quantize_(pipe.transformer, config)
    quant_full = generate(pipe, "pixart")
    assert not torch.equal(quant_full, float_full)  # quantized
    difa.apply_plan(pipe, plan)
    quant_plan = generate(pipe, "pixart")
    difa.apply_plan(pipe, skip_plan(pipe, "pixart", "full"))
    assert torch.equal(generate(pipe, "pixart"), quant_full)
    difa.remove_plan(pipe)
    quant_err = (quant_plan - quant_full).abs().mean()
    if scheme == "int8_weight_only":
        assert 0 < quant_err < 1.1 * float_err, (quant_err, float_err)
    else:
        assert 0 < quant_err < (quant_full - float_full).abs().mean(), quant_err
    assert torch.equal(generate(pipe, "pixart"), quant_full)


def test_enable_keys_a_control_image_by_shape_and_fingerprints_offloaded_or_quantized_weights():
    """difa.enable's settings key: a ControlNet's control image (a tensor or a PIL image) counts by its shape, like
    the prompts by their number, so a new image reuses the plan; the weight fingerprint reads neither meta tensors
    (sequential offload) nor quantized tensor subclasses, and still tells the models apart."""
    from PIL import Image

    from difa.enable import _fingerprint, _plain

    a, b = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    assert _plain(a) == _plain(b) != _plain(torch.rand(1, 3, 32, 32))
    assert _plain(Image.new("RGB", (64, 64))) == _plain(Image.new("RGB", (64, 64), "red")) != _plain(Image.new("RGB", (32, 64)))
    assert _plain([a, 2, "x"]) == _plain([b, 2, "x"])
    pipe = tiny("pixart")
    plain = _fingerprint(pipe.transformer)
    torchao = pytest.importorskip("torchao.quantization")
    torchao.quantize_(pipe.transformer, torchao.Int8WeightOnlyConfig())
    assert _fingerprint(pipe.transformer) != plain
    from accelerate import cpu_offload

    other = tiny("pixart")
    cpu_offload(other.transformer, execution_device=torch.device("cpu"))
    assert any(p.device.type == "meta" for p in other.transformer.parameters())
    assert isinstance(_fingerprint(other.transformer), str)
