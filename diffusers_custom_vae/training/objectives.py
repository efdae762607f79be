"""What a training run learns. The trainer (`trainer.py`) owns accelerate, the data, the optimiser and schedule of
`objective.model`, EMA, checkpoints, logging and the output folder; an `Objective` says what one step computes, how
validation looks and what the saved model records. `VAEObjective` learns a VAE from images."""

import inspect
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from PIL import Image
from torch import nn

from ..evaluation import comparison_grid, evaluate_vae
from ..latents import estimate_scaling_factor
from ..loading import load_vae, vae_class
from ..losses import PatchDiscriminator, VAELoss
from ..metrics import psnr, ssim
from ..modeling_custom_vae import CustomVAE, CustomVAEOutput
from ..presets import PRESETS
from .config import TrainConfig


class Objective:
    """The interface the trainer calls, in this order:

    - `model`: the module trained, averaged (EMA), validated and saved; `training_module()` is what accelerate wraps
      and the step calls (the model itself, or a wrapper whose `forward` makes the step's one call).
    - `prepare(accelerator, make_optimizer)`: wraps what else trains (a discriminator) and moves frozen helpers (a
      teacher) to the device; returns {name: (wrapped module, optimiser)} for the trainer to step beside the model's
      and to checkpoint.
    - `loss(module, images, step) -> (loss, terms)`: one batch. `module` is the wrapped `training_module()`; `loss` may
      include the helpers' losses (each touching only its own parameters), so one backward serves all; `terms` are
      detached tensors to log.
    - `validate(model, images) -> (scores, rows)`: floats to log, and image rows (originals first) for a grid.
    - `finish(model, data, config)`: sets what the saved config records (scaling factor...) before saving.
    - `evaluate(model, data) -> metrics` and `comparison_grid(model, images) -> image` for the output folder.
    """

    model: nn.Module

    def training_module(self) -> nn.Module:
        return self.model

    def prepare(self, accelerator: Accelerator, make_optimizer) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
        return {}

    def loss(self, module: nn.Module, images: torch.Tensor, step: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def validate(self, model: nn.Module, images: torch.Tensor) -> tuple[dict[str, float], list[torch.Tensor]]:
        raise NotImplementedError

    def finish(self, model: nn.Module, data, config: TrainConfig) -> None:
        pass

    def evaluate(self, model: nn.Module, data) -> dict[str, float]:
        raise NotImplementedError

    def comparison_grid(self, model: nn.Module, images: torch.Tensor) -> Image.Image:
        raise NotImplementedError

    @property
    def description(self) -> str:
        """What is learned, in a clause for the model card."""
        return ""

    grid_caption = "Originals (top) and reconstructions (bottom)"

    def card_description(self, metrics: dict) -> str | None:
        """A paragraph for the model card, under its first lines (`None`: none)."""
        return None

    def checkpoint_facts(self) -> dict:
        """JSON facts a checkpoint records beside the run's position (e.g. where a teacher came from)."""
        return {}

    def check_resume(self, facts: dict, folder) -> None:
        """Raises `ValueError` when the checkpoint at `folder` (its recorded facts) cannot be resumed with this
        objective: here, a distillation's checkpoint resumed without its teacher."""
        if facts.get("teacher_vae"):
            flags = (facts["teacher_vae"], facts.get("teacher_vae_subfolder"))
            teacher = " --teacher_vae_subfolder ".join(filter(None, flags))
            raise ValueError(f"{folder} is a distillation: resume it with its teacher, --teacher_vae {teacher}.")


class VAEObjective(Objective):
    """A VAE (a `CustomVAE`, or diffusers' `AutoencoderKL`) learns to reconstruct images: `losses.VAELoss`, with an
    optional PatchGAN discriminator trained beside it."""

    def __init__(self, config: TrainConfig):
        self.model = build_vae(config)
        self.config = config

    def training_module(self) -> nn.Module:
        return self.model if isinstance(self.model, CustomVAE) else WithPosterior(self.model)

    def prepare(self, accelerator, make_optimizer):
        helpers = {}
        if self.config.disc_scale > 0:
            discriminator = PatchDiscriminator()
            helpers["discriminator"] = accelerator.prepare(discriminator, make_optimizer(discriminator.parameters()))
        discriminator = helpers["discriminator"][0] if helpers else None
        self.loss_fn = VAELoss(**self.config.arguments_for(VAELoss), discriminator=discriminator)
        self.loss_fn.to(accelerator.device)
        return helpers

    def loss(self, module, images, step):
        output = module(images, sample_posterior=True, return_posterior=True)  # the wrapped forward: replicas sync
        loss, terms = self.loss_fn.generator_loss(output, images, step, self.model.decoder.conv_out.weight)
        if self.loss_fn.adversarial_active(step):
            d_loss, d_terms = self.loss_fn.discriminator_loss(images, output.sample)
            loss, terms = loss + d_loss, terms | d_terms
        return loss, terms

    def validate(self, model, images):
        reconstruction = model(images).sample.clamp(-1, 1)  # the posterior's mode: no RNG is drawn
        scores = {"psnr": psnr(reconstruction, images).item(), "ssim": ssim(reconstruction, images).item()}
        return scores, [images, reconstruction]

    def finish(self, model, data, config):
        # A trained encoder has latents of its own: a new scaling factor, which gives up any claim to the space it
        # started in (a distilled student's `latent_space`). A frozen encoder keeps both.
        if not config.train_decoder_only:
            estimate_scaling_factor(model, _training_batches(data.train, config.train_batch_size), register=True)

    def evaluate(self, model, data):
        return evaluate_vae(model, data.test, desc="held-out metrics")

    def comparison_grid(self, model, images):
        return comparison_grid([model], images)

    @property
    def description(self) -> str:
        config = self.config
        return f"{config.rec_loss} reconstruction loss, KL weight {config.kl_scale}{other_terms(config)}"


class WithPosterior(nn.Module):
    """Lets the training step call a diffusers `AutoencoderKL` as it calls a `CustomVAE`: its own `forward` returns
    only the reconstruction, and the loss needs the posterior too."""

    def __init__(self, vae: AutoencoderKL):
        super().__init__()
        self.vae = vae

    def forward(self, images: torch.Tensor, sample_posterior: bool = False, return_posterior: bool = False):
        posterior = self.vae.encode(images).latent_dist
        latents = posterior.sample() if sample_posterior else posterior.mode()
        return CustomVAEOutput(sample=self.vae.decode(latents).sample, latent_dist=posterior)


def other_terms(config: TrainConfig) -> str:
    """The optional loss terms that are on, for the model card: ", MS-SSIM 0.2, PatchGAN 0.5 from step 1000"."""
    return (
        f"{f', MS-SSIM {config.ms_ssim_scale}' if config.ms_ssim_scale else ''}"
        f"{f', LPIPS {config.perceptual_scale}' if config.perceptual_scale else ''}"
        f"{f', PatchGAN {config.disc_scale} from step {config.disc_start}' if config.disc_scale else ''}"
    )


def build_vae(config: TrainConfig, default=CustomVAE) -> CustomVAE | AutoencoderKL:
    """A new model from `model_config` (a CustomVAE config, or any config whose `_class_name` is AutoencoderKL), the
    weights of `pretrained_model_name_or_path`, or `default()` (the tutorial's CustomVAE); in training mode, with the
    encoder frozen for `train_decoder_only`."""
    if config.pretrained_model_name_or_path:
        vae = load_vae(config.pretrained_model_name_or_path, cache_dir=config.cache_dir)
    elif config.model_config:
        model_class, model_config = read_model_config(config.model_config)
        vae = model_class.from_config(model_config)
    else:
        vae = default()
    if config.train_decoder_only:  # the encoder side, AutoencoderKL's quant_conv included, keeps the latent space
        for part in (vae.encoder, getattr(vae, "quant_conv", None)):
            if part is not None:
                part.requires_grad_(False)
    if config.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    return vae.train()


def preset_config(name: str) -> dict | None:
    """The CustomVAE config of a preset's name (`presets.PRESETS`), or `None` when `name` is not one (or a file of
    that name exists: files win)."""
    return dict(PRESETS[name]) if name in PRESETS and not Path(name).exists() else None


def read_model_config(path: str) -> tuple[type, dict]:
    """(class, config) of a `--model_config`: a preset's name (`presets.PRESETS`: "tutorial", "small"), or a JSON
    file of an object whose keys are the class's config arguments (plus what diffusers writes beside them:
    `_class_name`, `_diffusers_version`, `auto_map`...), so a saved model's config.json works. A misspelled key is an
    error, not silently dropped."""
    if preset_config(path) is not None:
        return CustomVAE, preset_config(path)
    try:
        model_config = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"Cannot read --model_config {path!r}: {error}") from error
    if not isinstance(model_config, dict):
        raise ValueError(
            f"--model_config {path!r} must hold a JSON object of config arguments, e.g. "
            f'{{"block_out_channels": [32, 64, 128, 128]}}; it holds a {type(model_config).__name__}.'
        )
    model_class = vae_class(model_config, path)
    known = set(inspect.signature(model_class.__init__).parameters) - {"self"}
    unknown = sorted(key for key in model_config if key not in known and not key.startswith("_") and key != "auto_map")
    if unknown:
        raise ValueError(
            f"--model_config {path!r} has keys {model_class.__name__} does not take: {', '.join(unknown)}. "
            f"Its config arguments are {', '.join(sorted(known))}."
        )
    return model_class, model_config


def _training_batches(dataset, batch_size: int, count: int = 16):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for index, images in enumerate(loader):
        if index == count:
            return
        yield images
