"""Training a `CustomVAE` with accelerate: one CPU, one GPU or many.

`train(TrainConfig(...))` is the whole job; `examples/train_vae.py` is its command line. The step calls the wrapped
model's `forward`, so data-parallel replicas stay in sync; checkpoints are written atomically and resume exactly.
"""

import argparse
import dataclasses
import importlib.util
import json
import math
import os
import shutil
import signal
import threading
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import nn
from tqdm.auto import tqdm

from .data import load_data, parse_resolution
from .evaluation import common_crop, comparison_grid, evaluate_vae
from .hub import render_model_card, upload_folder_to_hub
from .images import image_grid
from .latents import estimate_scaling_factor
from .loading import load_vae, vae_class
from .losses import PatchDiscriminator, VAELoss
from .metrics import psnr, ssim
from .modeling_custom_vae import CustomVAE, CustomVAEOutput


def _flag(default, help: str, **kwargs):
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class TrainConfig:
    """A training run. Each field is a command-line flag of `examples/train_vae.py`, named as diffusers' trainers
    name it where the meaning is the same. The defaults are the main job: the embedded photos, 64 px, 5 epochs
    (280 steps of 8 images, about 4 minutes on a 2-core CPU); for your own data set at least --resolution."""

    # Data (neither --train_data_dir nor --dataset_name: the photos embedded in scikit-image and scikit-learn)
    train_data_dir: str | None = _flag(None, "a folder of images, searched recursively")
    dataset_name: str | None = _flag(None, "a Hugging Face dataset: Hub name or local path")
    dataset_config_name: str | None = _flag(None, "the dataset's config name, if it has several")
    image_column: str = _flag("image", "the dataset column holding the images")
    streaming: bool = _flag(False, "stream --dataset_name instead of downloading it first (needs --max_train_steps)")
    cache_dir: str | None = _flag(None, "where datasets and models downloaded from the Hub are cached")
    resolution: tuple[int, ...] = _flag((64,), "training image size: one number (square) or H W", nargs="+")
    center_crop: bool = _flag(False, "crop at the centre instead of at random")
    random_flip: bool = _flag(False, "flip images horizontally at random")
    dataloader_num_workers: int = _flag(0, "data-loading processes (0: load in the main process)")
    # Model
    model_config: str | None = _flag(
        None,
        "a JSON file of CustomVAE config arguments (default: the tutorial's); "
        'with "_class_name": "AutoencoderKL", a diffusers AutoencoderKL',
    )
    pretrained_model_name_or_path: str | None = _flag(None, "continue from these weights (a folder or Hub id)")
    train_decoder_only: bool = _flag(False, "freeze the encoder: the latent space stays the pretrained one")
    # Losses
    rec_loss: str = _flag("l1", "reconstruction loss: l1 or l2")
    ms_ssim_scale: float = _flag(0.0, "weight of the 1 - MS-SSIM term (0: off)")
    kl_scale: float = _flag(
        1e-6,
        "weight of the KL term against the reconstruction summed over each image "
        "(as in diffusers' trainer and latent diffusion)",
    )
    kl_warmup_steps: int = _flag(0, "ramp the KL weight linearly from 0 over this many steps")
    perceptual_scale: float = _flag(0.0, "weight of the LPIPS term (0: off; needs the lpips package and its weights)")
    disc_scale: float = _flag(0.0, "weight of the PatchGAN hinge loss (0: off)")
    disc_start: int = _flag(0, "step at which the adversarial loss starts")
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
    checkpointing_steps: int = _flag(500, "save a resumable checkpoint-N folder every this many steps")
    checkpoints_total_limit: int | None = _flag(None, "keep at most this many checkpoints")
    resume_from_checkpoint: str | None = _flag(None, "'latest' or a checkpoint folder to continue from")
    validation_steps: int = _flag(100, "validate (PSNR, SSIM, image grid) every this many steps")
    report_to: str = _flag("tensorboard", "accelerate tracker: tensorboard, wandb, all or none")
    push_to_hub: bool = _flag(False, "upload the result to the Hub (token: `hf auth login` or HF_TOKEN)")
    hub_model_id: str | None = _flag(None, "the Hub repo to push to (default: the output folder's name)")

    def __post_init__(self):
        self.resolution = parse_resolution(self.resolution)  # (H, W), multiples of 8
        problems = []
        if self.train_data_dir and self.dataset_name:
            problems.append("give --train_data_dir or --dataset_name, not both")
        if self.streaming and not self.max_train_steps:
            problems.append("--streaming needs --max_train_steps (a stream has no length)")
        for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "validation_steps"):
            if getattr(self, name) < 1:
                problems.append(f"--{name} must be at least 1, got {getattr(self, name)}")
        if self.rec_loss not in ("l1", "l2"):
            problems.append(f"--rec_loss must be l1 or l2, got {self.rec_loss!r}")
        if problems:
            raise ValueError("Invalid training config: " + "; ".join(problems) + ".")


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """The command line of `examples/train_vae.py`, generated from `TrainConfig`'s fields."""
    parser = argparse.ArgumentParser(
        description="Train a CustomVAE.", formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    for f in dataclasses.fields(TrainConfig):
        options = dict(f.metadata)
        kind = next(t for t in typing.get_args(f.type) or (f.type,) if t is not type(None))
        if kind is bool:
            parser.add_argument(f"--{f.name}", action="store_true", default=f.default, **options)
        else:
            base = typing.get_args(kind)[0] if typing.get_origin(kind) is tuple else kind
            parser.add_argument(f"--{f.name}", type=base, default=f.default, **options)
    try:
        return TrainConfig(**vars(parser.parse_args(argv)))
    except ValueError as error:
        parser.error(str(error))  # exits with the usage line and the message, as for any bad flag


class TrainingState:
    """Where the run is: optimiser steps, epoch, and batches consumed in that epoch (a resume skips them). Saved in
    every checkpoint beside the model, optimiser, schedulers and RNG states."""

    def __init__(self):
        self.step, self.epoch, self.epoch_batches = 0, 0, 0

    def state_dict(self):
        return {"step": self.step, "epoch": self.epoch, "epoch_batches": self.epoch_batches}

    def load_state_dict(self, state):
        self.step, self.epoch, self.epoch_batches = state["step"], state["epoch"], state["epoch_batches"]


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (a cluster's preemption): finish the current step, save a checkpoint, stop.
    A second Ctrl-C stops at once. Every rank must agree before any stops, so they save the same step."""

    def __enter__(self):
        self.requested, self._previous = False, {}
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        tqdm.write("Stopping after this step to save a checkpoint (Ctrl-C again to stop at once).")

    def agreed(self, accelerator: Accelerator) -> bool:
        flag = torch.tensor([self.requested], device=accelerator.device)
        return bool(accelerator.gather(flag).any()) if accelerator.num_processes > 1 else self.requested

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def train(config: TrainConfig) -> dict:
    """Runs the whole job: data, model, training loop, then the output folder (model, metrics, grid, model card).
    Returns what metrics.json holds: held-out metrics and training throughput."""
    _require_training_extras(config)
    output_dir = Path(config.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        mixed_precision=config.mixed_precision,
        log_with=None if config.report_to == "none" else config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
    _refuse_unaware_copies(accelerator)
    processes = accelerator.num_processes
    images_per_step = config.train_batch_size * config.gradient_accumulation_steps * processes
    set_seed(config.seed, device_specific=True)  # each rank draws its own posterior noise, reproducibly
    data = load_data(
        train_data_dir=config.train_data_dir,
        dataset_name=config.dataset_name,
        dataset_config_name=config.dataset_config_name,
        image_column=config.image_column,
        resolution=config.resolution,
        center_crop=config.center_crop,
        random_flip=config.random_flip,
        seed=config.seed,
        streaming=config.streaming,
        cache_dir=config.cache_dir,
    )
    model = _build_vae(config)  # the VAE itself; `vae` below is what accelerate wraps
    lr = config.learning_rate * (images_per_step if config.scale_lr else 1)
    betas = (config.adam_beta1, config.adam_beta2)
    adamw = lambda params: torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=config.adam_weight_decay)
    loader = torch.utils.data.DataLoader(
        data.train,
        batch_size=config.train_batch_size,
        shuffle=not _is_stream(data.train),
        drop_last=True,
        num_workers=config.dataloader_num_workers,
        generator=torch.Generator().manual_seed(config.seed),
    )
    vae = model if isinstance(model, CustomVAE) else WithPosterior(model)
    vae, optimizer, loader = accelerator.prepare(
        vae, adamw([p for p in model.parameters() if p.requires_grad]), loader
    )
    steps_per_epoch = None if _is_stream(data.train) else math.ceil(len(loader) / config.gradient_accumulation_steps)
    if steps_per_epoch == 0:  # drop_last leaves no batch: the loop would wait for one forever
        raise ValueError(
            f"The training data holds {len(data.train)} images, fewer than one batch of {config.train_batch_size} "
            f"per process on {processes} process(es): lower --train_batch_size or add images."
        )
    max_steps = config.max_train_steps or config.num_train_epochs * steps_per_epoch
    scheduler = accelerator.prepare(
        get_scheduler(  # stepped once per process per step, hence the factors
            config.lr_scheduler,
            optimizer,
            num_warmup_steps=config.lr_warmup_steps * processes,
            num_training_steps=max_steps * processes,
        )
    )
    discriminator = d_optimizer = None
    if config.disc_scale > 0:
        discriminator = PatchDiscriminator()
        discriminator, d_optimizer = accelerator.prepare(discriminator, adamw(discriminator.parameters()))
    loss_fn = VAELoss(
        reconstruction=config.rec_loss,
        kl_weight=config.kl_scale,
        kl_warmup_steps=config.kl_warmup_steps,
        ms_ssim_weight=config.ms_ssim_scale,
        lpips_weight=config.perceptual_scale,
        disc_weight=config.disc_scale,
        disc_start=config.disc_start,
        discriminator=discriminator,
    ).to(accelerator.device)
    ema = None
    if config.use_ema:
        ema = EMAModel(
            model.parameters(),
            decay=config.ema_decay,
            use_ema_warmup=True,
            model_cls=type(model),
            model_config=model.config,
        )
        ema.to(accelerator.device)
        accelerator.register_for_checkpointing(ema)
    state = TrainingState()
    accelerator.register_for_checkpointing(state)
    _resume(accelerator, config, state)
    if accelerator.is_main_process:
        accelerator.init_trackers(
            "train_vae",
            config={k: v for k, v in dataclasses.asdict(config).items() if isinstance(v, (int, float, str, bool))},
        )
    accelerator.print(
        f"Training {type(model).__name__} on {processes} process(es) ({accelerator.distributed_type.value}, "
        f"{accelerator.device}, mixed precision {accelerator.mixed_precision}): {max_steps} steps of "
        f"{images_per_step} images. Data: {data.description}"
    )

    progress = tqdm(total=max_steps, initial=state.step, desc="train", disable=not accelerator.is_local_main_process)
    first_step, step_seconds = state.step, 0.0  # time in steps only: validation and checkpoints excluded
    with StopRequest() as stop:
        while state.step < max_steps:
            loader.set_epoch(state.epoch)  # the shuffle order depends on (seed, epoch)...
            data.train.set_epoch(state.epoch)  # ...and so does each image's augmentation
            done = state.epoch_batches  # batches of this epoch consumed before a resume
            tick = time.perf_counter()
            for state.epoch_batches, images in enumerate(
                accelerator.skip_first_batches(loader, done) if done else loader, start=done + 1
            ):
                with accelerator.accumulate(vae, *([discriminator] if discriminator else [])):
                    # the wrapped forward: data-parallel gradients stay in sync
                    output = vae(images, sample_posterior=True, return_posterior=True)
                    loss, terms = loss_fn.generator_loss(output, images, state.step, model.decoder.conv_out.weight)
                    _stop_if_not_finite(accelerator, loss, terms, state.step, output_dir)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        terms["grad_norm"] = accelerator.clip_grad_norm_(vae.parameters(), config.max_grad_norm)
                    optimizer.step()  # accelerate steps (and schedules) only when the accumulation completes
                    scheduler.step()
                    optimizer.zero_grad()
                    if loss_fn.adversarial_active(state.step):
                        d_loss, d_terms = loss_fn.discriminator_loss(images, output.sample)
                        accelerator.backward(d_loss)
                        d_optimizer.step()
                        d_optimizer.zero_grad()
                        terms.update(d_terms)
                if not accelerator.sync_gradients:
                    continue
                state.step += 1
                if ema is not None:
                    ema.step(model.parameters())
                step_seconds += time.perf_counter() - tick
                images_per_second = images_per_step / (time.perf_counter() - tick)
                accelerator.log(
                    {k: float(v) for k, v in terms.items()}
                    | {"lr": scheduler.get_last_lr()[0], "images_per_second": images_per_second},
                    step=state.step,
                )
                progress.update(1)
                progress.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{images_per_second:.1f}")
                checkpoint_due = state.step % config.checkpointing_steps == 0 or state.step == max_steps
                if checkpoint_due:
                    save_checkpoint(accelerator, output_dir, state.step, config.checkpoints_total_limit)
                if state.step % config.validation_steps == 0 or state.step == max_steps:
                    _validate(accelerator, model, ema, data.validation, state.step)
                if stop.agreed(accelerator):
                    if not checkpoint_due:
                        save_checkpoint(accelerator, output_dir, state.step, config.checkpoints_total_limit)
                    progress.close()
                    accelerator.print(
                        f"Stopped at step {state.step}; saved checkpoint-{state.step}. "
                        "Continue with --resume_from_checkpoint latest."
                    )
                    raise KeyboardInterrupt
                if state.step >= max_steps:
                    break
                tick = time.perf_counter()
            else:
                if state.epoch_batches == 0:  # a stream that ends before its first batch would loop forever
                    raise ValueError(f"The training data gave no batch of {config.train_batch_size} images.")
                state.epoch, state.epoch_batches = state.epoch + 1, 0
    progress.close()

    _check_ranks_in_sync(accelerator, model)
    if ema is not None:
        ema.copy_to(model.parameters())
    throughput = {
        "train_steps": state.step - first_step,
        "train_seconds": round(step_seconds, 1),
        "train_images_per_second": (state.step - first_step) * images_per_step / max(step_seconds, 1e-9),
    }
    metrics = (
        export(model, data, config, output_dir, accelerator.num_processes, throughput)
        if accelerator.is_main_process
        else {}
    )
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return metrics


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


def _require_training_extras(config: TrainConfig):
    """The packages of the `train` extra this run needs, or an error that says how to install them."""
    needed = {"tensorboard": "--report_to tensorboard"} if config.report_to in ("tensorboard", "all") else {}
    if config.dataset_name:
        needed["datasets"] = "--dataset_name"
    elif not config.train_data_dir:
        needed |= {"skimage": "the embedded photos", "sklearn": "the embedded photos"}
    missing = [f"{module} (for {use})" for module, use in needed.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ImportError(
            f"Training needs {', '.join(missing)}: install them with `pip install 'diffusers_custom_vae[train]'` "
            '(or `pip install -e ".[train]"` in a checkout).'
        )


def _refuse_unaware_copies(accelerator: Accelerator):
    """torchrun (or --multi_gpu without a GPU) can start N processes that each think they are alone: N identical
    trainings writing the same folder. Refuse that instead of training."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size != accelerator.num_processes:
        raise RuntimeError(
            f"{world_size} processes were launched but accelerate sees {accelerator.num_processes}: they would train "
            "independent copies. On a machine without GPUs use `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
            "--num_processes N ...` (or `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N ...`)."
        )


def _build_vae(config: TrainConfig) -> CustomVAE | AutoencoderKL:
    """A new model from --model_config (a CustomVAE config, or any config whose `_class_name` is AutoencoderKL),
    the weights of --pretrained_model_name_or_path, or the tutorial's default CustomVAE."""
    if config.pretrained_model_name_or_path:
        vae = load_vae(config.pretrained_model_name_or_path, cache_dir=config.cache_dir)
    elif config.model_config:
        try:
            model_config = json.loads(Path(config.model_config).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise ValueError(f"Cannot read --model_config {config.model_config!r}: {error}") from error
        vae = vae_class(model_config, config.model_config).from_config(model_config)
    else:
        vae = CustomVAE()
    if config.train_decoder_only:  # the encoder side, AutoencoderKL's quant_conv included, keeps the latent space
        for part in (vae.encoder, getattr(vae, "quant_conv", None)):
            if part is not None:
                part.requires_grad_(False)
    if config.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    return vae.train()


def _is_stream(dataset) -> bool:
    return isinstance(dataset, torch.utils.data.IterableDataset)


def checkpoint_steps(output_dir: Path) -> list[int]:
    """Steps of the complete checkpoints in `output_dir`, oldest first."""
    names = (p.name for p in output_dir.glob("checkpoint-*") if p.is_dir())
    return sorted(int(name.split("-")[1]) for name in names if name.split("-")[1].isdigit())


def save_checkpoint(accelerator: Accelerator, output_dir: Path, step: int, total_limit: int | None):
    """Writes checkpoint-{step} atomically (into a temporary folder, then renamed), then prunes the oldest."""
    final, partial = output_dir / f"checkpoint-{step}", output_dir / f"checkpoint-{step}.partial"
    if accelerator.is_main_process:
        for unfinished in output_dir.glob("checkpoint-*.partial"):  # left by a process killed while saving
            shutil.rmtree(unfinished)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))  # every rank writes its own RNG state
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)  # a kill before this line leaves only a .partial folder, never a broken latest
        for old in checkpoint_steps(output_dir)[: -total_limit or None] if total_limit else []:
            shutil.rmtree(output_dir / f"checkpoint-{old}")
    accelerator.wait_for_everyone()


def _resume(accelerator: Accelerator, config: TrainConfig, state: TrainingState):
    if not config.resume_from_checkpoint:
        return
    output_dir = Path(config.output_dir)
    if config.resume_from_checkpoint == "latest":
        steps = checkpoint_steps(output_dir)
        if not steps:
            accelerator.print(f"No checkpoint in {output_dir}: starting a new run.")
            return
        path = output_dir / f"checkpoint-{steps[-1]}"
    else:
        path = Path(config.resume_from_checkpoint)
        if not path.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {path}: no such checkpoint folder.")
    accelerator.load_state(str(path))
    accelerator.print(f"Resumed from {path} at step {state.step}.")


def _stop_if_not_finite(accelerator: Accelerator, loss, terms, step: int, output_dir: Path):
    """Stops every rank before a NaN/inf reaches the weights; the last checkpoint stays as it was."""
    finite = accelerator.gather(torch.isfinite(loss.detach()).reshape(1)).all()
    if not finite:
        steps = checkpoint_steps(output_dir)
        last = f"{output_dir / f'checkpoint-{steps[-1]}'} is intact" if steps else "no checkpoint was written yet"
        values = ", ".join(f"{name}={float(value):.4g}" for name, value in terms.items())
        raise FloatingPointError(
            f"The loss is not finite at step {step + 1} ({values}). Nothing was saved from this step; {last}. "
            "Try a lower --learning_rate, --mixed_precision no, or a smaller --max_grad_norm."
        )


@torch.no_grad()
def _validate(accelerator: Accelerator, model: CustomVAE, ema, images: torch.Tensor, step: int):
    """PSNR/SSIM and an image grid of the validation images, with the EMA weights when there are some."""
    if ema is not None:
        ema.store(model.parameters())
        ema.copy_to(model.parameters())
    model.eval()
    images = images.to(accelerator.device)
    reconstruction = model(images, sample_posterior=False).sample.clamp(-1, 1)  # the mode: no RNG is drawn
    model.train()
    if ema is not None:
        ema.restore(model.parameters())
    if accelerator.is_main_process:
        scores = {
            "validation/psnr": psnr(reconstruction, images).item(),
            "validation/ssim": ssim(reconstruction, images).item(),
        }
        accelerator.log(scores, step=step)
        for tracker in accelerator.trackers:
            if tracker.name == "tensorboard":
                grid = np.array(image_grid([images.cpu(), reconstruction.cpu()]))
                tracker.writer.add_image("validation/reconstructions", grid, step, dataformats="HWC")
        tqdm.write(
            f"step {step}: validation PSNR {scores['validation/psnr']:.2f} dB, SSIM {scores['validation/ssim']:.4f}"
        )


def _check_ranks_in_sync(accelerator: Accelerator, model: CustomVAE):
    """Data-parallel replicas must end identical; a difference means the step bypassed the wrapped model."""
    if accelerator.num_processes == 1:
        return
    checksum = (
        torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1).to(accelerator.device)
    )
    checksums = accelerator.gather(checksum)
    if not torch.all(checksums == checksums[0]):
        raise RuntimeError(f"Model replicas diverged across processes (parameter checksums {checksums.tolist()}).")
    accelerator.print(f"All {accelerator.num_processes} processes hold identical weights.")


@torch.no_grad()
def export(
    model, data, config: TrainConfig, output_dir: Path, num_processes: int = 1, throughput: dict | None = None
) -> dict:
    """The output folder: weights with an estimated scaling_factor, metrics.json (held-out metrics and training
    throughput), the grid of originals above reconstructions, the model card and the training config; then the
    optional push. Returns metrics.json's content."""
    model.eval()
    if not config.train_decoder_only:  # a frozen encoder keeps its latents' statistics, and its scaling factor
        estimate_scaling_factor(model, _training_batches(data.train, config), register=True)
    metrics = evaluate_vae(model, data.test, desc="held-out metrics")
    model.save_pretrained(output_dir)
    summary = {**metrics, "split": data.test_description, "images": len(data.test), **(throughput or {})}
    (output_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    (output_dir / "training_config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
    comparison_grid([model], common_crop(data.test)).save(output_dir / "reconstructions.png")
    card = render_model_card(
        model,
        repo_id=config.hub_model_id,
        metrics=metrics,
        metrics_split=data.test_description,
        grid_image="reconstructions.png",
        datasets=data.dataset_ids or None,
        training=_training_summary(config, num_processes, throughput),
        credits=data.credits,
    )
    card.save(output_dir / "README.md")
    print(
        f"Held-out {data.test_description}: "
        + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items())
        + f". Saved to {output_dir}."
    )
    if data.skipped:
        print(f"Skipped {len(data.skipped)} unreadable image file(s), e.g. {data.skipped[0]}.")
    if config.push_to_hub:
        repo_id = config.hub_model_id or output_dir.name
        url = upload_folder_to_hub(output_dir, repo_id, ignore_patterns=["checkpoint-*", "logs/*"])
        print(f"Pushed to {url}")
    return summary


def _training_batches(dataset, config: TrainConfig, count: int = 16):
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.train_batch_size, shuffle=False)
    for index, images in enumerate(loader):
        if index == count:
            return
        yield images


def _training_summary(config: TrainConfig, num_processes: int, throughput: dict | None) -> str:
    steps = config.max_train_steps or f"{config.num_train_epochs} epochs"
    speed = ""
    if throughput and throughput["train_steps"]:
        minutes, images_per_second = throughput["train_seconds"] / 60, throughput["train_images_per_second"]
        speed = f" The last run took {minutes:.1f} min of steps ({images_per_second:.1f} images/s)."
    return (
        f"Trained with `examples/train_vae.py` for {steps} steps of "
        f"{config.train_batch_size * config.gradient_accumulation_steps * num_processes} images at "
        f"{config.resolution[0]}x{config.resolution[1]} on {num_processes} process(es): {config.rec_loss} "
        f"reconstruction loss, KL weight {config.kl_scale}"
        f"{f', MS-SSIM {config.ms_ssim_scale}' if config.ms_ssim_scale else ''}"
        f"{f', LPIPS {config.perceptual_scale}' if config.perceptual_scale else ''}"
        f"{f', PatchGAN {config.disc_scale} from step {config.disc_start}' if config.disc_scale else ''}; "
        f"AdamW, learning rate {config.learning_rate} ({config.lr_scheduler}), seed {config.seed}"
        f"{', EMA weights' if config.use_ema else ''}.{speed}"
    )
