"""The benchmarks' reports: targets checked on the numbers, the machine in one line, and BENCHMARKS.md, which the
benchmark scripts share: each owns a section between two markers and rewrites only it."""

import argparse
import json
import os
import platform
import re
from dataclasses import dataclass
from pathlib import Path

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


_HEADER = "# Benchmarks\n\nEach section is written by the script it names; rerun that script to refresh it.\n"


def write_section(path: str | Path, name: str, markdown: str) -> None:
    """Puts `markdown` between `<!-- {name}:start -->` and `<!-- {name}:end -->` in the file at `path`.

    The section's old text is replaced and the rest of the file is left as it was; a missing section is appended, and a
    missing file is created.
    """
    if not re.fullmatch(r"[\w-]+", name):
        raise ValueError(f"Section name must be letters, digits, '_' or '-', got {name!r}.")
    path = Path(path)
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    section = f"{start}\n{markdown.strip()}\n{end}"
    text = path.read_text() if path.exists() else _HEADER
    if text.count(start) != text.count(end) or text.count(start) > 1 or text.find(end) < text.find(start):
        raise ValueError(f"{path} must hold the markers {start} and {end} once each, in that order; fix it by hand.")
    if start in text:
        before, rest = text.split(start)
        text = before + section + rest.split(end)[1]
    else:
        text = f"{text.rstrip()}\n\n{section}\n"
    path.write_text(text)


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


def publish(path: str | Path, name: str, markdown: str) -> None:
    """Prints a report, then writes it into its section of BENCHMARKS.md (printed first: a file that cannot be
    written loses nothing)."""
    print(markdown)
    write_section(path, name, markdown)
    print(f"\nWritten to the {name} section of {os.fspath(path)}")


def json_object(text: str) -> dict:
    """`--train_config`'s argparse type: a JSON object (of TrainConfig fields)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error}): {text!r}") from error
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object of TrainConfig fields was expected, got {text!r}")
    return value
