"""The tiny pipelines' configs (difa/tiny.py builds them): each UPPER_CASE config's comment gives the real
model's sizes."""

import string

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


TINY_FRAMES = 4  # SVD and Latte frames (= latent frames: their VAEs are per-frame 2D in time)

# ---------------------------------------------------------------- svd
# stabilityai/stable-video-diffusion-img2vid-xt: UNetSpatioTemporalConditionModel with block_out_channels
# (320, 640, 1280, 1280), down = 3 x CrossAttnDownBlockSpatioTemporal + DownBlockSpatioTemporal (up mirrored),
# layers_per_block 2, num_attention_heads (5, 10, 20, 20) (heads; head dim = channels / heads = 64),
# cross_attention_dim 1024 (= image encoder projection_dim), addition_time_embed_dim 256 (x 3 ids = 768 =
# projection_class_embeddings_input_dim), in_channels 8 (4 noise + 4 image latents), out 4, num_frames 25,
# sample_size 96. Here: 2 levels (one CrossAttn level + one plain level, as in diffusers' own fast test), width 32,
# 2 heads x 16. GroupNorm(32) is hard-coded in the spatio-temporal resnets/transformers, so widths are multiples
# of 32. Spatial self-attention runs on 8x8 = 64 tokens (down_blocks.0 / up_blocks.1) and 4x4 = 16 (mid_block).
TINY_SVD_UNET = dict(
    sample_size=8,  # 64 px
    in_channels=8,
    out_channels=4,
    down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
    up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"),
    block_out_channels=(32, 32),
    layers_per_block=1,
    num_attention_heads=2,
    cross_attention_dim=32,
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=24,  # 3 added time ids (fps, motion_bucket_id, noise_aug) x 8
    num_frames=TINY_FRAMES,
)
# The real AutoencoderKLTemporalDecoder: block_out_channels (128, 256, 512, 512), layers_per_block 2, latent 4,
# scaling_factor 0.18215. Its TemporalDecoder hard-codes GroupNorm(32), hence width 32 (not TINY_VAE's 8).
TINY_SVD_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,  # 8x downsampling like the real one
    block_out_channels=(32, 32, 32, 32),
    layers_per_block=1,
    latent_channels=4,
)
# The real image encoder is OpenCLIP ViT-H/14: hidden 1280, 32 layers, 16 heads, intermediate 5120,
# projection_dim 1024, image_size 224, patch 14 (256 patches + class token). The pipeline always resizes to
# 224x224, so image_size stays 224; patch 14 is kept (a larger patch makes the patch conv weights the bulk).
TINY_SVD_CLIP_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    image_size=224,
    patch_size=14,
    projection_dim=TINY_SVD_UNET["cross_attention_dim"],
)
# The real scheduler_config (the same as diffusers' SVD fast test): EDM sigmas 0.002..700, Karras, v-prediction.
SVD_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    interpolation_type="linear",
    num_train_timesteps=1000,
    prediction_type="v_prediction",
    sigma_max=700.0,
    sigma_min=0.002,
    steps_offset=1,
    timestep_spacing="leading",
    timestep_type="continuous",
    use_karras_sigmas=True,
)

# ---------------------------------------------------------------- latte
# maxin-cn/Latte-1: LatteTransformer3DModel with 28 layers (each = one spatial BasicTransformerBlock with
# self- and cross-attention + one temporal BasicTransformerBlock with self-attention only) x 16 heads x 72
# (inner 1152), cross_attention_dim 1152, caption_channels 4096 (T5-v1.1-XXL), sample_size 64 (512 px),
# patch 2, video_length 16, out_channels 8 (learned sigma), ada_norm_single, gelu-approximate, attention_bias.
# VAE: the SD AutoencoderKL. Text: 120 T5 tokens (hard-coded in LattePipeline.encode_prompt).
# Note: temp_pos_embed has video_length rows and is added to every call's frames, so a call must use exactly
# video_length frames (or 1).
TINY_LATTE = dict(
    num_layers=2,
    num_attention_heads=4,
    attention_head_dim=16,
    in_channels=4,
    out_channels=8,
    patch_size=2,
    sample_size=8,  # latent 8x8 -> 4x4 = 16 tokens per frame, 64 px
    cross_attention_dim=64,  # = num_attention_heads * attention_head_dim
    caption_channels=TINY_T5["d_model"],
    attention_bias=True,
    activation_fn="gelu-approximate",
    num_embeds_ada_norm=1000,
    norm_type="ada_norm_single",
    norm_elementwise_affine=False,
    norm_eps=1e-6,
    video_length=TINY_FRAMES,
)
# Latte's sample config: DDIM, linear betas 1e-4..0.02 (learned sigma; LattePipeline drops the sigma half unless
# the scheduler has variance_type learned/learned_range, which DDIMScheduler has not). clip_sample=False: latents.
LATTE_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False)

# ---------------------------------------------------------------- cogvideox
# THUDM/CogVideoX-2b: CogVideoXTransformer3DModel with 30 CogVideoXBlocks x 30 heads x 64 (inner 1920), one joint
# self-attention over [226 text tokens, F' * h * w video tokens] per block (no cross-attention), text_embed_dim
# 4096, time_embed_dim 512, in/out 16, patch 2, sample 60x90 latent (480x720 px), sample_frames 49 (13 latent
# frames), 3D sincos positions (use_rotary_positional_embeddings=False; the 5b uses RoPE -> image_rotary_emb).
# max_text_seq_length must equal the call's max_sequence_length (the joint position table is
# max_text_seq_length + video tokens long).
TINY_COGVIDEOX = dict(
    num_layers=2,
    num_attention_heads=4,
    attention_head_dim=16,  # inner 64; 3D sincos needs inner % 16 == 0
    in_channels=16,
    out_channels=16,
    time_embed_dim=32,
    text_embed_dim=TINY_T5["d_model"],
    sample_height=8,  # 64 px
    sample_width=8,
    sample_frames=9,  # (9 - 1) / 4 + 1 = 3 latent frames, 3 x 4x4 = 48 video tokens
    patch_size=2,
    temporal_compression_ratio=4,
    max_text_seq_length=32,  # character-level tokens: about one per character
    attention_bias=True,
    activation_fn="gelu-approximate",
    spatial_interpolation_scale=1.875,
    temporal_interpolation_scale=1.0,
    use_rotary_positional_embeddings=False,
)
# The real AutoencoderKLCogVideoX: block_out_channels (128, 256, 256, 512), layers_per_block 3, latent 16,
# norm_num_groups 32, temporal_compression_ratio 4, scaling_factor 1.15258426, no quant convs.
TINY_COGVIDEOX_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("CogVideoXDownBlock3D",) * 4,
    up_block_types=("CogVideoXUpBlock3D",) * 4,
    block_out_channels=(8, 8, 8, 8),
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=2,
    temporal_compression_ratio=4,
    scaling_factor=1.15258426,
    use_quant_conv=False,
    use_post_quant_conv=False,
)
# The real 2b scheduler_config (CogVideoXDDIMScheduler).
COGVIDEOX_SCHEDULER = dict(
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    prediction_type="v_prediction",
    rescale_betas_zero_snr=True,
    set_alpha_to_one=True,
    snr_shift_scale=3.0,
    steps_offset=0,
    timestep_spacing="trailing",
)


# ---------------------------------------------------------------------------------------------------------------
# SD-XL (stabilityai/stable-diffusion-xl-base-1.0)
# Real UNet: block_out_channels (320, 640, 1280), layers_per_block 2, DownBlock2D + 2 x CrossAttnDownBlock2D,
# attention_head_dim (= number of heads, diffusers naming) (5, 10, 20) -> head dim 64, transformer_layers_per_block
# (1, 2, 10) (mid block: 10), cross_attention_dim 2048 (= 768 CLIP-L + 1280 OpenCLIP-bigG hidden states,
# penultimate layer, concatenated), addition_embed_type "text_time", addition_time_embed_dim 256,
# projection_class_embeddings_input_dim 2816 (= 6 * 256 + 1280 pooled bigG projection), use_linear_projection,
# sample_size 128 (1024 px). Text: CLIPTextModel (768, 12 layers) + CLIPTextModelWithProjection (1280, 32 layers,
# projection_dim 1280). VAE scaling_factor 0.13025, force_upcast.
# Tiny: widths (8, 16, 32), heads (1, 2, 4) x 8 (head count doubling per level, constant head dim, as the real),
# transformer layers (-, 2, 3) (mid: 3), layers_per_block 2; at the default 128 px (latent 16x16) the first level
# has no attention, self-attention runs on 8x8 = 64 tokens (level 1) and 4x4 = 16 tokens (level 2 and mid).
# (Real at 1024 px: 128x128 without attention, 4096 and 1024 tokens.)
SDXL_TIME_EMBED_DIM = 8  # addition_time_embed_dim: 6 micro-conditions (orig size, crop, target size) x 8
TINY_CLIP_2 = dict(TINY_CLIP, projection_dim=32)  # the CLIPTextModelWithProjection (text_encoder_2)
TINY_SDXL_UNET = dict(
    sample_size=16,  # 128 px
    in_channels=4,
    out_channels=4,
    block_out_channels=(8, 16, 32),
    layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    attention_head_dim=(1, 2, 4),  # number of heads per level (diffusers naming): head dim 8 everywhere
    transformer_layers_per_block=(1, 2, 3),
    cross_attention_dim=TINY_CLIP["hidden_size"] + TINY_CLIP_2["hidden_size"],
    addition_embed_type="text_time",
    addition_time_embed_dim=SDXL_TIME_EMBED_DIM,
    projection_class_embeddings_input_dim=6 * SDXL_TIME_EMBED_DIM + TINY_CLIP_2["projection_dim"],
    use_linear_projection=True,
    norm_num_groups=4,
)
# The real scheduler_config.json (EulerDiscreteScheduler, SD-1.x betas, "leading" spacing). Built with from_config
# like a loaded checkpoint, so the keys Euler ignores (clip_sample, set_alpha_to_one, ...) stay in its config and
# reach LCMScheduler.from_config(pipe.scheduler.config) the way the lcm-sdxl model card builds its scheduler.
SDXL_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    trained_betas=None,
    prediction_type="epsilon",
    interpolation_type="linear",
    use_karras_sigmas=False,
    timestep_spacing="leading",
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    sample_max_value=1.0,
)
SDXL_VAE = dict(TINY_VAE, scaling_factor=0.13025, force_upcast=True)

# ---------------------------------------------------------------------------------------------------------------
# Playground v2.5 (playgroundai/playground-v2.5-1024px-aesthetic): the SD-XL UNet and text encoders as they are;
# differs in the scheduler (EDM DPM-Solver++, Karras sigmas in [0.002, 80], sigma_data 0.5, so the UNet sees
# c_noise = log(sigma) / 4 as its timestep and EDM-preconditioned inputs) and in the VAE latent normalisation
# (per-channel latents_mean / latents_std with scaling_factor 0.5: decode(x * std / 0.5 + mean)).
# Checked against public copies (no hub here): the model card (EDMDPMSolverMultistepScheduler, 50 steps,
# guidance 3) and the latent statistics below; the remaining scheduler values are EDM's defaults, not read from
# its scheduler_config.json.
PLAYGROUND_SCHEDULER = dict(
    sigma_min=0.002,
    sigma_max=80.0,
    sigma_data=0.5,
    num_train_timesteps=1000,
    prediction_type="epsilon",
    rho=7.0,
    solver_order=2,
    algorithm_type="dpmsolver++",
    solver_type="midpoint",
    lower_order_final=True,
    euler_at_final=False,
    final_sigmas_type="zero",
)
PLAYGROUND_VAE = dict(
    TINY_VAE,
    scaling_factor=0.5,
    latents_mean=(-1.6574, 1.886, -1.383, 2.5155),
    latents_std=(8.4927, 5.9022, 6.5498, 5.2299),
    force_upcast=True,
)

# ---------------------------------------------------------------------------------------------------------------
# LCM-SDXL (latent-consistency/lcm-sdxl, a UNet repo used inside the SD-XL base pipeline): the SD-XL UNet plus
# time_cond_proj_dim 256 (the guidance scale w enters as a sinusoidal embedding added to the time embedding), with
# LCMScheduler.from_config(<SD-XL scheduler config>), 4 steps, guidance_scale 8.0 in the model card.
LCM_SDXL_UNET = dict(TINY_SDXL_UNET, time_cond_proj_dim=16)

# ---------------------------------------------------------------------------------------------------------------
# PixArt-LCM (PixArt-alpha/PixArt-LCM-XL-2-1024-MS): the PixArt-XL-2-1024-MS transformer (28 blocks x 16 heads x 72,
# patch 2, sample_size 128 -> use_additional_conditions: resolution + aspect-ratio micro-conditions; interpolation
# scale 2), T5-XXL (4096, 120 tokens), LCMScheduler; model card: 4 steps, guidance_scale 0.
# Tiny: TINY_PIXART's 4 blocks x 4 heads (of 12, see below) but sample_size 128 as the real config, so the pipeline passes the
# micro-conditions (it does so only when sample_size == 128) and the positional embedding uses interpolation scale
# 2; the sin-cos pos-embed is recomputed for the actual 8x8 latent (not saved: pos_embed_max_size is None).
# Call it at 64 px (image_call_kwargs), not at the 1024 px default.
# The micro-condition embedder splits the width in 3 (resolution 2/3, aspect ratio 1/3: 1152 = 3 x 384), so the
# width must be a multiple of 3: 4 heads x 12 = 48 here instead of TINY_PIXART's 4 x 16.
TINY_LCM_PIXART = dict(TINY_PIXART, sample_size=128, attention_head_dim=12, cross_attention_dim=48)
# PixArt's training betas (linear 1e-4 .. 0.02, as its DPMSolver config); the rest are LCMScheduler defaults.
LCM_PIXART_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.0001,
    beta_end=0.02,
    beta_schedule="linear",
    original_inference_steps=50,
    clip_sample=False,
    set_alpha_to_one=True,
    steps_offset=0,
    prediction_type="epsilon",
    timestep_spacing="leading",
    timestep_scaling=10.0,
)

# ---------------------------------------------------------------------------------------------------------------
# SD3 (stabilityai/stable-diffusion-3-medium-diffusers): SD3Transformer2DModel, 24 JointTransformerBlocks x 24 heads
# x 64 (1536), patch 2, in/out 16 channels, joint_attention_dim 4096 (T5-XXL), caption_projection_dim 1536,
# pooled_projection_dim 2048 (768 CLIP-L + 1280 CLIP-G projections), pos_embed_max_size 192, sample_size 128; the
# last block is context_pre_only. Text: 2 x CLIPTextModelWithProjection (penultimate hidden states concatenated to
# 2048, zero-padded to 4096) + T5EncoderModel (256 tokens by default), concatenated on the sequence: 77 + 256.
# VAE: 16 latent channels, scaling_factor 1.5305, shift_factor 0.0609, no quant convs.
# FlowMatchEulerDiscreteScheduler(shift=3.0).
# Tiny: 3 joint blocks x 4 heads x 16 (the last context_pre_only); T5 width 96 > 64 = the two 32-wide CLIP states
# concatenated (the pipeline zero-pads the CLIP states to the T5 width and would crop them if T5 were narrower).
TINY_T5_SD3 = dict(TINY_T5, d_model=96)  # > 64 = the two CLIP widths, so the zero-padding happens as in the real
TINY_SD3 = dict(
    sample_size=8,  # 64 px
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=3,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=TINY_T5_SD3["d_model"],
    caption_projection_dim=64,  # = num_attention_heads * attention_head_dim (the real: 1536 = 24 * 64)
    pooled_projection_dim=TINY_CLIP_2["projection_dim"] * 2,
    pos_embed_max_size=16,  # up to a 32x32 latent (256 px)
)
# SD3.5 Medium (stabilityai/stable-diffusion-3.5-medium, the same pipeline and adapter row): 24 blocks x 24 heads
# x 64, dual attention (a second, image-only attention attn2) in blocks 0-12, qk_norm "rms_norm" on every
# attention, pos_embed_max_size 384 (values checked against public copies of its config). Tiny: TINY_SD3 with
# attn2 in the first two of its three blocks and RMS qk-norm.
TINY_SD35 = dict(TINY_SD3, dual_attention_layers=(0, 1), qk_norm="rms_norm")
SD3_VAE = dict(
    TINY_VAE, latent_channels=16, scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False,
    use_post_quant_conv=False,
)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

# ---------------------------------------------------------------------------------------------------------------
# FLUX.1-dev (black-forest-labs/FLUX.1-dev): FluxTransformer2DModel, 19 double-stream FluxTransformerBlocks +
# 38 single-stream FluxSingleTransformerBlocks, 24 heads x 128 (3072), patch_size 1 on 2x2-packed latents
# (in_channels 64 = 16 x 4), joint_attention_dim 4096 (T5-XXL, max_sequence_length 512), pooled_projection_dim 768
# (CLIP-L pooler output), guidance_embeds True (dev; schnell: False), axes_dims_rope (16, 56, 56) (sums to the
# head dim). VAE: 16 latent channels, scaling_factor 0.3611, shift_factor 0.1159, no quant convs.
# Scheduler: FlowMatchEulerDiscreteScheduler(shift 3.0, use_dynamic_shifting, base/max_shift 0.5/1.15,
# base/max_image_seq_len 256/4096) (schnell: shift 1.0, no dynamic shifting).
# Tiny: 2 double + 3 single blocks x 4 heads x 16, rope axes (4, 6, 6); 64 px -> 8x8 latent -> 16 packed tokens.
TINY_FLUX = dict(
    patch_size=1,
    in_channels=64,  # 16 latent channels x 2x2 packing
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=16,
    num_attention_heads=4,
    joint_attention_dim=TINY_T5["d_model"],
    pooled_projection_dim=TINY_CLIP["hidden_size"],
    guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)
FLUX_VAE = dict(
    TINY_VAE, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159, use_quant_conv=False,
    use_post_quant_conv=False,
)
FLUX_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
TEXT_TOKENS = 32  # max_sequence_length for the T5 of SD3 / FLUX in the tiny calls (real defaults: 256 / 512)
