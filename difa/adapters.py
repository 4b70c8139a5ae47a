"""Per-architecture facts, in one table: where the denoiser lives on the pipeline, which modules are self- and
cross-attention (in execution order), how the CFG batch is laid out, and how to call the stock pipeline."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from difa.errors import DifaError

SELF_ATTN = "attn1"
CROSS_ATTN = "attn2"


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

    def denoiser(self, obj: Any) -> torch.nn.Module:
        return getattr(obj, self.denoiser_attr) if hasattr(obj, self.denoiser_attr) else obj

    def attention_layers(self, model: torch.nn.Module, kind: str = SELF_ATTN) -> list[tuple[str, torch.nn.Module]]:
        """`Attention` modules named `*.<kind>`, in module-registration order (= block execution order)."""
        from diffusers.models.attention_processor import Attention

        return [(n, m) for n, m in model.named_modules() if isinstance(m, Attention) and n.rsplit(".", 1)[-1] == kind]

    def planned_layers(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """Self- and cross-attention modules in execution order (registration order: attn1 before attn2 per block)."""
        from diffusers.models.attention_processor import Attention

        kinds = (SELF_ATTN, CROSS_ATTN)
        return [(n, m) for n, m in model.named_modules() if isinstance(m, Attention) and n.rsplit(".", 1)[-1] in kinds]

    def block_layers(self, model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        """Transformer blocks (the parents of self-attention layers: DiT / PixArt `transformer_blocks.N`, the
        UNet's `...attentions.K.transformer_blocks.0`), in execution order: the units of block cells."""
        out: dict[str, torch.nn.Module] = {}
        for name, _ in self.attention_layers(model, SELF_ATTN):
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

    def cond_slice(self, batch: int) -> slice:
        half = batch // 2
        return slice(0, half) if self.cfg_layout == "cond_first" else slice(half, batch)

    def latent_input(self, args: Sequence, kwargs: Mapping) -> torch.Tensor:
        x = args[0] if args else kwargs.get(self.latent_arg)
        if not torch.is_tensor(x):
            raise DifaError(f"could not find the latent input {self.latent_arg!r} of the {self.family} denoiser call")
        return x

    def is_cfg_batch(self, args: Sequence, kwargs: Mapping) -> bool:
        """A CFG batch is the same latents twice (every stock pipeline does torch.cat([latents] * 2));
        for class-conditional models the second half must also carry the null class."""
        x = self.latent_input(args, kwargs)
        b = x.shape[0]
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
        key = "class_labels" if self.inputs_kind == "classes" else "prompt"
        return pipe(**{key: list(inputs)}, num_inference_steps=steps, guidance_scale=guidance_scale,
                    generator=generator, output_type=output_type, **kw)


ADAPTERS: dict[str, Adapter] = {
    # diffusers DiTPipeline: class_labels_input = cat([labels, null=1000]) -> conditional half first
    "dit": Adapter("dit", ("DiTTransformer2DModel",), "transformer", "hidden_states", "cond_first", "classes", "pt", 1000),
    # PixArt*Pipeline: prompt_embeds = cat([negative, positive]) -> unconditional half first
    "pixart": Adapter("pixart", ("PixArtTransformer2DModel",), "transformer", "hidden_states", "uncond_first", "prompts"),
    # StableDiffusionPipeline: cat([negative_prompt_embeds, prompt_embeds])
    "sd": Adapter("sd", ("UNet2DConditionModel",), "unet", "sample", "uncond_first", "prompts", patched=False),
}


def adapter_for(obj: Any) -> Adapter:
    """The adapter of a pipeline or a bare denoiser model."""
    for a in ADAPTERS.values():
        model = getattr(obj, a.denoiser_attr, obj)
        if type(model).__name__ in a.model_classes:
            return a
    supported = ", ".join(c for a in ADAPTERS.values() for c in a.model_classes)
    raise DifaError(f"difa has no adapter for {type(obj).__name__}; supported denoisers: {supported}")


def get_adapter(family: str) -> Adapter:
    if family not in ADAPTERS:
        raise DifaError(f"unknown model family {family!r}; use one of {', '.join(ADAPTERS)}")
    return ADAPTERS[family]
