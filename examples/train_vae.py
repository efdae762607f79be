"""Train a CustomVAE on your images, or on the photos embedded in scikit-image and scikit-learn.

    python examples/train_vae.py                                   # embedded photos, CPU, a few minutes
    accelerate launch examples/train_vae.py --train_data_dir ./data/dogs --resolution 256 --output_dir dog-vae \\
        --mixed_precision bf16 --use_ema --checkpointing_steps 500 --push_to_hub --hub_model_id user/dog-vae
    accelerate launch examples/train_vae.py --dataset_name some/dataset --image_column image ...
    accelerate launch examples/train_vae.py ... --resume_from_checkpoint latest

`python examples/train_vae.py --help` lists every flag. The training itself is diffusers_custom_vae.training.train.
"""

from diffusers_custom_vae.training import parse_args, train


def main(argv=None):
    return train(parse_args(argv))


if __name__ == "__main__":
    main()
