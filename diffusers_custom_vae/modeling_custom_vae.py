"""CustomVAE: the whole model in one file.

The architecture is the "VAE from scratch" tutorial's: residual conv blocks (`VisualBlock`), strided-conv
downsampling, nearest-neighbour upsampling, one self-attention block at the bottleneck, and a diagonal-Gaussian
(KL-regularised) latent. Module names follow the tutorial, so a `state_dict` trained with its classes loads with
`strict=True`. Around it sits what diffusers expects of a VAE: a config, `encode`/`decode` outputs, slicing, tiling,
gradient checkpointing and model offload.

This file imports only torch and diffusers, never the diffusers_custom_vae package: `save_pretrained` copies it beside
the weights, and diffusers loads it from there as remote code (`trust_remote_code=True`) where the package is not
installed. Its path is recorded in saved pipelines: it never moves.
"""

import itertools
import json
import math
import os
import shutil
import traceback
import zipfile
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.model_loading_utils import load_state_dict
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils.accelerate_utils import apply_forward_hook
from torch import nn

# diffusers has moved these before (#6129): they are imported here and nowhere else.
from diffusers.models.autoencoders.vae import (  # isort: skip
    AutoencoderMixin,
    DecoderOutput,
    DiagonalGaussianDistribution,
)
from diffusers.models.modeling_outputs import AutoencoderKLOutput  # isort: skip
from diffusers.models.attention import AttentionMixin  # isort: skip
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0  # isort: skip


class SelfAttention(nn.Module):
    """Multi-head self-attention over a sequence: (B, T, C) -> (B, T, C).

    Like `AutoencoderKL`'s attention it runs a diffusers attention processor, one of those that fit q, k and v from
    one fused `projection`: `AttnProcessor2_0` (scaled_dot_product_attention, the default), `FusedAttnProcessor2_0`
    (the same: the projection is already fused) or `AttnProcessor` (the explicit softmax, as the tutorial writes it).
    """

    PROCESSORS = (AttnProcessor2_0, FusedAttnProcessor2_0, AttnProcessor)

    def __init__(self, embed_dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.projection = nn.Linear(embed_dim, embed_dim * 3)  # q, k, v
        self.out_projection = nn.Linear(embed_dim, embed_dim)
        self.processor = AttnProcessor2_0()

    def get_processor(self):  # read by CustomVAE.attn_processors
        return self.processor

    def set_processor(self, processor):  # called by CustomVAE.set_attn_processor
        if not isinstance(processor, self.PROCESSORS):
            supported = ", ".join(cls.__name__ for cls in self.PROCESSORS)
            raise ValueError(
                f"CustomVAE's attention computes q, k and v with one fused projection and runs diffusers' "
                f"{supported}; got {type(processor).__name__}, which expects diffusers' Attention module."
            )
        self.processor = processor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, channels = x.shape
        q, k, v = self.projection(x).chunk(3, dim=-1)
        q, k, v = (t.view(batch, tokens, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if isinstance(self.processor, AttnProcessor):
            weights = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).softmax(dim=-1)  # (B, nh, T, T)
            y = weights @ v
        else:  # softmax(q k^T / sqrt(hs)) v, without materialising the (T, T) weights
            y = F.scaled_dot_product_attention(q, k, v)
        return self.out_projection(y.transpose(1, 2).reshape(batch, tokens, channels))


class AttentionBlock(nn.Module):
    """GroupNorm, self-attention across all positions, scaled residual: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, num_heads: int = 4, norm_num_groups: int = 32):
        super().__init__()
        self.groupnorm = nn.GroupNorm(norm_num_groups, channels)
        self.attention = SelfAttention(channels, num_heads)
        self.residual_scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, height, width = x.shape
        h = self.groupnorm(x).view(batch, channels, height * width).transpose(1, 2)  # (B, HW, C)
        # (B, HW, C) -> (B, C, H, W) is a channels-last view: made contiguous, or every later layer runs channels-last,
        # whose GroupNorm backward is about 3x slower on CPU.
        h = self.attention(h).transpose(1, 2).reshape(batch, channels, height, width).contiguous()
        return h + x * self.residual_scale


class VisualBlock(nn.Module):
    """Residual block (GroupNorm, SiLU, 3x3 conv) x 2: (B, in, H, W) -> (B, out, H, W)."""

    def __init__(self, in_channels: int, out_channels: int | None = None, norm_num_groups: int = 32):
        super().__init__()
        out_channels = out_channels or in_channels
        self.groupnorm1 = nn.GroupNorm(norm_num_groups, in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.groupnorm2 = nn.GroupNorm(norm_num_groups, out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.residual_scale = nn.Parameter(torch.ones(1))
        # A 1x1 conv carries the residual across a change of width.
        self.identity = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.groupnorm1(x)))
        h = self.conv2(F.silu(self.groupnorm2(h)))
        return h + self.identity(x) * self.residual_scale


def _middle(channels: int, add_attention: bool, num_heads: int, groups: int) -> list[nn.Module]:
    """The bottleneck: VisualBlock, AttentionBlock, VisualBlock (attention optional)."""
    attention = [AttentionBlock(channels, num_heads, groups)] if add_attention else []
    return [VisualBlock(channels, norm_num_groups=groups), *attention, VisualBlock(channels, norm_num_groups=groups)]


class _Blocks(nn.Module):
    """What Encoder and Decoder run: `conv_in`, `blocks` in order (each one checkpointed when gradient checkpointing
    is on), then GroupNorm, SiLU and `conv_out`."""

    def __init__(self):
        super().__init__()
        self.gradient_checkpointing = False  # set by ModelMixin.enable_gradient_checkpointing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.blocks:
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                x = self._gradient_checkpointing_func(block, x)
            else:
                x = block(x)
        return self.conv_out(F.silu(self.norm_out(x)))


class Encoder(_Blocks):
    """Image (B, in_channels, H, W) -> Gaussian moments (B, 2 * latent_channels, H / f, W / f), mean first.

    With the defaults this is the tutorial's encoder: one row of `blocks` per resolution,
        32 @ H:      VisualBlock(32) x 2, Conv(32 -> 64, stride 2)
        64 @ H/2:    VisualBlock(64) x 2, Conv(64 -> 128, stride 2)
        128 @ H/4:   VisualBlock(128) x 2, Conv(128 -> 128, stride 2)
        128 @ H/8:   VisualBlock(128), AttentionBlock(128), VisualBlock(128)
    """

    def __init__(self, in_channels, latent_channels, widths, layers_per_block, groups, num_heads, add_attention):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, widths[0], kernel_size=3, padding=1)
        blocks = []
        for width, next_width in zip(widths[:-1], widths[1:]):
            blocks += [VisualBlock(width, norm_num_groups=groups) for _ in range(layers_per_block)]
            blocks.append(nn.Conv2d(width, next_width, kernel_size=3, stride=2, padding=1))  # halves H and W
        blocks += _middle(widths[-1], add_attention, num_heads, groups)
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(groups, widths[-1])
        self.conv_out = nn.Conv2d(widths[-1], 2 * latent_channels, kernel_size=3, padding=1)


class Decoder(_Blocks):
    """Latents (B, latent_channels, h, w) -> image (B, out_channels, h * f, w * f).

    With the defaults this is the tutorial's decoder, its channel changes made consistent:
        128 @ H/8:   VisualBlock(128), AttentionBlock(128), VisualBlock(128)
        128 @ H/4:   Upsample, VisualBlock(128), VisualBlock(128)
        64 @ H/2:    Upsample, VisualBlock(128), VisualBlock(128 -> 64)
        32 @ H:      Upsample, VisualBlock(64), VisualBlock(64 -> 32), VisualBlock(32)
    Each resolution's last block changes the width; the tutorial ends with one more block at full resolution.
    """

    def __init__(self, out_channels, latent_channels, widths, layers_per_block, groups, num_heads, add_attention):
        super().__init__()
        self.conv_in = nn.Conv2d(latent_channels, widths[-1], kernel_size=3, padding=1)
        blocks = _middle(widths[-1], add_attention, num_heads, groups)
        for width, previous_width in reversed(list(zip(widths[:-1], widths[1:]))):
            blocks.append(nn.Upsample(scale_factor=2))  # doubles H and W
            blocks += [VisualBlock(previous_width, norm_num_groups=groups) for _ in range(layers_per_block - 1)]
            blocks.append(VisualBlock(previous_width, width, norm_num_groups=groups))
        blocks.append(VisualBlock(widths[0], norm_num_groups=groups))
        self.blocks = nn.ModuleList(blocks)
        self.norm_out = nn.GroupNorm(groups, widths[0])
        self.conv_out = nn.Conv2d(widths[0], out_channels, kernel_size=3, padding=1)


@dataclass
class CustomVAEOutput(DecoderOutput):
    """
    Output of [`CustomVAE.forward`] with `return_posterior=True`: everything a training loss needs from one call.

    Args:
        sample (`torch.Tensor` of shape `(batch_size, out_channels, height, width)`):
            The reconstruction, in [-1, 1] once trained.
        latent_dist (`DiagonalGaussianDistribution`):
            The posterior the reconstruction was decoded from (its `kl()` is the KL term).
    """

    # A default, as BaseOutput expects of every field but the first: accelerate's mixed precision rebuilds outputs
    # from a dict (`CustomVAEOutput({"sample": ..., "latent_dist": ...})`), which BaseOutput supports only then.
    latent_dist: DiagonalGaussianDistribution | None = None


def downsample_factor_of(vae) -> int:
    """How many image pixels one latent spans in each direction, for a `CustomVAE`, a diffusers `AutoencoderKL` or
    either's config: each entry of `block_out_channels` after the first halves the height and width, which is also
    how pipelines compute their `vae_scale_factor`."""
    config = getattr(vae, "config", vae)
    return 2 ** (len(config["block_out_channels"]) - 1)


def _check_config(config):
    """Refuses a config that would build a broken model, or one that fails later in a torch layer or with a
    ZeroDivisionError (or in save_pretrained, for values JSON cannot hold). Each message names the field."""
    # bool is a subclass of int in Python, but True is a typo for a channel count, not the count 1.
    positive_int = lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= 1
    number = lambda value: isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    width_list = lambda value: isinstance(value, (list, tuple)) and len(value) > 0 and all(map(positive_int, value))
    flag = lambda value: isinstance(value, bool)
    rules = [  # (field, test, what the value must be), in the order of __init__'s arguments
        ("in_channels", positive_int, "a positive int"),
        ("out_channels", positive_int, "a positive int"),
        ("latent_channels", positive_int, "a positive int"),
        ("block_out_channels", width_list, "a non-empty list of positive ints (one width per resolution)"),
        ("layers_per_block", positive_int, "a positive int"),
        ("norm_num_groups", positive_int, "a positive int"),
        ("num_attention_heads", positive_int, "a positive int"),
        ("mid_block_add_attention", flag, "True or False"),
        ("scaling_factor", lambda value: number(value) and value > 0, "a finite positive number"),
        ("shift_factor", lambda value: value is None or number(value), "None or a finite number"),
        ("force_upcast", flag, "True or False"),
        ("latent_space", lambda value: value is None or isinstance(value, str), "None or a name (a str)"),
    ]
    for field, valid, expected in rules:
        if not valid(config[field]):
            raise ValueError(f"CustomVAE config: {field} must be {expected}, got {config[field]!r}.")

    widths, groups, heads = config["block_out_channels"], config["norm_num_groups"], config["num_attention_heads"]
    if any(width % groups for width in widths):
        raise ValueError(
            f"Every width in block_out_channels must be a multiple of norm_num_groups={groups}, got {tuple(widths)}."
        )
    if widths[-1] % heads:
        raise ValueError(f"The bottleneck width {widths[-1]} must be a multiple of num_attention_heads={heads}.")


def _check_input(x: torch.Tensor, channels: int, what: str, spatial_multiple: int):
    """Refuses what `encode` (`what="images"`) or `decode` (`"latents"`) cannot take, naming what it expected."""
    if not isinstance(x, torch.Tensor):
        hint = " (diffusers_custom_vae.images.pil_to_tensor converts PIL images)" if what == "images" else ""
        raise TypeError(
            f"CustomVAE expected {what} as a torch.Tensor of shape (batch, {channels}, height, width), got "
            f"{type(x).__module__}.{type(x).__qualname__}{hint}."
        )
    # Integer, bool and complex tensors would be cast to the VAE's dtype: 0-255 pixels would give a posterior
    # that is wrong without a sign (and cast back, a uint8 one), complex values would lose their imaginary part.
    if not x.is_floating_point():
        hint = " in [-1, 1]: x / 127.5 - 1 converts 0-255 pixels" if what == "images" else ""
        raise TypeError(f"CustomVAE expected {what} of a floating-point dtype{hint}; got {x.dtype}.")
    if x.ndim != 4 or x.shape[1] != channels:
        raise ValueError(
            f"CustomVAE expected {what} of shape (batch, {channels}, height, width), got {tuple(x.shape)}."
        )
    if x.numel() == 0:  # torch would fail deep inside, in a reshape or a convolution
        raise ValueError(f"CustomVAE got {what} of shape {tuple(x.shape)}, which hold no values.")
    height, width = x.shape[-2:]
    if height % spatial_multiple or width % spatial_multiple:
        m = spatial_multiple
        raise ValueError(
            f"Image height and width must be multiples of {m} (the VAE downsamples {m}x), got {height}x{width}; "
            f"resize or crop to e.g. {max(height // m, 1) * m}x{max(width // m, 1) * m}."
        )


def _tile_spans(length: int, tile: int, overlap: int) -> list[tuple[int, int]]:
    """(start, size) of the fewest equal tiles, each at most `tile` long and overlapping by at least `overlap`,
    that cover `length`. Equal tiles leave no thin leftover tile at the edge."""
    if length <= tile:
        return [(0, length)]
    count = math.ceil((length - overlap) / (tile - overlap))
    size = math.ceil((length + (count - 1) * overlap) / count)
    return [(round(i * (length - size) / (count - 1)), size) for i in range(count)]


def _tiled(fn, x: torch.Tensor, scale_in: int, scale_out: int, tile: int, overlap: int) -> torch.Tensor:
    """Applies `fn` to overlapping tiles of `x` and cross-fades the results.

    Tiles are planned on the latent grid (`tile` and `overlap` in latents): a tile of `n` latents is `n * scale_in`
    rows of `x` and `n * scale_out` rows of the output (encode: scale_in = f, scale_out = 1; decode: the reverse).
    """
    rows = _tile_spans(x.shape[-2] // scale_in, tile, overlap)
    cols = _tile_spans(x.shape[-1] // scale_in, tile, overlap)

    def ramp(size: int) -> torch.Tensor:  # (size * scale_out,) weights, rising linearly over the overlap at both ends
        position = torch.arange(size * scale_out, device=x.device)
        distance_to_edge = torch.minimum(position, position.flip(0))
        return ((distance_to_edge + 1) / (overlap * scale_out + 1)).clamp(max=1.0)

    weight = ramp(rows[0][1])[:, None] * ramp(cols[0][1])  # one for every tile: tiles along an axis are equal
    span = lambda start, size, scale: slice(start * scale, (start + size) * scale)
    out = total_weight = None
    for (top, height), (left, width) in itertools.product(rows, cols):
        piece = fn(x[..., span(top, height, scale_in), span(left, width, scale_in)]).float()
        if out is None:  # (B, C_out, H_out, W_out), accumulated in float32
            out_size = (x.shape[-2] // scale_in * scale_out, x.shape[-1] // scale_in * scale_out)
            out, total_weight = piece.new_zeros(*piece.shape[:2], *out_size), piece.new_zeros(out_size)
        out_rows, out_cols = span(top, height, scale_out), span(left, width, scale_out)
        out[..., out_rows, out_cols] += piece * weight
        total_weight[out_rows, out_cols] += weight
    return (out / total_weight).to(x.dtype)


# ---------------------------------------------------------------------------------------------------- strict loading


class StrictLoadingMixin:
    """Makes a diffusers `ModelMixin` class load strictly, where diffusers only warns about missing, unexpected or
    mismatched weights (left random or on the meta device), and casts integer weights and loads NaN without a word.
    It lives in this file because from a pipeline's Hub repo diffusers downloads only this one code file
    (tests/test_remote_code.py); `load_vae` applies it to `AutoencoderKL` too."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        r"""
        Load a saved model from a local folder or a Hub repo id, as [`ModelMixin.from_pretrained`] does (all its
        arguments work, `device_map` with CPU or disk offload included), but refuse:

        - weights missing from the files, unexpected ones, or ones of another shape (`ValueError`, "don't fit its
          config.json");
        - weights that are not floating-point (int8, bool, ...), which diffusers would silently cast (`ValueError`);
        - NaN or inf weights, also those that only overflow in `torch_dtype` (`ValueError`);
        - files that are truncated or corrupt, and pickles (`.bin`) that hold Python objects besides tensors, refused
          for safety since unpickling them could run any code (`OSError`).

        Weights that `device_map` offloads to the CPU or the disk are checked as well.
        """
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except Exception as error:
            # diffusers' error for a file it cannot read says neither why nor, in words to rely on, which file: the
            # file is the argument of the `load_state_dict` call that failed.
            frames = (frame for frame, _ in traceback.walk_tb(error.__traceback__))
            files = [
                frame.f_locals.get("checkpoint_file") for frame in frames if frame.f_code is load_state_dict.__code__
            ]
            if not files or not isinstance(files[-1], str):
                raise
            raise _unreadable(files[-1], error) from error

    @classmethod
    def _load_pretrained_model(cls, model, state_dict, resolved_model_file, source, *args, **kwargs):
        # diffusers calls this with what it read, before it casts or places any weight: the state_dict of a single
        # file, or the shard files it then reads one at a time (as this does first). `model` may be on the meta device.
        state_dicts = [state_dict] if state_dict is not None else map(load_state_dict, resolved_model_file)
        if problem := _weights_problem(model, state_dicts, source):
            raise problem
        return super()._load_pretrained_model(model, state_dict, resolved_model_file, source, *args, **kwargs)


class CustomVAE(StrictLoadingMixin, ModelMixin, AttentionMixin, AutoencoderMixin, ConfigMixin):
    r"""
    The tutorial's VAE, with KL loss, for encoding images into latents and decoding latents into images.

    This model inherits from [`ModelMixin`]: `save_pretrained`, `from_pretrained` and `push_to_hub` work as for
    diffusers' own models (`diffusers_custom_vae.push_vae_to_hub` uploads it with the package's model card). Defaults
    give the tutorial's architecture (8x downsampling, 4 latent channels).

    Parameters:
        in_channels (`int`, *optional*, defaults to 3): Number of channels in the input image.
        out_channels (`int`, *optional*, defaults to 3): Number of channels in the output image.
        latent_channels (`int`, *optional*, defaults to 4): Number of channels in the latent space.
        block_out_channels (`tuple[int]`, *optional*, defaults to `(32, 64, 128, 128)`):
            Width of each resolution, full resolution first. Each entry after the first halves the height and width,
            so pipelines compute a scale factor of `2 ** (len(block_out_channels) - 1)`.
        layers_per_block (`int`, *optional*, defaults to 2): `VisualBlock`s per resolution.
        norm_num_groups (`int`, *optional*, defaults to 32): Groups of every GroupNorm; divides every width.
        num_attention_heads (`int`, *optional*, defaults to 4): Heads of the bottleneck's self-attention.
        mid_block_add_attention (`bool`, *optional*, defaults to `True`):
            Whether the bottleneck has self-attention (between its two `VisualBlock`s).
        scaling_factor (`float`, *optional*, defaults to 1.0):
            Pipelines multiply latents by it so the diffusion model sees unit variance (`z * scaling_factor`) and
            divide by it before decoding. Estimate it from data with `estimate_scaling_factor`.
        shift_factor (`float`, *optional*): Subtracted from latents before scaling (SD3/Flux convention).
        force_upcast (`bool`, *optional*, defaults to `False`):
            Whether pipelines should keep this VAE in float32 when they run in float16.
        latent_space (`str`, *optional*):
            The latent space this VAE's latents live in: `None` for its own (trained from scratch), or the name of the
            space it was aligned to: `"stable-diffusion"` (the SD 1.x/2.x VAE's), `"stable-diffusion-xl"` (SDXL's),
            or a name of your own that VAEs sharing one space carry. A diffusion model only denoises latents of the
            space it was trained in: `swap_vae` warns when this differs from the space of the pipeline's VAE.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["VisualBlock", "AttentionBlock"]
    _skip_layerwise_casting_patterns = ["norm"]  # GroupNorms stay in float32 under layerwise casting

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        out_channels: int = 3,
        latent_channels: int = 4,
        block_out_channels: tuple[int, ...] = (32, 64, 128, 128),
        layers_per_block: int = 2,
        norm_num_groups: int = 32,
        num_attention_heads: int = 4,
        mid_block_add_attention: bool = True,
        scaling_factor: float = 1.0,
        shift_factor: float | None = None,
        force_upcast: bool = False,
        latent_space: str | None = None,
    ):
        super().__init__()
        _check_config(self.config)  # register_to_config has recorded every argument by now
        shared = dict(
            latent_channels=latent_channels,
            widths=tuple(block_out_channels),
            layers_per_block=layers_per_block,
            groups=norm_num_groups,
            num_heads=num_attention_heads,
            add_attention=mid_block_add_attention,
        )
        self.encoder = Encoder(in_channels=in_channels, **shared)
        self.decoder = Decoder(out_channels=out_channels, **shared)

        self.use_slicing = False
        self.use_tiling = False
        self.tile_sample_min_size = 512  # images larger than this are tiled, when tiling is enabled
        self.tile_overlap = 64  # pixels shared by neighbouring tiles, cross-faded

    @property
    def downsample_factor(self) -> int:
        """How many image pixels one latent spans in each direction (8 by default)."""
        return downsample_factor_of(self)

    @property
    def post_quant_conv(self) -> nn.Conv2d:
        """The first layer latents go through. SDXL pipelines read its dtype (as `AutoencoderKL`'s) when they upcast
        a float16 VAE whose config says `force_upcast`; without it their image-to-image and inpainting fail."""
        return self.decoder.conv_in

    def set_default_attn_processor(self):
        """Use diffusers' default processor, `AttnProcessor`, as `AutoencoderKL.set_default_attn_processor` does: the
        tutorial's explicit softmax, whose (T, T) weights take memory that grows with the square of the latent area."""
        self.set_attn_processor(AttnProcessor())

    def fuse_qkv_projections(self):
        """Nothing to do: q, k and v are already one fused `projection` (the tutorial's layout)."""

    def unfuse_qkv_projections(self):
        """Nothing to do: q, k and v stay one fused `projection`, the names its `state_dict` keeps."""

    def enable_tiling(self, tile_sample_min_size: int | None = None, tile_overlap: int | None = None):
        r"""
        Encode and decode large images tile by tile, in bounded memory. Neighbouring tiles overlap and are
        cross-faded, so no seams show.

        Args:
            tile_sample_min_size (`int`, *optional*, defaults to 512):
                Largest tile, in image pixels; images up to this size are processed whole.
            tile_overlap (`int`, *optional*, defaults to 64): Smallest overlap of neighbouring tiles, in image pixels.
        """
        size = self.tile_sample_min_size if tile_sample_min_size is None else tile_sample_min_size
        overlap = self.tile_overlap if tile_overlap is None else tile_overlap
        f = self.downsample_factor
        if size <= 0 or size % f or overlap % f or not 0 <= overlap < size:
            raise ValueError(
                f"Tile size and overlap must be multiples of the downsampling factor {f}, with overlap < size; "
                f"got tile_sample_min_size={size}, tile_overlap={overlap}."
            )
        self.tile_sample_min_size, self.tile_overlap = size, overlap
        self.use_tiling = True

    def _tile_in_latents(self) -> tuple[int, int]:
        return self.tile_sample_min_size // self.downsample_factor, self.tile_overlap // self.downsample_factor

    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and max(x.shape[-2:]) > self.tile_sample_min_size:
            return _tiled(self.encoder, x, self.downsample_factor, 1, *self._tile_in_latents())
        return self.encoder(x)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.use_tiling and max(z.shape[-2:]) * self.downsample_factor > self.tile_sample_min_size:
            return _tiled(self.decoder, z, 1, self.downsample_factor, *self._tile_in_latents())
        return self.decoder(z)

    @apply_forward_hook
    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        r"""
        Encode a batch of images into latent distributions.

        The VAE computes in its own dtype and returns the distribution in the dtype of `x`, so a float32 VAE can serve
        a half-precision pipeline.

        Args:
            x (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`):
                Images in [-1, 1]; height and width must be multiples of `downsample_factor`.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return an [`AutoencoderKLOutput`] instead of a plain tuple.

        Returns:
            [`AutoencoderKLOutput`] or `tuple`: `latent_dist`, a `DiagonalGaussianDistribution` over latents of shape
            `(batch_size, latent_channels, height / downsample_factor, width / downsample_factor)`.
        """
        _check_input(x, self.config.in_channels, "images", self.downsample_factor)
        h = x.to(self.dtype)
        if self.use_slicing and h.shape[0] > 1:
            moments = torch.cat([self._encode(one) for one in h.split(1)])
        else:
            moments = self._encode(h)
        posterior = DiagonalGaussianDistribution(moments.to(x.dtype))
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    @apply_forward_hook
    def decode(
        self, z: torch.Tensor, return_dict: bool = True, generator: torch.Generator | None = None
    ) -> DecoderOutput | tuple:
        r"""
        Decode a batch of latents into images.

        Args:
            z (`torch.Tensor` of shape `(batch_size, latent_channels, height, width)`): Latents (unscaled).
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return a [`DecoderOutput`] instead of a plain tuple.
            generator (`torch.Generator`, *optional*):
                Accepted for pipeline compatibility; decoding is deterministic.

        Returns:
            [`DecoderOutput`] or `tuple`: `sample`, images of shape `(batch_size, out_channels, height *
            downsample_factor, width * downsample_factor)` in the dtype of `z`.
        """
        _check_input(z, self.config.latent_channels, "latents", 1)
        h = z.to(self.dtype)
        if self.use_slicing and h.shape[0] > 1:
            images = torch.cat([self._decode(one) for one in h.split(1)])
        else:
            images = self._decode(h)
        images = images.to(z.dtype)
        return DecoderOutput(sample=images) if return_dict else (images,)

    def forward(
        self,
        sample: torch.Tensor,
        sample_posterior: bool = False,
        return_dict: bool = True,
        generator: torch.Generator | None = None,
        return_posterior: bool = False,
    ) -> DecoderOutput | CustomVAEOutput | tuple:
        r"""
        Encode and decode, as [`AutoencoderKL.forward`] does.

        Args:
            sample (`torch.Tensor` of shape `(batch_size, in_channels, height, width)`): Images in [-1, 1].
            sample_posterior (`bool`, *optional*, defaults to `False`):
                Whether to decode a sample of the posterior (training) instead of its mode (deterministic).
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return an output object instead of a plain tuple.
            generator (`torch.Generator`, *optional*): Makes posterior sampling deterministic.
            return_posterior (`bool`, *optional*, defaults to `False`):
                Whether to also return the posterior: a training step's loss needs both from one call, which
                data-parallel wrappers see.

        Returns:
            [`DecoderOutput`] or `tuple` `(sample,)`, as `AutoencoderKL` returns; with `return_posterior`, a
            [`CustomVAEOutput`] or `(sample, latent_dist)`.
        """
        posterior = self.encode(sample).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        reconstruction = self.decode(z).sample
        if not return_dict:
            return (reconstruction, posterior) if return_posterior else (reconstruction,)
        if return_posterior:
            return CustomVAEOutput(sample=reconstruction, latent_dist=posterior)
        return DecoderOutput(sample=reconstruction)

    def save_config(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        """Save `config.json`, with an `auto_map` entry naming this class, and this file beside it: the folder or Hub
        repo then loads without the diffusers_custom_vae package, with `AutoModel.from_pretrained(...,
        trust_remote_code=True)`. `save_pretrained`, `push_to_hub` and a pipeline's `save_pretrained` call this."""
        super().save_config(save_directory, push_to_hub=push_to_hub, **kwargs)
        module_file = os.path.basename(__file__)
        shutil.copyfile(__file__, os.path.join(save_directory, module_file))
        config_file = os.path.join(save_directory, self.config_name)
        with open(config_file, encoding="utf-8") as file:
            config = json.load(file)
        config["auto_map"] = {"AutoModel": f"{os.path.splitext(module_file)[0]}.{CustomVAE.__name__}"}
        with open(config_file, "w", encoding="utf-8") as file:
            file.write(json.dumps(config, indent=2, sort_keys=True) + "\n")

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # `auto_map` (written by `save_config`) is for diffusers' AutoModel, not an argument of __init__: without this,
        # every load would warn that the config has an unexpected attribute.
        return super().extract_init_dict({k: v for k, v in config_dict.items() if k != "auto_map"}, **kwargs)


def _weights_problem(model, state_dicts, source: str) -> ValueError | None:
    """What is wrong with the weights in `state_dicts` for `model`, whose tensors give the names, shapes and dtypes
    expected; `None` when nothing is. Values are checked in the dtype the model holds them in (its `torch_dtype`), so
    a float32 weight too large for float16 counts."""
    expected, found = model.state_dict(), set()
    unexpected, mismatched = [], []
    bad_values = {"not floating-point": [], "not finite": [], "overflows": []}  # as weight_value_problem names them
    for state_dict in state_dicts:
        for name, tensor in state_dict.items():
            found.add(name)
            target = expected.get(name)
            if target is None:
                unexpected.append(name)
            elif tensor.shape != target.shape:
                mismatched.append(f"{name} {tuple(tensor.shape)} vs {tuple(target.shape)}")
            elif target.is_floating_point() and (kind := weight_value_problem(tensor, target.dtype)):
                detail = {"not floating-point": f" ({tensor.dtype})", "overflows": f" ({target.dtype})"}.get(kind, "")
                bad_values[kind].append(name + detail)
    structure = {
        "missing keys": [name for name in expected if name not in found],
        "unexpected keys": unexpected,
        "mismatched shapes, checkpoint vs model": mismatched,
    }
    listed = lambda names: ", ".join(names[:5]) + (f" (and {len(names) - 5} more)" if len(names) > 5 else "")
    if any(structure.values()):
        details = "; ".join(f"{kind}: {listed(names)}" for kind, names in structure.items() if names)
        return ValueError(
            f"The weights in {source} don't fit its config.json ({details}). Were they saved from a different config?"
        )
    if names := bad_values["not floating-point"]:
        return ValueError(
            f"The checkpoint in {source} holds weights that are not floating-point: {listed(names)}. "
            f"{type(model).__name__} computes in floating point, and casting them would silently change what they "
            "mean (a quantised or corrupted file?). Save the floating-point weights with save_pretrained."
        )
    if names := bad_values["not finite"]:
        return ValueError(f"The checkpoint in {source} has NaN or inf weights in {names[:8]}.")
    if names := bad_values["overflows"]:
        return ValueError(
            f"Weights in {source} become inf in the dtype they are loaded in: {listed(names)}. Load them in a wider "
            "one (torch_dtype=torch.float32 or torch.bfloat16)."
        )
    return None


def _unreadable(path: str, error: Exception) -> OSError:
    """The error for a weight file that diffusers could not read: a pickle refused for safety, or a damaged file."""
    if unsafe := unsafe_pickle_globals(path):
        return OSError(
            f"{path} is a pickle that holds Python objects besides tensors ({', '.join(unsafe[:5])}). It was refused "
            "for safety: unpickling it could run any code. If you trust it, load it yourself and save the weights "
            "with save_pretrained (safetensors)."
        )
    while error.__context__ is not None:  # the reader's own error, beneath diffusers' rewording of it
        error = error.__context__
    return OSError(
        f"Unable to read the weights in {path}: the file is truncated or corrupt ({type(error).__name__}: {error}). "
        "Download or save it again."
    )


def unsafe_pickle_globals(path) -> list[str] | None:
    """The Python objects (`module.name`) that loading the torch.save file at `path` would construct besides tensors
    and plain values, read without running any of them: `[]` for none; `None` when torch cannot list them (a file that
    is not a torch.save zip archive: an older torch.save format, a plain pickle, a damaged file; or torch < 2.5).
    The package's loaders all ask this one function (`conversion.py`, `training/checkpoints.py`)."""
    find_unsafe_globals = getattr(torch.serialization, "get_unsafe_globals_in_checkpoint", None)  # torch >= 2.5
    if find_unsafe_globals is None or not zipfile.is_zipfile(path):
        return None
    try:
        return sorted(find_unsafe_globals(path))
    except Exception:  # a zip archive, but not one torch.save wrote
        return None


def weight_value_problem(tensor: torch.Tensor, dtype: torch.dtype | None = None) -> str | None:
    """What makes `tensor` unusable as a floating-point weight held in `dtype` (default: its own): "not floating-point"
    (casting integer or bool weights would silently change what they mean), "not finite" (NaN or inf), "overflows"
    (finite, but inf in `dtype`); `None` when nothing does. The package's loaders all ask this one function."""
    if not tensor.is_floating_point():
        return "not floating-point"
    if not torch.isfinite(tensor).all():
        return "not finite"
    if dtype is not None and not torch.isfinite(tensor.to(dtype)).all():
        return "overflows"
    return None
