"""Evaluating and comparing VAEs on held-out images: metrics, and a grid to look at; and how faithfully a student
VAE distilled from a teacher stands in for it."""

import time
from collections.abc import Iterable, Sequence

import torch
from PIL import Image
from tqdm.auto import tqdm

from .images import image_grid
from .metrics import psnr, reconstruction_metrics


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
    """
    scores = []
    for image in tqdm(images, desc=desc):
        image = image[None].to(vae.device, vae.dtype)
        scores.append(reconstruction_metrics(vae(image, sample_posterior=False).sample.clamp(-1, 1), image))
    if not scores:
        raise ValueError("evaluate_vae needs at least one image.")
    return {name: sum(score[name] for score in scores) / len(scores) for name in scores[0]}


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
        rows.append(vae(images.to(vae.device, vae.dtype), sample_posterior=False).sample.clamp(-1, 1).float().cpu())
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
    totals, seconds, count = {}, {"student": 0.0, "teacher": 0.0}, 0
    for vae in (teacher, student):  # first-call set-up (allocations, kernel choice) is not decoding time
        vae.decode(torch.zeros(1, vae.config.latent_channels, 4, 4, device=vae.device, dtype=vae.dtype))
    for image in tqdm(images, desc=desc):
        x = image[None].to(teacher.device, teacher.dtype)
        teacher_latents = teacher.encode(x).latent_dist.mode()
        teacher_decode, seconds["teacher"] = _timed(teacher.decode, teacher_latents, seconds["teacher"], teacher)
        student_decode, seconds["student"] = _timed(
            student.decode, teacher_latents.to(student.device, student.dtype), seconds["student"], student
        )
        student_latents = student.encode(x.to(student.device, student.dtype)).latent_dist.mode()
        teacher_of_student = teacher.decode(student_latents.to(teacher.device, teacher.dtype)).sample
        x, teacher_decode, student_decode, teacher_of_student = (
            t.float().cpu().clamp(-1, 1) for t in (x, teacher_decode, student_decode, teacher_of_student)
        )
        difference = (student_latents.float().cpu() - teacher_latents.float().cpu()).norm()
        scores = reconstruction_metrics(student_decode, x) | {
            "teacher_psnr": psnr(teacher_decode, x).item(),
            "student_vs_teacher_psnr": psnr(student_decode, teacher_decode).item(),
            "teacher_decodes_student_psnr": psnr(teacher_of_student, x).item(),
            "latent_relative_error": (difference / teacher_latents.float().cpu().norm()).item(),
        }
        totals = {name: totals.get(name, 0.0) + value for name, value in scores.items()}
        count += 1
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
