"""The demo as a Hugging Face Space: this file and requirements.txt, beside it, are all a Space needs.

The VAEs (and the optional pipeline) are Hub ids, set in the Space's variables or edited below:
    VAES="user/custom-vae,user/sd-tiny-vae"    the first is the main one; CustomVAE and AutoencoderKL both work
    PIPELINE="user/pets-dit"                   optional: a DiTPipeline from examples/train_latent_diffusion.py
"""

import os

from diffusers_custom_vae.app import build_demo

VAES = [name.strip() for name in os.environ.get("VAES", "user/custom-vae").split(",") if name.strip()]
demo = build_demo(VAES, pipeline=os.environ.get("PIPELINE") or None)

if __name__ == "__main__":
    demo.launch()
