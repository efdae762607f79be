"""What a training run learns. The trainer (`trainer.py`) owns accelerate, the loop, the optimiser and schedule of
`objective.model`, EMA, checkpoints, logging, metrics.json and the push; an `Objective` says which data, what one step
computes, how validation looks and what the output folder holds. `VAEObjective` learns a VAE from images."""

import inspect
import io
import json
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers import AutoencoderKL
from PIL import Image
from torch import nn

from ..data import load_data
from ..evaluation import common_crop, comparison_grid, evaluate_vae, reconstruct
from ..hub import render_model_card
from ..latents import estimate_scaling_factor
from ..loading import load_vae, vae_class
from ..losses import PatchDiscriminator, VAELoss
from ..metrics import psnr, ssim
from ..modeling_custom_vae import CustomVAE, CustomVAEOutput, downsample_factor_of
from ..presets import PRESETS
from .config import TrainConfig


class Objective:
    """What a run learns, as the trainer (`trainer.py`) calls it. Each objective's steps read alike: `load_data` gives
    the splits, `loss` one batch's loss, `validate` scores and image grids, `save` the output folder.

    - `name`: what a run of it is, in words ("distillation"), recorded in checkpoints; `output_patterns`: the names
      `save` writes, which a new run refuses to overwrite (class attributes: checked before the objective is built).
    - `model`: the module trained, averaged (EMA), validated and saved; `training_module()` is what accelerate wraps
      and the step calls (the model itself, or a wrapper whose `forward` makes the step's one call).
    - `load_data(accelerator) -> DataSplits`: `train` (a dataset with `set_epoch`), a fixed `validation` batch (a
      tensor or a dict of tensors) and what `save` evaluates on.
    - `prepare(accelerator, make_optimizer)`: wraps what else trains (a discriminator) and moves frozen helpers (a
      teacher, a VAE) to the device; returns {name: (wrapped module, optimiser)} for the trainer to step beside the
      model's and to checkpoint.
    - `loss(module, batch, step) -> (loss, terms)`: one batch. `module` is the wrapped `training_module()`; `loss` may
      include the helpers' losses (each touching only its own parameters), so one backward serves all; `terms` are
      detached tensors to log.
    - `validate(model, batch) -> (scores, grids)`: floats to log, and {name: image rows} to show.
    - `save(model, data, written, training) -> metrics`: the output folder's model, grid and model card (whose
      training paragraph is `training`, which ends with `description`), each written through `written`
      (`export.WrittenFiles`, whose record is what a push uploads); returns the held-out metrics.
    - `checkpoint_facts()`: JSON facts each checkpoint records (the trainer refuses to resume a checkpoint whose
      "objective" differs, naming its "resume_with"); `check_resume(facts, folder)` may refuse more; `model_source`:
      the flag the model's config comes from, which a refusal of another model config names.
    """

    name = "training run"
    output_patterns: tuple[str, ...] = ()
    model: nn.Module

    def training_module(self) -> nn.Module:
        return self.model

    def load_data(self, accelerator: Accelerator):
        raise NotImplementedError

    def prepare(self, accelerator: Accelerator, make_optimizer) -> dict[str, tuple[nn.Module, torch.optim.Optimizer]]:
        return {}

    def loss(self, module: nn.Module, batch, step: int) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def validate(self, model: nn.Module, batch) -> tuple[dict[str, float], dict[str, list[torch.Tensor]]]:
        raise NotImplementedError

    def save(self, model: nn.Module, data, written, training: str) -> dict[str, float]:
        raise NotImplementedError

    @property
    def description(self) -> str:
        """What is learned, in a clause for the model card's training paragraph."""
        return ""

    @property
    def model_source(self) -> str:
        """The flag the model's config comes from, for a refusal to resume to name ("": none to name)."""
        return ""

    def checkpoint_facts(self) -> dict:
        return {"objective": self.name, "resume_with": "the flags of the run that wrote it"}

    def check_resume(self, facts: dict, folder) -> None:
        pass


class VAEObjective(Objective):
    """A VAE (a `CustomVAE`, or diffusers' `AutoencoderKL`) learns to reconstruct images: `losses.VAELoss`, with an
    optional PatchGAN discriminator trained beside it. Its output folder is the VAE's (`save_pretrained`), with
    reconstructions.png and a model card; `finish`, `evaluate`, `comparison_grid`, `grid_caption` and
    `card_description` are the parts a subclass (`DistillationObjective`) changes."""

    name = "VAE training run"
    output_patterns = ("config.json", "diffusion_pytorch_model*", "modeling_custom_vae.py", "reconstructions.png")

    def __init__(self, config: TrainConfig):
        self.model = build_vae(config)
        self.config = config

    def load_data(self, accelerator):
        return load_data(**self.config.arguments_for(load_data), downsample_factor=downsample_factor_of(self.model))

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
        reconstruction = reconstruct(model, images)  # the posterior's mode: no RNG is drawn
        scores = {"psnr": psnr(reconstruction, images).item(), "ssim": ssim(reconstruction, images).item()}
        return scores, {"reconstructions": [images, reconstruction]}

    def save(self, model, data, written, training):
        self.finish(model, data)  # e.g. the scaling factor, before the config is saved
        written.save_model(model)  # first: whatever fails later, the trained model is safe
        metrics = self.evaluate(model, data)
        grid_images = common_crop(data.test, multiple=downsample_factor_of(model))
        written.write("reconstructions.png", png_bytes(self.comparison_grid(model, grid_images)))
        card = render_model_card(
            model,
            repo_id=self.config.hub_model_id,
            metrics=metrics,
            metrics_split=data.test_description,
            grid_image="reconstructions.png",
            grid_caption=self.grid_caption,
            description=self.card_description(metrics),
            datasets=data.dataset_ids or None,
            training=training,
            credits=data.credits,
        )
        written.write("README.md", str(card).encode())
        return metrics

    def finish(self, model, data):
        """Sets what the saved config records (the scaling factor) before saving. A trained encoder has latents of
        its own: a new scaling factor, which gives up any claim to the space it started in (a distilled student's
        `latent_space`). A frozen encoder keeps both."""
        if not self.config.train_decoder_only:
            batches = _training_batches(data.train, self.config.train_batch_size)
            estimate_scaling_factor(model, batches, register=True)

    def evaluate(self, model, data):
        return evaluate_vae(model, data.test, desc="held-out metrics")

    def comparison_grid(self, model, images):
        return comparison_grid([model], images)

    grid_caption = "Originals (top) and reconstructions (bottom)"

    def card_description(self, metrics: dict) -> str | None:
        """A paragraph for the model card, under its first lines (`None`: none)."""
        return None

    def checkpoint_facts(self) -> dict:
        return {"objective": self.name, "resume_with": "examples/train_vae.py, without --teacher_vae"}

    @property
    def model_source(self) -> str:
        if self.config.pretrained_model_name_or_path:
            return f"--pretrained_model_name_or_path {self.config.pretrained_model_name_or_path}"
        return f"--model_config {self.config.model_config or 'tutorial'}"

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


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


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
