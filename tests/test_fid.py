"""FID (issue 16, item 11): computed with a feature extractor, or skipped with one line, never made up."""

import pytest
import torch

from diffusers_custom_vae import fid
from diffusers_custom_vae.fid import frechet_distance


class MeanColour(torch.nn.Module):
    """A stand-in for Inception: each image's mean colour and its square (4 features)."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        colour = images.float().mean(dim=(2, 3))
        return torch.cat([colour, colour.square().mean(1, keepdim=True)], dim=1)


def colours(count: int, centre: float, seed: int, size: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    shades = centre + 0.2 * torch.randn(count, 3, 1, 1, generator=generator)
    return shades.expand(count, 3, size, size).clamp(-1, 1)


def test_fid_with_a_stand_in_feature_extractor():
    references = colours(32, 0.0, seed=0)
    near, message = frechet_distance(colours(32, 0.0, seed=1), references, feature_extractor=MeanColour())
    far, _ = frechet_distance(colours(32, 0.6, seed=2), references, feature_extractor=MeanColour())
    assert near is not None and far is not None and 0 <= near < far
    assert "32 samples against 32 held-out images" in message and f"{near:.2f}" in message
    # Whole images of different sizes, one at a time, give the same distance as one batch.
    one_by_one, _ = frechet_distance(colours(32, 0.6, seed=2), list(references), feature_extractor=MeanColour())
    assert one_by_one == pytest.approx(far, rel=1e-5)


def test_fid_matches_the_formula():
    samples, references = colours(40, 0.3, seed=3), colours(40, -0.1, seed=4)
    value, _ = frechet_distance(samples, references, feature_extractor=MeanColour())
    a, b = (MeanColour()((x + 1) / 2).double() for x in (samples, references))
    mu_a, mu_b, cov_a, cov_b = a.mean(0), b.mean(0), torch.cov(a.T), torch.cov(b.T)
    eigenvalues = torch.linalg.eigvals(cov_a @ cov_b).sqrt().real.sum()
    expected = float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * eigenvalues)
    assert value == pytest.approx(expected, rel=1e-3, abs=1e-6)


@pytest.mark.parametrize("fidelity_installed", [False, True])
def test_fid_is_skipped_without_the_inception_weights(monkeypatch, tmp_path, fidelity_installed):
    import torchmetrics.utilities.imports

    monkeypatch.setattr(torchmetrics.utilities.imports, "_TORCH_FIDELITY_AVAILABLE", fidelity_installed)
    monkeypatch.setattr(fid, "inception_weights_path", lambda: tmp_path / fid.INCEPTION_WEIGHTS)
    value, message = frechet_distance(colours(4, 0, 0), colours(4, 0, 1))
    assert value is None and message.startswith("FID skipped: ") and "\n" not in message
    if fidelity_installed:
        assert "not in the local cache" in message and str(tmp_path / fid.INCEPTION_WEIGHTS) in message
    else:
        assert "torch-fidelity, which is not installed" in message


def test_fid_needs_two_images_each():
    value, message = frechet_distance(colours(1, 0, 0), colours(8, 0, 1), feature_extractor=MeanColour())
    assert value is None and "at least 2" in message
