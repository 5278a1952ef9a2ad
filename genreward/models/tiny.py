"""Tiny, architecture-faithful Stable Diffusion components with random weights.

``tiny:sd`` builds the same classes as a real SD-1.x checkpoint (``UNet2DConditionModel``,
``AutoencoderKL``, ``CLIPTextModel``, CLIP's real BPE tokenizer, ``DDIMScheduler``), only small, from a
fixed seed, so tests and the quickstart are reproducible on a CPU with no downloaded weights.
``tiny:sd-v`` is the same with a v-prediction scheduler (like SD 2.x).
"""

from __future__ import annotations

import torch

from genreward.models.tokenizers import CLIP_TEXT_TOKEN_IDS, build_clip_tokenizer

TINY_SEED = 1234
TINY_SPECS = ("tiny:sd", "tiny:sd-v")
RANDOM_SPECS = ("random:sd15",)  # full-size architectures with random weights, for GPU benchmarks


def tiny_scheduler_config(prediction_type: str = "epsilon") -> dict:
    """SD-1.x scheduler settings (scaled-linear betas, leading spacing, offset 1, no final alpha = 1)."""
    return dict(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_tiny_sd(spec: str = "tiny:sd", seed: int = TINY_SEED):
    """Build a tiny ``StableDiffusionPipeline`` (32×32 images, 16×16×4 latents) on CPU in fp32."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    prediction_type = "v_prediction" if spec == "tiny:sd-v" else "epsilon"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=16,
            in_channels=4,
            out_channels=4,
            layers_per_block=1,
            block_out_channels=(32, 64),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=32,
            attention_head_dim=8,
            norm_num_groups=8,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(32, 64),
            layers_per_block=1,
            latent_channels=4,
            norm_num_groups=8,
            sample_size=32,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                **CLIP_TEXT_TOKEN_IDS,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                max_position_embeddings=77,
            )
        )
    scheduler = DDIMScheduler(**tiny_scheduler_config(prediction_type))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_random_sd15(seed: int = TINY_SEED):
    """SD-1.5 architecture (860M-parameter U-Net, 512 px) with random weights, for benchmarks on a GPU."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(128, 256, 512, 512),
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
        )
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu",
                bos_token_id=49406, eos_token_id=49407, pad_token_id=49407,
            )
        )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(), unet=unet,
        scheduler=DDIMScheduler(**tiny_scheduler_config()), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
