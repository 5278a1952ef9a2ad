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


# --------------------------------------------------------------------------- tiny SDXL, SD3 and FLUX

TINY_FAMILY_SPECS = ("tiny:sdxl", "tiny:sd3", "tiny:flux")


def _clip_text(cls_name: str, seed: int, hidden: int = 32, projection: int | None = None, max_len: int = 77):
    import transformers
    from transformers import CLIPTextConfig

    torch.manual_seed(seed)
    extra = {"projection_dim": projection} if projection is not None else {}
    config = CLIPTextConfig(**CLIP_TEXT_TOKEN_IDS, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=max_len, **extra)
    return getattr(transformers, cls_name)(config)


def _t5(seed: int, d_model: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=CLIP_TEXT_TOKEN_IDS["vocab_size"], d_model=d_model, d_ff=2 * d_model,
                                   d_kv=d_model // 4, num_layers=2, num_heads=4, pad_token_id=CLIP_TEXT_TOKEN_IDS["pad_token_id"],
                                   eos_token_id=CLIP_TEXT_TOKEN_IDS["eos_token_id"], decoder_start_token_id=0))


def _flow_vae(seed: int):
    """SD3/FLUX-style VAE: 16 latent channels, no quant convs, scaling and shift factors (the pipelines need both)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                         latent_channels=16, norm_num_groups=8, sample_size=32, use_quant_conv=False,
                         use_post_quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)


T5_TINY_LENGTH = 32  # tokens: the tiny T5 slots' model_max_length (max_sequence_length is capped to it)


def build_tiny_sd3(seed: int = TINY_SEED):
    """A tiny ``StableDiffusion3Pipeline`` (32×32 images, 16×16×16 latents, 2×2 patches): two CLIP encoders with
    projections, a tiny T5, ``SD3Transformer2DModel`` and ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` (SD3.5's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                            attention_head_dim=8, num_attention_heads=4, joint_attention_dim=64,
                                            caption_projection_dim=32, pooled_projection_dim=64, pos_embed_max_size=32)
        vae = _flow_vae(seed + 1)
        te1 = _clip_text("CLIPTextModelWithProjection", seed + 2, projection=32)
        te2 = _clip_text("CLIPTextModelWithProjection", seed + 3, projection=32)
        te3 = _t5(seed + 4, d_model=64)
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
        text_encoder=te1, tokenizer=build_clip_tokenizer(), text_encoder_2=te2, tokenizer_2=build_clip_tokenizer(),
        text_encoder_3=te3, tokenizer_3=build_clip_tokenizer(model_max_length=T5_TINY_LENGTH),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_flux(seed: int = TINY_SEED):
    """A tiny ``FluxPipeline`` (32×32 images; 16-channel latents packed 2×2 into 64 tokens of 64 features): CLIP (pooled)
    and a tiny T5, ``FluxTransformer2DModel`` with the guidance embedding, FLUX.1-dev's dynamically shifted scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                             attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                             pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        vae = _flow_vae(seed + 1)
        te1 = _clip_text("CLIPTextModel", seed + 2)
        te2 = _t5(seed + 3, d_model=32)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=te1, tokenizer=build_clip_tokenizer(),
                        text_encoder_2=te2, tokenizer_2=build_clip_tokenizer(model_max_length=T5_TINY_LENGTH),
                        transformer=transformer)
    pipe.default_sample_size = 16  # latent side: 16 × VAE factor 2 = 32 px images by default
    pipe.set_progress_bar_config(disable=True)
    return pipe


def build_tiny_sdxl(seed: int = TINY_SEED):
    """A tiny ``StableDiffusionXLPipeline`` (32×32 images): CLIP + CLIP-with-projection, the ``text_time``
    micro-conditioning U-Net, a DDIM scheduler with SDXL's betas (the kernel with log-probabilities)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                    block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
                                    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
                                    transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 8 + 32,
                                    cross_attention_dim=64, norm_num_groups=8)
        torch.manual_seed(seed + 1)
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), layers_per_block=1,
                            latent_channels=4, norm_num_groups=8, sample_size=32, scaling_factor=0.13025)
        te1 = _clip_text("CLIPTextModel", seed + 2)
        te2 = _clip_text("CLIPTextModelWithProjection", seed + 3, projection=32)
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=te1, text_encoder_2=te2, tokenizer=build_clip_tokenizer(),
                                     tokenizer_2=build_clip_tokenizer(), unet=unet,
                                     scheduler=DDIMScheduler(**tiny_scheduler_config()))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------- full-size architectures, random weights (GPU benchmarks)

RANDOM_FAMILY_SPECS = ("random:sdxl", "random:sd35m", "random:flux-dev")


def _sd_vae(latent_channels: int, scaling: float, shift: float | None = None, flow: bool = False):
    from diffusers import AutoencoderKL

    extra = dict(use_quant_conv=False, use_post_quant_conv=False, shift_factor=shift) if flow else {}
    return AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=latent_channels,
                         sample_size=1024, scaling_factor=scaling, **extra)


def _clip_config(hidden: int, layers: int, heads: int, projection: int | None = None, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig

    extra = {"projection_dim": projection} if projection is not None else {}
    return CLIPTextConfig(**CLIP_TEXT_TOKEN_IDS, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                          num_attention_heads=heads, max_position_embeddings=77, hidden_act=act, **extra)


def _t5_xxl():
    """T5 v1.1 XXL's encoder (4.76 B parameters); the vocabulary is CLIP's 49,408 tokens, so the offline CLIP BPE
    tokenizer fits it (the real T5 has 32,128: the embedding table is 0.07 B parameters larger here)."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=CLIP_TEXT_TOKEN_IDS["vocab_size"], d_model=4096, d_ff=10240, d_kv=64,
                                   num_heads=64, num_layers=24, feed_forward_proj="gated-gelu", is_gated_act=True,
                                   pad_token_id=CLIP_TEXT_TOKEN_IDS["pad_token_id"], decoder_start_token_id=0))


def build_random_family(spec: str, seed: int = TINY_SEED):
    """``random:sdxl`` (SDXL base 1.0), ``random:sd35m`` (SD3.5 Medium), ``random:flux-dev`` (FLUX.1-dev): the real
    architectures with random weights, for benchmarks. Build them under ``with torch.device("cuda"):`` so the
    weights are created on the GPU (several billion parameters)."""
    import transformers
    from diffusers import (DDIMScheduler, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)

    clip = lambda cls, **kw: getattr(transformers, cls)(_clip_config(**kw))  # noqa: E731
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if spec == "random:sdxl":
            unet = UNet2DConditionModel(
                sample_size=128, block_out_channels=(320, 640, 1280), layers_per_block=2,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
                transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
            pipe = StableDiffusionXLPipeline(
                vae=_sd_vae(4, 0.13025), text_encoder=clip("CLIPTextModel", hidden=768, layers=12, heads=12),
                text_encoder_2=clip("CLIPTextModelWithProjection", hidden=1280, layers=32, heads=20, projection=1280, act="gelu"),
                tokenizer=build_clip_tokenizer(), tokenizer_2=build_clip_tokenizer(pad_token="!"), unet=unet,
                scheduler=DDIMScheduler(**tiny_scheduler_config()))
        elif spec == "random:sd35m":
            transformer = SD3Transformer2DModel(
                sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64,
                num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
            pipe = StableDiffusion3Pipeline(
                transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                vae=_sd_vae(16, 1.5305, 0.0609, flow=True),
                text_encoder=clip("CLIPTextModelWithProjection", hidden=768, layers=12, heads=12, projection=768),
                tokenizer=build_clip_tokenizer(),
                text_encoder_2=clip("CLIPTextModelWithProjection", hidden=1280, layers=32, heads=20, projection=1280, act="gelu"),
                tokenizer_2=build_clip_tokenizer(), text_encoder_3=_t5_xxl(), tokenizer_3=build_clip_tokenizer(model_max_length=256))
        elif spec == "random:flux-dev":
            transformer = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
            scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                        base_image_seq_len=256, max_image_seq_len=4096)
            pipe = FluxPipeline(scheduler=scheduler, vae=_sd_vae(16, 0.3611, 0.1159, flow=True),
                                text_encoder=clip("CLIPTextModel", hidden=768, layers=12, heads=12),
                                tokenizer=build_clip_tokenizer(), text_encoder_2=_t5_xxl(),
                                tokenizer_2=build_clip_tokenizer(model_max_length=512), transformer=transformer)
        else:
            raise ValueError(f"unknown random family spec {spec!r}; known: {', '.join(RANDOM_FAMILY_SPECS)}")
    pipe.set_progress_bar_config(disable=True)
    return pipe
