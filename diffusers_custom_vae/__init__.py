"""A VAE written from scratch, as a first-class diffusers model."""

from .conversion import convert_tutorial_checkpoint
from .modeling_custom_vae import CustomVAE, CustomVAEOutput

__all__ = ["CustomVAE", "CustomVAEOutput", "convert_tutorial_checkpoint"]
