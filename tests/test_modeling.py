"""CustomVAE's behaviour: shapes, the diffusers contract, gradients, slicing, tiling, and agreement with the
tutorial's own classes (`benchmarks/tutorial.py`). Tiny configs unless the point is the default
architecture."""

import copy
import itertools
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0

from benchmarks import tutorial
from diffusers_custom_vae import CustomVAE, CustomVAEOutput
from diffusers_custom_vae.modeling_custom_vae import (
    AttentionBlock,
    AutoencoderKLOutput,
    DecoderOutput,
    DiagonalGaussianDistribution,
    SelfAttention,
    _tile_spans,
    _tiled,
)

# name -> (config, (height, width)); every image is non-square.
TWO_LEVELS = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, num_attention_heads=2)
CONFIGS = {
    "two-levels": (TWO_LEVELS, (16, 24)),
    "three-levels-no-attention": (
        dict(
            block_out_channels=(8, 16, 16),
            layers_per_block=2,
            latent_channels=3,
            norm_num_groups=4,
            mid_block_add_attention=False,
        ),
        (16, 28),
    ),
    "single-level": ({**TWO_LEVELS, "block_out_channels": (16,)}, (10, 14)),
    "one-channel": ({**TWO_LEVELS, "in_channels": 1, "out_channels": 1}, (12, 8)),
}


def random_images(*shape: int, seed: int = 0) -> torch.Tensor:
    """Uniform noise in [-1, 1], the range the VAE expects."""
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def smooth_field(channels: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """(1, channels, height, width): coarse noise upsampled bicubically, so tile seams are the only sharp edges."""
    coarse = torch.randn(1, channels, height // 8 + 1, width // 8 + 1, generator=torch.Generator().manual_seed(seed))
    return F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=True)


def seeded_vae(**config) -> CustomVAE:
    torch.manual_seed(0)
    return CustomVAE(**config).eval()


# ---------------------------------------------------------------------------------------------------- shapes


@pytest.mark.parametrize("name", CONFIGS)
def test_shapes_across_configs(name):
    config, (height, width) = CONFIGS[name]
    vae = seeded_vae(**config)
    f = 2 ** (len(config["block_out_channels"]) - 1)
    latent_channels = config.get("latent_channels", 4)
    channels_in, channels_out = config.get("in_channels", 3), config.get("out_channels", 3)
    x = random_images(2, channels_in, height, width)

    assert vae.downsample_factor == f
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator=torch.Generator().manual_seed(0))
        reconstruction = vae.decode(z).sample
        forward = vae(x).sample
    latent_shape = (2, latent_channels, height // f, width // f)
    assert posterior.mean.shape == posterior.logvar.shape == z.shape == latent_shape
    assert reconstruction.shape == forward.shape == (2, channels_out, height, width)
    for tensor in (posterior.mean, posterior.logvar, z, reconstruction, forward):
        assert torch.isfinite(tensor).all()


# ---------------------------------------------------------------------------------------------------- contracts


def test_encode_returns_diagonal_gaussian(tiny_vae):
    x = random_images(2, 3, 8, 12)
    with torch.no_grad():
        output = tiny_vae.encode(x)
        as_tuple = tiny_vae.encode(x, return_dict=False)
    assert isinstance(output, AutoencoderKLOutput)
    assert isinstance(output.latent_dist, DiagonalGaussianDistribution)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert isinstance(as_tuple[0], DiagonalGaussianDistribution)
    assert torch.equal(as_tuple[0].mean, output.latent_dist.mean)
    assert torch.equal(as_tuple[0].logvar, output.latent_dist.logvar)


def test_decode_returns_decoder_output_and_accepts_generator(tiny_vae):
    z = torch.randn(2, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        output = tiny_vae.decode(z)
        as_tuple = tiny_vae.decode(z, return_dict=False, generator=torch.Generator().manual_seed(1))
    assert isinstance(output, DecoderOutput)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1
    assert torch.equal(as_tuple[0], output.sample)  # decoding is deterministic, generator or not


def test_forward_decodes_the_mode_and_returns_what_autoencoder_kl_returns(tiny_vae):
    """As `AutoencoderKL.forward`: deterministic by default, a `DecoderOutput`, or a tuple holding only the image."""
    x = random_images(2, 3, 8, 12)
    with torch.no_grad():
        output, again = tiny_vae(x), tiny_vae(x)
        (as_tuple,) = tiny_vae(x, return_dict=False)
        expected = tiny_vae.decode(tiny_vae.encode(x).latent_dist.mode()).sample
    assert isinstance(output, DecoderOutput) and not isinstance(output, CustomVAEOutput)
    assert torch.equal(output.sample, expected) and torch.equal(again.sample, expected)
    assert torch.equal(as_tuple, expected)
    assert all(isinstance(value, torch.Tensor) for value in output.to_tuple())


def test_forward_with_return_posterior_gives_the_training_step_both(tiny_vae):
    x = random_images(2, 3, 8, 12)
    seeded = lambda: torch.Generator().manual_seed(0)
    with torch.no_grad():
        output = tiny_vae(x, sample_posterior=True, generator=seeded(), return_posterior=True)
        reconstruction, posterior = tiny_vae(
            x, sample_posterior=True, return_dict=False, generator=seeded(), return_posterior=True
        )
        expected_posterior = tiny_vae.encode(x).latent_dist
        expected = tiny_vae.decode(expected_posterior.sample(generator=seeded())).sample
    assert isinstance(output, CustomVAEOutput) and isinstance(output, DecoderOutput)
    assert isinstance(output.latent_dist, DiagonalGaussianDistribution)
    assert torch.equal(output.sample, expected)
    assert torch.equal(reconstruction, expected)
    assert torch.equal(posterior.mean, expected_posterior.mean)
    assert torch.equal(posterior.logvar, expected_posterior.logvar)


def test_forward_output_survives_accelerates_mixed_precision_wrapper(tiny_vae):
    """accelerate converts a forward's outputs to float32 by rebuilding them from a dict; both fields must survive."""
    from accelerate.utils import convert_to_fp32

    with torch.no_grad():
        output = tiny_vae(random_images(1, 3, 8, 8).bfloat16().float(), return_posterior=True)
    converted = convert_to_fp32(CustomVAEOutput(sample=output.sample.bfloat16(), latent_dist=output.latent_dist))
    assert isinstance(converted, CustomVAEOutput) and converted.sample.dtype == torch.float32
    assert converted.latent_dist is output.latent_dist


def test_sampling_the_posterior_changes_the_reconstruction(tiny_vae):
    x = random_images(2, 3, 8, 12)
    with torch.no_grad():
        mode = tiny_vae(x).sample
        sampled = tiny_vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(0)).sample
    assert not torch.allclose(sampled, mode)


def test_float32_vae_serves_bfloat16_inputs_in_float32(tiny_vae):
    x = random_images(2, 3, 8, 12).to(torch.bfloat16)
    with torch.no_grad():
        posterior = tiny_vae.encode(x).latent_dist
        posterior_float32 = tiny_vae.encode(x.float()).latent_dist
        images = tiny_vae.decode(posterior.mean).sample
        images_float32 = tiny_vae.decode(posterior.mean.float()).sample
        reconstruction = tiny_vae(x, sample_posterior=False).sample
    assert posterior.mean.dtype == posterior.logvar.dtype == images.dtype == reconstruction.dtype == torch.bfloat16
    # Computed in float32 and cast once at the end: bit-equal to the float32 result rounded to bfloat16.
    assert torch.equal(posterior.mean, posterior_float32.mean.to(torch.bfloat16))
    assert torch.equal(images, images_float32.to(torch.bfloat16))


def test_bfloat16_vae_serves_float32_inputs_in_bfloat16(tiny_vae):
    vae = tiny_vae.to(torch.bfloat16)
    x = random_images(2, 3, 8, 12)
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        mean_bfloat16 = vae.encode(x.to(torch.bfloat16)).latent_dist.mean
        images = vae.decode(mean).sample
        images_bfloat16 = vae.decode(mean.to(torch.bfloat16)).sample
    assert mean.dtype == images.dtype == torch.float32
    assert torch.equal(mean, mean_bfloat16.float())
    assert torch.equal(images, images_bfloat16.float())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_inference_stays_finite(tiny_vae, dtype):
    x = random_images(2, 3, 16, 24)
    with torch.no_grad():
        expected = tiny_vae(x, sample_posterior=False).sample
        reconstruction = tiny_vae.to(dtype)(x.to(dtype), sample_posterior=False).sample
    assert reconstruction.dtype == dtype
    assert torch.isfinite(reconstruction).all()
    # Measured relative error: 0.003 (float16), 0.02 (bfloat16).
    assert (reconstruction.float() - expected).abs().max() < 0.1 * expected.abs().max()


# ---------------------------------------------------------------------------------------------------- determinism


def test_generator_makes_sampling_deterministic(tiny_vae):
    x = random_images(2, 3, 8, 12)
    with torch.no_grad():
        posterior = tiny_vae.encode(x).latent_dist
        samples = [posterior.sample(generator=torch.Generator().manual_seed(seed)) for seed in (0, 0, 1)]
        outputs = [
            tiny_vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(seed)).sample
            for seed in (0, 0, 1)
        ]
    for same_a, same_b, different in (samples, outputs):
        assert torch.equal(same_a, same_b)
        assert not torch.allclose(same_a, different)


# ---------------------------------------------------------------------------------------------------- gradients


def reconstruction_and_kl_loss(vae: CustomVAE, x: torch.Tensor) -> tuple[torch.Tensor, CustomVAEOutput]:
    output = vae(x, sample_posterior=True, generator=torch.Generator().manual_seed(0), return_posterior=True)
    return F.mse_loss(output.sample, x) + output.latent_dist.kl().mean(), output


@pytest.mark.parametrize(
    "config, size",
    [*CONFIGS.values(), ({}, (16, 16))],  # the default config once, at the smallest size it takes
    ids=[*CONFIGS, "default"],
)
def test_every_parameter_receives_a_gradient(config, size):
    vae = seeded_vae(**config).train()
    loss, _ = reconstruction_and_kl_loss(vae, random_images(2, vae.config.in_channels, *size))
    loss.backward()
    without_gradient = [name for name, p in vae.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without_gradient == []


def test_gradient_checkpointing_gives_the_same_outputs_and_gradients(tiny_vae):
    plain = tiny_vae.train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.enable_gradient_checkpointing()
    x = random_images(2, 3, 16, 24)

    def run(vae: CustomVAE) -> tuple[CustomVAEOutput, list[int]]:
        # A checkpointed block's forward runs again during backward (a pre-hook sees it; the recomputation stops
        # before the forward hooks, so those would not). Blocks without weights (Upsample) save nothing to recompute.
        blocks = [block for block in (*vae.encoder.blocks, *vae.decoder.blocks) if list(block.parameters())]
        calls = []
        handles = [block.register_forward_pre_hook(lambda block, _: calls.append(block)) for block in blocks]
        loss, output = reconstruction_and_kl_loss(vae, x)
        loss.backward()
        for handle in handles:
            handle.remove()
        return output, [calls.count(block) for block in blocks]

    output, plain_calls = run(plain)
    checkpointed_output, checkpointed_calls = run(checkpointed)
    assert set(plain_calls) == {1}
    assert set(checkpointed_calls) == {2}, "gradient checkpointing is not active"
    torch.testing.assert_close(checkpointed_output.sample, output.sample)
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, msg=name)


# ---------------------------------------------------------------------------------------------------- slicing


def test_slicing_gives_the_same_results(tiny_vae):
    x = random_images(3, 3, 8, 12)
    z = torch.randn(3, 4, 4, 6, generator=torch.Generator().manual_seed(0))
    encoder_calls = []
    tiny_vae.encoder.register_forward_pre_hook(lambda *_: encoder_calls.append(1))
    with torch.no_grad():
        posterior, images = tiny_vae.encode(x).latent_dist, tiny_vae.decode(z).sample
        tiny_vae.enable_slicing()
        calls_before = len(encoder_calls)
        sliced_posterior, sliced_images = tiny_vae.encode(x).latent_dist, tiny_vae.decode(z).sample
    assert len(encoder_calls) - calls_before == 3, "slicing is not active"
    torch.testing.assert_close(sliced_posterior.mean, posterior.mean)
    torch.testing.assert_close(sliced_posterior.logvar, posterior.logvar)
    torch.testing.assert_close(sliced_images, images)


# ---------------------------------------------------------------------------------------------------- tiling


@pytest.mark.parametrize("levels", [2, 3], ids=["f2", "f4"])
@pytest.mark.parametrize("overlap_latents", [0, 2, 3])
@pytest.mark.parametrize("direction", ["decode-like", "encode-like"])
def test_tile_blending_is_exact_for_local_operations(levels, overlap_latents, direction):
    vae = seeded_vae(block_out_channels=(8,) * levels, layers_per_block=1, norm_num_groups=4, num_attention_heads=2)
    f = vae.downsample_factor
    vae.enable_tiling(8 * f, overlap_latents * f)  # tiles of 8 latents
    mix_channels = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))  # local, and changes the width
    if direction == "decode-like":  # a latent grid of 21 x 30: not multiples of the tile
        x, scale_in, scale_out = torch.randn(2, 3, 21, 30), 1, f
        fn = lambda t: torch.einsum("oc,bchw->bohw", mix_channels, F.interpolate(t, scale_factor=f, mode="nearest"))
    else:
        x, scale_in, scale_out = torch.randn(2, 3, 21 * f, 30 * f), f, 1
        fn = lambda t: torch.einsum("oc,bchw->bohw", mix_channels, F.avg_pool2d(t, f))
    tiled = _tiled(fn, x, scale_in, scale_out, *vae._tile_in_latents())
    expected = fn(x)
    assert tiled.shape == expected.shape == (2, 5, 21 * scale_out, 30 * scale_out)
    torch.testing.assert_close(tiled, expected, atol=1e-5, rtol=1e-5)


def test_tile_spans_cover_the_length_with_equal_overlapping_tiles():
    for tile in range(1, 13):
        for overlap in range(tile):
            for length in range(1, 50):
                spans = _tile_spans(length, tile, overlap)
                case = f"length={length} tile={tile} overlap={overlap}: {spans}"
                if length <= tile:
                    assert spans == [(0, length)], case
                    continue
                sizes = {size for _, size in spans}
                assert len(sizes) == 1 and sizes.pop() <= tile, case
                assert spans[0][0] == 0 and spans[-1][0] + spans[-1][1] == length, case
                for (start, size), (next_start, _) in itertools.pairwise(spans):
                    assert start < next_start and start + size - next_start >= overlap, case
                # The fewest tiles: n tiles of at most `tile` overlapping by `overlap` cover
                # n * (tile - overlap) + overlap.
                assert (len(spans) - 1) * (tile - overlap) + overlap < length, case


def seam_ratio(image: torch.Tensor, row_spans, column_spans, scale: int, margin: int) -> float:
    """How much larger the jump between neighbouring rows/columns is across tile edges than on average.

    About 1 when there are no seams; the largest of the two directions. `margin` leaves out the image's own borders,
    where zero padding makes the output jump anyway."""
    ratios = []
    for axis, spans in ((-1, column_spans), (-2, row_spans)):
        jumps = image.diff(dim=axis).abs().transpose(axis, -1).mean(dim=(0, 1, 2))  # jumps[j]: |x[j + 1] - x[j]|
        edges = {start * scale for start, _ in spans[1:]} | {(start + size) * scale for start, size in spans[:-1]}
        across_edges = jumps[[edge - 1 for edge in sorted(edges)]]
        ratios.append((across_edges.mean() / jumps[margin:-margin].mean()).item())
    return max(ratios)


def test_tiled_encode_and_decode_have_no_seams(tiny_vae):
    # Smooth inputs make the untrained model's output smooth, so the per-tile GroupNorm statistics would show as
    # steps at tile edges. Measured on this model, tiles of 16 latents: blended 1.05 (decode) and 1.09 (encode);
    # hard cuts (overlap 0) 3.9 and 1.52. Over 12 seeds and both attention settings, blended never exceeded 1.15.
    z, images = smooth_field(4, 40, 56, seed=0), smooth_field(3, 80, 112, seed=10).clamp(-1, 1)
    ratios = {}
    with torch.no_grad():
        for overlap in (8, 0):
            tiny_vae.enable_tiling(tile_sample_min_size=32, tile_overlap=overlap)
            decoded = tiny_vae.decode(z).sample
            encoded = tiny_vae.encode(images).latent_dist
            assert decoded.shape == (1, 3, 80, 112) and encoded.mean.shape == (1, 4, 40, 56)
            assert (
                torch.isfinite(decoded).all()
                and torch.isfinite(encoded.mean).all()
                and torch.isfinite(encoded.logvar).all()
            )
            rows, columns = _tile_spans(40, 16, overlap // 2), _tile_spans(56, 16, overlap // 2)
            assert len(rows) > 1 and len(columns) > 1
            ratios[overlap] = (
                seam_ratio(decoded, rows, columns, scale=2, margin=4),
                seam_ratio(encoded.mean, rows, columns, scale=1, margin=2),
            )
    assert max(ratios[8]) < 1.25, f"seams at tile edges: {ratios[8]}"
    assert min(ratios[0]) > 1.4, f"the criterion no longer sees hard tile cuts: {ratios[0]}"


def test_tiling_agrees_with_whole_image_on_stationary_input(tiny_vae):
    # Tiles differ from the whole image only through their own GroupNorm statistics and attention, which on
    # statistically uniform noise are close to the whole image's. Measured mean relative error: 16% (decode) and
    # 12% (encode), against 139% and 103% between the outputs of two different inputs.
    generator = torch.Generator().manual_seed(100)
    z, other_z = torch.randn(2, 1, 4, 48, 64, generator=generator)
    images, other_images = torch.rand(2, 1, 3, 96, 128, generator=generator) * 2 - 1
    with torch.no_grad():
        decoded, other_decoded = tiny_vae.decode(z).sample, tiny_vae.decode(other_z).sample
        mean, other_mean = tiny_vae.encode(images).latent_dist.mean, tiny_vae.encode(other_images).latent_dist.mean
        tiny_vae.enable_tiling(tile_sample_min_size=32, tile_overlap=16)
        tiled_decoded, tiled_mean = tiny_vae.decode(z).sample, tiny_vae.encode(images).latent_dist.mean

    def relative_error(a, b):
        return ((a - b).abs().mean() / b.abs().mean()).item()

    assert relative_error(other_decoded, decoded) > 0.8 and relative_error(other_mean, mean) > 0.8
    assert relative_error(tiled_decoded, decoded) < 0.3
    assert relative_error(tiled_mean, mean) < 0.3


@pytest.mark.parametrize("height, width", [(80, 24), (24, 80)])
def test_tiling_along_one_axis_only(tiny_vae, height, width):
    x, z = random_images(1, 3, height, width), torch.randn(1, 4, height // 2, width // 2)
    tiny_vae.enable_tiling(tile_sample_min_size=32, tile_overlap=8)
    with torch.no_grad():
        posterior, images = tiny_vae.encode(x).latent_dist, tiny_vae.decode(z).sample
    assert posterior.mean.shape == (1, 4, height // 2, width // 2) and images.shape == (1, 3, height, width)
    assert torch.isfinite(posterior.mean).all() and torch.isfinite(images).all()


def test_inputs_within_one_tile_are_untouched(tiny_vae):
    x, z = random_images(2, 3, 32, 24), torch.randn(2, 4, 16, 12)
    with torch.no_grad():
        mean, images = tiny_vae.encode(x).latent_dist.mean, tiny_vae.decode(z).sample
        tiny_vae.enable_tiling(tile_sample_min_size=32, tile_overlap=8)
        assert torch.equal(tiny_vae.encode(x).latent_dist.mean, mean)
        assert torch.equal(tiny_vae.decode(z).sample, images)


@pytest.mark.parametrize("size, overlap", [(33, 8), (32, 7), (32, 32), (16, 24)])
def test_enable_tiling_rejects_sizes_off_the_latent_grid(tiny_vae, size, overlap):
    with pytest.raises(ValueError, match=f"factor 2.*tile_sample_min_size={size}.*tile_overlap={overlap}"):
        tiny_vae.enable_tiling(tile_sample_min_size=size, tile_overlap=overlap)
    assert not tiny_vae.use_tiling


def test_enable_tiling_names_a_factor_of_four():
    vae = CustomVAE(**CONFIGS["three-levels-no-attention"][0])
    with pytest.raises(ValueError, match="downsampling factor 4"):
        vae.enable_tiling(tile_sample_min_size=30, tile_overlap=8)


# ---------------------------------------------------------------------------------------------------- attention


@pytest.mark.parametrize("num_heads", [1, 2, 4, 8])
def test_self_attention_equals_the_tutorial_explicit_softmax(num_heads):
    torch.manual_seed(0)
    reference = tutorial.SelfAttention(32, num_heads)
    attention = SelfAttention(32, num_heads)
    attention.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 35, 32)
    torch.testing.assert_close(attention(x), reference(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_heads", [1, 4, 8])
def test_attention_block_equals_the_tutorial(num_heads):
    torch.manual_seed(0)
    reference = tutorial.AttentionBlock(64, num_heads)
    with torch.no_grad():  # non-trivial norm affine and residual scale, so that each of them is checked
        for p in (reference.groupnorm.weight, reference.groupnorm.bias, reference.residual_scale):
            p.copy_(torch.randn_like(p))
    block = AttentionBlock(64, num_heads, norm_num_groups=32)
    block.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 64, 5, 7)
    torch.testing.assert_close(block(x), reference(x), atol=1e-5, rtol=1e-5)


def attention_names(vae) -> list[str]:
    return [f"{name}.processor" for name, module in vae.named_modules() if isinstance(module, SelfAttention)]


def test_attention_processors_are_listed_and_set_as_for_autoencoder_kl(tiny_vae):
    """As diffusers tests its models' processors: listed by module path, settable at once or one by one, and the
    default processor (the explicit softmax) agrees with scaled_dot_product_attention."""
    from tiny_pipelines import tiny_autoencoder_kl

    autoencoder_kl = tiny_autoencoder_kl()  # the control: what SD scripts find on `pipe.vae` today
    processors = tiny_vae.attn_processors
    assert sorted(processors) == sorted(attention_names(tiny_vae))
    assert len(processors) == 2  # one at the encoder's bottleneck, one at the decoder's
    kinds = lambda vae: {type(processor) for processor in vae.attn_processors.values()}
    assert kinds(tiny_vae) == kinds(autoencoder_kl) == {AttnProcessor2_0}

    x = random_images(2, 3, 16, 24)
    with torch.no_grad():
        scaled_dot_product = tiny_vae(x).sample
        tiny_vae.set_default_attn_processor()
        autoencoder_kl.set_default_attn_processor()
        assert kinds(tiny_vae) == kinds(autoencoder_kl) == {AttnProcessor}
        explicit = tiny_vae(x).sample
        tiny_vae.set_attn_processor({name: AttnProcessor2_0() for name in processors})
        again = tiny_vae(x).sample
    torch.testing.assert_close(explicit, scaled_dot_product, atol=1e-5, rtol=1e-5)
    assert torch.equal(again, scaled_dot_product)
    with pytest.raises(ValueError, match="processors 1.*attention layers: 2"):
        tiny_vae.set_attn_processor({attention_names(tiny_vae)[0]: AttnProcessor()})


def test_processors_that_expect_separate_q_k_v_are_refused_by_name(tiny_vae):
    from diffusers.models.attention_processor import SlicedAttnProcessor

    with pytest.raises(ValueError, match="AttnProcessor2_0.*SlicedAttnProcessor"):
        tiny_vae.set_attn_processor(SlicedAttnProcessor(slice_size=1))
    assert {type(p) for p in tiny_vae.attn_processors.values()} == {AttnProcessor2_0}


def test_fusing_qkv_changes_neither_outputs_nor_state_dict_names(tiny_vae):
    """q, k, v are one Linear already: fusing (as pipelines do it for AutoencoderKL) and unfusing are no-ops."""
    x = random_images(2, 3, 16, 24)
    names = list(tiny_vae.state_dict())
    with torch.no_grad():
        expected = tiny_vae(x).sample
        tiny_vae.fuse_qkv_projections()
        tiny_vae.set_attn_processor(FusedAttnProcessor2_0())
        fused = tiny_vae(x).sample
        tiny_vae.unfuse_qkv_projections()
        unfused = tiny_vae(x).sample
    assert torch.equal(fused, expected) and torch.equal(unfused, expected)
    assert list(tiny_vae.state_dict()) == names
    assert any(name.endswith("attention.projection.weight") for name in names)


@pytest.mark.parametrize("num_heads", [1, 4])
def test_explicit_softmax_processor_equals_the_tutorial(num_heads):
    torch.manual_seed(0)
    reference = tutorial.SelfAttention(32, num_heads)
    attention = SelfAttention(32, num_heads)
    attention.load_state_dict(reference.state_dict(), strict=True)
    attention.set_processor(AttnProcessor())
    x = torch.randn(2, 35, 32)
    torch.testing.assert_close(attention(x), reference(x), atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------------------------------------------- tutorial


def test_tutorial_state_dict_loads_into_the_default_config_with_the_same_outputs():
    torch.manual_seed(0)
    reference = tutorial.VAE().eval()
    vae = CustomVAE().eval()
    vae.load_state_dict(reference.state_dict(), strict=True)
    x = random_images(2, 3, 32, 40)
    z = torch.randn(2, 4, 4, 5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mean, logvar = reference.encoder(x)
        posterior = vae.encode(x).latent_dist
        expected_images, images = reference.decoder(z), vae.decode(z).sample
    assert vae.downsample_factor == 8
    torch.testing.assert_close(posterior.mean, mean, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(posterior.logvar, logvar, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(images, expected_images, atol=1e-5, rtol=1e-5)  # measured: 5e-6 at most


# ---------------------------------------------------------------------------------------------------- errors


def test_encode_names_the_expected_channel_count(tiny_vae):
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\).*\(1, 4, 8, 8\)"):
        tiny_vae.encode(torch.zeros(1, 4, 8, 8))


def test_encode_rejects_three_dimensional_input(tiny_vae):
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\).*\(3, 8, 8\)"):
        tiny_vae.encode(torch.zeros(3, 8, 8))


def test_decode_names_the_expected_latent_channel_count(tiny_vae):
    with pytest.raises(ValueError, match=r"latents.*\(batch, 4, height, width\).*\(1, 3, 4, 4\)"):
        tiny_vae.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match=r"\(batch, 4, height, width\).*\(4, 4, 4\)"):
        tiny_vae.decode(torch.zeros(4, 4, 4))


@pytest.mark.parametrize(
    "dtype", [torch.uint8, torch.int64, torch.bool, torch.complex64], ids=["uint8", "int64", "bool", "complex64"]
)
def test_encode_and_decode_refuse_tensors_that_are_not_real_floating_point(tiny_vae, dtype):
    """Cast to the VAE's dtype, 0-255 pixels would become a silently wrong posterior (uint8: mean all 0)."""
    with pytest.raises(TypeError, match=f"images.*floating-point.*{dtype}"):
        tiny_vae.encode(torch.ones(1, 3, 8, 8, dtype=dtype))
    with pytest.raises(TypeError, match=f"latents.*floating-point.*{dtype}"):
        tiny_vae.decode(torch.ones(1, 4, 4, 4, dtype=dtype))
    with pytest.raises(TypeError, match=f"images.*floating-point.*{dtype}"):
        tiny_vae(torch.ones(1, 3, 8, 8, dtype=dtype))


@pytest.mark.parametrize("shape", [(0, 3, 8, 8), (1, 3, 0, 8)], ids=["empty batch", "no rows"])
def test_empty_inputs_are_refused_clearly(tiny_vae, shape):
    with pytest.raises(ValueError, match=rf"images.*\({', '.join(map(str, shape))}\).*no values"):
        tiny_vae.encode(torch.zeros(shape))
    with pytest.raises(ValueError, match="latents.*no values"):
        tiny_vae.decode(torch.zeros(shape[0], 4, *shape[2:]))


def test_encode_names_what_it_got_instead_of_a_tensor(tiny_vae):
    from PIL import Image

    with pytest.raises(TypeError, match=r"images.*torch.Tensor.*PIL.Image.Image.*pil_to_tensor"):
        tiny_vae.encode(Image.new("RGB", (8, 8)))
    with pytest.raises(TypeError, match="latents.*torch.Tensor.*numpy.ndarray"):
        tiny_vae.decode(torch.zeros(1, 4, 4, 4).numpy())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=["float64", "float16"])
def test_every_floating_point_dtype_is_served(tiny_vae, dtype):
    x = random_images(1, 3, 8, 8)
    with torch.no_grad():
        posterior = tiny_vae.encode(x.to(dtype)).latent_dist
        expected = tiny_vae.encode(x.to(dtype).float()).latent_dist.mean
        images = tiny_vae.decode(posterior.mean).sample
    assert posterior.mean.dtype == images.dtype == dtype
    torch.testing.assert_close(posterior.mean, expected.to(dtype))


@pytest.mark.parametrize(
    "name, size, factor", [("two-levels", (15, 16), 2), ("three-levels-no-attention", (16, 18), 4)]
)
def test_encode_names_the_downsampling_factor(name, size, factor):
    vae = CustomVAE(**CONFIGS[name][0])
    with pytest.raises(ValueError, match=f"{factor}.*{size[0]}x{size[1]}"):
        vae.encode(torch.zeros(1, 3, *size))


def test_images_smaller_than_one_latent_get_a_size_they_can_be_resized_to():
    vae = CustomVAE(**CONFIGS["three-levels-no-attention"][0])
    with pytest.raises(ValueError, match="2x6.*4x4"):
        vae.encode(torch.zeros(1, 3, 2, 6))


@pytest.mark.parametrize(
    "config, message",
    [
        (dict(block_out_channels=(8, 12), norm_num_groups=8), r"norm_num_groups=8.*\(8, 12\)"),
        (dict(num_attention_heads=3), "16.*num_attention_heads=3"),
        (dict(block_out_channels=()), r"block_out_channels.*positive ints.*\(\)"),
        (dict(layers_per_block=0), "layers_per_block.*positive int.*0"),
    ],
    ids=["width-vs-groups", "bottleneck-vs-heads", "no-levels", "no-layers"],
)
def test_invalid_configs_are_refused(config, message):
    with pytest.raises(ValueError, match=message):
        CustomVAE(**{**TWO_LEVELS, **config})


# Each of these built a model (or failed in a torch layer, or with a ZeroDivisionError) before it was refused.
COUNTS = (
    "in_channels",
    "out_channels",
    "latent_channels",
    "layers_per_block",
    "norm_num_groups",
    "num_attention_heads",
)
NOT_POSITIVE = [(field, value) for field in COUNTS for value in (0, -2)]
WRONG_TYPE = [
    ("layers_per_block", 2.5, "a positive int"),
    ("in_channels", True, "a positive int"),  # Python's True is the int 1: a typo, not a channel count
    ("norm_num_groups", 4.0, "a positive int"),
    ("block_out_channels", (8, 0), "a non-empty list of positive ints"),
    ("block_out_channels", (-8, 16), "a non-empty list of positive ints"),
    ("block_out_channels", (8.0, 16), "a non-empty list of positive ints"),
    ("block_out_channels", 16, "a non-empty list of positive ints"),
    ("block_out_channels", "8,16", "a non-empty list of positive ints"),
    ("scaling_factor", float("nan"), "a finite positive number"),
    ("scaling_factor", float("inf"), "a finite positive number"),
    ("scaling_factor", 0.0, "a finite positive number"),
    ("scaling_factor", -0.18, "a finite positive number"),
    ("scaling_factor", "0.18", "a finite positive number"),
    ("scaling_factor", True, "a finite positive number"),
    ("shift_factor", float("nan"), "None or a finite number"),
    ("mid_block_add_attention", "false", "True or False"),
    ("force_upcast", 1, "True or False"),
    ("latent_space", 7, "None or a name"),
]


@pytest.mark.parametrize(
    "field, value, expected",
    [(field, value, "a positive int") for field, value in NOT_POSITIVE] + WRONG_TYPE,
)
def test_configs_out_of_range_or_of_the_wrong_type_are_refused_naming_the_field(field, value, expected):
    message = rf"{field}.*{expected}.*{re.escape(repr(value))}"
    with pytest.raises(ValueError, match=message):
        CustomVAE(**{**TWO_LEVELS, field: value})
    with pytest.raises(ValueError, match=rf"{field}.*{expected}"):  # config.json's route in
        CustomVAE.from_config({**TWO_LEVELS, field: value})


def test_numpy_integers_are_refused_before_save_pretrained_would_fail_on_them():
    """config.json cannot hold numpy integers: the model built, and save_pretrained raised a TypeError."""
    with pytest.raises(ValueError, match=r"block_out_channels.*positive ints"):
        CustomVAE(**{**TWO_LEVELS, "block_out_channels": tuple(np.array([8, 16]))})


def test_valid_configs_of_every_accepted_type_still_build():
    vaes = [
        CustomVAE(),  # the default: the tutorial's architecture
        CustomVAE(**{**TWO_LEVELS, "block_out_channels": [8, 16]}),  # a list, as config.json gives it
        CustomVAE(**{**TWO_LEVELS, "scaling_factor": 1, "shift_factor": 0}),  # ints where numbers are expected
        CustomVAE(**{**TWO_LEVELS, "scaling_factor": 0.18215, "shift_factor": -0.5, "latent_space": "mine"}),
    ]
    assert [vae.downsample_factor for vae in vaes] == [8, 2, 2, 2]


# ---------------------------------------------------------------------------------------------------- integration


def test_encode_and_decode_call_the_offload_hook(tiny_vae):
    class RecordingHook:  # what accelerate's cpu_offload_with_hook attaches: moves the model before the call
        def __init__(self):
            self.modules = []

        def pre_forward(self, module):
            self.modules.append(module)

    tiny_vae._hf_hook = RecordingHook()
    with torch.no_grad():
        posterior = tiny_vae.encode(random_images(1, 3, 8, 8)).latent_dist
        assert tiny_vae._hf_hook.modules == [tiny_vae]
        tiny_vae.decode(posterior.mode())
    assert tiny_vae._hf_hook.modules == [tiny_vae, tiny_vae]


def test_model_declares_what_diffusers_reads():
    class_names = {type(module).__name__ for module in CustomVAE().modules()}
    assert CustomVAE._no_split_modules and set(CustomVAE._no_split_modules) <= class_names
    assert CustomVAE._supports_gradient_checkpointing is True


@pytest.mark.parametrize(
    "offload_type, options",
    [("block_level", dict(num_blocks_per_group=1)), ("leaf_level", {})],
    ids=["block-level", "leaf-level"],
)
def test_group_offloading_gives_the_same_outputs(tiny_vae, offload_type, options):
    """As diffusers tests its models' group offloading (without CUDA streams: onloading to the CPU is all a CPU-only
    machine can check, but the hooks wrap the same modules as on a GPU)."""
    x = random_images(2, 3, 16, 24)
    with torch.no_grad():
        expected = tiny_vae(x).sample
        cpu = torch.device("cpu")
        tiny_vae.enable_group_offload(onload_device=cpu, offload_device=cpu, offload_type=offload_type, **options)
        assert torch.equal(tiny_vae(x).sample, expected)


def test_layerwise_casting_stores_bfloat16_and_keeps_group_norms_float32(tiny_vae):
    x = random_images(2, 3, 16, 24)
    with torch.no_grad():
        expected = tiny_vae(x).sample
        tiny_vae.enable_layerwise_casting(storage_dtype=torch.bfloat16, compute_dtype=torch.float32)
        output = tiny_vae(x).sample
    dtypes = {name: p.dtype for name, p in tiny_vae.named_parameters()}
    assert dtypes["encoder.conv_in.weight"] == dtypes["encoder.blocks.3.attention.projection.weight"] == torch.bfloat16
    assert {dtype for name, dtype in dtypes.items() if "norm" in name} == {torch.float32}
    assert output.dtype == torch.float32
    # Measured: 0.024 at most, with outputs up to 1.9 (bfloat16 keeps 8 bits of mantissa).
    assert (output - expected).abs().max() < 0.05 * expected.abs().max()


@pytest.mark.slow  # compiling takes about a minute on 2 CPU cores
def test_decode_compiles_without_graph_breaks(tiny_vae):
    compiled = torch.compile(tiny_vae.decode, fullgraph=True)  # fullgraph: any graph break raises
    z = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(compiled(z).sample, tiny_vae.decode(z).sample, atol=1e-5, rtol=1e-5)
