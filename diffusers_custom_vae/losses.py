"""Training losses for a KL autoencoder: the latent-diffusion recipe, each term optional and reported on its own.

    loss = rec + ms_ssim_weight * (1 - MS-SSIM) + lpips_weight * LPIPS       (the "nll": reconstruction terms)
         + kl_weight * KL / pixels                                           (KL warmed up over kl_warmup_steps)
         + adaptive_weight * g_adv                                           (from disc_start on)

The weights mean what they mean in CompVis' `LPIPSWithDiscriminator` and diffusers' `train_autoencoderkl.py`
(`--kl_scale`, `--perceptual_scale`, `--disc_scale`, `--disc_start`). Those sum the reconstruction over the pixels of
an image; here it is averaged, so the KL (summed over latent dimensions, as `posterior.kl()` returns it) is divided
by the number of values in one image (C * H * W) to keep their balance: `kl_weight=1e-6` is their `--kl_scale 1e-6`.
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


class VAELoss(nn.Module):
    r"""
    The loss of a KL autoencoder: reconstruction (L1 or L2, optionally with MS-SSIM and LPIPS), KL, and an optional
    hinge PatchGAN term from `disc_start` on, weighted adaptively as in the latent-diffusion recipe.

    A training step calls [`~VAELoss.generator_loss`] on the output of the (wrapped) VAE's `forward` and, while
    [`~VAELoss.adversarial_active`], [`~VAELoss.discriminator_loss`] for the discriminator's own optimiser.

    Args:
        reconstruction (`str`, *optional*, defaults to `"l1"`): `"l1"` or `"l2"`, averaged over pixels.
        kl_weight (`float`, *optional*, defaults to 1e-6): Weight of the KL term (diffusers' `--kl_scale`).
        kl_warmup_steps (`int`, *optional*, defaults to 0):
            The KL weight rises linearly from 0 at step 0 to `kl_weight` at this step (0: no warm-up).
        ms_ssim_weight (`float`, *optional*, defaults to 0.0): Weight of `1 - MS-SSIM` (0: off).
        lpips_weight (`float`, *optional*, defaults to 0.0):
            Weight of LPIPS (diffusers' `--perceptual_scale`; the recipe uses 1.0). Needs the `lpips` package and its
            backbone's ImageNet weights (0: off).
        lpips_net (`str`, *optional*, defaults to `"vgg"`): LPIPS backbone: `"vgg"`, `"alex"` or `"squeeze"`.
        disc_weight (`float`, *optional*, defaults to 0.0):
            Factor on the adaptive weight of the adversarial term (diffusers' `--disc_scale`; the recipe uses 0.5).
            Needs `discriminator` (0: no adversarial term).
        disc_start (`int`, *optional*, defaults to 0): First step with the adversarial term and discriminator updates.
        discriminator (`PatchDiscriminator`, *optional*):
            The discriminator, as returned by `accelerator.prepare` (a data-parallel wrapper is fine).
    """

    def __init__(
        self,
        reconstruction: str = "l1",
        kl_weight: float = 1e-6,
        kl_warmup_steps: int = 0,
        ms_ssim_weight: float = 0.0,
        lpips_weight: float = 0.0,
        lpips_net: str = "vgg",
        disc_weight: float = 0.0,
        disc_start: int = 0,
        discriminator: nn.Module | None = None,
    ):
        super().__init__()
        if reconstruction not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"reconstruction must be one of {sorted(RECONSTRUCTION_LOSSES)}, got {reconstruction!r}.")
        weights = dict(
            kl_weight=kl_weight,
            ms_ssim_weight=ms_ssim_weight,
            lpips_weight=lpips_weight,
            disc_weight=disc_weight,
            kl_warmup_steps=kl_warmup_steps,
            disc_start=disc_start,
        )
        for name, value in weights.items():
            if not value >= 0:  # also refuses NaN
                raise ValueError(f"{name} must be >= 0, got {value}.")
        if (disc_weight > 0) != (discriminator is not None):
            raise ValueError(
                f"An adversarial term needs both disc_weight > 0 and a discriminator, got disc_weight={disc_weight} "
                f"and discriminator={type(discriminator).__name__}: pass e.g. disc_weight=0.5 and "
                "discriminator=PatchDiscriminator(), or neither."
            )
        self.reconstruction_loss = RECONSTRUCTION_LOSSES[reconstruction]
        self.kl_weight, self.kl_warmup_steps = kl_weight, kl_warmup_steps
        self.ms_ssim_weight, self.lpips_weight = ms_ssim_weight, lpips_weight
        self.disc_weight, self.disc_start = disc_weight, disc_start
        self.discriminator = discriminator
        self.lpips = _load_lpips(lpips_net) if lpips_weight > 0 else None

    def kl_weight_at(self, step: int) -> float:
        """The KL weight at `step`: linear warm-up from 0 to `kl_weight` over `kl_warmup_steps`."""
        if self.kl_warmup_steps == 0:
            return self.kl_weight
        return self.kl_weight * min(1.0, step / self.kl_warmup_steps)

    def adversarial_active(self, step: int) -> bool:
        """Whether `step` has the adversarial term and a discriminator update."""
        return self.discriminator is not None and step >= self.disc_start

    def generator_loss(
        self,
        output: CustomVAEOutput,
        target: torch.Tensor,
        step: int,
        last_layer: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r"""
        The VAE's loss for one batch.

        Args:
            output ([`CustomVAEOutput`]):
                What the (wrapped) VAE's `forward` returned, or any object with its `sample` and `latent_dist`.
            target (`torch.Tensor` of shape `(batch_size, channels, height, width)`): The input images, in [-1, 1].
            step (`int`): The global optimisation step (KL warm-up, `disc_start`).
            last_layer (`torch.Tensor`, *optional*):
                The weight of the decoder's last layer, where the adaptive weight compares gradients, e.g.
                `accelerator.unwrap_model(vae).decoder.conv_out.weight`. Required when there is a discriminator.

        Returns:
            `tuple(torch.Tensor, dict[str, torch.Tensor])`: the loss to backpropagate, and each term detached for
            logging: `rec`, `kl` (nats per image), `ms_ssim` and `lpips` when on, and with a discriminator `g_adv`
            and `adaptive_weight` (both 0 before `disc_start`; `adaptive_weight` is also 0 where gradients are
            off, e.g. under `torch.no_grad()`, as taming does in validation).
        """
        reconstruction, target = output.sample.float(), target.float()
        if reconstruction.shape != target.shape:
            raise ValueError(
                f"The reconstruction {tuple(reconstruction.shape)} and target {tuple(target.shape)} differ in shape."
            )
        if self.discriminator is not None and last_layer is None:
            raise ValueError(
                "With a discriminator, generator_loss needs last_layer, e.g. "
                "last_layer=accelerator.unwrap_model(vae).decoder.conv_out.weight."
            )
        terms = {"rec": self.reconstruction_loss(reconstruction, target)}
        nll = terms["rec"]
        if self.ms_ssim_weight > 0:
            terms["ms_ssim"] = 1 - ms_ssim(reconstruction, target)
            nll = nll + self.ms_ssim_weight * terms["ms_ssim"]
        if self.lpips is not None:
            terms["lpips"] = self.lpips(reconstruction, target).mean()  # LPIPS takes [-1, 1], gives (B, 1, 1, 1)
            nll = nll + self.lpips_weight * terms["lpips"]
        terms["kl"] = output.latent_dist.kl().mean()  # summed over latent dims, averaged over the batch
        loss = nll + self.kl_weight_at(step) * terms["kl"] / target[0].numel()

        if self.discriminator is not None:
            terms["g_adv"] = terms["adaptive_weight"] = torch.zeros((), device=target.device)
            if self.adversarial_active(step):
                terms["g_adv"] = -self._frozen_discriminator(reconstruction).float().mean()
                terms["adaptive_weight"] = self.adaptive_weight(nll, terms["g_adv"], last_layer)
                loss = loss + terms["adaptive_weight"] * terms["g_adv"]
        return loss, {name: value.detach() for name, value in terms.items()}

    def _frozen_discriminator(self, images: torch.Tensor) -> torch.Tensor:
        """The discriminator's logits with its parameters detached: gradient reaches `images` only.

        The generator's step must leave the discriminator's gradients alone (they belong to its own step), so it runs
        the module inside any data-parallel wrapper: the wrapper would expect those gradients in this backward."""
        module = extract_model_from_parallel(self.discriminator)
        detached = {name: parameter.detach() for name, parameter in module.named_parameters()}
        return functional_call(module, detached, (images,))

    def adaptive_weight(self, nll: torch.Tensor, g_adv: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
        """disc_weight * ||d nll / d last_layer|| / (||d g_adv / d last_layer|| + 1e-4), clamped to [0, 1e4] first:
        the adversarial gradient at the decoder's output layer is scaled to the reconstruction gradient's size.

        `torch.autograd.grad` computes gradients for `last_layer` only and accumulates nothing into `.grad`, so
        data-parallel gradient hooks do not fire; the graph is kept for the step's own backward."""
        if not torch.is_grad_enabled():
            return torch.zeros((), device=nll.device)
        nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
        g_adv_grad = torch.autograd.grad(g_adv, last_layer, retain_graph=True)[0]
        weight = nll_grad.norm() / (g_adv_grad.norm() + 1e-4)
        return self.disc_weight * weight.clamp(0.0, MAX_ADAPTIVE_WEIGHT).detach()

    def discriminator_loss(
        self, target: torch.Tensor, reconstruction: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        r"""
        The discriminator's hinge loss on one batch; call it only while [`~VAELoss.adversarial_active`].

        Args:
            target (`torch.Tensor` of shape `(batch_size, channels, height, width)`): Real images, in [-1, 1].
            reconstruction (`torch.Tensor` of the same shape):
                The VAE's reconstructions of them; detached here, so only the discriminator gets gradient.

        Returns:
            `tuple(torch.Tensor, dict[str, torch.Tensor])`: the loss, and `d_loss`, `logits_real`, `logits_fake`
            (mean logits) detached for logging.
        """
        if self.discriminator is None:
            raise ValueError("discriminator_loss needs a discriminator: pass disc_weight > 0 and discriminator=.")
        logits_real = self.discriminator(target).float()
        logits_fake = self.discriminator(reconstruction.detach()).float()
        loss = hinge_discriminator_loss(logits_real, logits_fake)
        terms = {"d_loss": loss, "logits_real": logits_real.mean(), "logits_fake": logits_fake.mean()}
        return loss, {name: value.detach() for name, value in terms.items()}


def _load_lpips(net: str) -> nn.Module:
    """The `lpips` package's LPIPS, frozen, without dropout (so train and eval mode agree), or a clear error."""
    if net not in LPIPS_NETS:
        raise ValueError(f"lpips_net must be one of {LPIPS_NETS}, got {net!r}.")
    try:
        import lpips
    except Exception as error:  # ImportError, or the RuntimeError of a torchvision that doesn't fit torch
        raise ImportError(
            f"lpips_weight > 0 needs the `lpips` package: `pip install lpips`, with a torchvision built for your "
            f"torch ({torch.__version__}). Importing it failed: {error!r}"
        ) from error
    try:
        return lpips.LPIPS(net=net, use_dropout=False, verbose=False).requires_grad_(False).eval()
    except Exception as error:  # typically the backbone's download failing offline
        raise OSError(
            f"LPIPS could not load the ImageNet weights of its {net!r} backbone. torchvision downloads them on first "
            f"use into {torch.hub.get_dir()}/checkpoints; on a machine without internet, copy the file named below "
            f"there (or set TORCH_HOME). Cause: {error!r}"
        ) from error
