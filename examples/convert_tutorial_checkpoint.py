"""Turn a state_dict saved from the tutorial's VAE classes into a `save_pretrained` folder.

    python examples/convert_tutorial_checkpoint.py tutorial_vae.pt dog-vae [--scaling_factor 0.2]

The file is read with torch.load(weights_only=True): a checkpoint holding pickled objects is refused, never executed.
"""

import argparse

from diffusers_custom_vae import convert_tutorial_checkpoint


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a .pt/.pth file saved with torch.save(model.state_dict(), ...)")
    parser.add_argument("output_dir", help="the folder to write (config.json + safetensors weights)")
    parser.add_argument("--scaling_factor", type=float, default=None, help="record this latent scaling factor")
    args = parser.parse_args(argv)
    config = {} if args.scaling_factor is None else {"scaling_factor": args.scaling_factor}
    try:  # the library refuses a bad output folder first, and writes only once everything checked out
        vae = convert_tutorial_checkpoint(args.checkpoint, args.output_dir, **config)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    parameters = sum(p.numel() for p in vae.parameters())
    print(
        f"Wrote {args.output_dir}: CustomVAE with {parameters / 1e6:.2f}M parameters. Load it with "
        f"CustomVAE.from_pretrained({args.output_dir!r})."
    )


if __name__ == "__main__":
    main()
