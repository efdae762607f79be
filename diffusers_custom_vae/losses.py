"""Training losses for a KL autoencoder: the latent-diffusion recipe, each term optional and reported on its own.

    loss = rec + ms_ssim_scale * (1 - MS-SSIM) + perceptual_scale * LPIPS    (the "nll": `ReconstructionLoss`)
         + kl_scale * KL / pixels                                            (KL warmed up over kl_warmup_steps)
         + adaptive_weight * g_adv                                           (from disc_start on: `AdversarialLoss`)

The weights are named and mean what they mean in diffusers' `train_autoencoderkl.py` and CompVis'
`LPIPSWithDiscriminator` (`--kl_scale`, `--perceptual_scale`, `--disc_scale`, `--disc_start`), and the trainer's flags
carry the same names. Those sum the reconstruction over the pixels of an image; here it is averaged, so the KL (summed
over latent dimensions, as `posterior.kl()` returns it) is divided by the number of values in one image (C * H * W) to
keep their balance: `kl_scale=1e-6` is their `--kl_scale 1e-6`.
"""

import math

import torch
import torch.nn.functional as F
from accelerate.utils import extract_model_from_parallel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn
from torch.func import functional_call

from .metrics import ms_ssim
from .modeling_custom_vae import CustomVAEOutput

RECONSTRUCTION_LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss}
LPIPS_NETS = ("vgg", "alex", "squeeze")
MAX_ADAPTIVE_WEIGHT = 1e4


class PatchDiscriminator(ModelMixin, ConfigMixin):
    r"""
    The PatchGAN discriminator of pix2pix and taming-transformers: one real-vs-fake logit per overlapping patch of
    the image (70x70 pixels with the defaults), initialised as they initialise it.

    Images (B, in_channels, H, W) -> logits (B, 1, H / 2**num_layers - 2, W / 2**num_layers - 2).

    Parameters:
        in_channels (`int`, *optional*, defaults to 3): Channels of the images.
        base_channels (`int`, *optional*, defaults to 64):
            Width of the first convolution; each later one doubles it, up to 8 times `base_channels`.
        num_layers (`int`, *optional*, defaults to 3):
            Stride-2 convolutions. Each doubles the patch a logit sees; images need at least `3 * 2**num_layers`
            pixels per side.
        norm (`str`, *optional*, defaults to `"group"`):
            `"group"` (GroupNorm, at most 32 groups) or `"batch"` (BatchNorm, as in pix2pix and taming). GroupNorm
            is the default because it does not depend on the batch: it behaves the same in training and evaluation,
            works at batch size 1, and data-parallel ranks need no synchronised statistics (SyncBatchNorm does not
            run on CPU; plain BatchNorm normalises each rank's few images on their own).
    """

    @register_to_config
    def __init__(self, in_channels: int = 3, base_channels: int = 64, num_layers: int = 3, norm: str = "group"):
        super().__init__()
        norms = {"group": lambda width: nn.GroupNorm(math.gcd(32, width), width), "batch": nn.BatchNorm2d}
        if norm not in norms:
            raise ValueError(f"PatchDiscriminator's norm must be one of {sorted(norms)}, got {norm!r}.")
        if num_layers < 1 or base_channels < 1:
            raise ValueError(
                f"PatchDiscriminator needs num_layers >= 1 and base_channels >= 1, "
                f"got num_layers={num_layers}, base_channels={base_channels}."
            )
        widths = [base_channels * min(2**n, 8) for n in range(num_layers + 1)]
        layers = [nn.Conv2d(in_channels, widths[0], kernel_size=4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for n in range(1, num_layers + 1):
            stride = 2 if n < num_layers else 1  # the last of these keeps the resolution
            layers += [
                nn.Conv2d(widths[n - 1], widths[n], kernel_size=4, stride=stride, padding=1, bias=False),
                norms[norm](widths[n]),
                nn.LeakyReLU(0.2),
            ]
        layers.append(nn.Conv2d(widths[-1], 1, kernel_size=4, stride=1, padding=1))
        self.layers = nn.Sequential(*layers)
        self.apply(_pix2pix_init)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        smallest = 3 * 2**self.config.num_layers
        if min(images.shape[-2:]) < smallest:
            raise ValueError(
                f"PatchDiscriminator with num_layers={self.config.num_layers} needs images of at least "
                f"{smallest}x{smallest} pixels, got {tuple(images.shape[-2:])}; use fewer layers or larger crops."
            )
        return self.layers(images)


def _pix2pix_init(module: nn.Module):
    """Convolutions N(0, 0.02), norm scales N(1, 0.02), biases 0 (pix2pix's and taming's `weights_init`)."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, (nn.GroupNorm, nn.BatchNorm2d)):
        nn.init.normal_(module.weight, 1.0, 0.02)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)


def hinge_discriminator_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """Hinge loss of the discriminator: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


class ReconstructionLoss(nn.Module):
    r"""
    How far a reconstruction is from its target: `rec_loss` (L1 or L2, averaged over pixels), plus optional
    `1 - MS-SSIM` and LPIPS terms. Their sum is the "nll" of the latent-diffusion recipe.

    Args:
        rec_loss (`str`, *optional*, defaults to `"l1"`): `"l1"` or `"l2"`.
        ms_ssim_scale (`float`, *optional*, defaults to 0.0): Weight of `1 - MS-SSIM` (0: off).
        perceptual_scale (`float`, *optional*, defaults to 0.0):
            Weight of LPIPS (the recipe uses 1.0). Needs the `lpips` package and its backbone's ImageNet weights.
        lpips_net (`str`, *optional*, defaults to `"vgg"`): LPIPS backbone: `"vgg"`, `"alex"` or `"squeeze"`.
    """

    def __init__(
        self, rec_loss: str = "l1", ms_ssim_scale: float = 0.0, perceptual_scale: float = 0.0, lpips_net: str = "vgg"
    ):
        super().__init__()
        if rec_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"rec_loss must be one of {sorted(RECONSTRUCTION_LOSSES)}, got {rec_loss!r}.")
        _check_non_negative(ms_ssim_scale=ms_ssim_scale, perceptual_scale=perceptual_scale)
        self.distance = RECONSTRUCTION_LOSSES[rec_loss]
        self.ms_ssim_scale, self.perceptual_scale = ms_ssim_scale, perceptual_scale
        self.lpips = _load_lpips(lpips_net) if perceptual_scale > 0 else None

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """(nll, {"rec", "ms_ssim" and "lpips" when on}) of two (B, C, H, W) batches in [-1, 1], in float32."""
        reconstruction, target = reconstruction.float(), target.float()
        if reconstruction.shape != target.shape:
            raise ValueError(
                f"The reconstruction {tuple(reconstruction.shape)} and target {tuple(target.shape)} differ in shape."
            )
        terms = {"rec": self.distance(reconstruction, target)}
        nll = terms["rec"]
        if self.ms_ssim_scale > 0:
            terms["ms_ssim"] = 1 - ms_ssim(reconstruction, target)
            nll = nll + self.ms_ssim_scale * terms["ms_ssim"]
        if self.lpips is not None:
            terms["lpips"] = self.lpips(reconstruction, target).mean()  # LPIPS takes [-1, 1], gives (B, 1, 1, 1)
            nll = nll + self.perceptual_scale * terms["lpips"]
        return nll, terms


class AdversarialLoss(nn.Module):
    r"""
    A hinge PatchGAN from `disc_start` on, its generator term weighted adaptively as in the latent-diffusion recipe.

    A step adds [`~AdversarialLoss.generator_loss`] to its own loss and, while [`~AdversarialLoss.active`],
    [`~AdversarialLoss.discriminator_loss`]; the two touch disjoint parameters, so one backward serves both.

    Args:
        discriminator (`PatchDiscriminator`):
            The discriminator, as returned by `accelerator.prepare` (a data-parallel wrapper is fine).
        disc_scale (`float`, *optional*, defaults to 0.5): Factor on the adaptive weight (diffusers' `--disc_scale`).
        disc_start (`int`, *optional*, defaults to 0): First step with the adversarial term and discriminator updates.
    """

    def __init__(self, discriminator: nn.Module, disc_scale: float = 0.5, disc_start: int = 0):
        super().__init__()
        _check_non_negative(disc_scale=disc_scale, disc_start=disc_start)
        self.discriminator, self.disc_scale, self.disc_start = discriminator, disc_scale, disc_start

    def active(self, step: int) -> bool:
        """Whether `step` has the adversarial term and a discriminator update."""
        return step >= self.disc_start

    def generator_loss(
        self, nll: torch.Tensor, reconstruction: torch.Tensor, last_layer: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict]:
        """(adaptive_weight * g_adv, {"g_adv", "adaptive_weight"}), both 0 before `disc_start`."""
        if not self.active(step):
            zero = torch.zeros((), device=reconstruction.device)
            return zero, {"g_adv": zero, "adaptive_weight": zero}
        g_adv = -self._frozen_discriminator(reconstruction).float().mean()
        weight = self.adaptive_weight(nll, g_adv, last_layer)
        return weight * g_adv, {"g_adv": g_adv, "adaptive_weight": weight}

    def _frozen_discriminator(self, images: torch.Tensor) -> torch.Tensor:
        """The discriminator's logits with its parameters detached: gradient reaches `images` only.

        The generator's loss must leave the discriminator's gradients alone (they belong to its own loss), so it runs
        the module inside any data-parallel wrapper: the wrapper would expect those gradients in this backward."""
        module = extract_model_from_parallel(self.discriminator)
        detached = {name: parameter.detach() for name, parameter in module.named_parameters()}
        return functional_call(module, detached, (images,))

    def adaptive_weight(self, nll: torch.Tensor, g_adv: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """disc_scale * ||d nll / d last_layer|| / (||d g_adv / d last_layer|| + 1e-4), clamped to [0, 1e4] first:
        the adversarial gradient at the decoder's output layer is scaled to the reconstruction gradient's size.

        `torch.autograd.grad` computes gradients for `last_layer` only and accumulates nothing into `.grad`, so
        data-parallel gradient hooks do not fire; the graph is kept for the step's own backward. Where gradients are
        off (e.g. under `torch.no_grad()`, as taming does in validation) the weight is 0."""
        if not torch.is_grad_enabled():
            return torch.zeros((), device=nll.device)
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_adv_grad = torch.autograd.grad(g_adv, last_layer, retain_graph=True)[0]
        weight = nll_grad.norm() / (g_adv_grad.norm() + 1e-4)
        return self.disc_scale * weight.clamp(0.0, MAX_ADAPTIVE_WEIGHT).detach()

    def discriminator_loss(self, target: torch.Tensor, reconstruction: torch.Tensor) -> tuple[torch.Tensor, dict]:
        r"""
        The discriminator's hinge loss on one batch; call it only while [`~AdversarialLoss.active`].

        Args:
            target (`torch.Tensor` of shape `(batch_size, channels, height, width)`): Real images, in [-1, 1].
            reconstruction (`torch.Tensor` of the same shape):
                Reconstructions of them; detached here, so only the discriminator gets gradient.

        Returns:
            `tuple(torch.Tensor, dict)`: the loss, and `d_loss`, `logits_real`, `logits_fake` (mean logits).
        """
        logits_real = self.discriminator(target).float()
        logits_fake = self.discriminator(reconstruction.detach()).float()
        loss = hinge_discriminator_loss(logits_real, logits_fake)
        return loss, {"d_loss": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}


class VAELoss(nn.Module):
    r"""
    The loss of a KL autoencoder: [`ReconstructionLoss`], KL (warmed up over `kl_warmup_steps`), and with a
    discriminator an [`AdversarialLoss`]. Argument names are the trainer's flags, which are diffusers' trainer's.

    A training step calls [`~VAELoss.generator_loss`] on the output of the (wrapped) VAE's `forward` and, while
    [`~VAELoss.adversarial_active`], [`~VAELoss.discriminator_loss`].

    Args:
        rec_loss (`str`, *optional*, defaults to `"l1"`): `"l1"` or `"l2"`, averaged over pixels.
        kl_scale (`float`, *optional*, defaults to 1e-6): Weight of the KL term (see the module docstring).
        kl_warmup_steps (`int`, *optional*, defaults to 0):
            The KL weight rises linearly from 0 at step 0 to `kl_scale` at this step (0: no warm-up).
        ms_ssim_scale (`float`, *optional*, defaults to 0.0): Weight of `1 - MS-SSIM` (0: off).
        perceptual_scale (`float`, *optional*, defaults to 0.0): Weight of LPIPS (0: off).
        disc_scale (`float`, *optional*, defaults to 0.0):
            Factor on the adaptive weight of the adversarial term (the recipe uses 0.5). Needs `discriminator`.
        disc_start (`int`, *optional*, defaults to 0): First step with the adversarial term and discriminator updates.
        discriminator (`PatchDiscriminator`, *optional*):
            The discriminator, as returned by `accelerator.prepare` (a data-parallel wrapper is fine).
        lpips_net (`str`, *optional*, defaults to `"vgg"`): LPIPS backbone: `"vgg"`, `"alex"` or `"squeeze"`.
    """

    def __init__(
        self,
        rec_loss: str = "l1",
        kl_scale: float = 1e-6,
        kl_warmup_steps: int = 0,
        ms_ssim_scale: float = 0.0,
        perceptual_scale: float = 0.0,
        disc_scale: float = 0.0,
        disc_start: int = 0,
        discriminator: nn.Module | None = None,
        lpips_net: str = "vgg",
    ):
        super().__init__()
        _check_non_negative(kl_scale=kl_scale, kl_warmup_steps=kl_warmup_steps, disc_scale=disc_scale)
        if (disc_scale > 0) != (discriminator is not None):
            raise ValueError(
                f"An adversarial term needs both disc_scale > 0 and a discriminator, got disc_scale={disc_scale} "
                f"and discriminator={type(discriminator).__name__}: pass e.g. disc_scale=0.5 and "
                "discriminator=PatchDiscriminator(), or neither."
            )
        self.reconstruction = ReconstructionLoss(rec_loss, ms_ssim_scale, perceptual_scale, lpips_net)
        self.kl_scale, self.kl_warmup_steps = kl_scale, kl_warmup_steps
        self.adversarial = AdversarialLoss(discriminator, disc_scale, disc_start) if discriminator else None

    def kl_scale_at(self, step: int) -> float:
        """The KL weight at `step`: linear warm-up from 0 to `kl_scale` over `kl_warmup_steps`."""
        if self.kl_warmup_steps == 0:
            return self.kl_scale
        return self.kl_scale * min(1.0, step / self.kl_warmup_steps)

    def adversarial_active(self, step: int) -> bool:
        """Whether `step` has the adversarial term and a discriminator update."""
        return self.adversarial is not None and self.adversarial.active(step)

    def generator_loss(
        self, output: CustomVAEOutput, target: torch.Tensor, step: int, last_layer: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r"""
        The VAE's loss for one batch.

        Args:
            output ([`CustomVAEOutput`]):
                What the (wrapped) VAE's `forward(..., return_posterior=True)` returned: `sample` and `latent_dist`.
            target (`torch.Tensor` of shape `(batch_size, channels, height, width)`): The input images, in [-1, 1].
            step (`int`): The global optimisation step (KL warm-up, `disc_start`).
            last_layer (`torch.Tensor`, *optional*):
                The weight of the decoder's last layer, where the adaptive weight compares gradients, e.g.
                `accelerator.unwrap_model(vae).decoder.conv_out.weight`. Required when there is a discriminator.

        Returns:
            `tuple(torch.Tensor, dict[str, torch.Tensor])`: the loss to backpropagate, and each term detached for
            logging: `rec`, `kl` (nats per image), `ms_ssim` and `lpips` when on, and with a discriminator `g_adv`
            and `adaptive_weight` (both 0 before `disc_start`, and `adaptive_weight` where gradients are off).
        """
        if self.adversarial is not None and last_layer is None:
            raise ValueError(
                "With a discriminator, generator_loss needs last_layer, e.g. "
                "last_layer=accelerator.unwrap_model(vae).decoder.conv_out.weight."
            )
        nll, terms = self.reconstruction(output.sample, target)
        terms["kl"] = output.latent_dist.kl().mean()  # summed over latent dims, averaged over the batch
        loss = nll + self.kl_scale_at(step) * terms["kl"] / target[0].numel()
        if self.adversarial is not None:
            adversarial, adversarial_terms = self.adversarial.generator_loss(nll, output.sample, last_layer, step)
            loss, terms = loss + adversarial, terms | adversarial_terms
        return loss, {name: value.detach() for name, value in terms.items()}

    def discriminator_loss(
        self, target: torch.Tensor, reconstruction: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The discriminator's hinge loss ([`AdversarialLoss.discriminator_loss`]), terms detached."""
        if self.adversarial is None:
            raise ValueError("discriminator_loss needs a discriminator: pass disc_scale > 0 and discriminator=.")
        loss, terms = self.adversarial.discriminator_loss(target, reconstruction)
        return loss, {name: value.detach() for name, value in terms.items()}


def _check_non_negative(**values):
    for name, value in values.items():
        if not value >= 0:  # also refuses NaN
            raise ValueError(f"{name} must be >= 0, got {value}.")


def _load_lpips(net: str) -> nn.Module:
    """The `lpips` package's LPIPS, frozen, without dropout (so train and eval mode agree), or a clear error."""
    if net not in LPIPS_NETS:
        raise ValueError(f"lpips_net must be one of {LPIPS_NETS}, got {net!r}.")
    try:
        import lpips
    except Exception as error:  # ImportError, or the RuntimeError of a torchvision that doesn't fit torch
        raise ImportError(
            f"perceptual_scale > 0 (--perceptual_scale) needs the `lpips` package: `pip install lpips`, with a "
            f"torchvision built for your torch ({torch.__version__}). Importing it failed: {error!r}"
        ) from error
    try:
        return lpips.LPIPS(net=net, use_dropout=False, verbose=False).requires_grad_(False).eval()
    except Exception as error:  # typically the backbone's download failing offline
        raise OSError(
            f"LPIPS could not load the ImageNet weights of its {net!r} backbone. torchvision downloads them on first "
            f"use into {torch.hub.get_dir()}/checkpoints; on a machine without internet, copy the file named below "
            f"there (or set TORCH_HOME). Cause: {error!r}"
        ) from error
