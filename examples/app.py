"""A demo app in the browser: reconstruct, compare VAEs, interpolate in latent space, and generate.

    pip install -e ".[app]"
    python examples/app.py --vae outputs/custom-vae --vae user/sd-tiny-vae --pipeline pets-dit --port 7860

Then open http://127.0.0.1:7860. `--vae` is a folder or Hub id (CustomVAE or AutoencoderKL), repeatable: the first
is the main one. `--pipeline` is a folder written by examples/train_latent_diffusion.py (the Generate tab).
"""

import argparse

from diffusers_custom_vae.cli import one_line_errors


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vae", action="append", required=True, help="a VAE folder or Hub id; repeat to compare")
    parser.add_argument("--pipeline", default=None, help="a class-conditional pipeline folder or Hub id (Generate)")
    parser.add_argument("--host", default="127.0.0.1", help="the address to serve on (0.0.0.0: every interface)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    parser.add_argument("--max_image_side", type=int, default=2048, help="larger images are refused (memory)")
    args = parser.parse_args(argv)
    with one_line_errors(parser):
        from diffusers_custom_vae.app import build_demo

        demo = build_demo(args.vae, pipeline=args.pipeline, max_image_side=args.max_image_side)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share)


if __name__ == "__main__":
    main()
