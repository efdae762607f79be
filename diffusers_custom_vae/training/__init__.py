"""Training with accelerate, from one CPU to many GPUs: `train(TrainConfig(...), VAEObjective)` is the whole job, and
`examples/train_vae.py` its command line.

- `config.py`: the run's settings (the command line's flags): `RunConfig` (every run's), `TrainConfig` (a VAE's),
  `LatentDiffusionConfig` (a DiT's).
- `trainer.py`: the machinery, whatever is learned: accelerate, the loop, stops, logging, validation, checkpoints.
- `objectives.py`: what is learned: `Objective` (the interface), `VAEObjective` (a VAE from images).
- `distillation.py`: `DistillationObjective`, a student learning a teacher VAE's latent space (`teacher_vae`).
- `latent_diffusion.py`: `LatentDiffusionObjective`, a class-conditional DiT in a VAE's latent space, saved as a
  `DiTPipeline` (`LatentDiffusionConfig`).
- `checkpoints.py`: resumable checkpoint folders, never unpickled. `export.py`: the output folder and the push.
"""

from .checkpoints import checkpoint_steps
from .config import LatentDiffusionConfig, RunConfig, TrainConfig
from .distillation import DistillationObjective
from .latent_diffusion import LatentDiffusionObjective
from .objectives import Objective, VAEObjective
from .trainer import Trainer, train

__all__ = [
    "DistillationObjective",
    "LatentDiffusionConfig",
    "LatentDiffusionObjective",
    "Objective",
    "RunConfig",
    "TrainConfig",
    "Trainer",
    "VAEObjective",
    "checkpoint_steps",
    "train",
]
