"""Per-architecture facts, in one table: where the denoiser lives on the pipeline, which modules are self- and
cross-attention (in execution order), how the CFG batch is laid out, and how to call the stock pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from difa.errors import DifaError

SELF_ATTN = "attn1"
CROSS_ATTN = "attn2"
JOINT = "joint"  # the kind of a joint (MMDiT) attention layer: text and image / video tokens in one softmax
TEXT_FIRST, HIDDEN_FIRST = "text_first", "hidden_first"  # Adapter.block_streams: the order of a block's tuple output
SET = "<set>"  # in Adapter.config_match: the config key has any value but None
NO_CFG = "none"  # cfg_layout of guidance-distilled families: the pipeline never builds a CFG batch
SPATIAL, TEMPORAL = "spatial", "temporal"  # token axes of an attention layer (Adapter.axis)
INPUT_KEYS = {"classes": "class_labels", "prompts": "prompt", "images": "image"}  # inputs_kind -> pipeline argument


@dataclass(frozen=True)
class Adapter:
    family: str
    model_classes: tuple[str, ...]  # diffusers denoiser classes this adapter handles
    denoiser_attr: str  # attribute of the pipeline holding the denoiser
    latent_arg: str  # name of the denoiser's latent input (first positional argument)
    cfg_layout: str  # "cond_first": batch = [cond, uncond]; "uncond_first": [uncond, cond]
    inputs_kind: str  # "classes" (class ids) or "prompts" (text)
    calib_output_type: str = "latent"  # cheapest output_type the pipeline accepts (DiTPipeline always decodes)
    null_class: int | None = None  # class id the pipeline uses for the unconditional half
    patched: bool = True  # tokens are the latent's patch grid at every block (transformers); False: UNet levels
    # How the row is told apart from another row with the same denoiser class (the first matching row wins):
    pipeline_classes: tuple[str, ...] = ()  # the pipeline must be one of these (empty: any, or a bare model)
    scheduler_classes: tuple[str, ...] = ()  # the pipeline's scheduler must be one of these (a bare model never matches)
    config_match: tuple[tuple[str, Any], ...] = ()  # denoiser config values; SET: any value but None
    temporal: str | None = None  # module-name part of the temporal blocks (video): their tokens are frames
    cfg_channels: tuple[int, int] | None = None  # (dim, n): compare only the first n channels along dim for CFG halves
    output_attr: str = "images"  # the pipeline output's field ("frames" for video pipelines)
    guidance_arg: str = "guidance_scale"  # the pipeline's CFG scale argument (SVD: max_guidance_scale)
    # Video: the frame dim of the pipeline's latents and denoiser output (SVD, CogVideoX (B, F, C, h, w): 1;
    # Latte (B, C, F, h, w): 2). None: an image family.
    frame_dim: int | None = None
    # FLUX: the pipeline's latents are 2x2-packed tokens (B, N, 4C); its `_unpack_latents` restores (B, C, H, W)
    # before the VAE decode (which also adds the VAE's shift_factor)
    packed_latents: bool = False
    # Per-frame guidance (SVD): (the pipeline's lower-end argument, its default); the weight ramps linearly over the
    # frames (frame_dim) from that argument to guidance_arg. None: one scalar weight.
    guidance_ramp: tuple[str, float] | None = None
    # The CFG half the engine keeps when every cross-attention is gated (T-GATE's "CFG dropped"): the one T-GATE's
    # own pipeline runs. SD-XL runs the unconditional half (its pooled text embedding, in temb, differs between halves)
    collapse_to: str = "cond"
    # Joint-attention (MMDiT) families: the module-name parts of their attention layers (SD3 / FLUX "attn", CogVideoX
    # "attn1"), all of kind JOINT whatever the name says; only these are planned. Empty: attn1 / attn2 by name.
    joint_layers: tuple[str, ...] = ()
    # Blocks with two streams (hidden_states, encoder_hidden_states) in and a tuple out: the tuple's order,
    # TEXT_FIRST (SD3, FLUX: (encoder_hidden_states, hidden_states)) or HIDDEN_FIRST (CogVideoX). None: a tensor.
    block_streams: str | None = None
    joint_window: bool = False  # `wars` runs on its joint layers (their processors are reproduced: techniques/joint.py)

    def denoiser(self, obj: Any) -> torch.nn.Module:
        return getattr(obj, self.denoiser_attr) if hasattr(obj, self.denoiser_attr) else obj

    def kind(self, layer_name: str) -> str:
        """The layer's kind from the architecture: JOINT in a joint-attention family, else attn1 / attn2 (its name)."""
        last = layer_name.rsplit(".", 1)[-1]
        return JOINT if last in self.joint_layers else last

    def attention_layers(self, model: torch.nn.Module, kind: str = SELF_ATTN) -> list[tuple[str, torch.nn.Module]]:
        """Planned attention modules of `kind` (attn1, attn2 or JOINT), in execution order."""
        return [(n, m) for n, m in self.planned_layers(model) if self.kind(n) == kind]

    def planned_layers(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """Self- and cross-attention modules in execution order (attn1 before attn2 within a block); in a joint family
        its joint attention modules (FLUX's FluxAttention is no `Attention` subclass: any module with a processor)."""
        from diffusers.models.attention_processor import Attention

        if self.joint_layers:
            return self.execution_order([(n, m) for n, m in model.named_modules() if hasattr(m, "set_processor")
                                         and hasattr(m, "processor") and n.rsplit(".", 1)[-1] in self.joint_layers])
        kinds = (SELF_ATTN, CROSS_ATTN)
        return self.execution_order(
            [(n, m) for n, m in model.named_modules() if isinstance(m, Attention) and n.rsplit(".", 1)[-1] in kinds])

    def execution_order(self, named: list[tuple[str, Any]]) -> list[tuple[str, Any]]:
        """Named modules, from registration order into the order a forward runs them. Two traps: UNets register
        down_blocks, up_blocks, then mid_block, but run the mid block between them; Latte registers every spatial
        block, then every temporal one, but runs them interleaved (spatial i, temporal i, spatial i + 1, ...)."""
        parts = ("down_blocks", "mid_block", "up_blocks")

        def key(item: tuple[int, tuple[str, Any]]) -> tuple[int, int, int]:
            i, (name, _) = item
            p = name.split(".")
            rank = parts.index(p[0]) if p[0] in parts else 0
            top = self.temporal is not None and p[0] in ("transformer_blocks", self.temporal) and len(p) > 1
            return rank, int(p[1]) if top and p[1].isdigit() else -1, i

        return [item for _, item in sorted(enumerate(named), key=key)]

    def block_layers(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """Transformer blocks (the parents of self-attention layers: DiT / PixArt `transformer_blocks.N`, the
        UNet's `...attentions.K.transformer_blocks.0`), in execution order: the units of block cells."""
        out: dict[str, torch.nn.Module] = {}
        for name, _ in self.attention_layers(model, JOINT if self.joint_layers else SELF_ATTN):
            parent = name.rsplit(".", 1)[0]
            out.setdefault(parent, model.get_submodule(parent))
        return list(out.items())

    def cache_units(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module, tuple[str, int, int]]]:
        """A UNet's DeepCache units (the modules DeepCache's `DeepCacheSDHelper` wraps), outermost-last per block:
        (name, module, (part, block, layer)) with part "down" / "mid" / "up". Up blocks and their layers are
        numbered from the output end, as DeepCache does (the last up block is block 0, its last resnet layer 0).
        Empty for transformers (no down/mid/up structure)."""
        if self.patched or not all(hasattr(model, a) for a in ("down_blocks", "mid_block", "up_blocks")):
            return []
        out: list[tuple[str, torch.nn.Module, tuple[str, int, int]]] = []
        for i, block in enumerate(model.down_blocks):
            n_res = len(getattr(block, "resnets", []) or [])
            for part in ("attentions", "resnets"):
                for k, m in enumerate(getattr(block, part, None) or []):
                    out.append((f"down_blocks.{i}.{part}.{k}", m, ("down", i, k)))
            for k, m in enumerate(getattr(block, "downsamplers", None) or []):
                out.append((f"down_blocks.{i}.downsamplers.{k}", m, ("down", i, n_res)))
            out.append((f"down_blocks.{i}", block, ("down", i, 0)))
        out.append(("mid_block", model.mid_block, ("mid", 0, 0)))
        n_up = len(model.up_blocks)
        for i, block in enumerate(model.up_blocks):
            b, n_res = n_up - 1 - i, len(getattr(block, "resnets", []) or [])
            for part in ("attentions", "resnets"):
                for k, m in enumerate(getattr(block, part, None) or []):
                    out.append((f"up_blocks.{i}.{part}.{k}", m, ("up", b, n_res - 1 - k)))
            for k, m in enumerate(getattr(block, "upsamplers", None) or []):
                out.append((f"up_blocks.{i}.upsamplers.{k}", m, ("up", b, 0)))
            out.append((f"up_blocks.{i}", block, ("up", b, 0)))
        return out

    def patch_size(self, model: torch.nn.Module) -> int | None:
        """Side of a token in latent pixels for transformers; None for the UNet (tokens depend on the level)."""
        return int(model.config.patch_size) if self.patched else None

    def axis(self, layer_name: str) -> str:
        """TEMPORAL for attention inside a temporal block (tokens = frames, batch = B x positions), else SPATIAL."""
        return TEMPORAL if self.temporal is not None and self.temporal in layer_name.split(".") else SPATIAL

    def matches(self, obj: Any) -> bool:
        """Is `obj` (a pipeline or a bare denoiser) one this row handles?"""
        model = self.denoiser(obj)
        if type(model).__name__ not in self.model_classes:
            return False
        config = getattr(model, "config", {})
        for key, want in self.config_match:
            have = config.get(key) if hasattr(config, "get") else getattr(config, key, None)
            if (have is None) if want == SET else have != want:
                return False
        bare = obj is model
        if self.pipeline_classes and not bare and type(obj).__name__ not in self.pipeline_classes:
            return False
        return not self.scheduler_classes or (not bare and type(getattr(obj, "scheduler", None)).__name__
                                              in self.scheduler_classes)

    def cond_slice(self, batch: int) -> slice:
        half = batch // 2
        return slice(0, half) if self.cfg_layout == "cond_first" else slice(half, batch)

    def runs_cfg(self, guidance_scale: float) -> bool:
        """Does the pipeline build a CFG batch at this guidance scale? (never for guidance-distilled families)"""
        return guidance_scale > 1 and self.cfg_layout != NO_CFG

    def guidance(self, scale: float, shape: Sequence[int], call_kwargs: Mapping | None = None) -> float | torch.Tensor:
        """The weight g in uncond + g * (cond - uncond) as the pipeline applies it to a denoiser output of `shape`:
        `scale`, or (guidance_ramp) a float32 ramp over the frame dim shaped to broadcast, e.g. SVD's (1, F, 1, 1, 1)
        = linspace(min_guidance_scale, max_guidance_scale, F)."""
        if self.guidance_ramp is None:
            return scale
        arg, default = self.guidance_ramp
        dim = self.frame_dim
        low = float((call_kwargs or {}).get(arg, default))
        ramp = torch.linspace(low, scale, shape[dim])  # float32, as the pipeline makes it before casting
        return ramp.view([-1 if d == dim else 1 for d in range(len(shape))])

    def kept_half(self, batch: int) -> slice:
        """The half of a CFG batch the engine runs when it collapses the batch (collapse_to)."""
        half = batch // 2
        first = (self.collapse_to == "cond") == (self.cfg_layout == "cond_first")
        return slice(0, half) if first else slice(half, batch)

    def latent_input(self, args: Sequence, kwargs: Mapping) -> torch.Tensor:
        x = args[0] if args else kwargs.get(self.latent_arg)
        if not torch.is_tensor(x):
            raise DifaError(f"could not find the latent input {self.latent_arg!r} of the {self.family} denoiser call")
        return x

    def is_cfg_batch(self, args: Sequence, kwargs: Mapping) -> bool:
        """A CFG batch is the same latents twice (every stock pipeline does torch.cat([latents] * 2));
        for class-conditional models the second half must also carry the null class."""
        if self.cfg_layout == NO_CFG:
            return False
        x = self.latent_input(args, kwargs)
        b = x.shape[0]
        if self.cfg_channels is not None:  # e.g. SVD: noise (4 channels) + image latents, zero in the uncond half
            dim, n = self.cfg_channels
            x = x.narrow(dim, 0, n)
        if b % 2 or not torch.equal(x[: b // 2], x[b // 2 :]):
            return False
        labels = kwargs.get("class_labels")
        if self.null_class is not None and torch.is_tensor(labels):
            uncond = labels[b // 2 :] if self.cfg_layout == "cond_first" else labels[: b // 2]
            return bool((uncond == self.null_class).all())
        return True

    def call_pipeline(self, pipe: Any, inputs: Sequence, *, steps: int, guidance_scale: float,
                      generator: torch.Generator | None, output_type: str = "pil", extra: Mapping | None = None):
        kw = dict(extra or {})
        if self.inputs_kind == "images":
            from difa.data import load_images

            inputs = load_images(inputs)  # paths, or synthetic:<seed> test images
        return pipe(**{INPUT_KEYS[self.inputs_kind]: list(inputs)}, num_inference_steps=steps,
                    **{self.guidance_arg: guidance_scale}, generator=generator, output_type=output_type, **kw)

    def outputs(self, result: Any) -> Any:
        """The generated images (or videos) of a pipeline call's result."""
        return getattr(result, self.output_attr)


_SDXL = dict(model_classes=("UNet2DConditionModel",), denoiser_attr="unet", latent_arg="sample",
             cfg_layout="uncond_first", inputs_kind="prompts", patched=False, collapse_to="uncond")
# Rows sharing a denoiser class: the more specific first (adapter_for takes the first row that matches).
ADAPTERS: dict[str, Adapter] = {a.family: a for a in (
    # diffusers DiTPipeline: class_labels_input = cat([labels, null=1000]) -> conditional half first
    Adapter("dit", ("DiTTransformer2DModel",), "transformer", "hidden_states", "cond_first", "classes", "pt", 1000),
    # PixArt-LCM (PixArtAlphaPipeline + LCMScheduler, guidance_scale=0): consistency-distilled, no CFG batch
    Adapter("lcm_pixart", ("PixArtTransformer2DModel",), "transformer", "hidden_states", NO_CFG, "prompts",
            scheduler_classes=("LCMScheduler",)),
    # PixArt*Pipeline: prompt_embeds = cat([negative, positive]) -> unconditional half first
    Adapter("pixart", ("PixArtTransformer2DModel",), "transformer", "hidden_states", "uncond_first", "prompts"),
    # LCM-SDXL: the SD-XL UNet with a guidance embedding (time_cond_proj_dim): StableDiffusionXLPipeline never
    # builds a CFG batch for it, whatever guidance_scale says
    Adapter("lcm_sdxl", **{**_SDXL, "cfg_layout": NO_CFG},
            config_match=(("addition_embed_type", "text_time"), ("time_cond_proj_dim", SET))),
    # Playground v2.5: the SD-XL architecture with an EDM scheduler (told apart by it; the facts are SD-XL's)
    Adapter("playground_v25", **_SDXL, config_match=(("addition_embed_type", "text_time"),),
            scheduler_classes=("EDMDPMSolverMultistepScheduler", "EDMEulerScheduler")),
    # StableDiffusionXLPipeline: cat([negative_prompt_embeds, prompt_embeds]), plus added_cond_kwargs likewise
    Adapter("sdxl", **_SDXL, config_match=(("addition_embed_type", "text_time"),)),
    # StableDiffusionPipeline: cat([negative_prompt_embeds, prompt_embeds])
    Adapter("sd", ("UNet2DConditionModel",), "unet", "sample", "uncond_first", "prompts", patched=False),
    # StableVideoDiffusionPipeline: latents (B, F, 8, h, w) = 4 noise channels + the image's latents, which (like the
    # image embedding) are zero in the unconditional half: [uncond, cond]. Spatial layers: batch B*F, tokens h*w;
    # temporal layers: batch B*h*w, tokens F. Guidance ramps from min_guidance_scale to max_guidance_scale per frame.
    Adapter("svd", ("UNetSpatioTemporalConditionModel",), "unet", "sample", "uncond_first", "images", patched=False,
            temporal="temporal_transformer_blocks", cfg_channels=(2, 4), output_attr="frames",
            guidance_arg="max_guidance_scale", frame_dim=1,
            guidance_ramp=("min_guidance_scale", 1.0)),
    # LattePipeline: latents (B, C, F, h, w), cat([negative, positive]) prompt embeddings. Spatial blocks: batch B*F,
    # tokens (h/2)*(w/2); temporal blocks (self-attention only): batch B*(h/2)*(w/2), tokens F
    Adapter("latte", ("LatteTransformer3DModel",), "transformer", "hidden_states", "uncond_first", "prompts",
            temporal="temporal_transformer_blocks", output_attr="frames", frame_dim=2),
    # StableDiffusion3Pipeline (MMDiT): cat([negative, positive]) -> [uncond, cond]. JointTransformerBlock.attn gets the
    # image tokens as hidden_states and the text as encoder_hidden_states, attends over [image | text] and returns
    # (image, text); the block returns (encoder_hidden_states, hidden_states), the last one (None, hidden_states)
    # SD3.5 Medium's dual-attention blocks add attn2: the same processor over the image tokens only (a tensor out)
    Adapter("sd3", ("SD3Transformer2DModel",), "transformer", "hidden_states", "uncond_first", "prompts",
            joint_layers=("attn", "attn2"), block_streams=TEXT_FIRST, joint_window=True),
    # FluxPipeline: guidance-distilled (guidance_scale is embedded, batch 1). Double-stream blocks attend over
    # [text | image] (FluxAttention, processor called positionally with image_rotary_emb), single-stream blocks over
    # the joined sequence; both block kinds return (encoder_hidden_states, hidden_states)
    Adapter("flux", ("FluxTransformer2DModel",), "transformer", "hidden_states", NO_CFG, "prompts",
            joint_layers=("attn",), block_streams=TEXT_FIRST, joint_window=True, packed_latents=True),
    # CogVideoXPipeline: [uncond, cond]; latents (B, F', C, h, w). CogVideoXBlock.attn1 attends over [text | video] and
    # returns (video, text); blocks are called by keyword only and return (hidden_states, encoder_hidden_states)
    Adapter("cogvideox", ("CogVideoXTransformer3DModel",), "transformer", "hidden_states", "uncond_first", "prompts",
            output_attr="frames", frame_dim=1, joint_layers=("attn1",), block_streams=HIDDEN_FIRST, joint_window=True),
)}


def adapter_for(obj: Any, family: str | None = None) -> Adapter:
    """The adapter of a pipeline or a bare denoiser model; `family` (e.g. a plan's) is preferred if it matches."""
    if family in ADAPTERS and ADAPTERS[family].matches(obj):
        return ADAPTERS[family]
    for a in ADAPTERS.values():
        if a.matches(obj):
            return a
    supported = ", ".join(dict.fromkeys(c for a in ADAPTERS.values() for c in a.model_classes))
    raise DifaError(f"difa has no adapter for {type(obj).__name__}; supported denoisers: {supported}")


def get_adapter(family: str) -> Adapter:
    if family not in ADAPTERS:
        raise DifaError(f"unknown model family {family!r}; use one of {', '.join(ADAPTERS)}")
    return ADAPTERS[family]
