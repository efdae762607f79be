"""Tiny Stable Diffusion 1.x/2.x and SDXL pipelines built from configs, with no download.

Every model is a few thousand parameters and seeded, so a 2-step generation takes a fraction of a second. The CLIP
tokenizer is built in memory (byte-level symbols, no merges): it tokenises any prompt, one symbol per character.
Each pipeline comes with a tiny `AutoencoderKL` carrying the scaling factor of the real VAE it stands for, so the
pipeline's original latent space is recognised as the real one's would be.
"""

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from tokenizers.pre_tokenizers import ByteLevel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from diffusers_custom_vae import CustomVAE

SD_PIPELINES = (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline)
SDXL_PIPELINES = (StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline)
INPAINT_PIPELINES = (StableDiffusionInpaintPipeline, StableDiffusionXLInpaintPipeline)

SD_SCALING_FACTOR = 0.18215  # the SD 1.x/2.x VAE's
SDXL_SCALING_FACTOR = 0.13025  # the SDXL VAE's

# 8x downsampling like the Stable Diffusion VAE, 8 channels wide.
TINY_VAE_8X = dict(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, num_attention_heads=2)
# A `--model_config` that trains a tiny 8x diffusers AutoencoderKL (SD's VAE layout).
TINY_AUTOENCODER_KL_CONFIG = {
    "_class_name": "AutoencoderKL",
    "block_out_channels": [8, 8, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}


def tiny_custom_vae(**config) -> CustomVAE:
    """A seeded 8x `CustomVAE`; keyword arguments override `TINY_VAE_8X`."""
    torch.manual_seed(0)
    return CustomVAE(**{**TINY_VAE_8X, **config}).eval()


def tiny_autoencoder_kl(scaling_factor: float = SD_SCALING_FACTOR) -> AutoencoderKL:
    """A seeded 8x `AutoencoderKL`: the VAE a pipeline "was trained with"."""
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(4, 4, 4, 4),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        scaling_factor=scaling_factor,
    )


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer with the two special tokens and the 256 byte-level symbols, each alone and word-final."""
    symbols = sorted(ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in symbols + [symbol + "</w>" for symbol in symbols]:
        vocab[token] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_clip_text_encoder(with_projection: bool = False) -> CLIPTextModel | CLIPTextModelWithProjection:
    torch.manual_seed(0)
    tokenizer_size = 2 + 2 * 256
    config = CLIPTextConfig(
        vocab_size=tokenizer_size,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        projection_dim=32,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def tiny_unet(in_channels: int = 4, sdxl: bool = False) -> UNet2DConditionModel:
    """A 2-resolution UNet on 4-channel latents (an inpainting UNet takes 9 = 4 + 4 + 1 input channels)."""
    torch.manual_seed(0)
    sdxl_conditioning = dict(
        addition_embed_type="text_time",  # SDXL's size and crop conditioning, plus the pooled text embedding
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=6 * 8 + 32,  # 6 size numbers x 8, plus text_encoder_2's projection
    )
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=in_channels,
        out_channels=4,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        attention_head_dim=4,
        cross_attention_dim=64 if sdxl else 32,  # SDXL concatenates both text encoders' hidden states
        **(sdxl_conditioning if sdxl else {}),
    ).eval()


def tiny_pipeline(pipeline_class=StableDiffusionPipeline, vae=None):
    """A tiny pipeline of `pipeline_class` (one of `SD_PIPELINES` or `SDXL_PIPELINES`).

    `vae` defaults to a tiny `AutoencoderKL` with the real SD (or SDXL) VAE's scaling factor.
    """
    sdxl = pipeline_class in SDXL_PIPELINES
    if vae is None:
        vae = tiny_autoencoder_kl(SDXL_SCALING_FACTOR if sdxl else SD_SCALING_FACTOR)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
    )
    components = dict(
        vae=vae,
        unet=tiny_unet(in_channels=9 if pipeline_class in INPAINT_PIPELINES else 4, sdxl=sdxl),
        scheduler=scheduler,
        text_encoder=tiny_clip_text_encoder(),
        tokenizer=tiny_clip_tokenizer(),
    )
    if sdxl:
        components.update(
            text_encoder_2=tiny_clip_text_encoder(with_projection=True),
            tokenizer_2=tiny_clip_tokenizer(),
            add_watermarker=False,
        )
    else:
        components.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = pipeline_class(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe
