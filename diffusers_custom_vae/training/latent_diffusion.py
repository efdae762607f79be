"""Latent diffusion: a class-conditional DiT learns to denoise a trained VAE's latents, and the run ends in a stock
diffusers `DiTPipeline` folder.

The recipe of DiT: the data is encoded once (`latent_cache.cache_latents`: posterior mean and std), and a step
samples z = (mean + std * noise - shift_factor) * scaling_factor, so it never runs the VAE; DDPM with linear betas
1e-4 to 0.02 over 1000 steps, epsilon prediction, labels replaced by the null label with `class_dropout_prob` for
classifier-free guidance. `DiTPipeline` hard-codes the null label at index 1000, so the DiT has 1001 label rows
whatever the number of classes, and it divides latents by `scaling_factor` only, so a VAE with a `shift_factor` is
refused. Latents are not bounded to [-1, 1]: the saved scheduler never clips samples.
"""

import dataclasses
import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DiTPipeline, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from huggingface_hub import ModelCard, ModelCardData

from ..data import load_data
from ..fid import frechet_distance
from ..hub import _template_path
from ..images import image_grid
from ..latent_cache import cache_latents
from ..latent_spaces import describe_latent_space
from ..loading import load_vae
from ..modeling_custom_vae import downsample_factor_of
from ..pipelines import save_pipeline
from .config import LatentDiffusionConfig
from .objectives import Objective, png_bytes

logger = logging.getLogger(__name__)

NULL_LABEL = 1000  # DiTPipeline's unconditional label, hard-coded there
# The DiT paper's widths (hidden size = heads * head dim), and a tiny one for tests and CPUs; patch size 2.
DIT_PRESETS = {
    "tiny": dict(num_layers=6, num_attention_heads=4, attention_head_dim=32),
    "S/2": dict(num_layers=12, num_attention_heads=6, attention_head_dim=64),
    "B/2": dict(num_layers=12, num_attention_heads=12, attention_head_dim=64),
}
# DDPM as in DiT: linear betas over 1000 steps, epsilon prediction; never clip (latents are not in [-1, 1]).
NOISE_SCHEDULE = dict(
    num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, clip_sample=False
)
VALIDATION_TIMESTEPS = 8  # each held-out latent is noised at this many fixed timesteps for the held-out loss
SAMPLES_PER_CLASS, MAX_CLASSES_SHOWN = 4, 8


class LatentDiffusionObjective(Objective):
    """A `DiTTransformer2DModel` learns to denoise the latents of `config.vae` (frozen, never wrapped, float32). Each
    step, on a batch of cached posteriors {"mean", "std", "label"}:

        z = (mean + std * noise - shift) * scaling;  z_t = sqrt(a_t) z + sqrt(1 - a_t) eps,  t ~ U{0..999}
        loss = |DiT(z_t, t, label or the null label with class_dropout_prob) - eps|^2
    """

    name = "latent diffusion"
    output_patterns = ("model_index.json", "transformer", "vae", "scheduler", "samples.png")

    def __init__(self, config: LatentDiffusionConfig):
        self.config = config
        self.vae = load_frozen_vae(config)
        self.factor = downsample_factor_of(self.vae)
        self.scaling_factor = self.vae.config.scaling_factor
        self.model = build_dit(config, self.vae)
        self.noise_scheduler = DDPMScheduler(**NOISE_SCHEDULE)

    def load_data(self, accelerator):
        config = self.config
        arguments = config.arguments_for(load_data) | {"random_flip": False}  # the cache encodes the flips
        splits = load_data(**arguments, downsample_factor=self.factor, class_labels=True)
        if len(splits.class_names) > NULL_LABEL:
            raise ValueError(f"The data has {len(splits.class_names)} classes; a DiTPipeline holds at most 1000.")
        self.class_names = splits.class_names or ["image"]  # no classes: one (every label 0), unconditional
        self.vae.to(accelerator.device)
        train = cache_latents(
            self.vae,
            splits.train,
            random_flip=config.random_flip,
            cache_dir=config.cache_dir,
            device=accelerator.device,
        )
        self.report_scale(train.scaled_std(self.scaling_factor, None))
        size = config.resolution[0]
        held_out = (
            f"the validation batch: {len(splits.validation)} crops of {size}x{size} from {len(splits.test)} held-out "
            "images"
        )
        self.held_out_images = splits.validation  # (N, 3, size, size) in [-1, 1]: FID's references
        return dataclasses.replace(
            splits, train=train, validation=self.validation_batch(splits), test_description=held_out
        )

    def report_scale(self, std: float):
        """The scaled latents' standard deviation on the data: diffusion assumes about 1."""
        self.latent_std = std
        message = f"Scaled latents of the training data: std {std:.3f} (scaling_factor {self.scaling_factor:.5g})."
        if not 0.5 <= std <= 2:
            message += (
                f" Far from 1: the noise schedule assumes unit variance. Give the VAE scaling_factor "
                f"{self.scaling_factor / std:.5g} (e.g. `latents.estimate_scaling_factor`) and train again."
            )
            logger.warning(message)
        else:
            print(message)

    @torch.no_grad()
    def validation_batch(self, splits) -> dict[str, torch.Tensor]:
        """The held-out latents, each noised at `VALIDATION_TIMESTEPS` timesteps spread over the schedule, with
        noise fixed by the seed: the held-out loss is one deterministic number."""
        images = splits.validation.to(self.vae.device)
        posterior = self.vae.encode(images).latent_dist
        generator = torch.Generator().manual_seed(self.config.seed)
        count = len(images) * VALIDATION_TIMESTEPS
        latents = posterior.mean.float().cpu().repeat(VALIDATION_TIMESTEPS, 1, 1, 1) * self.scaling_factor
        labels = torch.as_tensor(splits.validation_labels).repeat(VALIDATION_TIMESTEPS)
        return {
            "latents": latents,
            "labels": labels,
            "noise": torch.randn(latents.shape, generator=generator),
            "timesteps": torch.linspace(0, NOISE_SCHEDULE["num_train_timesteps"] - 1, count).round().long(),
        }

    def loss(self, module, batch, step):
        mean, std, labels = batch["mean"], batch["std"], batch["label"]
        latents = (mean + std * torch.randn_like(std)) * self.scaling_factor  # the global RNG: checkpointed
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, len(self.noise_scheduler.timesteps), (len(latents),), device=latents.device)
        dropped = torch.rand(len(labels), device=labels.device) < self.config.class_dropout_prob
        labels = torch.where(dropped, NULL_LABEL, labels)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        prediction = module(noisy, timestep=timesteps, class_labels=labels).sample  # the wrapped forward
        loss = F.mse_loss(prediction.float(), noise.float())
        return loss, {"mse": loss.detach()}

    @torch.no_grad()
    def held_out_loss(self, model, batch) -> float:
        batch = {name: tensor.to(model.device) for name, tensor in batch.items()}
        noisy = self.noise_scheduler.add_noise(batch["latents"], batch["noise"], batch["timesteps"])
        prediction = model(noisy, timestep=batch["timesteps"], class_labels=batch["labels"]).sample
        return F.mse_loss(prediction.float(), batch["noise"].float()).item()

    def pipeline(self, model) -> DiTPipeline:
        """The `DiTPipeline` of `model` and the VAE, with a DDIM scheduler that never clips."""
        pipe = DiTPipeline(
            transformer=model,
            vae=self.vae,
            scheduler=DDIMScheduler(**NOISE_SCHEDULE),
            id2label=dict(enumerate(self.class_names)),
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe

    @torch.no_grad()
    def samples(self, model) -> list[torch.Tensor]:
        """One row per class (the first `MAX_CLASSES_SHOWN`), `SAMPLES_PER_CLASS` samples each, from fixed seeds
        (their own generator: the global RNG is untouched)."""
        pipe, rows = self.pipeline(model), []
        for label in range(min(len(self.class_names), MAX_CLASSES_SHOWN)):
            generator = torch.Generator(model.device).manual_seed(self.config.seed + label)
            images = pipe(
                [label] * SAMPLES_PER_CLASS,
                guidance_scale=self.config.guidance_scale,
                num_inference_steps=self.config.num_inference_steps,
                generator=generator,
                output_type="pt",
            ).images
            rows.append(images.float() * 2 - 1)  # image_grid takes [-1, 1]
        return rows

    def validate(self, model, batch):
        return {"held_out_loss": self.held_out_loss(model, batch)}, {"samples": self.samples(model)}

    def save(self, model, data, written, training):
        """A DiTPipeline folder (`save_pipeline`: `DiTPipeline.from_pretrained` loads it once the package is imported,
        and with `trust_remote_code=True` where it is not installed), `id2label` in model_index.json; samples.png and
        the model card."""
        written.save_with(lambda folder: save_pipeline(self.pipeline(model), folder))
        index = json.loads((written.folder / "model_index.json").read_text())
        index["id2label"] = {str(label): name for label, name in enumerate(self.class_names)}
        written.write("model_index.json", (json.dumps(index, indent=2, sort_keys=True) + "\n").encode())
        samples = self.samples(model)
        fid, fid_line = frechet_distance(samples, self.held_out_images)  # (None, why) where it cannot be computed
        print(fid_line)
        metrics = {"held_out_loss": self.held_out_loss(model, data.validation), "latent_std": self.latent_std}
        metrics |= {"fid": fid, "fid_note": fid_line}
        written.write("samples.png", png_bytes(image_grid(samples)))
        written.write("README.md", str(self.model_card(model, metrics, data, training)).encode())
        return metrics

    def model_card(self, model, metrics: dict, data, training: str) -> ModelCard:
        config = self.config
        card_data = ModelCardData(
            library_name="diffusers",
            license="apache-2.0",
            tags=["diffusers", "diffusers_custom_vae", "DiTPipeline", "class-conditional", "latent-diffusion"],
            datasets=data.dataset_ids or None,
        )
        return ModelCard.from_template(
            card_data,
            template_path=str(_template_path("latent_diffusion.md")),
            title=config.hub_model_id.split("/")[-1] if config.hub_model_id else Path(config.output_dir).name,
            repo_id=config.hub_model_id or "path/to/this/folder",
            classes=self.class_names,
            example_classes=self.class_names[:2],
            parameters=f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M",
            model_config=config.model_config,
            vae=vae_source(config),
            vae_class=type(self.vae).__name__,
            latent_space=describe_latent_space(self.vae),
            latent_shape=f"{model.config.in_channels}x{model.config.sample_size}x{model.config.sample_size}",
            scaling_factor=f"{self.scaling_factor:.5g}",
            latent_std=f"{metrics['latent_std']:.3f}",
            held_out_loss=f"{metrics['held_out_loss']:.4f}",
            fid_note=metrics["fid_note"],
            metrics_split=data.test_description,
            guidance_scale=config.guidance_scale,
            num_inference_steps=config.num_inference_steps,
            training=training,
            credits=data.credits,
        )

    @property
    def description(self) -> str:
        return (
            f"a DiT ({self.config.model_config}) denoising the latents of `{vae_source(self.config)}` (DDPM, epsilon "
            f"prediction, label dropout {self.config.class_dropout_prob})"
        )

    def checkpoint_facts(self) -> dict:
        return {"objective": self.name, "resume_with": f"its VAE, --vae {vae_source(self.config)}"}

    @property
    def model_source(self) -> str:
        return f"--model_config {self.config.model_config}"


def vae_source(config: LatentDiffusionConfig) -> str:
    return "/".join(part for part in (config.vae, config.vae_subfolder) if part)


def load_frozen_vae(config: LatentDiffusionConfig):
    """`config.vae`, loaded as strictly as every VAE here (`loading.load_vae`), in float32, frozen, in eval mode;
    refused when DiTPipeline could not decode its latents (a `shift_factor`) or the resolution does not fit it."""
    kwargs = {"subfolder": config.vae_subfolder} if config.vae_subfolder else {}
    vae = load_vae(config.vae, cache_dir=config.cache_dir, torch_dtype=torch.float32, **kwargs)
    if vae.config.get("shift_factor"):
        raise ValueError(
            f"--vae {vae_source(config)} has shift_factor {vae.config.shift_factor}, which DiTPipeline ignores when "
            "it decodes (it divides latents by scaling_factor only): its samples would be shifted. Use a VAE without "
            "one."
        )
    factor = downsample_factor_of(vae)
    if config.resolution[0] % factor:
        raise ValueError(
            f"--resolution {config.resolution[0]} is not a multiple of the VAE's downsampling factor {factor}."
        )
    return vae.requires_grad_(False).eval()


def dit_config(config: LatentDiffusionConfig, vae) -> dict:
    """The DiT's config: a preset's or a JSON file's, with the VAE's latent channels and size, 1000 label rows
    (plus the null label) and epsilon prediction only (out_channels = in_channels)."""
    if config.model_config in DIT_PRESETS:
        arguments = dict(DIT_PRESETS[config.model_config])
    else:
        try:
            arguments = json.loads(Path(config.model_config).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(
                f"--model_config {config.model_config!r} is neither a preset ({', '.join(DIT_PRESETS)}) nor a "
                f"readable JSON file: {error}"
            ) from error
        if not isinstance(arguments, dict):
            raise ValueError(f"--model_config {config.model_config!r} must hold a JSON object of DiT arguments.")
    arguments = {key: value for key, value in arguments.items() if not key.startswith("_")}
    latent_channels, latent_size = vae.config.latent_channels, config.resolution[0] // downsample_factor_of(vae)
    for key, expected in (("in_channels", latent_channels), ("sample_size", latent_size)):
        if arguments.get(key, expected) != expected:
            raise ValueError(
                f"--model_config {config.model_config!r} has {key} {arguments[key]}, but the VAE's latents at "
                f"--resolution {config.resolution[0]} have {key} {expected}."
            )
    if arguments.get("num_embeds_ada_norm", NULL_LABEL) != NULL_LABEL:
        raise ValueError(
            f"--model_config: num_embeds_ada_norm must be {NULL_LABEL}, where DiTPipeline's null label is."
        )
    patch_size = arguments.setdefault("patch_size", 2)
    if latent_size % patch_size:
        raise ValueError(f"The latents' size {latent_size} is not a multiple of the DiT's patch_size {patch_size}.")
    return arguments | dict(
        in_channels=latent_channels,
        out_channels=latent_channels,
        sample_size=latent_size,
        num_embeds_ada_norm=NULL_LABEL,
        norm_type="ada_norm_zero",
    )


def build_dit(config: LatentDiffusionConfig, vae) -> DiTTransformer2DModel:
    """A new DiT for `vae`'s latents (`dit_config`), in training mode. The label dropout is the objective's, once per
    sample: diffusers' DiT would otherwise drop labels in every block independently."""
    try:
        model = DiTTransformer2DModel(**dit_config(config, vae))
    except TypeError as error:
        raise ValueError(f"--model_config {config.model_config!r}: {error}") from error
    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return model.train()
