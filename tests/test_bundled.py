"""The bundled Fashion-MNIST models load through the stock pipelines' from_pretrained and have the promised shapes;
the default command runs them. Quality (FID, accuracy) is measured by `python -m difa.evaluate`, see README."""

from __future__ import annotations

import pytest
import torch
from diffusers import DiTPipeline, PixArtAlphaPipeline

from difa.cli.common import model_config
from difa.apply import plan_layers
from difa.models import bundled_dir, load_pipeline, pipeline_call_kwargs
from difa.zoo import FMNISTClassifier, load_minilm
from omegaconf import OmegaConf

MODELS = bundled_dir() / "models"
MAX_BYTES = 25 * 1024 * 1024


def load(name: str):
    pipe = load_pipeline(OmegaConf.to_container(model_config(name)))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("folder", ["fmnist-dit", "fmnist-pixart", "fmnist-vae", "fmnist-classifier"])
def test_committed_weights_are_safetensors_under_25_mb(folder):
    files = list((MODELS / folder).rglob("*.safetensors"))
    assert files and all(f.stat().st_size < MAX_BYTES for f in files)
    assert not list((MODELS / folder).rglob("*.bin")) and not list((MODELS / folder).rglob("*.pt"))


def test_fmnist_dit_is_a_stock_dit_with_256_tokens():
    pipe = load("fmnist_dit")
    assert type(pipe) is DiTPipeline
    t = pipe.transformer.config
    assert t.sample_size // t.patch_size == 16 and t.num_layers >= 8 and t.num_embeds_ada_norm == 1000
    assert len(plan_layers(pipe)[2]) == t.num_layers  # self-attention only: class conditioning is adaLN
    out = pipe(class_labels=[1, 7], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    assert out.shape == (2, 32, 32, 3)


def test_fmnist_pixart_runs_with_the_minilm_encoder():
    pipe = load("fmnist_pixart")
    assert type(pipe) is PixArtAlphaPipeline and type(pipe.text_encoder).__name__ == "BertModel"
    assert pipe.transformer.config.caption_channels == 384
    kinds = [n.rsplit(".", 1)[-1] for n, _ in plan_layers(pipe)[2]]
    assert kinds.count("attn1") == kinds.count("attn2") >= 8
    out = pipe(["a photo of a Trouser"], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
               output_type="np", **pipeline_call_kwargs("pixart")).images
    assert out.shape == (1, 32, 32, 3)


def test_the_bundled_text_model_runs_at_four_times_the_tokens():
    """fmnist_pixart_64: the same weights at 64 px, 1024 image tokens (position embeddings from the latent size);
    its config has no reference set (FID and class accuracy mean nothing off the trained resolution)."""
    from difa.apply import plan_layers as layers_of
    from difa.cli.common import call_kwargs

    m = model_config("fmnist_pixart_64")
    assert m.get("dataset") is None and m.path == model_config("fmnist_pixart").path
    pipe = load("fmnist_pixart_64")
    seen = []
    attn = layers_of(pipe)[2][0][1]
    hook = attn.register_forward_pre_hook(lambda mod, args, kw: seen.append(kw.get("hidden_states", args[0] if args
                                                                                   else None).shape[1]),
                                          with_kwargs=True)
    try:
        out = pipe(["a photo of a Trouser"], num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                   output_type="np", **call_kwargs(m)).images
    finally:
        hook.remove()
    assert out.shape == (1, 64, 64, 3) and seen[0] == 1024


def test_minilm_token_states_do_not_depend_on_padding_length():
    """Training padded captions to 32 tokens, the pipeline pads to 120: the states of real tokens must agree."""
    tok, enc = load_minilm()
    short = tok(["a photo of a Bag"], padding="max_length", max_length=32, return_tensors="pt")
    long = tok(["a photo of a Bag"], padding="max_length", max_length=120, return_tensors="pt")
    with torch.no_grad():
        a = enc(short.input_ids, attention_mask=short.attention_mask)[0]
        b = enc(long.input_ids, attention_mask=long.attention_mask)[0]
    n = int(short.attention_mask.sum())
    torch.testing.assert_close(a[:, :n], b[:, :n], atol=1e-5, rtol=1e-5)


def test_classifier_loads_and_labels_real_test_images():
    from difa import data

    x, y = data.load_fmnist("test")
    x, y = data.to_model_space(x[:500]), y[:500]
    clf = FMNISTClassifier.from_pretrained(MODELS / "fmnist-classifier").eval()
    with torch.no_grad():
        acc = (clf(x).argmax(1) == y).float().mean().item()
    assert acc > 0.85  # 90.2% on the whole test split (README); 500 images leave some slack


def test_calibrating_the_bundled_text_model_mixes_techniques(tmp_path):
    """Issue 4's bar: at a moderate threshold one plan on fmnist-pixart uses at least three different techniques."""
    import difa
    from difa.cli.common import call_kwargs

    m = model_config("fmnist_pixart")
    pipe = load("fmnist_pixart")
    plan = difa.calibrate_pipeline(pipe, list(m.inputs)[:2], threshold=0.1, steps=10, guidance_scale=4.0,
                                   call_kwargs=call_kwargs(m), search="greedy")
    used = set(plan.counts()) - {"full"}
    assert len(used) >= 3, plan.counts()
    assert plan.flops["fraction"] < 1.0
