"""Train a CustomVAE on your images, or on the photos embedded in scikit-image and scikit-learn.

    python examples/train_vae.py                                   # embedded photos, CPU, a few minutes
    accelerate launch examples/train_vae.py --train_data_dir ./data/dogs --resolution 256 --output_dir dog-vae \\
        --mixed_precision bf16 --use_ema --checkpointing_steps 500 --push_to_hub --hub_model_id user/dog-vae
    accelerate launch examples/train_vae.py --dataset_name some/dataset --image_column image ...
    accelerate launch examples/train_vae.py ... --resume_from_checkpoint latest

The flags are the fields of `diffusers_custom_vae.training.TrainConfig`; `train(config, VAEObjective)` is the whole job
(`DistillationObjective` with --teacher_vae).
"""

import argparse

from transformers import HfArgumentParser

from diffusers_custom_vae.cli import one_line_errors
from diffusers_custom_vae.training import DistillationObjective, TrainConfig, VAEObjective, train


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each flag's default, and the examples above as written."""


PARSER = HfArgumentParser(TrainConfig, description=__doc__, formatter_class=HelpFormatter, prog="train_vae.py")


def parse_config(argv: list[str] | None = None) -> TrainConfig:
    """The flags as a `TrainConfig`; `ValueError` for values it refuses (argparse exits on unknown flags)."""
    (config,) = PARSER.parse_args_into_dataclasses(argv, look_for_args_file=False)
    return config


def main(argv: list[str] | None = None) -> dict:
    with one_line_errors(PARSER):
        config = parse_config(argv)
        return train(config, DistillationObjective if config.teacher_vae else VAEObjective)


if __name__ == "__main__":
    main()
