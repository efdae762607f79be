import pytest
import torch

from diffusers_custom_vae import CustomVAE
from diffusers_custom_vae.latents import estimate_scaling_factor


def blocky_images(seed: int, count: int = 8) -> torch.Tensor:
    """(count, 3, 32, 32) in [-1, 1]: random 4x4-pixel blocks, so neighbouring pixels correlate as in photos."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(count, 3, 8, 8, generator=generator) * 2 - 1
    return images.repeat_interleave(4, dim=-1).repeat_interleave(4, dim=-2)


@pytest.fixture
def wide_vae(tiny_vae) -> CustomVAE:
    """A VAE whose latents have a std near 10 and a mean near 9, far from unit variance and zero mean."""
    mean_channels = slice(0, tiny_vae.config.latent_channels)  # conv_out gives the mean, then the log-variance
    with torch.no_grad():
        tiny_vae.encoder.conv_out.weight[mean_channels] *= 25
        tiny_vae.encoder.conv_out.bias[mean_channels] += 3
    return tiny_vae


@pytest.fixture
def deterministic_vae(wide_vae) -> CustomVAE:
    """Posteriors with a variance of e^-30: sampled latents equal the mean, whatever the batching."""
    log_variance_channels = slice(wide_vae.config.latent_channels, None)
    with torch.no_grad():
        wide_vae.encoder.conv_out.weight[log_variance_channels] = 0
        wide_vae.encoder.conv_out.bias[log_variance_channels] = -40  # clamped to -30 by the distribution
    return wide_vae


@torch.no_grad()
def fresh_latents(vae, seed: int) -> torch.Tensor:
    return vae.encode(blocky_images(seed)).latent_dist.sample(generator=torch.Generator().manual_seed(seed))


def test_scaling_factor_gives_unit_variance_on_new_images(wide_vae):
    scaling_factor = estimate_scaling_factor(wide_vae, blocky_images(0), generator=torch.Generator().manual_seed(0))

    latents = fresh_latents(wide_vae, seed=1)
    assert latents.std() > 5  # the factor has work to do
    assert (latents * scaling_factor).std().item() == pytest.approx(1.0, abs=0.1)
    assert wide_vae.config.scaling_factor == 1.0  # not registered unless asked


def test_shift_factor_centres_the_latents(wide_vae):
    batches = [blocky_images(seed, count=4) for seed in (0, 1, 2)]
    scaling_factor, shift_factor = estimate_scaling_factor(wide_vae, batches, shift=True)

    latents = fresh_latents(wide_vae, seed=3)
    assert latents.mean() * scaling_factor > 0.5  # without the shift, the scaled latents are far from centred
    shifted = (latents - shift_factor) * scaling_factor
    assert shifted.mean().item() == pytest.approx(0.0, abs=0.1)
    assert shifted.std().item() == pytest.approx(1.0, abs=0.1)


def test_batches_stream_to_the_statistics_of_the_whole(deterministic_vae, capsys):
    images = torch.cat([blocky_images(seed, count=3) for seed in (0, 1, 2)])
    with torch.no_grad():
        latents = deterministic_vae.encode(images).latent_dist.mode().double()
    expected = (1 / latents.std(correction=0).item(), latents.mean().item())

    whole = estimate_scaling_factor(deterministic_vae, images, shift=True)
    chunks = estimate_scaling_factor(deterministic_vae, (images[i : i + 2] for i in range(0, 9, 2)), shift=True)

    assert whole == pytest.approx(expected, rel=1e-5)
    assert chunks == pytest.approx(expected, rel=1e-5)  # unequal batches (2, 2, 2, 2, 1) merge exactly
    assert "Estimating the scaling factor" in capsys.readouterr().err  # a progress bar for iterables


def test_register_writes_the_config_and_save_pretrained_keeps_it(wide_vae, tmp_path):
    scaling_factor = estimate_scaling_factor(wide_vae, blocky_images(0), register=True)
    assert wide_vae.config.scaling_factor == scaling_factor
    assert wide_vae.config.shift_factor is None  # only what was estimated is written

    scaling_factor, shift_factor = estimate_scaling_factor(wide_vae, blocky_images(0), shift=True, register=True)
    wide_vae.save_pretrained(tmp_path)
    reloaded = CustomVAE.from_pretrained(tmp_path)
    assert (reloaded.config.scaling_factor, reloaded.config.shift_factor) == (scaling_factor, shift_factor)


def test_registering_a_new_scale_gives_up_a_recorded_latent_space(wide_vae):
    """A distilled VAE on another scale than its space's no longer claims it: pipelines would not warn otherwise."""
    wide_vae.register_to_config(latent_space="stable-diffusion", scaling_factor=0.18215)
    estimate_scaling_factor(wide_vae, blocky_images(0))
    assert (wide_vae.config.latent_space, wide_vae.config.scaling_factor) == ("stable-diffusion", 0.18215)
    scaling_factor = estimate_scaling_factor(wide_vae, blocky_images(0), register=True)
    assert wide_vae.config.latent_space is None and wide_vae.config.scaling_factor == scaling_factor


@pytest.mark.parametrize(
    "images, error, message",
    [
        (torch.full((2, 3, 32, 32), 255.0), ValueError, r"\[-1, 1\].*\[255, 255\]"),
        (torch.zeros(2, 1, 32, 32), ValueError, r"\(batch, 3, height, width\).*\(2, 1, 32, 32\)"),
        ([], ValueError, "at least one batch"),
        ([{"pixel_values": torch.zeros(2, 3, 32, 32)}], TypeError, "got a batch of type dict"),
        (torch.full((2, 3, 32, 32), float("nan")), ValueError, "6144 NaN"),
        (
            [blocky_images(0), blocky_images(1).index_fill(2, torch.tensor([3]), float("inf"))],
            ValueError,
            "hold 768 NaN",
        ),
        (
            torch.ones(2, 3, 32, 32, dtype=torch.uint8),
            TypeError,
            r"floating-point.*torch.uint8",
        ),
    ],
    ids=["0-255 pixels", "grey images", "empty iterable", "dict batches", "NaN images", "inf in a batch", "uint8"],
)
def test_bad_images_are_refused_clearly(tiny_vae, images, error, message):
    with pytest.raises(error, match=message):
        estimate_scaling_factor(tiny_vae, images, register=True)
    assert tiny_vae.config.scaling_factor == 1.0 and tiny_vae.config.shift_factor is None


@pytest.mark.parametrize(
    "not_a_vae, got", [("user/dog-vae", "the str 'user/dog-vae'"), (None, "None")], ids=["repo id", "None"]
)
def test_what_is_not_a_vae_is_refused_clearly(not_a_vae, got):
    with pytest.raises(TypeError, match=rf"VAE.*{got}"):
        estimate_scaling_factor(not_a_vae, blocky_images(0))


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")], ids=["NaN", "inf"])
def test_non_finite_latents_are_refused_and_nothing_is_registered(wide_vae, tmp_path, bad_value):
    """A VAE with a broken weight (or float16 overflow) encodes finite images into NaN or infinite latents."""
    with torch.no_grad():
        wide_vae.encoder.conv_out.bias[0] = bad_value
    with pytest.raises(ValueError, match=r"latents.*not finite"):
        estimate_scaling_factor(wide_vae, blocky_images(0), shift=True, register=True)
    wide_vae.save_pretrained(tmp_path)
    config = (tmp_path / "config.json").read_text()
    assert '"scaling_factor": 1.0' in config and '"shift_factor": null' in config


def test_constant_latents_have_no_scaling_factor(deterministic_vae):
    with torch.no_grad():
        deterministic_vae.encoder.conv_out.weight.zero_()  # every latent is its bias...
        deterministic_vae.encoder.conv_out.bias[:4] = 1000.0  # ...and float32's spacing at 1000 hides the noise
    with pytest.raises(ValueError, match="variance is 0"):
        estimate_scaling_factor(deterministic_vae, blocky_images(0))
