"""What the benchmarks' results share: targets checked on the numbers, and what every results file says of its run
(`render.py` turns the results into BENCHMARKS.md)."""

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from datetime import datetime

import diffusers
import torch


@dataclass(frozen=True)
class Target:
    """One thing a model is built to reach, checked on a run's numbers."""

    what: str
    measured: float | str  # the number held against `bound`, or why there is none
    bound: float
    at_least: bool  # met when measured >= bound; else when measured <= bound
    detail: str  # the numbers behind `measured`

    @property
    def met(self) -> bool:  # False for a NaN or a missing number
        if isinstance(self.measured, str):
            return False
        return self.measured >= self.bound if self.at_least else self.measured <= self.bound

    def markdown(self) -> str:
        return f"- **{'PASS' if self.met else 'FAIL'}**: {self.what}: {self.detail}"


def machine_description(device: str) -> str:
    """CPU, cores, memory (and GPU), Python, torch, its threads and diffusers, in one line."""
    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "unknown CPU")
    with open("/proc/meminfo") as meminfo:
        memory_gb = int(next(line for line in meminfo if line.startswith("MemTotal:")).split()[1]) * 1024 / 1e9
    gpu = f"; GPU: {torch.cuda.get_device_name()}" if device == "cuda" else ""
    return (
        f"{cpu}, {os.cpu_count()} cores, {memory_gb:.0f} GB RAM{gpu}; Python {platform.python_version()}, "
        f"torch {torch.__version__}, torch threads: {torch.get_num_threads()}, diffusers {diffusers.__version__}"
    )


def the_run(command: str, argv: list[str] | None, start: float, device: str) -> dict:
    """What every results file says of its run: the date, the wall time since `start` (a `time.perf_counter()`), the
    command line (`command` with `argv`, or with sys.argv's arguments), and the machine."""
    arguments = sys.argv[1:] if argv is None else argv
    return {
        "date": f"{datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        "wall_seconds": time.perf_counter() - start,
        "command": " ".join([command, shlex.join(arguments)]).strip(),
        "machine": machine_description(device),
    }


def budget(config) -> dict:
    """The fields of a TrainConfig that make a training budget, as the results files record them."""
    fields = ("train_batch_size", "resolution", "learning_rate", "lr_scheduler", "lr_warmup_steps", "rec_loss")
    return {field: getattr(config, field) for field in (*fields, "kl_scale", "seed", "latent_scale")}


def json_object(text: str) -> dict:
    """`--train_config`'s argparse type: a JSON object (of TrainConfig fields)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error}): {text!r}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object of TrainConfig fields was expected, got {text!r}")
    return value


def refuse_unknown_fields(parser: argparse.ArgumentParser, flag: str, given: dict, config_class, set_here: tuple):
    """One argparse error (exit 2) naming the fields of `given` (from `flag`, e.g. --train_config) that are not
    `config_class`'s, or that the benchmark sets itself (`set_here`)."""
    settable = {field.name for field in dataclasses.fields(config_class)} - set(set_here)
    if unknown := sorted(set(given) - settable):
        parser.error(
            f"{flag}: {', '.join(unknown)}: expected {config_class.__name__} fields other than {', '.join(set_here)} "
            "(the benchmark sets those)"
        )
