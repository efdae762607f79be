"""A VAE written from scratch, as a first-class diffusers model.

Importing the package registers `CustomVAE`'s module, which diffusers needs to load a saved pipeline that uses it.
Training lives in `diffusers_custom_vae.training` (not imported here: it pulls in the metrics and data libraries).
"""

from .conversion import convert_tutorial_checkpoint
from .generation import generate, load_dit_pipeline
from .hub import push_pipeline_to_hub, push_vae_to_hub
from .latent_spaces import LatentSpaceWarning, latent_space_of
from .latents import estimate_scaling_factor
from .modeling_custom_vae import CustomVAE, CustomVAEOutput
from .pipelines import save_pipeline, swap_vae
from .previews import LivePreviews

__all__ = [
    "CustomVAE",
    "CustomVAEOutput",
    "LatentSpaceWarning",
    "LivePreviews",
    "convert_tutorial_checkpoint",
    "estimate_scaling_factor",
    "generate",
    "latent_space_of",
    "load_dit_pipeline",
    "push_pipeline_to_hub",
    "push_vae_to_hub",
    "save_pipeline",
    "swap_vae",
]
