"""Distillation: a student `CustomVAE` learns a teacher VAE's latent space, so that a pipeline made for the teacher
(a pretrained Stable Diffusion UNet, for the SD VAE) gets its images from the student, faster.

As TAESD was made: the student's encoder regresses onto the teacher's latents; its decoder learns to turn the
teacher's latents into the images, with a VAE's reconstruction, MS-SSIM, perceptual and adversarial terms, and
optionally to match the teacher's own decode. The teacher is frozen and never wrapped for data parallelism; the
saved student keeps the teacher's `scaling_factor` and `shift_factor`, and names its latent space.
"""

import dataclasses
import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from ..evaluation import evaluate_distillation
from ..images import image_grid
from ..latent_spaces import describe_latent_space, latent_space_identity, shares_latent_space
from ..loading import load_vae
from ..losses import AdversarialLoss, PatchDiscriminator, ReconstructionLoss
from ..metrics import psnr
from ..modeling_custom_vae import CustomVAE, downsample_factor_of
from .config import TrainConfig, local_path
from .objectives import VAEObjective, build_vae, other_terms, preset_config


class DistillationObjective(VAEObjective):
    """A student (the default `CustomVAE` with the teacher's latent channels, or `--model_config` /
    `--pretrained_model_name_or_path`) distilled from `--teacher_vae`. Each step:

        teacher posterior of the images  ->  latents sampled from it (what a UNet's latents vary like)
        student(images, latents)         ->  student posterior, student decode of those latents
        loss = latent_scale * (|mean_s - mean_t|^2 + |std_s - std_t|^2)   (scaled as a UNet sees latents)
             + reconstruction(decode, images) [+ teacher_decode_scale * |decode - teacher decode|]  (the "nll")
             + adaptive_weight * g_adv [+ the discriminator's hinge loss]
    """

    name = "distillation"

    def __init__(self, config: TrainConfig):
        self.config = config
        self.teacher = load_teacher(config)
        self.model = build_student(config, self.teacher)
        self.scaling_factor = self.teacher.config.scaling_factor

    def training_module(self) -> nn.Module:
        return StudentForward(self.model)

    def prepare(self, accelerator, make_optimizer):
        self.teacher.to(accelerator.device)  # each process its own frozen copy: no data-parallel wrapper
        # A force_upcast teacher (SD's VAE overflows in float16) runs in float32 whatever the mixed precision.
        self.teacher_precision = (
            (lambda: torch.autocast(accelerator.device.type, enabled=False))
            if self.teacher.config.get("force_upcast", False)
            else accelerator.autocast
        )
        config, helpers = self.config, {}
        self.reconstruction = ReconstructionLoss(config.rec_loss, config.ms_ssim_scale, config.perceptual_scale)
        self.reconstruction.to(accelerator.device)
        self.adversarial = None
        if config.disc_scale > 0:
            discriminator = PatchDiscriminator()
            helpers["discriminator"] = accelerator.prepare(discriminator, make_optimizer(discriminator.parameters()))
            self.adversarial = AdversarialLoss(helpers["discriminator"][0], config.disc_scale, config.disc_start)
        return helpers

    @torch.no_grad()
    def teacher_targets(self, images: torch.Tensor):
        """The teacher's posterior of `images`, latents sampled from it, and (when matched) its decode of them."""
        with self.teacher_precision():
            posterior = self.teacher.encode(images.to(self.teacher.dtype)).latent_dist
            latents = posterior.sample()  # the global RNG: checkpointed, so a resumed run draws the same
            decode = self.teacher.decode(latents).sample.float() if self.config.teacher_decode_scale > 0 else None
        return posterior, latents.float(), decode

    def loss(self, module, images, step):
        config = self.config
        teacher_posterior, latents, teacher_decode = self.teacher_targets(images)
        student_posterior, decode = module(images, latents)  # the wrapped forward: one call, replicas stay in sync
        scale = self.scaling_factor
        terms = {
            "latent_mean": F.mse_loss(student_posterior.mean.float() * scale, teacher_posterior.mean.float() * scale),
            "latent_std": F.mse_loss(student_posterior.std.float() * scale, teacher_posterior.std.float() * scale),
        }
        nll, reconstruction_terms = self.reconstruction(decode, images)
        terms |= reconstruction_terms
        if teacher_decode is not None:
            terms["teacher_decode"] = F.l1_loss(decode.float(), teacher_decode)
            nll = nll + config.teacher_decode_scale * terms["teacher_decode"]
        loss = nll + config.latent_scale * (terms["latent_mean"] + terms["latent_std"])
        if self.adversarial is not None:
            last_layer = self.model.decoder.conv_out.weight
            adversarial, adversarial_terms = self.adversarial.generator_loss(nll, decode, last_layer, step)
            loss, terms = loss + adversarial, terms | adversarial_terms
            if self.adversarial.active(step):
                d_loss, d_terms = self.adversarial.discriminator_loss(images, decode)
                loss, terms = loss + d_loss, terms | d_terms
        return loss, {name: value.detach() for name, value in terms.items()}

    @torch.no_grad()
    def decodes(self, model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's and the student's decodes of the teacher's latents (posterior modes) of `images`."""
        with self.teacher_precision():
            latents = self.teacher.encode(images.to(self.teacher.device, self.teacher.dtype)).latent_dist.mode()
            teacher_decode = self.teacher.decode(latents).sample
        student_decode = model.decode(latents.to(model.device, model.dtype)).sample
        return teacher_decode.float().clamp(-1, 1), student_decode.float().clamp(-1, 1)

    def validate(self, model, images):
        teacher_decode, student_decode = self.decodes(model, images)
        scores = {
            "psnr": psnr(student_decode, images).item(),
            "teacher_psnr": psnr(teacher_decode, images).item(),
            "student_vs_teacher_psnr": psnr(student_decode, teacher_decode).item(),
        }
        return scores, {"reconstructions": [images, teacher_decode, student_decode]}  # originals, teacher, student

    def finish(self, model, data):
        """The student keeps the teacher's scaling and shift factors (pipelines scale its latents as the teacher's)
        and names the teacher's latent space, or records the teacher's encoder fingerprint when it has no name."""
        model.register_to_config(
            scaling_factor=self.teacher.config.scaling_factor,
            shift_factor=self.teacher.config.get("shift_factor"),
            latent_space=latent_space_identity(self.teacher),
        )

    def evaluate(self, model, data):
        return evaluate_distillation(model, self.teacher, data.test, desc="held-out distillation metrics")

    def comparison_grid(self, model, images):
        teacher_decode, student_decode = self.decodes(model, images)
        return image_grid([images, teacher_decode.cpu(), student_decode.cpu()])

    @property
    def description(self) -> str:
        config = self.config
        matched = f", L1 to the teacher's decode {config.teacher_decode_scale}" if config.teacher_decode_scale else ""
        return (
            f"distilled from the teacher `{teacher_source(config)}` into {describe_latent_space(self.teacher)}: "
            f"latent regression {config.latent_scale}, {config.rec_loss} reconstruction from the teacher's latents"
            f"{matched}{other_terms(config)}"
        )

    grid_caption = "Originals (top), the teacher's decode of its latents, and this VAE's decode of the same latents"

    def card_description(self, metrics: dict) -> str:
        factors = f"`scaling_factor` ({self.teacher.config.scaling_factor:.5g})"
        if self.teacher.config.get("shift_factor") is not None:
            factors += f" and `shift_factor` ({self.teacher.config.shift_factor:.5g})"
        m = {name: f"{value:.2f}" for name, value in metrics.items()}
        return (
            f"Distilled from `{teacher_source(self.config)}`: it encodes into and decodes from the teacher's latent "
            f"space and keeps its {factors}, so a pipeline whose UNet was trained with the teacher decodes its "
            "latents with this VAE (`diffusers_custom_vae.swap_vae(pipe, vae)`, no latent-space warning). On the "
            f"held-out images below, its decode of the teacher's latents reaches {m['psnr']} dB PSNR against the "
            f"originals (the teacher's own decode: {m['teacher_psnr']} dB) and {m['student_vs_teacher_psnr']} dB "
            f"against the teacher's decode; the teacher decodes this VAE's latents at "
            f"{m['teacher_decodes_student_psnr']} dB; it decodes {metrics['decode_speedup']:.1f}x as fast as the "
            "teacher (measured in the training run, on its hardware). Prefer the teacher where its last fraction of a "
            "dB matters; use this VAE for speed: previews, large batches, small devices."
        )

    def checkpoint_facts(self) -> dict:
        """Where the teacher came from, recorded in each checkpoint (the teacher's weights are not saved there)."""
        return {
            "objective": self.name,
            "resume_with": f"its teacher, --teacher_vae {' --teacher_vae_subfolder '.join(self._teacher_flags())}",
            "teacher_vae": local_path(self.config.teacher_vae),  # a local folder by its absolute path
            "teacher_vae_subfolder": self.config.teacher_vae_subfolder,
            "teacher_fingerprint": self.teacher_fingerprint,
        }

    def check_resume(self, facts: dict, folder) -> None:
        """A resume reloads the teacher: it must be the one the checkpoint was distilled from."""
        if facts.get("teacher_fingerprint") != self.teacher_fingerprint:
            recorded = facts.get("teacher_vae") or "no teacher (a VAE trained from images)"
            raise ValueError(
                f"{folder} was distilled from {recorded!r}, but the teacher {teacher_source(self.config)!r} has other "
                "weights. Resume with the checkpoint's teacher, or start a new run."
            )

    def _teacher_flags(self) -> list[str]:
        return [part for part in (local_path(self.config.teacher_vae), self.config.teacher_vae_subfolder) if part]

    @property
    def teacher_fingerprint(self) -> str:
        if not hasattr(self, "_teacher_fingerprint"):
            digest = hashlib.sha256()
            for name, tensor in sorted(self.teacher.state_dict().items()):
                digest.update(name.encode() + tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            self._teacher_fingerprint = digest.hexdigest()[:16]
        return self._teacher_fingerprint


class StudentForward(nn.Module):
    """The student's training call, in one `forward` so that a data-parallel wrapper sees every parameter used:
    the student's posterior of the images, and its decode of the teacher's latents."""

    def __init__(self, student: CustomVAE):
        super().__init__()
        self.student = student

    def forward(self, images: torch.Tensor, teacher_latents: torch.Tensor):
        posterior = self.student.encode(images).latent_dist
        return posterior, self.student.decode(teacher_latents).sample


def load_teacher(config: TrainConfig):
    """The teacher VAE of `config.teacher_vae`, loaded as strictly as any VAE (`loading.load_vae`: missing,
    unexpected or non-finite weights and configs that are not a VAE's are errors), in float32, frozen, in eval mode."""
    kwargs = {"subfolder": config.teacher_vae_subfolder} if config.teacher_vae_subfolder else {}
    teacher = load_vae(config.teacher_vae, cache_dir=config.cache_dir, torch_dtype=torch.float32, **kwargs)
    return teacher.requires_grad_(False).eval()


def teacher_source(config: TrainConfig) -> str:
    """The teacher as the user named it: "repo/id" or "repo/id/subfolder"."""
    return "/".join(part for part in (config.teacher_vae, config.teacher_vae_subfolder) if part)


def build_student(config: TrainConfig, teacher) -> CustomVAE:
    """The student: `build_vae`'s model, by default a `CustomVAE` with the teacher's latent channels. Refused, before
    anything is written, when it is not a CustomVAE or its latents cannot be the teacher's (channels, downsampling)."""
    preset = preset_config(config.model_config or "tutorial")
    if preset is not None and not config.pretrained_model_name_or_path:  # the default, or a preset: with the
        latent_channels = teacher.config.latent_channels  # teacher's latent channels
        default = lambda: CustomVAE(**{**preset, "latent_channels": latent_channels})  # noqa: E731
        student = build_vae(dataclasses.replace(config, model_config=None), default=default)
    else:
        student = build_vae(config)
    if not isinstance(student, CustomVAE):
        raise ValueError(
            f"The student of a distillation is a CustomVAE (its config records the teacher's latent space); "
            f"--model_config / --pretrained_model_name_or_path give a {type(student).__name__}."
        )
    teacher_name = f"the teacher {teacher_source(config)!r}"
    if config.train_decoder_only and not shares_latent_space(student, teacher):  # its encoder would stay unaligned
        raise ValueError(
            f"--train_decoder_only freezes the student's encoder, which does not encode into the latent space of "
            f"{teacher_name}: the student would claim a space it cannot encode into. Distil without "
            "--train_decoder_only, or fine-tune the decoder of a student already distilled from this teacher "
            "(--pretrained_model_name_or_path)."
        )
    for what, mine, theirs in (
        ("latent channels", student.config.latent_channels, teacher.config.latent_channels),
        ("downsampling factor", downsample_factor_of(student), downsample_factor_of(teacher)),
    ):
        if mine != theirs:
            raise ValueError(
                f"The student's {what} ({mine}) differ from those of {teacher_name} ({theirs}): its latents could not "
                f"be the teacher's. Give the student {what} = {theirs} in --model_config."
            )
    return student
