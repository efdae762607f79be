"""A VAE written from scratch, as a first-class diffusers model.

Importing the package registers `CustomVAE`'s module with diffusers, so that a saved pipeline that uses it loads with
`from_pretrained` (see below).
Training lives in `diffusers_custom_vae.training` (not imported here: it pulls in the metrics and data libraries).
"""

import diffusers.pipelines

from . import modeling_custom_vae
from .conversion import convert_tutorial_checkpoint
from .generation import generate, load_dit_pipeline
from .hub import push_pipeline_to_hub, push_vae_to_hub
from .latent_spaces import LatentSpaceWarning, latent_space_of
from .latents import estimate_scaling_factor
from .modeling_custom_vae import CustomVAE, CustomVAEOutput
from .pipelines import save_pipeline, swap_vae
from .previews import LivePreviews

# A pipeline folder written by `save_pipeline` (or the latent diffusion trainer) names its VAE
# ["modeling_custom_vae", "CustomVAE"] in model_index.json and ships that file, for loading without the package
# (`trust_remote_code=True`). diffusers looks a component's library up among `diffusers.pipelines`' attributes before
# it looks for the folder's copy (`pipeline_loading_utils.get_class_obj_and_candidates`), so with the package imported
# `DiTPipeline.from_pretrained(folder)` loads the package's own CustomVAE, as strictly as ever, and runs no code from
# the folder. tests/test_latent_diffusion.py and tests/test_pipelines.py check it.
diffusers.pipelines.modeling_custom_vae = modeling_custom_vae

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
