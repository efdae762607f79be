"""The settings of a training run: `RunConfig` holds what every run has (data, optimisation, checkpoints, output);
`TrainConfig` adds a VAE's (the flags of `examples/train_vae.py`), `LatentDiffusionConfig` a latent diffusion model's
(`examples/train_latent_diffusion.py`). Fields are named as diffusers' trainers name them where the meaning is the same
and as the keyword arguments of the functions they feed, so a setting keeps one name from the command line to the loss
or the data loader (`arguments_for`)."""

import dataclasses
import inspect
import os
from dataclasses import dataclass, field

from diffusers.optimization import SchedulerType

from ..data import parse_resolution

SCHEDULERS = [kind.value for kind in SchedulerType]
# The smallest value of each numeric setting (`None`, where a setting allows it, means "not given").
MINIMUMS = {
    **dict.fromkeys(["train_batch_size", "gradient_accumulation_steps", "num_train_epochs", "max_train_steps"], 1),
    **dict.fromkeys(["checkpointing_steps", "checkpoints_total_limit", "validation_steps"], 1),
    **dict.fromkeys(["lr_warmup_steps", "kl_warmup_steps", "disc_start", "dataloader_num_workers"], 0),
    **dict.fromkeys(["kl_scale", "ms_ssim_scale", "perceptual_scale", "disc_scale", "adam_weight_decay"], 0.0),
    **dict.fromkeys(["latent_scale", "teacher_decode_scale"], 0.0),
}


# Settings a resumed run may change: where and how long it runs, how often it saves, logs or validates, and how it is
# computed (memory, workers, precision); paths of a model or teacher whose weights or identity a checkpoint checks
# itself. Every other setting shapes what is learned, and a checkpoint records it (`TrainConfig.shaping_settings`).
RUN_CONTROLS = {
    "output_dir", "overwrite_output_dir", "resume_from_checkpoint", "max_train_steps", "num_train_epochs",
    "checkpointing_steps", "checkpoints_total_limit", "validation_steps", "report_to", "push_to_hub", "hub_model_id",
    "dataloader_num_workers", "cache_dir", "mixed_precision", "gradient_checkpointing", "model_config",
    "pretrained_model_name_or_path", "teacher_vae", "teacher_vae_subfolder", "guidance_scale", "num_inference_steps",
}  # fmt: skip
# Settings that name a file or folder, or a Hub id: a local one is recorded by its absolute path (`local_path`), so the
# same folder by another relative path, or from another working folder, is the same setting, and another folder by
# the same relative path is not.
PATH_SETTINGS = ("train_data_dir", "dataset_name", "cache_dir", "pretrained_model_name_or_path", "teacher_vae", "vae")


def local_path(value: str | None) -> str | None:
    """`value`'s absolute path where it names something on this machine; otherwise (a Hub id, `None`) `value`."""
    return os.path.abspath(value) if value and os.path.exists(value) else value


def _flag(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class RunConfig:
    """What every training run has: data, optimisation, checkpoints, validation, logging and output. The defaults are
    the main job's: the embedded photos at 64 px."""

    # Data (neither train_data_dir nor dataset_name: the photos embedded in scikit-image and scikit-learn)
    train_data_dir: str | None = _flag(None, "a folder of images, searched recursively")
    dataset_name: str | None = _flag(None, "a Hugging Face dataset: Hub name or local path")
    dataset_config_name: str | None = _flag(None, "the dataset's config name, if it has several")
    image_column: str = _flag("image", "the dataset column holding the images")
    streaming: bool = _flag(False, "stream --dataset_name instead of downloading it first (needs --max_train_steps)")
    cache_dir: str | None = _flag(None, "where datasets and models downloaded from the Hub are cached")
    resolution: list[int] = field(
        default_factory=lambda: [64],
        metadata={"help": "training image size: one number (square) or H W, multiples of the model's downsampling"},
    )
    center_crop: bool = _flag(False, "crop at the centre instead of at random")
    random_flip: bool = _flag(False, "flip images horizontally at random")
    dataloader_num_workers: int = _flag(0, "data-loading processes (0: load in the main process)")
    # Optimisation
    train_batch_size: int = _flag(8, "images per process per step")
    max_train_steps: int | None = _flag(None, "total optimiser steps (overrides --num_train_epochs)")
    num_train_epochs: int = _flag(5, "epochs, when --max_train_steps is not given")
    gradient_accumulation_steps: int = _flag(1, "batches per optimiser step")
    gradient_checkpointing: bool = _flag(False, "recompute activations in backward to save memory")
    learning_rate: float = _flag(1e-3, "AdamW learning rate (also the discriminator's); ~1e-4 to fine-tune weights")
    scale_lr: bool = _flag(False, "multiply the learning rate by batch size, accumulation and process count")
    lr_scheduler: str = _flag("cosine", "a diffusers scheduler: constant, constant_with_warmup, linear, cosine, ...")
    lr_warmup_steps: int = _flag(50, "warm-up steps of the learning-rate schedule")
    adam_beta1: float = _flag(0.9, "AdamW beta1")
    adam_beta2: float = _flag(0.999, "AdamW beta2")
    adam_weight_decay: float = _flag(0.0, "AdamW weight decay")
    max_grad_norm: float = _flag(1.0, "clip gradients to this norm")
    mixed_precision: str | None = _flag(
        None, "no, fp16 or bf16 (default: accelerate's config)", choices=["no", "fp16", "bf16"]
    )
    use_ema: bool = _flag(False, "keep an exponential moving average of the weights for validation and the result")
    ema_decay: float = _flag(0.9999, "the EMA's largest decay (it warms up from 0)")
    seed: int = _flag(0, "seed of the whole run: same seed, same weights on CPU")
    # Checkpoints, validation, logging, output
    output_dir: str = _flag("outputs/custom-vae", "where the model, checkpoints, logs and model card go")
    overwrite_output_dir: bool = _flag(
        False, "let a new run replace the files an earlier run wrote in --output_dir (without it, it refuses)"
    )
    checkpointing_steps: int = _flag(500, "save a resumable checkpoint-N folder every this many steps")
    checkpoints_total_limit: int | None = _flag(None, "keep at most this many checkpoints")
    resume_from_checkpoint: str | None = _flag(None, "'latest' or a checkpoint folder to continue from")
    validation_steps: int = _flag(100, "validate (PSNR, SSIM, image grid) every this many steps")
    report_to: str = _flag("tensorboard", "accelerate tracker: tensorboard, wandb, all or none")
    push_to_hub: bool = _flag(False, "upload the result to the Hub (token: `hf auth login` or HF_TOKEN)")
    hub_model_id: str | None = _flag(None, "the Hub repo to push to (default: the output folder's name)")

    def __post_init__(self):
        # (H, W); the model's downsampling factor is checked when the model is known.
        self.resolution = list(parse_resolution(self.resolution, multiple=1))
        problems = []
        if self.train_data_dir and self.dataset_name:
            problems.append("give --train_data_dir or --dataset_name, not both")
        if self.streaming and not self.max_train_steps:
            problems.append("--streaming needs --max_train_steps (a stream has no length)")
        for name, lowest in MINIMUMS.items():
            value = getattr(self, name, None)
            if value is not None and not value >= lowest:  # `not >=` also refuses NaN
                problems.append(f"--{name} must be at least {lowest}, got {value}")
        for name in ("learning_rate", "max_grad_norm"):
            if not 0 < getattr(self, name) < float("inf"):
                problems.append(f"--{name} must be a positive number, got {getattr(self, name)}")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                problems.append(f"--{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 <= self.ema_decay <= 1:
            problems.append(f"--ema_decay must be in [0, 1], got {self.ema_decay}")
        if self.mixed_precision not in (None, "no", "fp16", "bf16"):
            problems.append(f"--mixed_precision must be no, fp16 or bf16, got {self.mixed_precision!r}")
        if self.lr_scheduler not in SCHEDULERS:
            problems.append(f"--lr_scheduler must be one of {', '.join(SCHEDULERS)}, got {self.lr_scheduler!r}")
        problems += self.problems()
        if problems:
            raise ValueError("Invalid training config: " + "; ".join(problems) + ".")

    def problems(self) -> list[str]:
        """What is wrong with the fields a subclass adds, one phrase each."""
        return []

    @property
    def images_per_step(self) -> int:
        """Images per process per optimiser step (times the process count for the whole step)."""
        return self.train_batch_size * self.gradient_accumulation_steps

    def arguments_for(self, function) -> dict:
        """The fields named like `function`'s parameters, as keyword arguments: the settings keep their names from
        the flag to the function (`load_data`, `VAELoss`)."""
        names = inspect.signature(function).parameters.keys() & {f.name for f in dataclasses.fields(self)}
        return {name: getattr(self, name) for name in names}

    def shaping_settings(self) -> dict:
        """The settings that shape what is learned (all but `RUN_CONTROLS`; local paths absolute): a checkpoint records
        them, and a resume that changes one is refused."""
        settings = {name: value for name, value in self.to_json_dict().items() if name not in RUN_CONTROLS}
        for name in settings.keys() & PATH_SETTINGS:  # the same folder, whichever folder the command runs in
            settings[name] = local_path(settings[name])
        return settings

    def to_json_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainConfig(RunConfig):
    """A VAE's training run (`VAEObjective`, or `DistillationObjective` with `teacher_vae`). The defaults are the main
    job: the embedded photos, 64 px, 5 epochs (280 steps of 8 images, about 4 minutes on a 2-core CPU); for your own
    data set at least `resolution`."""

    # Model
    model_config: str | None = _flag(
        None,
        "a JSON file of CustomVAE config arguments, or a preset: tutorial (the default), small (a fast "
        'distillation student); with "_class_name": "AutoencoderKL", a diffusers AutoencoderKL',
    )
    pretrained_model_name_or_path: str | None = _flag(None, "continue from these weights (a folder or Hub id)")
    train_decoder_only: bool = _flag(False, "freeze the encoder: the latent space stays the pretrained one")
    # Distillation (with --teacher_vae, the model is a student that learns the teacher's latent space)
    teacher_vae: str | None = _flag(
        None,
        "distil this VAE (a folder or Hub id; AutoencoderKL or CustomVAE) into the model: the student learns to "
        "encode into and decode from the teacher's latent space, so pipelines made for the teacher can use it",
    )
    teacher_vae_subfolder: str | None = _flag(None, "the teacher's subfolder, e.g. vae for a pipeline's repo")
    latent_scale: float = _flag(
        1.0, "distillation: weight of the student's latent regression onto the teacher's (scaled as a UNet sees them)"
    )
    teacher_decode_scale: float = _flag(
        0.0, "distillation: weight of an L1 term to the teacher's own decode of the same latents (0: images only)"
    )
    # Losses (the keyword arguments of `losses.VAELoss`)
    rec_loss: str = _flag("l1", "reconstruction loss: l1 or l2")
    ms_ssim_scale: float = _flag(0.0, "weight of the 1 - MS-SSIM term (0: off)")
    kl_scale: float = _flag(
        1e-6,
        "weight of the KL term against the reconstruction summed over each image "
        "(as in diffusers' trainer and latent diffusion; unused in distillation, where the teacher sets the space)",
    )
    kl_warmup_steps: int = _flag(0, "ramp the KL weight linearly from 0 over this many steps")
    perceptual_scale: float = _flag(0.0, "weight of the LPIPS term (0: off; needs the lpips package and its weights)")
    disc_scale: float = _flag(0.0, "weight of the PatchGAN hinge loss (0: off)")
    disc_start: int = _flag(0, "step at which the adversarial loss starts")

    def problems(self) -> list[str]:
        problems = []
        if self.teacher_vae_subfolder and not self.teacher_vae:
            problems.append("--teacher_vae_subfolder needs --teacher_vae")
        if self.rec_loss not in ("l1", "l2"):
            problems.append(f"--rec_loss must be l1 or l2, got {self.rec_loss!r}")
        return problems


@dataclass
class LatentDiffusionConfig(RunConfig):
    """A latent diffusion run (`LatentDiffusionObjective`): a class-conditional DiT learns to denoise the latents of a
    trained VAE. The defaults are the second main job: the embedded photos, with the first main job's VAE
    (outputs/custom-vae), 64 px, a tiny DiT, a few CPU minutes."""

    vae: str = _flag("outputs/custom-vae", "the VAE whose latent space the model learns: a folder or Hub id")
    vae_subfolder: str | None = _flag(None, "the VAE's subfolder, e.g. vae for a pipeline's repo")
    model_config: str = _flag(
        "tiny",
        "the DiT: a preset (tiny, S/2, B/2: the DiT paper's widths) or a JSON file of DiTTransformer2DModel arguments",
    )
    label_column: str | None = _flag(
        None, "the dataset column holding class labels (a folder's classes: its subfolders)"
    )
    class_dropout_prob: float = _flag(
        0.1, "how often a label is replaced by the null label (classifier-free guidance)"
    )
    guidance_scale: float = _flag(4.0, "classifier-free guidance of the validation samples")
    num_inference_steps: int = _flag(25, "denoising steps of the validation samples (DDIM)")
    num_train_epochs: int = _flag(5, "epochs, when --max_train_steps is not given")
    max_train_steps: int | None = _flag(1500, "total optimiser steps (overrides --num_train_epochs)")
    train_batch_size: int = _flag(32, "latents per process per step")
    learning_rate: float = _flag(3e-4, "AdamW learning rate")
    lr_scheduler: str = _flag(
        "constant_with_warmup", "a diffusers scheduler: constant, constant_with_warmup, cosine, ..."
    )
    use_ema: bool = _flag(True, "keep an exponential moving average of the weights for validation and the result")
    ema_decay: float = _flag(0.995, "the EMA's largest decay (it warms up from 0); ~0.9999 for long runs")
    validation_steps: int = _flag(500, "validate (held-out denoising loss, samples per class) every this many steps")
    output_dir: str = _flag("outputs/custom-dit", "where the pipeline, checkpoints, logs and model card go")

    def problems(self) -> list[str]:
        problems = []
        if not 0 <= self.class_dropout_prob < 1:
            problems.append(f"--class_dropout_prob must be in [0, 1), got {self.class_dropout_prob}")
        if not self.guidance_scale >= 1:
            problems.append(f"--guidance_scale must be at least 1, got {self.guidance_scale}")
        if not self.num_inference_steps >= 1:
            problems.append(f"--num_inference_steps must be at least 1, got {self.num_inference_steps}")
        if self.resolution[0] != self.resolution[1]:
            problems.append(f"--resolution must be square (DiTPipeline samples square images), got {self.resolution}")
        return problems
