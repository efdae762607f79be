"""The training machinery, whatever is learned: accelerate, data, the loop, checkpoints, stops, logging, validation.

`train(config, VAEObjective)` runs the whole job. What is learned is the `Objective` the caller hands over (the trainer
imports none: `objectives.py`, `distillation.py`, `latent_diffusion.py`): its data, what one step computes, validation
and the output folder. The step calls the wrapped module's `forward`, so data-parallel replicas stay in sync, and
makes one host sync, shared by every process: one all-reduce carries the loss terms, the non-finite check and any stop
request.
"""

import importlib.util
import math
import os
import signal
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, DistributedType, ProjectConfiguration, send_to_device, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..images import image_grid
from .checkpoints import Checkpoints, is_intact, latest_checkpoint, other_runs_checkpoints, refuse_changes
from .config import RunConfig
from .export import check_output_dir, write_output_folder
from .objectives import Objective


def train(config: RunConfig, objective: type[Objective]) -> dict:
    """Runs the whole job of `objective` (a class, e.g. `VAEObjective`, built with `config` once the run is seeded):
    data, model, training loop, then the output folder (model, metrics, grid, model card). Returns what metrics.json
    holds: held-out metrics and training throughput."""
    require_training_extras(config)
    trainer = Trainer(config, objective)
    trainer.fit()
    return trainer.finish()


class Trainer:
    """Sets up a run of `objective` (an `Objective` class, built with `config`) with accelerate: data, optimiser,
    schedule, EMA, trackers, and the state of a checkpoint to resume from. `fit()` trains; `finish()` writes the
    output folder."""

    def __init__(self, config: RunConfig, objective: type[Objective]):
        check_output_dir(config, objective.output_patterns)  # before anything is written
        self.config, self.output_dir = config, Path(config.output_dir)
        self.accelerator = accelerator = Accelerator(
            gradient_accumulation_steps=config.gradient_accumulation_steps,
            mixed_precision=config.mixed_precision,
            log_with=None if config.report_to == "none" else config.report_to,
            project_config=ProjectConfiguration(config.output_dir, logging_dir=f"{config.output_dir}/logs"),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
        )
        refuse_unaware_copies(accelerator)
        set_seed(config.seed, device_specific=True)  # each rank draws its own posterior noise, reproducibly
        self.objective = objective(config)
        self.model = self.objective.model  # `self.module` below is what accelerate wraps and the step calls
        self.data = self.objective.load_data(accelerator)
        self.images_per_step = config.images_per_step * accelerator.num_processes
        self._prepare_optimisation()
        self.state = TrainingState()
        self.non_finite = torch.zeros((), device=accelerator.device)  # non-finite losses since the last update
        self.checkpoints = Checkpoints(accelerator, self.output_dir, self._resume(), config.checkpoints_total_limit)
        self.checkpoints.refuse_others_in_the_way(self.state.step, self.max_steps)  # before anything is written
        if accelerator.is_main_process:
            loggable = {k: v for k, v in config.to_json_dict().items() if isinstance(v, (int, float, str, bool))}
            accelerator.init_trackers("train_vae", config=loggable)
        accelerator.print(
            f"Training {type(self.model).__name__} on {accelerator.num_processes} process(es) "
            f"({accelerator.distributed_type.value}, {accelerator.device}, mixed precision "
            f"{accelerator.mixed_precision}): {self.max_steps} steps of {self.images_per_step} images. "
            f"Data: {self.data.description}"
        )

    def _prepare_optimisation(self):
        """The data loader, AdamW and the learning-rate schedule of the model, the objective's helpers (each with
        its own AdamW), EMA, all prepared by accelerate; and what a checkpoint holds of them."""
        config, accelerator = self.config, self.accelerator
        lr = config.learning_rate * (self.images_per_step if config.scale_lr else 1)
        betas, decay = (config.adam_beta1, config.adam_beta2), config.adam_weight_decay
        make_optimizer = lambda params: torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=decay)
        loader = torch.utils.data.DataLoader(
            self.data.train,
            batch_size=config.train_batch_size,
            shuffle=not isinstance(self.data.train, torch.utils.data.IterableDataset),
            drop_last=True,
            num_workers=config.dataloader_num_workers,
            generator=torch.Generator().manual_seed(config.seed),  # the global RNG stays untouched by new iterators
        )
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        self.module, optimizer, self.loader = accelerator.prepare(
            self.objective.training_module(), make_optimizer(trainable), loader
        )
        self.max_steps = self._max_steps()
        self.scheduler = accelerator.prepare(
            get_scheduler(  # stepped once per process per step, hence the factors
                config.lr_scheduler,
                optimizer,
                num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                num_training_steps=self.max_steps * accelerator.num_processes,
            )
        )
        helpers = self.objective.prepare(accelerator, make_optimizer)  # e.g. {"discriminator": (module, optimiser)}
        self.helper_modules = [module for module, _ in helpers.values()]
        self.optimizers = [optimizer, *(helper_optimizer for _, helper_optimizer in helpers.values())]
        self.ema = None
        if config.use_ema:
            self.ema = EMAModel(
                self.model.parameters(),
                decay=config.ema_decay,
                use_ema_warmup=True,
                model_cls=type(self.model),
                model_config=self.model.config,
            )
            self.ema.to(accelerator.device)
        # A checkpoint holds the trained modules as safetensors, the rest as state dicts of tensors and numbers.
        self.checkpointed_modules = {"model": self.model} | {name: module for name, (module, _) in helpers.items()}
        self.checkpointed_states = {"optimizer": optimizer, "scheduler": self.scheduler}
        self.checkpointed_states |= {f"{name}_optimizer": opt for name, (_, opt) in helpers.items()}
        self.checkpointed_states |= {"ema": self.ema} if self.ema is not None else {}
        self.checkpointed_states |= {"scaler": accelerator.scaler} if accelerator.scaler is not None else {}

    def _resume(self) -> str:
        """Restores the checkpoint `resume_from_checkpoint` names ("latest": the newest in the output folder), if
        any; returns the run's id: the checkpoint's, or a new one."""
        choice = self.config.resume_from_checkpoint
        folder = None if not choice else latest_checkpoint(self.output_dir) if choice == "latest" else Path(choice)
        if choice == "latest" and folder is None:
            self.accelerator.print(f"No checkpoint in {self.output_dir}: starting a new run.")
        if folder is None:
            return uuid.uuid4().hex
        if not folder.is_dir():
            raise FileNotFoundError(f"--resume_from_checkpoint {folder}: no such checkpoint folder.")
        loader = Checkpoints(self.accelerator, self.output_dir, run_id="")
        modules, states = self.checkpointed_modules, self.checkpointed_states
        trainer_state = loader.load(folder, modules, states, check=self._check_resume)
        self.state.load_state_dict(trainer_state)
        others = other_runs_checkpoints(self.output_dir, trainer_state["run_id"])
        self.accelerator.print(
            f"Resumed from {folder} at step {self.state.step}."
            + (
                f" {self.output_dir} also holds checkpoints of other runs, left alone: {', '.join(others)}."
                if others
                else ""
            )
        )
        return trainer_state["run_id"]

    def _check_resume(self, facts: dict, folder: Path):
        """A checkpoint resumes only with the objective that wrote it, which may refuse it too (another teacher), and
        with the settings and model config it records (a change is refused, naming it and the flag it comes from);
        the model config is compared as built, so the same config from another file or a preset is no change."""
        ours = self.objective.checkpoint_facts()["objective"]
        if facts.get("objective", ours) != ours:
            raise ValueError(f"{folder} is a {facts['objective']}: resume it with {facts['resume_with']}.")
        self.objective.check_resume(facts, folder)
        # The flags first: a model config follows from some (a latent diffusion model's from --vae and --resolution).
        refuse_changes("training settings", facts.get("settings", {}), self.config.shaping_settings(), folder)
        source = self.objective.model_source
        kind = f"model config (from {source})" if source else "model config"
        refuse_changes(kind, facts.get("model_config", {}), self._model_config(), folder)

    def _model_config(self) -> dict:
        return {name: value for name, value in self.model.config.items() if not name.startswith("_")}

    def save_checkpoint(self):
        facts = self.state.state_dict() | self.objective.checkpoint_facts()
        facts |= {"model_config": self._model_config(), "settings": self.config.shaping_settings()}
        self.checkpoints.save(self.state.step, self.checkpointed_modules, self.checkpointed_states, facts)

    def _max_steps(self) -> int:
        if isinstance(self.data.train, torch.utils.data.IterableDataset):
            return self.config.max_train_steps  # a stream has no length; the config requires max_train_steps
        steps_per_epoch = math.ceil(len(self.loader) / self.config.gradient_accumulation_steps)
        if steps_per_epoch == 0:  # drop_last leaves no batch: the loop would wait for one forever
            raise ValueError(
                f"The training data holds {len(self.data.train)} images, fewer than one batch of "
                f"{self.config.train_batch_size} per process on {self.accelerator.num_processes} process(es): lower "
                "--train_batch_size or add images."
            )
        return self.config.max_train_steps or self.config.num_train_epochs * steps_per_epoch

    def fit(self):
        """Trains to `max_steps`: checkpoints and validation on their schedules; a stop request (Ctrl-C, SIGTERM)
        finishes the step, saves a checkpoint and raises `KeyboardInterrupt`; a non-finite loss raises before the
        weights change."""
        state, config = self.state, self.config
        progress = tqdm(
            total=self.max_steps, initial=state.step, desc="train", disable=not self.accelerator.is_local_main_process
        )
        self.first_step, self.step_seconds = state.step, 0.0  # time in steps only: validation and checkpoints excluded
        with StopRequest(announce=self.accelerator.is_local_main_process) as stop:
            while state.step < self.max_steps:
                tick = time.perf_counter()
                for batch in self._epoch_batches():
                    report = self._step(batch, stop)
                    if report is None:  # accumulating: the optimiser steps after the last micro-batch
                        continue
                    state.step += 1
                    if self.ema is not None:
                        self.ema.step(self.model.parameters())
                    self.step_seconds += time.perf_counter() - tick
                    self._log(report, time.perf_counter() - tick, progress)
                    last = state.step >= self.max_steps
                    checkpoint_due = last or state.step % config.checkpointing_steps == 0 or report["stop"]
                    if checkpoint_due:
                        self.save_checkpoint()
                    if last or state.step % config.validation_steps == 0:
                        self.validate()
                    if report["stop"]:
                        progress.close()
                        self.accelerator.print(
                            f"Stopped at step {state.step}; saved checkpoint-{state.step}. "
                            "Continue with --resume_from_checkpoint latest."
                        )
                        raise KeyboardInterrupt
                    if last:
                        break
                    tick = time.perf_counter()
        progress.close()

    def _epoch_batches(self):
        """The batches of the current epoch from where the run stands (a resumed run skips those it consumed), with
        `state.epoch_batches` counting them, so a checkpoint records the position; the epoch advances only when the
        loader is exhausted, not when the loop breaks off at the last step."""
        state = self.state
        self.loader.set_epoch(state.epoch)  # the shuffle order depends on (seed, epoch)...
        self.data.train.set_epoch(state.epoch)  # ...and so does each image's augmentation
        consumed = state.epoch_batches
        for batch in self.accelerator.skip_first_batches(self.loader, consumed) if consumed else self.loader:
            state.epoch_batches += 1
            yield batch
        if state.epoch_batches == 0:  # a stream that ends before its first batch would loop forever
            raise ValueError(f"The training data gave no batch of {self.config.train_batch_size} items.")
        state.epoch, state.epoch_batches = state.epoch + 1, 0

    def _step(self, batch, stop: "StopRequest") -> dict[str, float] | None:
        """One batch: forward and backward; after the last batch of a step, clip, check and update. Returns the
        step's report (its terms averaged over the processes, and whether any asked to stop), or `None` while
        accumulating gradients."""
        accelerator = self.accelerator
        with accelerator.accumulate(self.module, *self.helper_modules):
            loss, terms = self.objective.loss(self.module, batch, self.state.step)
            self.non_finite += (~torch.isfinite(loss.detach())).float()  # counted on the device: no host sync
            accelerator.backward(loss)
            if not accelerator.sync_gradients:
                return None
            terms["grad_norm"] = accelerator.clip_grad_norm_(self.module.parameters(), self.config.max_grad_norm)
            self.non_finite += (~torch.isfinite(terms["grad_norm"].detach())).float()  # NaN gradients, finite loss
            report = self._agree(loss, terms, stop.requested)  # read now: a request made during this step counts
            if report.pop("non_finite"):
                raise FloatingPointError(self._non_finite_message(report))
            for optimizer in self.optimizers:  # accelerate steps (and schedules) only when the accumulation completes
                optimizer.step()
                optimizer.zero_grad()
            self.scheduler.step()
        return report

    def _agree(self, loss: torch.Tensor, terms: dict, stop_requested: bool) -> dict[str, float]:
        """The step's one host sync: every process's terms, non-finite count and stop request in one all-reduce."""
        flags = torch.tensor([float(stop_requested)], device=loss.device)
        values = torch.cat([loss.detach().float().reshape(1), self.non_finite.reshape(1), flags])
        values = torch.cat([values, torch.stack([value.float() for value in terms.values()])])
        loss_value, non_finite, stop, *term_values = self.accelerator.reduce(values, reduction="mean").tolist()
        self.non_finite.zero_()
        return {"loss": loss_value, **dict(zip(terms, term_values)), "non_finite": non_finite > 0, "stop": stop > 0}

    def _non_finite_message(self, report: dict) -> str:
        last = latest_checkpoint(self.output_dir)
        intact = f"{last} is intact" if last and is_intact(last) else "no intact checkpoint was written yet"
        values = ", ".join(f"{name}={value:.4g}" for name, value in report.items() if name != "stop")
        return (
            f"The loss or its gradients are not finite at step {self.state.step + 1} ({values}). Nothing was saved "
            f"from this step; {intact}. Try a lower --learning_rate, --mixed_precision no, or a smaller "
            "--max_grad_norm."
        )

    def _log(self, report: dict, seconds: float, progress: tqdm):
        images_per_second = self.images_per_step / seconds
        scalars = {k: v for k, v in report.items() if k != "stop"}
        lr = self.scheduler.get_last_lr()[0]
        self.accelerator.log(scalars | {"lr": lr, "images_per_second": images_per_second}, step=self.state.step)
        progress.update(1)
        progress.set_postfix(loss=f"{report['loss']:.4f}", img_s=f"{images_per_second:.1f}")

    @torch.no_grad()
    def validate(self):
        """The objective's scores and grids (image rows) for the validation batch, with the EMA weights when there
        are some; logged (scores, and the grids to tensorboard) and printed on the main process."""
        if self.ema is not None:
            self.ema.store(self.model.parameters())
            self.ema.copy_to(self.model.parameters())
        self.model.eval()
        scores, grids = self.objective.validate(
            self.model, send_to_device(self.data.validation, self.accelerator.device)
        )
        self.model.train()
        if self.ema is not None:
            self.ema.restore(self.model.parameters())
        if not self.accelerator.is_main_process:
            return
        self.accelerator.log({f"validation/{name}": value for name, value in scores.items()}, step=self.state.step)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                for name, rows in grids.items():  # a NaN shows black rather than stopping the run: scores say NaN
                    grid = np.array(image_grid([row.float().cpu().nan_to_num(0.0) for row in rows]))
                    tracker.writer.add_image(f"validation/{name}", grid, self.state.step, dataformats="HWC")
        tqdm.write(f"step {self.state.step}: validation " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items()))

    def finish(self) -> dict:
        """Checks the replicas agree, puts the EMA weights in, and writes the output folder (main process)."""
        check_ranks_in_sync(self.accelerator, self.model)
        if self.ema is not None:
            self.ema.copy_to(self.model.parameters())
        throughput = {
            "train_steps": self.state.step - self.first_step,
            "train_seconds": round(self.step_seconds, 1),
            "train_images_per_second": (self.state.step - self.first_step)
            * self.images_per_step
            / max(self.step_seconds, 1e-9),
        }
        metrics = {}
        if self.accelerator.is_main_process:
            metrics = write_output_folder(
                self.model,
                self.objective,
                self.data,
                self.config,
                self.accelerator.num_processes,
                throughput,
                run_id=self.checkpoints.run_id,
            )
        self.accelerator.wait_for_everyone()
        self.accelerator.end_training()
        return metrics


class TrainingState:
    """Where the run is: optimiser steps, epoch, and batches consumed in that epoch (a resume skips them). Saved in
    every checkpoint's trainer_state.json beside the model, optimiser, schedulers and RNG states."""

    def __init__(self):
        self.step, self.epoch, self.epoch_batches = 0, 0, 0

    def state_dict(self):
        return {"step": self.step, "epoch": self.epoch, "epoch_batches": self.epoch_batches}

    def load_state_dict(self, state):
        self.step, self.epoch, self.epoch_batches = state["step"], state["epoch"], state["epoch_batches"]


class StopRequest:
    """Ctrl-C (SIGINT) or SIGTERM (a cluster's preemption): the trainer finishes the step, saves a checkpoint and
    stops; every process learns of a request through the step's all-reduce, so they save the same step. A second
    Ctrl-C stops at once. Ctrl-C reaches every process of the terminal: the request is announced once (`announce`:
    by the local main process), and DataLoader workers, which inherit the handler, ignore it."""

    def __init__(self, announce: bool = True):
        self.announce = announce

    def __enter__(self):
        self.requested, self._previous, self._pid = False, {}, os.getpid()
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._request)
        return self

    def _request(self, signum, frame):
        if os.getpid() != self._pid:  # a DataLoader worker: its process stops with the loader
            return
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not self.requested and self.announce:
            tqdm.write("Stopping after this step to save a checkpoint (Ctrl-C again to stop at once).")
        self.requested = True

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def require_training_extras(config: RunConfig):
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


def refuse_unaware_copies(accelerator: Accelerator):
    """torchrun (or --multi_gpu without a GPU) can start N processes that each think they are alone: N identical
    trainings writing the same folder. Refuse that instead of training; and refuse sharded set-ups (FSDP,
    DeepSpeed), whose states the checkpoints do not hold: this trainer is data-parallel."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM):
        raise ValueError(
            f"This trainer runs data-parallel (one process, or DDP over several); accelerate is configured for "
            f"{accelerator.distributed_type.value}. Run `accelerate config` again, or pass --multi_gpu."
        )
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if (
        world_size != accelerator.num_processes
    ):  # a launch the user can fix: a ValueError, one line at the command line
        raise ValueError(
            f"{world_size} processes were launched but accelerate sees {accelerator.num_processes}: they would train "
            "independent copies. On a machine without GPUs use `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
            "--num_processes N ...` (or `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node N ...`)."
        )


def check_ranks_in_sync(accelerator: Accelerator, model: torch.nn.Module):
    """Data-parallel replicas must end identical; a difference means the step bypassed the wrapped model."""
    if accelerator.num_processes == 1:
        return
    checksum = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    checksums = accelerator.gather(checksum.to(accelerator.device))
    if not torch.all(checksums == checksums[0]):
        raise RuntimeError(f"Model replicas diverged across processes (parameter checksums {checksums.tolist()}).")
    accelerator.print(f"All {accelerator.num_processes} processes hold identical weights.")
