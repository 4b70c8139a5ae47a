"""Tiny random-weight pipelines of every family difa supports, for tests and CPU smoke runs.

They keep the real pipeline classes, denoiser classes and block structure (so the real CFG batch layouts, the
spatial / temporal attention split of the video models and the real schedulers), at toy width: 1-5 MB on disk and
well under a second per call on CPU. Their configs are in difa/tiny_configs.py, each with the real model's sizes.

    family          pipeline                      denoiser                          attention
    dit             DiTPipeline                   DiTTransformer2DModel             4 blocks x 4 heads x 16, 16 tokens
    pixart          PixArtAlphaPipeline           PixArtTransformer2DModel          4 blocks (+ attn2), text 120
    sd              StableDiffusionPipeline       UNet2DConditionModel              7 blocks x 2 heads x 16 (+ attn2)
    sdxl            StableDiffusionXLPipeline     UNet2DConditionModel (text_time)  3 levels, none at the first, 128 px
    playground_v25  StableDiffusionXLPipeline     the SD-XL UNet, EDM scheduler     as sdxl
    lcm_sdxl        StableDiffusionXLPipeline     SD-XL UNet + guidance embedding   as sdxl, LCMScheduler, no CFG batch
    lcm_pixart      PixArtAlphaPipeline           PixArtTransformer2DModel          4 blocks, LCMScheduler, no CFG batch
    sd3             StableDiffusion3Pipeline      SD3Transformer2DModel             3 joint (MMDiT) blocks
    sd35            StableDiffusion3Pipeline      SD3Transformer2DModel             sd3 + attn2 in 2 blocks (family sd3)
    flux            FluxPipeline                  FluxTransformer2DModel            2 double + 3 single stream blocks
    svd             StableVideoDiffusionPipeline  UNetSpatioTemporalConditionModel  spatial + temporal attn1/attn2
    latte           LattePipeline                 LatteTransformer3DModel           2 x (spatial attn1/attn2 + temporal)
    cogvideox       CogVideoXPipeline             CogVideoXTransformer3DModel       2 x joint text+video attn1

`build_tiny_pipeline(family, seed=..., sample_size=...)` seeds through torch.random.fork_rng (the global RNG is left
alone) and puts every module in eval mode. Call a pipeline with `tiny_call_kwargs(family)`: what the family needs
offline (`pipeline_call_kwargs`) plus the tiny sizes where the pipeline's defaults are the real model's.
"""

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLTemporalDecoder,
    CogVideoXDDIMScheduler,
    CogVideoXPipeline,
    CogVideoXTransformer3DModel,
    DDIMScheduler,
    DiffusionPipeline,
    DiTPipeline,
    DiTTransformer2DModel,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    LCMScheduler,
    LattePipeline,
    LatteTransformer3DModel,
    PixArtAlphaPipeline,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    StableVideoDiffusionPipeline,
    UNet2DConditionModel,
    UNetSpatioTemporalConditionModel,
)
from transformers import (
    CLIPImageProcessor,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

from diffusers.utils import logging as diffusers_logging

from difa.errors import DifaError
from difa.tiny_configs import (  # noqa: F401 (TEXT_TOKENS, VAE_SCALE_FACTOR: re-exported)
    CHARACTERS, CLIP_MAX_LENGTH, COGVIDEOX_SCHEDULER, DIT_CLASSES, FLUX_SCHEDULER, FLUX_VAE, LATTE_SCHEDULER,
    LCM_PIXART_SCHEDULER, LCM_SDXL_UNET, PLAYGROUND_SCHEDULER, PLAYGROUND_VAE, SD3_SCHEDULER, SD3_VAE,
    SDXL_SCHEDULER, SDXL_VAE, SD_SCHEDULER, SVD_SCHEDULER, T5_MAX_LENGTH, TEXT_TOKENS, TINY_CLIP, TINY_CLIP_2,
    TINY_COGVIDEOX, TINY_COGVIDEOX_VAE, TINY_DIT, TINY_FLUX, TINY_FRAMES, TINY_LATTE, TINY_LCM_PIXART, TINY_PIXART,
    TINY_SD3, TINY_SD35, TINY_SDXL_UNET, TINY_SVD_CLIP_VISION, TINY_SVD_UNET, TINY_SVD_VAE, TINY_T5, TINY_T5_SD3,
    TINY_UNET, TINY_VAE, VAE_SCALE_FACTOR,
)



def pipeline_call_kwargs(family: str) -> dict:
    """Extra `pipe(...)` kwargs a family needs to run offline (and at tiny sizes).

    PixArt: `clean_caption=True` needs bs4 + ftfy, and resolution binning only knows sample sizes 32/64/128.
    Latte: `clean_caption=True` needs bs4 + ftfy too.
    """
    _check_family(family)
    return dict(CALL_KWARGS.get(family, {}))


TINY_SIDE = {"sdxl": 16, "playground_v25": 16, "lcm_sdxl": 16}  # latent side called at (default 8): SD-XL 128 px


def tiny_call_kwargs(family: str, sample_size: int | None = None) -> dict:
    """pipeline_call_kwargs plus the sizes a tiny video pipeline must be called with (its pipeline's defaults are the
    real model's: SVD 576 x 1024 px, Latte 512 px x 16 frames)."""
    kw = pipeline_call_kwargs(family)
    side = (sample_size or TINY_SIDE.get(family, 8)) * VAE_SCALE_FACTOR
    if family in ("lcm_pixart", "sd3", "sd35", "flux"):  # PixArt-LCM keeps the real sample_size 128, FLUX has none
        kw.update(height=side, width=side)
    if family in ("sd3", "sd35", "flux"):
        kw.update(max_sequence_length=TEXT_TOKENS)  # a short T5 sequence (real defaults: 256 / 512)
    if family in ("svd", "latte"):
        frames = {"svd": "num_frames", "latte": "video_length"}[family]
        kw.update(height=side, width=side, decode_chunk_size=TINY_FRAMES, **{frames: TINY_FRAMES})
    if family == "cogvideox":  # max_sequence_length must be the transformer's max_text_seq_length
        kw.update(height=side, width=side, num_frames=TINY_COGVIDEOX["sample_frames"],
                  max_sequence_length=TINY_COGVIDEOX["max_text_seq_length"])
    return kw


def build_tiny_pipeline(family: str, *, seed: int = 0, sample_size: int | None = None) -> DiffusionPipeline:
    """A randomly initialised pipeline of `family` with the real architecture at toy size.

    Deterministic in `seed` and leaves the global torch RNG untouched. `sample_size` is the latent side
    (pixels / 8) and must be even (patch size 2; one UNet downsample).
    The pipelines save with `save_pretrained` and load back with their class's `from_pretrained`.
    Call them with `pipeline_call_kwargs(family)`; PixArt needs `clean_caption=False, use_resolution_binning=False`.
    """
    _check_family(family)
    multiple = 4 if family in TINY_SIDE else 2  # SD-XL: two UNet downsamples; the rest: patch 2 or one downsample
    if sample_size is not None and (sample_size < multiple or sample_size % multiple):
        raise DifaError(f"tiny {family} needs a latent size that is a multiple of {multiple} (resolution: multiple of "
                        f"{8 * multiple} px), got {sample_size}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = BUILDERS[family]({} if sample_size is None else {"sample_size": sample_size})
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


def _tiny_svd(size: dict) -> StableVideoDiffusionPipeline:
    unet = UNetSpatioTemporalConditionModel(**{**TINY_SVD_UNET, **size})
    return StableVideoDiffusionPipeline(
        vae=AutoencoderKLTemporalDecoder(**TINY_SVD_VAE),
        image_encoder=CLIPVisionModelWithProjection(CLIPVisionConfig(**TINY_SVD_CLIP_VISION)),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SVD_SCHEDULER),
        feature_extractor=CLIPImageProcessor(),  # only normalises: the pipeline resizes to 224 itself
    )


def _tiny_latte(size: dict) -> LattePipeline:
    tokenizer = _tiny_t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), **TINY_T5))
    return LattePipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=AutoencoderKL(**TINY_VAE),
        transformer=LatteTransformer3DModel(**{**TINY_LATTE, **size}),
        scheduler=DDIMScheduler(**LATTE_SCHEDULER),
    )


def _tiny_cogvideox(size: dict) -> CogVideoXPipeline:
    if "sample_size" in size:  # CogVideoX names the latent side per axis
        side = size.pop("sample_size")
        size.update(sample_height=side, sample_width=side)
    tokenizer = _tiny_t5_tokenizer()
    text_encoder = T5EncoderModel(T5Config(vocab_size=len(tokenizer), **TINY_T5))
    return CogVideoXPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=AutoencoderKLCogVideoX(**TINY_COGVIDEOX_VAE),
        transformer=CogVideoXTransformer3DModel(**{**TINY_COGVIDEOX, **size}),
        scheduler=CogVideoXDDIMScheduler(**COGVIDEOX_SCHEDULER),
    )



def _clip(tokenizer, cls=CLIPTextModel, **config):
    return cls(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            max_position_embeddings=CLIP_MAX_LENGTH,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,  # CLIP pools at the first eos
            pad_token_id=tokenizer.pad_token_id,
            **config,
        )
    )


def _t5(tokenizer, **config):
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), **config))


def _sdxl_pipeline(unet_config: dict, scheduler, vae_config: dict) -> StableDiffusionXLPipeline:
    tokenizer, tokenizer_2 = _tiny_clip_tokenizer(), _tiny_clip_tokenizer()
    return StableDiffusionXLPipeline(
        vae=AutoencoderKL(**vae_config),
        text_encoder=_clip(tokenizer, CLIPTextModel, **TINY_CLIP),
        text_encoder_2=_clip(tokenizer_2, CLIPTextModelWithProjection, **TINY_CLIP_2),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        unet=UNet2DConditionModel(**unet_config),
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,  # as in the SD-XL base model_index.json
        add_watermarker=False,  # from_pretrained re-decides from is_invisible_watermark_available() (False here)
    )


def _sdxl_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler.from_config(SDXL_SCHEDULER)


def _tiny_sdxl(size: dict) -> StableDiffusionXLPipeline:
    return _sdxl_pipeline({**TINY_SDXL_UNET, **size}, _sdxl_scheduler(), SDXL_VAE)


def _tiny_playground_v25(size: dict) -> StableDiffusionXLPipeline:
    scheduler = EDMDPMSolverMultistepScheduler(**PLAYGROUND_SCHEDULER)
    return _sdxl_pipeline({**TINY_SDXL_UNET, **size}, scheduler, PLAYGROUND_VAE)


def _tiny_lcm_sdxl(size: dict) -> StableDiffusionXLPipeline:
    # As the model card: LCMScheduler.from_config(<SD-XL Euler config>); silence its "ignored keys" warning.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        scheduler = LCMScheduler.from_config(_sdxl_scheduler().config)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return _sdxl_pipeline({**LCM_SDXL_UNET, **size}, scheduler, SDXL_VAE)


def _tiny_lcm_pixart(size: dict) -> PixArtAlphaPipeline:
    tokenizer = _tiny_t5_tokenizer()
    return PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=_t5(tokenizer, **TINY_T5),
        vae=AutoencoderKL(**TINY_VAE),
        transformer=PixArtTransformer2DModel(**TINY_LCM_PIXART),  # sample_size stays 128: see TINY_LCM_PIXART
        scheduler=LCMScheduler(**LCM_PIXART_SCHEDULER),
    )


def _tiny_sd3(size: dict, transformer: dict = TINY_SD3) -> StableDiffusion3Pipeline:
    tokenizer, tokenizer_2, tokenizer_3 = _tiny_clip_tokenizer(), _tiny_clip_tokenizer(), _tiny_t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**{**transformer, **size}),
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=AutoencoderKL(**SD3_VAE),
        text_encoder=_clip(tokenizer, CLIPTextModelWithProjection, **TINY_CLIP_2),
        tokenizer=tokenizer,
        text_encoder_2=_clip(tokenizer_2, CLIPTextModelWithProjection, **TINY_CLIP_2),
        tokenizer_2=tokenizer_2,
        text_encoder_3=_t5(tokenizer_3, **TINY_T5_SD3),
        tokenizer_3=tokenizer_3,
    )


def _tiny_sd35(size: dict) -> StableDiffusion3Pipeline:
    return _tiny_sd3(size, TINY_SD35)


def _tiny_flux(size: dict) -> FluxPipeline:
    tokenizer, tokenizer_2 = _tiny_clip_tokenizer(), _tiny_t5_tokenizer()
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=AutoencoderKL(**FLUX_VAE),
        text_encoder=_clip(tokenizer, CLIPTextModel, **TINY_CLIP),
        tokenizer=tokenizer,
        text_encoder_2=_t5(tokenizer_2, **TINY_T5),
        tokenizer_2=tokenizer_2,
        transformer=FluxTransformer2DModel(**TINY_FLUX),  # no sample_size: the size is the call's height/width
    )


BUILDERS = {"dit": _tiny_dit, "pixart": _tiny_pixart, "sd": _tiny_sd, "sdxl": _tiny_sdxl,
            "playground_v25": _tiny_playground_v25, "lcm_sdxl": _tiny_lcm_sdxl, "lcm_pixart": _tiny_lcm_pixart,
            "svd": _tiny_svd, "latte": _tiny_latte, "cogvideox": _tiny_cogvideox, "sd3": _tiny_sd3,
            "sd35": _tiny_sd35, "flux": _tiny_flux}
FAMILIES = tuple(BUILDERS)
_NO_CLEANING = {"clean_caption": False}  # caption cleaning needs bs4 + ftfy
CALL_KWARGS = {"pixart": {**_NO_CLEANING, "use_resolution_binning": False}, "latte": _NO_CLEANING,
               "lcm_pixart": {**_NO_CLEANING, "use_resolution_binning": False}}


def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise DifaError(f"unknown model family {family!r}; use one of {', '.join(FAMILIES)}")
