"""difa.models: tiny pipelines run, save and load back bit-exact; loading failures are one-line DifaErrors."""

from __future__ import annotations

import huggingface_hub
import numpy as np
import pytest
import torch
from diffusers import DiTPipeline, PixArtAlphaPipeline, PixArtSigmaPipeline, StableDiffusionPipeline

from difa.adapters import adapter_for
from difa.errors import DifaError
from difa.models import FAMILIES, build_tiny_pipeline, bundled_dir, load_pipeline, pipeline_call_kwargs, resolve_path
from difa.tiny import tiny_call_kwargs

PIPELINES = {"dit": DiTPipeline, "pixart": PixArtAlphaPipeline, "sd": StableDiffusionPipeline}
CONDITIONS = {"dit": {"class_labels": [0, 7]}, "pixart": {"prompt": ["a red bird", "A blue car, at night!"]}}
CONDITIONS["sd"] = CONDITIONS["pixart"]
STEPS = 3


def path_cfg(family: str, path: str, pipeline: str | None = None) -> dict:
    return {"name": family, "family": ADAPTER_FAMILY.get(family, family),
            "pipeline": pipeline or PIPELINES[family].__name__, "path": path, "tiny": None}


ADAPTER_FAMILY = {"sd35": "sd3"}  # tiny builders whose adapter row is another family's


def generate(pipe, family: str) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        **CONDITIONS[family],
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(0),
        output_type="np",  # DiTPipeline has no "latent" output
        **pipeline_call_kwargs(family),
    )
    return out.images  # (B, H, W, 3)


def generate_any(pipe, family: str) -> torch.Tensor:
    """Two images (videos: (2, F, 3, H, W)) of any tiny family, through its adapter (cogvideox / sd3 / flux, which
    difa has no adapter row for yet, are called directly)."""
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=STEPS, generator=torch.Generator().manual_seed(0), output_type="pt",
              **tiny_call_kwargs(family))
    try:
        adapter = adapter_for(pipe)
    except DifaError:
        return torch.as_tensor(getattr(pipe(prompt=["a red bird", "a cat"], **kw), "frames" if family == "cogvideox"
                                       else "images"))
    inputs = {"classes": [0, 7], "images": ["synthetic:0", "synthetic:1"]}.get(adapter.inputs_kind,
                                                                                 ["a red bird", "A blue car!"])
    kw.pop("num_inference_steps"), kw.pop("generator"), kw.pop("output_type")
    return torch.as_tensor(adapter.outputs(adapter.call_pipeline(
        pipe, inputs, steps=STEPS, guidance_scale=4.0, generator=torch.Generator().manual_seed(0), output_type="pt",
        extra=kw)))


def realigned(pipe):
    """Every parameter and buffer copied into fresh memory. Loaded safetensors are memory-mapped at offsets that
    are only 8-byte aligned, and CPU matmuls round by an ulp differently on such operands (seen on the SD-XL, SD3 and
    FLUX tiny models), so outputs are compared after this; the weights themselves are compared as loaded."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for t in [*component.parameters(), *component.buffers()]:
                t.data = t.data.clone()
    return pipe


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_round_trips_through_save_pretrained(family, tmp_path):
    pipe = build_tiny_pipeline(family, seed=0)
    if family in PIPELINES:
        assert type(pipe) is PIPELINES[family]
    images = generate_any(pipe, family)
    assert images.shape[0] == 2 and torch.isfinite(images).all()

    pipe.save_pretrained(tmp_path, safe_serialization=True)
    loaded = load_pipeline(path_cfg(family, str(tmp_path), type(pipe).__name__))

    assert type(loaded) is type(pipe)
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            saved, back = component.state_dict(), getattr(loaded, name).state_dict()
            assert saved.keys() == back.keys() and all(torch.equal(saved[k], back[k]) for k in saved), name
    assert torch.equal(generate_any(realigned(loaded), family), images)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_pipeline_is_deterministic_in_seed_and_leaves_global_rng_alone(family):
    rng_state = torch.get_rng_state()
    first, again, other = (build_tiny_pipeline(family, seed=s) for s in (0, 0, 1))
    assert torch.equal(torch.get_rng_state(), rng_state)

    denoiser = "unet" if hasattr(first, "unet") else "transformer"
    weights = [getattr(p, denoiser).state_dict() for p in (first, again, other)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_tiny_config_honours_resolution_and_pipeline_class():
    cfg = {"name": "t", "family": "pixart", "pipeline": "PixArtSigmaPipeline", "path": None, "tiny": "pixart"}
    pipe = load_pipeline({**cfg, "seed": 0, "resolution": 128})

    assert type(pipe) is PixArtSigmaPipeline
    assert pipe.transformer.config.sample_size == 16  # 128 px / 8
    assert generate(pipe, "pixart").shape == (2, 128, 128, 3)


def test_bundled_tiny_dit_loads_from_a_repo_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # data/models/... names a bundled model from any cwd
    pipe = load_pipeline(path_cfg("dit", "data/models/tiny-dit"))

    assert type(pipe) is DiTPipeline
    assert pipe.get_label_ids(["cat", "truck"]) == [3, 9]  # id2label survives save_pretrained
    np.testing.assert_array_equal(generate(pipe, "dit"), generate(build_tiny_pipeline("dit", seed=0, sample_size=16), "dit"))


def test_relative_paths_resolve_against_the_cwd_then_the_bundled_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bundled = bundled_dir() / "models" / "tiny-dit"
    assert resolve_path("data/models/tiny-dit") == str(bundled)
    assert resolve_path("org/repo") == "org/repo" and resolve_path("data/models/no-such") == "data/models/no-such"
    (tmp_path / "data" / "models" / "tiny-dit").mkdir(parents=True)
    assert resolve_path("data/models/tiny-dit") == "data/models/tiny-dit"  # the user's own folder comes first
    build_tiny_pipeline("dit", seed=1, sample_size=16).save_pretrained(tmp_path / "mine")
    pipe = load_pipeline(path_cfg("dit", "./mine"))  # a user's relative model.path: the working directory
    np.testing.assert_array_equal(generate(pipe, "dit"), generate(build_tiny_pipeline("dit", seed=1, sample_size=16), "dit"))


@pytest.mark.parametrize("path", ["data/models/no-such-model", "/no/such/dir", "difa-test/no-such-repo"])
def test_unloadable_path_raises_a_one_line_difa_error(path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads HF_HUB_OFFLINE at import, so also flip the flag it checks before any request.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    with pytest.raises(DifaError) as excinfo:
        load_pipeline(path_cfg("dit", path))

    message = str(excinfo.value)
    assert "\n" not in message
    assert repr(path) in message and "network" in message and "model.path=<local dir>" in message


@pytest.mark.parametrize(
    "cfg",
    [
        {"path": None, "tiny": None},
        {"path": "data/models/tiny-dit", "tiny": "dit"},
        {"path": None, "tiny": "unet"},
        {"path": None, "tiny": "dit", "pipeline": "NoSuchPipeline"},
        {"path": None, "tiny": "dit", "resolution": 72},  # latent 9: odd, patch size 2 does not fit
    ],
)
def test_bad_model_config_raises_difa_error(cfg):
    with pytest.raises(DifaError):
        load_pipeline({"name": "bad", "family": "dit", **cfg})


def test_load_configured_gives_the_pipeline_as_the_clis_call_it():
    import yaml

    from difa.models import load_configured

    m = load_configured("fmnist_dit", n_calib=12)
    cfg = yaml.safe_load(open("conf/model/fmnist_dit.yaml"))
    assert isinstance(m.pipe, DiTPipeline) and m.adapter.family == "dit"
    assert (m.steps, m.guidance) == (cfg["steps"], cfg["guidance_scale"])
    assert m.calib == [cfg["inputs"][i % len(cfg["inputs"])] for i in range(12)] and len(cfg["inputs"]) < 12
    assert len(load_configured("fmnist_dit").calib) == cfg["n_calib"]
    with pytest.raises(DifaError, match="no model config 'nope'"):
        load_configured("nope")
