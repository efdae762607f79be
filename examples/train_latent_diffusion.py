"""Train a class-conditional DiT in your own VAE's latent space; the output folder is a stock diffusers DiTPipeline.

    python examples/train_latent_diffusion.py          # the embedded photos, the VAE of `python examples/train_vae.py`
    accelerate launch examples/train_latent_diffusion.py --vae user/dog-vae --train_data_dir ./pets --resolution 256 \\
        --model_config B/2 --output_dir pets-dit    # ./pets/dog/*.jpg, ./pets/cat/*.jpg: one class per subfolder
    python examples/generate.py --pipeline pets-dit --class_name dog --num_images 8 --output dogs.png

The flags are the fields of `diffusers_custom_vae.training.LatentDiffusionConfig` (data, optimisation, checkpoints and
output as in train_vae.py); `train(config, LatentDiffusionObjective)` is the whole job.
"""

import argparse
from pathlib import Path

from transformers import HfArgumentParser

from diffusers_custom_vae.cli import one_line_errors
from diffusers_custom_vae.training import LatentDiffusionConfig, LatentDiffusionObjective, train


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default, and the examples above as written."""


PARSER = HfArgumentParser(
    LatentDiffusionConfig, description=__doc__, formatter_class=HelpFormatter, prog="train_latent_diffusion.py"
)
MAIN_JOB_VAE = LatentDiffusionConfig.vae


def main(argv: list[str] | None = None) -> dict:
    with one_line_errors(PARSER):
        (config,) = PARSER.parse_args_into_dataclasses(argv, look_for_args_file=False)
        if config.vae == MAIN_JOB_VAE and not Path(MAIN_JOB_VAE).is_dir():
            raise ValueError(
                f"--vae {MAIN_JOB_VAE} (the default) does not exist: run the first main job, "
                "`python examples/train_vae.py`, or give --vae."
            )
        return train(config, LatentDiffusionObjective)


if __name__ == "__main__":
    main()
