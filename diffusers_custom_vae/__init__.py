"""A VAE written from scratch, as a first-class diffusers model."""

from .modeling_custom_vae import CustomVAE, CustomVAEOutput

__all__ = ["CustomVAE", "CustomVAEOutput"]
