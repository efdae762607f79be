"""Benchmarks of `CustomVAE`, run from the repository root as modules:

    python -m benchmarks.benchmark_vae       # CustomVAE vs the tutorial's VAE vs AutoencoderKL: speed and memory
    python -m benchmarks.benchmark_training  # the main job: CustomVAE vs AutoencoderKL, same trainer, same budget
    python -m benchmarks.benchmark_distillation  # students in a teacher's latent space: fidelity, decode speed
    python -m benchmarks.benchmark_latent_diffusion  # DiTs: the latent cache; which latent space diffuses better

Each saves its results in benchmarks/results/, from which `render.py` writes BENCHMARKS.md; `measure.py` is how they
time and measure memory, `models.py` builds the AutoencoderKL they compare against, and `tutorial.py` is the
tutorial's own VAE (the reference that tests and benchmarks hold `CustomVAE` against). Not part of the installed
package.
"""
