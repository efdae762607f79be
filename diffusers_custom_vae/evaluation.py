"""Evaluating and comparing VAEs on held-out images: which images (those a VAE's training held out), metrics, and a
grid to look at; and how faithfully a student VAE distilled from a teacher stands in for it."""

import inspect
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from .data import load_data
from .images import image_grid
from .metrics import psnr, reconstruction_metrics
from .modeling_custom_vae import downsample_factor_of

logger = logging.getLogger(__name__)

TRAINING_RECORD = "training_config.json"  # the trainer's settings, written beside the model (training/export.py)
# The `load_data` arguments that choose the held-out images: the data, and for a dataset without a test split the
# seed and streaming that drew its held-out rows (a folder's held-out files and the embedded photos do not vary).
DATA_ARGUMENTS = ("train_data_dir", "dataset_name", "dataset_config_name", "image_column")
DATASET_SPLIT_ARGUMENTS = ("seed", "streaming")


def training_data_of(vae: str | os.PathLike) -> dict | None:
    """The `load_data` arguments of the data a VAE was trained on and of the images its training held out (see
    `DATA_ARGUMENTS`), read from the training_config.json the trainer writes beside the model; `None` for a VAE
    without one (a Hub id, a VAE trained elsewhere). Raises `ValueError` when that file is not a JSON object."""
    path = Path(vae, TRAINING_RECORD)
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError as error:  # not JSON, or not UTF-8
        raise ValueError(f"{path} is not a training record (a JSON object): {error}") from error
    if not isinstance(record, dict):
        raise ValueError(f"{path} is not a training record: expected a JSON object, got a {type(record).__name__}")
    names = DATA_ARGUMENTS + (DATASET_SPLIT_ARGUMENTS if record.get("dataset_name") else ())
    return {name: record[name] for name in names if name in record}


def held_out_data(vaes: Sequence[str | os.PathLike], **given) -> dict:
    r"""
    The `load_data` arguments that give the images the VAEs' training held out, to evaluate them on.

    Args:
        vaes (`list[str]`): VAE folders or Hub ids; a folder the trainer wrote holds its training record
            (`training_data_of`).
        **given: `load_data` arguments the user chose (`train_data_dir`, `dataset_name`, `image_column`, `seed`);
            `None` means not given.

    Returns:
        `dict`: the arguments given, completed from the records of the VAEs trained on that data (on any data when
        none is given): the same data, and for a dataset without a test split the rows its training held out.

    Raises `ValueError` when the records disagree on an argument not given (VAEs trained on other data, or whose
    training held out other rows), and when a folder a record names is missing. Logs a warning for each VAE whose
    training held out other images than the arguments give: it may be measured on images it trained on.
    """
    given = {name: value for name, value in given.items() if value is not None}
    records = {os.fspath(vae): record for vae in vaes if (record := training_data_of(vae)) is not None}
    if "train_data_dir" in given or "dataset_name" in given:  # other data than the records' is simply other data
        records = {vae: record for vae, record in records.items() if _same_source(record, given)}
    first, *others = records.values() or [{}]
    agreed = {name: value for name, value in first.items() if all(other.get(name) == value for other in others)}
    disputed = sorted({name for record in records.values() for name in record} - agreed.keys() - given.keys())
    if disputed:
        trained = "; ".join(f"{vae}: {_settings(record)}" for vae, record in records.items())
        raise ValueError(
            f"The VAEs were trained on other data or held out other images ({trained}): choose the images to "
            f"evaluate on with {', '.join(f'--{name}' for name in disputed)}."
        )
    arguments = agreed | given
    folder = arguments.get("train_data_dir")
    if "train_data_dir" not in given and folder is not None and not os.path.isdir(folder):
        raise ValueError(
            f"The VAEs were trained on the folder {folder!r} (their {TRAINING_RECORD} says), which is not here: "
            "give its path with --train_data_dir."
        )
    defaults = {name: parameter.default for name, parameter in inspect.signature(load_data).parameters.items()}
    for vae, record in records.items():
        other = {name: value for name, value in record.items() if arguments.get(name, defaults[name]) != value}
        if other:
            logger.warning(
                f"{vae} was trained with {_settings(other)}: its training held out other images than these, so "
                "some of the images measured here may be ones it was trained on."
            )
    return arguments


def _same_source(record: dict, given: dict) -> bool:
    """Whether a training record names the folder or dataset given (paths compared as real paths)."""
    return all(_real(record.get(name)) == _real(given.get(name)) for name in ("train_data_dir", "dataset_name"))


def _real(path: str | None) -> str | None:
    return None if path is None else os.path.realpath(path)


def _settings(arguments: dict) -> str:
    return ", ".join(f"{name}={value!r}" for name, value in arguments.items())


@torch.no_grad()
def evaluate_vae(vae, images: Iterable[torch.Tensor], desc: str = "evaluating") -> dict[str, float]:
    r"""
    Mean PSNR, SSIM and MS-SSIM of a VAE's reconstructions (decoded from the posterior's mode).

    Args:
        vae (`CustomVAE` or `AutoencoderKL`): The VAE, on the device to evaluate on.
        images (iterable of `torch.Tensor`): Images (3, H, W) in [-1, 1], one at a time, so sizes may differ (H and
            W multiples of the VAE's downsampling).
        desc (`str`, *optional*): The progress bar's label.

    Returns:
        `dict[str, float]`: `psnr`, `ssim`, `ms_ssim`, averaged over the images.

    An image one latent pixel in size is padded for the VAE and measured on its own pixels (see `reconstruct`).
    """
    scores, padded = [], 0
    for image in tqdm(images, desc=desc):
        image = image[None].to(vae.device, vae.dtype)
        padded += is_one_latent_pixel(image, vae)
        scores.append(reconstruction_metrics(reconstruct(vae, image), image))
    if not scores:
        raise ValueError("evaluate_vae needs at least one image.")
    _note_padded(padded, len(scores), vae)
    return {name: sum(score[name] for score in scores) / len(scores) for name in scores[0]}


def reconstruct(vae, images: torch.Tensor) -> torch.Tensor:
    """The VAE's reconstructions (decoded from the posterior's mode, clamped to [-1, 1]) of (B, 3, H, W) images in
    [-1, 1], given on the VAE's device and in its dtype. Images one latent pixel in size are padded by repeating
    their last row and column to two latent pixels a side, and their reconstructions cropped back: a (1, C, 1, 1)
    feature map holds one value per group where a config has as many norm groups as channels, and group norm
    refuses it."""
    height, width = images.shape[-2:]
    return vae(_pad_one_latent_pixel(images, vae), sample_posterior=False).sample[..., :height, :width].clamp(-1, 1)


def is_one_latent_pixel(images: torch.Tensor, vae) -> bool:
    """Whether (..., H, W) images are the size of one latent pixel of `vae` (what `reconstruct` pads)."""
    factor = downsample_factor_of(vae)
    return tuple(images.shape[-2:]) == (factor, factor)


def _pad_one_latent_pixel(images: torch.Tensor, vae) -> torch.Tensor:
    """(B, 3, f, f) -> (B, 3, 2f, 2f), edges repeated (f: the VAE's downsampling factor); other sizes unchanged."""
    if not is_one_latent_pixel(images, vae):
        return images
    factor = downsample_factor_of(vae)
    return F.pad(images.float(), (0, factor, 0, factor), mode="replicate").to(images.dtype)


def _note_padded(padded: int, total: int, vae):
    if padded:
        factor = downsample_factor_of(vae)
        logger.warning(
            f"{padded} of {total} held-out images ({factor}x{factor} pixels: one latent pixel) were padded to "
            f"{2 * factor}x{2 * factor} by repeating their edges for the VAE, and measured on their own pixels."
        )


def common_crop(images: Iterable[torch.Tensor], count: int = 8, max_side: int = 256, multiple: int = 8):
    """The first `count` images (3, H, W), centre-cropped to one square size (the smallest side among them, at most
    `max_side`, a multiple of `multiple`), as a (B, 3, S, S) tensor: held-out images of any sizes, ready for a grid."""
    chosen = [image for image, _ in zip(images, range(count))]
    side = min(max_side, *(min(image.shape[-2:]) for image in chosen)) // multiple * multiple
    crops = []
    for image in chosen:
        top, left = (image.shape[-2] - side) // 2, (image.shape[-1] - side) // 2
        crops.append(image[:, top : top + side, left : left + side])
    return torch.stack(crops)


@torch.no_grad()
def comparison_grid(vaes: Sequence, images: torch.Tensor) -> Image.Image:
    """Originals (top row), then one row of reconstructions per VAE; `images` is a (B, 3, H, W) batch in [-1, 1]."""
    rows = [images]
    for vae in vaes:
        rows.append(reconstruct(vae, images.to(vae.device, vae.dtype)).float().cpu())
    return image_grid(rows)


@torch.no_grad()
def evaluate_distillation(student, teacher, images: Iterable[torch.Tensor], desc: str = "distillation") -> dict:
    r"""
    How well a student VAE stands in for the teacher it was distilled from, on held-out images (posterior modes).

    Args:
        student (`CustomVAE`): The student, on the device to evaluate on.
        teacher (`CustomVAE` or `AutoencoderKL`): The teacher, on its device.
        images (iterable of `torch.Tensor`): Images (3, H, W) in [-1, 1], one at a time.
        desc (`str`, *optional*): The progress bar's label.

    Returns:
        `dict[str, float]`, averaged over the images:
        - `psnr`, `ssim`, `ms_ssim`: the student's decode of the teacher's latents against the originals (what a
          pipeline whose UNet made the teacher's latents shows);
        - `teacher_psnr`: the teacher's own decode against the originals;
        - `student_vs_teacher_psnr`: the student's decode against the teacher's decode of the same latents;
        - `teacher_decodes_student_psnr`: the teacher's decode of the student's latents against the originals (how
          well the student's encoder speaks the teacher's latent space, e.g. for image-to-image);
        - `latent_relative_error`: |student latents - teacher latents| / |teacher latents|;
        - `decode_speedup`: the teacher's decode time over the student's, for the same latents.
    """
    totals, seconds, count, padded = {}, {"student": 0.0, "teacher": 0.0}, 0, 0
    for vae in (teacher, student):  # first-call set-up (allocations, kernel choice) is not decoding time
        vae.decode(torch.zeros(1, vae.config.latent_channels, 4, 4, device=vae.device, dtype=vae.dtype))
    for image in tqdm(images, desc=desc):
        x = image[None].to(teacher.device, teacher.dtype)
        # Both VAEs see an image one latent pixel in size padded (see `reconstruct`); outputs are cropped back.
        padded += is_one_latent_pixel(x, student)
        height, width, factor = *x.shape[-2:], downsample_factor_of(student)
        x_in = _pad_one_latent_pixel(x, student)
        teacher_latents = teacher.encode(x_in).latent_dist.mode()
        teacher_decode, seconds["teacher"] = _timed(teacher.decode, teacher_latents, seconds["teacher"], teacher)
        student_decode, seconds["student"] = _timed(
            student.decode, teacher_latents.to(student.device, student.dtype), seconds["student"], student
        )
        student_latents = student.encode(x_in.to(student.device, student.dtype)).latent_dist.mode()
        teacher_of_student = teacher.decode(student_latents.to(teacher.device, teacher.dtype)).sample
        teacher_decode, student_decode, teacher_of_student = (
            t[..., :height, :width].float().cpu().clamp(-1, 1)
            for t in (teacher_decode, student_decode, teacher_of_student)
        )
        x = x.float().cpu().clamp(-1, 1)
        teacher_latents, student_latents = (
            t[..., : height // factor, : width // factor].float().cpu() for t in (teacher_latents, student_latents)
        )
        scores = reconstruction_metrics(student_decode, x) | {
            "teacher_psnr": psnr(teacher_decode, x).item(),
            "student_vs_teacher_psnr": psnr(student_decode, teacher_decode).item(),
            "teacher_decodes_student_psnr": psnr(teacher_of_student, x).item(),
            "latent_relative_error": ((student_latents - teacher_latents).norm() / teacher_latents.norm()).item(),
        }
        totals = {name: totals.get(name, 0.0) + value for name, value in scores.items()}
        count += 1
    _note_padded(padded, count, student)
    if not count:
        raise ValueError("evaluate_distillation needs at least one image.")
    return {name: total / count for name, total in totals.items()} | {
        "decode_speedup": seconds["teacher"] / max(seconds["student"], 1e-9)
    }


def _timed(decode, latents: torch.Tensor, seconds: float, vae) -> tuple[torch.Tensor, float]:
    """`decode(latents).sample`, and `seconds` plus the time it took (the device's queue drained on both sides)."""
    _synchronize(vae.device)
    start = time.perf_counter()
    images = decode(latents).sample
    _synchronize(vae.device)
    return images, seconds + time.perf_counter() - start


def _synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
