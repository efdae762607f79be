"""Fréchet Inception Distance of generated samples against held-out images, when it can honestly be computed.

torchmetrics' `FrechetInceptionDistance` extracts Inception-v3 features through torch-fidelity, whose FID weights
(`weights-inception-2015-12-05-6726825d.pth`) are downloaded on first use. Nothing is downloaded here: FID is
computed only when torch-fidelity imports and the weights are already in torch's hub cache
(`torch.hub.get_dir()/checkpoints`), or with a feature extractor the caller gives; otherwise the reason it was
skipped is returned, never a made-up number.
"""

import os
from collections.abc import Iterable
from pathlib import Path

import torch

# torch-fidelity's FID Inception weights (the TF FID network ported to PyTorch), as torch.hub caches them.
INCEPTION_WEIGHTS = "weights-inception-2015-12-05-6726825d.pth"


def inception_weights_path() -> Path:
    """Where torch's hub cache keeps torch-fidelity's FID Inception weights (`$TORCH_HOME/hub/checkpoints/...`)."""
    return Path(torch.hub.get_dir(), "checkpoints", INCEPTION_WEIGHTS)


def frechet_distance(
    samples: torch.Tensor | Iterable[torch.Tensor],
    references: torch.Tensor | Iterable[torch.Tensor],
    feature_extractor: torch.nn.Module | None = None,
) -> tuple[float | None, str]:
    r"""
    FID between two sets of images in [-1, 1], with torchmetrics' `FrechetInceptionDistance`.

    Args:
        samples (`torch.Tensor` or iterable of them): Generated images, (N, 3, H, W) or (3, H, W) tensors in
            [-1, 1]; sizes may vary between tensors (the Inception network resizes to 299 px).
        references (`torch.Tensor` or iterable of them): Real held-out images, the same way.
        feature_extractor (`torch.nn.Module`, *optional*): Maps (B, 3, H, W) images in [0, 1] to (B, F) features
            (torchmetrics' `feature=`); defaults to torch-fidelity's Inception-v3 pool features when its weights are
            in the local cache.

    Returns:
        `(float, str)`: the FID and a line saying what it compares; or `(None, str)`: why it was skipped, one line.
    """
    samples, references = _batches(samples), _batches(references)
    counts = sum(len(batch) for batch in samples), sum(len(batch) for batch in references)
    if min(counts) < 2:
        return (
            None,
            f"FID skipped: it needs at least 2 samples and 2 reference images, got {counts[0]} and {counts[1]}",
        )
    if feature_extractor is None:
        metric, reason = _inception_fid()
        if metric is None:
            return None, f"FID skipped: {reason}"
        features = "Inception-v3 pool features"
    else:
        from torchmetrics.image.fid import FrechetInceptionDistance

        metric, features = FrechetInceptionDistance(feature=feature_extractor, normalize=True), "the given features"
    with torch.no_grad():
        for batches, real in ((references, True), (samples, False)):
            for batch in batches:
                metric.update(((batch.float() + 1) / 2).clamp(0, 1), real=real)
        value = float(metric.compute())
    if value != value or value in (float("inf"), float("-inf")):
        return None, "FID skipped: the features gave a non-finite distance"
    return value, f"FID {value:.2f} ({features}): {counts[0]} samples against {counts[1]} held-out images"


def _batches(images) -> list[torch.Tensor]:
    """(N, 3, H, W) batches of a batch or of an iterable of images and batches."""
    if isinstance(images, torch.Tensor):
        images = [images]
    return [image.unsqueeze(0) if image.dim() == 3 else image for image in images]


def _inception_fid():
    """(torchmetrics' FID with torch-fidelity's Inception, None) or (None, why not), downloading nothing."""
    from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

    if not _TORCH_FIDELITY_AVAILABLE:
        return None, "torchmetrics' Inception feature extractor needs torch-fidelity, which is not installed"
    weights = inception_weights_path()
    if not weights.is_file():
        return None, f"the FID Inception weights are not in the local cache ({os.fspath(weights)})"
    from torchmetrics.image.fid import FrechetInceptionDistance

    try:
        metric = FrechetInceptionDistance(feature=2048, normalize=True, feature_extractor_weights_path=str(weights))
    except (OSError, RuntimeError, ValueError) as error:
        return None, f"the FID Inception weights in {os.fspath(weights)} do not load ({type(error).__name__}: {error})"
    return metric, None
