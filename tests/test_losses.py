import copy
import sys
import types
import urllib.error

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from torch import nn

from diffusers_custom_vae import CustomVAE
from diffusers_custom_vae.losses import MAX_ADAPTIVE_WEIGHT, PatchDiscriminator, VAELoss, hinge_discriminator_loss


def tiny_discriminator() -> PatchDiscriminator:
    torch.manual_seed(1)
    return PatchDiscriminator(base_channels=8, num_layers=2)  # 16x16 images -> 2x2 logits


@pytest.fixture
def images() -> torch.Tensor:
    torch.manual_seed(2)
    return torch.rand(2, 3, 16, 16) * 2 - 1


class FakeLPIPS(nn.Module):
    """Stands in for `lpips.LPIPS` (same constructor keywords and (B, 1, 1, 1) output): a distance between the
    features of a fixed random convolution. It lets the tests check the wiring (the net is frozen and the term
    reaches the VAE's parameters), not LPIPS itself, whose backbone weights cannot be downloaded here."""

    def __init__(self, net: str, use_dropout: bool, verbose: bool):
        super().__init__()
        self.net = net
        self.features = nn.Conv2d(3, 4, kernel_size=3)

    def forward(self, in0: torch.Tensor, in1: torch.Tensor) -> torch.Tensor:
        return (self.features(in0) - self.features(in1)).pow(2).mean(dim=(1, 2, 3), keepdim=True)


@pytest.fixture
def fake_lpips(monkeypatch):
    module = types.ModuleType("lpips")
    module.LPIPS = FakeLPIPS
    monkeypatch.setitem(sys.modules, "lpips", module)
    return module


def generator_step(vae, loss_fn, images, step=0):
    """Runs one generator loss through the VAE's forward (fixed posterior sample) and backward.
    Returns the loss, the logged terms and every VAE parameter's gradient (zeros where none)."""
    vae.zero_grad()
    output = vae(images, sample_posterior=True, generator=torch.Generator().manual_seed(0), return_posterior=True)
    loss, terms = loss_fn.generator_loss(output, images, step, last_layer=vae.decoder.conv_out.weight)
    loss.backward()
    grads = {name: torch.zeros_like(p) if p.grad is None else p.grad.clone() for name, p in vae.named_parameters()}
    return loss, terms, grads


# Each term: options that turn it on, and the baseline without it (None: no loss at all; "step 0": the same loss
# before disc_start). The gradient a term alone gives is the difference of the two, taken at step 1.
TERMS = {
    "rec_l1": (dict(rec_loss="l1", kl_scale=0), None),
    "rec_l2": (dict(rec_loss="l2", kl_scale=0), None),
    "ms_ssim": (dict(kl_scale=0, ms_ssim_scale=1.0), dict(kl_scale=0)),
    "lpips": (dict(kl_scale=0, perceptual_scale=1.0), dict(kl_scale=0)),
    "kl": (dict(kl_scale=1.0), dict(kl_scale=0)),
    "g_adv": (dict(kl_scale=0, disc_scale=0.5, disc_start=1), "step 0"),
}


@pytest.mark.parametrize("term", TERMS)
def test_each_term_alone_gives_gradient_to_the_vae(term, tiny_vae, images, fake_lpips):
    with_term, without_term = TERMS[term]
    discriminator = tiny_discriminator() if "disc_scale" in with_term else None
    loss_fn = VAELoss(**with_term, discriminator=discriminator)
    _, _, grads = generator_step(tiny_vae, loss_fn, images, step=1)
    if without_term is None:
        baseline = {name: torch.zeros_like(g) for name, g in grads.items()}
    elif without_term == "step 0":  # the same loss before disc_start
        baseline = generator_step(tiny_vae, loss_fn, images, step=0)[2]
    else:
        baseline = generator_step(tiny_vae, VAELoss(**without_term), images, step=1)[2]
    from_term = {name: grads[name] - baseline[name] for name in grads}

    assert from_term["encoder.conv_in.weight"].abs().max() > 1e-6
    if term == "kl":  # the KL depends on the encoder only
        assert all(g.abs().max() == 0 for name, g in from_term.items() if name.startswith("decoder."))
    else:
        assert from_term["decoder.conv_out.weight"].abs().max() > 1e-6
    if discriminator is not None:  # the generator's step leaves the discriminator's gradients alone
        assert all(p.grad is None for p in discriminator.parameters())


def test_terms_are_reported_detached_with_the_loss_they_sum_to(tiny_vae, images, fake_lpips):
    loss_fn = VAELoss(
        kl_scale=1e-3, ms_ssim_scale=0.3, perceptual_scale=0.2, disc_scale=0.5, discriminator=tiny_discriminator()
    )
    loss, terms, _ = generator_step(tiny_vae, loss_fn, images)
    assert set(terms) == {"rec", "ms_ssim", "lpips", "kl", "g_adv", "adaptive_weight"}
    assert not any(value.requires_grad for value in terms.values())
    expected = (
        terms["rec"]
        + 0.3 * terms["ms_ssim"]
        + 0.2 * terms["lpips"]
        + 1e-3 * terms["kl"] / images[0].numel()
        + terms["adaptive_weight"] * terms["g_adv"]
    )
    torch.testing.assert_close(loss.detach(), expected)
    assert loss_fn.reconstruction.lpips.net == "vgg" and not any(
        p.requires_grad for p in loss_fn.reconstruction.lpips.parameters()
    )


def test_kl_warmup_is_linear_then_constant(tiny_vae, images):
    loss_fn = VAELoss(kl_scale=2e-3, kl_warmup_steps=10)
    assert [loss_fn.kl_scale_at(step) for step in (0, 5, 10, 1000)] == pytest.approx([0, 1e-3, 2e-3, 2e-3])
    assert VAELoss(kl_scale=2e-3).kl_scale_at(0) == 2e-3
    for step in (0, 5):
        loss, terms, _ = generator_step(tiny_vae, loss_fn, images, step=step)
        expected = terms["rec"] + loss_fn.kl_scale_at(step) * terms["kl"] / images[0].numel()
        torch.testing.assert_close(loss.detach(), expected)


def test_adversarial_term_is_off_and_free_before_disc_start(tiny_vae, images):
    discriminator = tiny_discriminator()
    calls = []
    discriminator.register_forward_hook(lambda *args: calls.append(1))
    loss_fn = VAELoss(kl_scale=0, disc_scale=0.5, disc_start=3, discriminator=discriminator)
    plain_loss = generator_step(tiny_vae, VAELoss(kl_scale=0), images)[0]

    loss, terms, _ = generator_step(tiny_vae, loss_fn, images, step=2)
    assert not loss_fn.adversarial_active(2) and not calls
    assert terms["g_adv"] == 0 and terms["adaptive_weight"] == 0 and loss == plain_loss

    loss, terms, _ = generator_step(tiny_vae, loss_fn, images, step=3)
    assert loss_fn.adversarial_active(3) and len(calls) == 1
    assert terms["g_adv"] != 0 and terms["adaptive_weight"] > 0 and loss != plain_loss


def test_adaptive_weight_matches_a_direct_computation(tiny_vae, images):
    discriminator = tiny_discriminator()
    loss_fn = VAELoss(kl_scale=0, disc_scale=0.5, discriminator=discriminator)
    last_layer = tiny_vae.decoder.conv_out.weight
    output = tiny_vae(images, sample_posterior=True, generator=torch.Generator().manual_seed(0), return_posterior=True)
    loss, terms = loss_fn.generator_loss(output, images, 0, last_layer)

    rec = F.l1_loss(output.sample, images)
    g_adv = -discriminator(output.sample).mean()
    rec_grad = torch.autograd.grad(rec, last_layer, retain_graph=True)[0]
    g_adv_grad = torch.autograd.grad(g_adv, last_layer)[0]
    expected = 0.5 * rec_grad.norm() / (g_adv_grad.norm() + 1e-4)
    torch.testing.assert_close(terms["adaptive_weight"], expected)
    torch.testing.assert_close(loss, rec + expected * g_adv)
    with torch.no_grad():  # validation: no gradients to compare, so no adversarial term (as taming does)
        assert (
            loss_fn.generator_loss(tiny_vae(images, return_posterior=True), images, 0, last_layer)[1][
                "adaptive_weight"
            ]
            == 0
        )


def test_adaptive_weight_is_clamped():
    loss_fn = VAELoss(disc_scale=0.5, discriminator=tiny_discriminator())
    last_layer = nn.Parameter(torch.ones(3))
    huge = loss_fn.adversarial.adaptive_weight(1e9 * last_layer.sum(), 1e-9 * last_layer.sum(), last_layer)
    no_adversarial_gradient = loss_fn.adversarial.adaptive_weight(last_layer.sum(), 0 * last_layer.sum(), last_layer)
    assert huge == no_adversarial_gradient == 0.5 * MAX_ADAPTIVE_WEIGHT
    assert not huge.requires_grad


def test_discriminator_loss_trains_the_discriminator_only(tiny_vae, images):
    discriminator = tiny_discriminator()
    loss_fn = VAELoss(disc_scale=0.5, discriminator=discriminator)
    reconstruction = tiny_vae(images).sample
    loss, terms = loss_fn.discriminator_loss(images, reconstruction)
    loss.backward()
    assert all(p.grad is None for p in tiny_vae.parameters())
    # Every weight learns (the last bias's gradient is 0 where real and fake logits are equal on average).
    assert all(p.grad.abs().max() > 0 for name, p in discriminator.named_parameters() if name.endswith("weight"))
    logits_real, logits_fake = discriminator(images), discriminator(reconstruction)
    torch.testing.assert_close(terms["d_loss"], hinge_discriminator_loss(logits_real, logits_fake))
    torch.testing.assert_close(terms["logits_fake"], logits_fake.mean())


def test_hinge_loss_on_known_logits():
    # real: relu(1 - [2, 0.5]) = [0, 0.5]; fake: relu(1 + [-3, 0]) = [0, 1]
    loss = hinge_discriminator_loss(torch.tensor([2.0, 0.5]), torch.tensor([-3.0, 0.0]))
    assert loss.item() == pytest.approx(0.5 * (0.25 + 0.5))
    assert hinge_discriminator_loss(torch.tensor([1.0, 5.0]), torch.tensor([-1.0, -7.0])).item() == 0


@pytest.mark.parametrize("norm", ["group", "batch"])
def test_discriminator_save_pretrained_round_trip(norm, tmp_path):
    torch.manual_seed(0)
    discriminator = PatchDiscriminator(base_channels=8, num_layers=2, norm=norm).eval()
    discriminator.save_pretrained(tmp_path)
    loaded = PatchDiscriminator.from_pretrained(tmp_path).eval()
    public = lambda config: {key: value for key, value in config.items() if not key.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(discriminator.config) != {}
    images = torch.rand(2, 3, 16, 16)
    logits = discriminator(images)
    assert torch.equal(loaded(images), logits)
    assert logits.shape == (2, 1, 2, 2) and torch.isfinite(logits).all()  # 16 / 2**2 - 2


def test_discriminator_is_initialised_as_in_pix2pix():
    torch.manual_seed(0)
    discriminator = PatchDiscriminator()
    conv, norm = discriminator.layers[2], discriminator.layers[3]
    assert conv.weight.std().item() == pytest.approx(0.02, rel=0.05) and conv.bias is None
    assert norm.weight.mean().item() == pytest.approx(1.0, abs=0.01) and torch.all(norm.bias == 0)
    logits = discriminator(torch.zeros(1, 3, 256, 256))
    assert logits.shape == (1, 1, 30, 30) and torch.isfinite(logits).all()  # pix2pix's 70x70 PatchGAN


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(rec_loss="l3"), "'l3'"),
        (dict(kl_scale=-1e-6), "kl_scale.*>= 0.*-1e-06"),
        (dict(ms_ssim_scale=float("nan")), "ms_ssim_scale.*>= 0.*nan"),
        (dict(perceptual_scale=-0.1), "perceptual_scale.*>= 0"),
        (dict(kl_warmup_steps=-5), "kl_warmup_steps.*>= 0.*-5"),
        (dict(disc_scale=-0.5, discriminator=PatchDiscriminator(base_channels=8)), "disc_scale.*>= 0"),
        (dict(disc_scale=0.5), "disc_scale > 0.*discriminator"),
        (dict(discriminator=PatchDiscriminator(base_channels=8)), "got disc_scale=0.0"),
        (dict(perceptual_scale=1.0, lpips_net="resnet"), "'resnet'"),
    ],
)
def test_invalid_options_are_refused(options, match):
    with pytest.raises(ValueError, match=match):
        VAELoss(**options)


def test_invalid_discriminator_and_calls_are_refused(tiny_vae, images):
    with pytest.raises(ValueError, match="norm must be one of"):
        PatchDiscriminator(norm="instance")
    with pytest.raises(ValueError, match="24x24.*\\(16, 16\\)"):
        PatchDiscriminator(base_channels=8)(images)
    loss_fn = VAELoss(disc_scale=0.5, disc_start=100, discriminator=tiny_discriminator())
    with pytest.raises(ValueError, match="needs last_layer"):  # at step 0, not only once disc_start is reached
        loss_fn.generator_loss(tiny_vae(images, return_posterior=True), images, step=0)
    with pytest.raises(ValueError, match="differ in shape"):
        VAELoss().generator_loss(tiny_vae(images, return_posterior=True), images[:, :, :8], step=0)
    with pytest.raises(ValueError, match="needs a discriminator"):
        VAELoss().discriminator_loss(images, images)


def test_lpips_unavailable_gives_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "lpips", None)  # `import lpips` fails, as it does without the package
    with pytest.raises(ImportError, match="perceptual_scale .*pip install lpips"):  # the setting's real name
        VAELoss(perceptual_scale=1.0)

    def offline_lpips(**kwargs):
        raise urllib.error.URLError("no network")  # what torchvision's download raises offline

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=offline_lpips))
    with pytest.raises(OSError, match=f"'alex' backbone.*{torch.hub.get_dir()}/checkpoints.*no network"):
        VAELoss(perceptual_scale=1.0, lpips_net="alex")


def _data_parallel_worker(rank: int, world_size: int, store: str, vae_config: dict):
    torch.set_num_threads(1)  # the two ranks share the cores
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        _check_data_parallel_gradients(rank, world_size, vae_config)
    finally:  # once the DDP wrappers are gone: destroyed under live ones, the group hung at exit (1 run in 5)
        torch.distributed.destroy_process_group()


def _check_data_parallel_gradients(rank: int, world_size: int, vae_config: dict):
    """A generator and a discriminator step through DistributedDataParallel (VAE with gradient checkpointing),
    twice, must give every rank the mean of the ranks' plain single-process gradients."""
    from torch.nn.parallel import DistributedDataParallel

    torch.manual_seed(0)
    vae, discriminator = CustomVAE(**vae_config), tiny_discriminator()
    plain_vae, plain_discriminator = copy.deepcopy(vae), copy.deepcopy(discriminator)
    vae.enable_gradient_checkpointing()
    torch.manual_seed(10 + rank)
    images = torch.rand(2, 3, 16, 16) * 2 - 1  # each rank its own batch

    def train_step(model, discriminator):
        model.zero_grad(), discriminator.zero_grad()
        loss_fn = VAELoss(kl_scale=1e-3, ms_ssim_scale=0.5, disc_scale=0.5, discriminator=discriminator)
        output = model(
            images, sample_posterior=True, generator=torch.Generator().manual_seed(rank), return_posterior=True
        )
        last_layer = extract_model_from_parallel(model).decoder.conv_out.weight
        loss_fn.generator_loss(output, images, 0, last_layer)[0].backward()
        loss_fn.discriminator_loss(images, output.sample)[0].backward()

    wrapped_vae, wrapped_discriminator = DistributedDataParallel(vae), DistributedDataParallel(discriminator)
    for _ in range(2):  # a reducer left waiting by the first step would fail the second
        train_step(wrapped_vae, wrapped_discriminator)
    train_step(plain_vae, plain_discriminator)
    for model, plain in ((vae, plain_vae), (discriminator, plain_discriminator)):
        for (name, p), plain_p in zip(model.named_parameters(), plain.parameters()):
            expected = plain_p.grad.clone()
            torch.distributed.all_reduce(expected)
            torch.testing.assert_close(
                p.grad, expected / world_size, msg=lambda m, name=name: f"rank {rank}, {name}: {m}"
            )


def test_losses_under_distributed_data_parallel(tmp_path, tiny_config):
    """Two gloo processes: the adaptive weight's autograd.grad and the discriminator's two forwards per step
    keep DistributedDataParallel's gradient reduction exact."""
    # Spawned, not forked: a child forked from a process that has run OpenMP work can hang in it.
    torch.multiprocessing.spawn(_data_parallel_worker, args=(2, str(tmp_path / "store"), tiny_config), nprocs=2)
