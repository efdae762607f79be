"""Named `CustomVAE` configs, for `--model_config NAME` and `CustomVAE(**PRESETS[NAME])`.

- "tutorial": the default, the tutorial's widths (32, 64, 128, 128): 3.5 M parameters, 1.8 M of them decoding.
- "small": half the channels at full resolution and below: 0.45 M decoding parameters. A distillation student for
  speed: on a 2-core CPU it decoded 512x512 25x faster than Stable Diffusion's VAE architecture (the default
  CustomVAE: 9.4x), as close to its teacher (BENCHMARKS.md); `python -m benchmarks.benchmark_distillation` measures
  both on your machine.
"""

PRESETS: dict[str, dict] = {
    "tutorial": {},
    "small": {"block_out_channels": [16, 32, 64, 64], "norm_num_groups": 16},
}
