import importlib.util
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDPMPipeline,
    DDPMScheduler,
    DiffusionPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DModel,
)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from image_files import write_bomb_png
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_pipelines import (
    INPAINT_PIPELINES,
    SD_PIPELINES,
    SDXL_PIPELINES,
    tiny_autoencoder_kl,
    tiny_custom_vae,
    tiny_pipeline,
)

from diffusers_custom_vae import CustomVAE
from diffusers_custom_vae.latent_spaces import (
    LatentSpaceWarning,
    encoder_fingerprint,
    latent_space_of,
    shares_latent_space,
)
from diffusers_custom_vae.pipelines import save_pipeline, swap_vae

ROOT = Path(__file__).resolve().parents[1]
TEXT_TO_IMAGE = (StableDiffusionPipeline, StableDiffusionXLPipeline)
ALL_PIPELINES = SD_PIPELINES + SDXL_PIPELINES


def generate(pipe, height: int = 64, width: int = 96, **options):
    """Runs 2 steps of any tiny pipeline, with a grey image (and a full mask) when it takes them."""
    if type(pipe) not in TEXT_TO_IMAGE:
        options.update(image=Image.new("RGB", (width, height), "grey"), strength=0.5)
    if type(pipe) in INPAINT_PIPELINES:
        options.update(mask_image=Image.new("L", (width, height), 255))
    generator = torch.Generator().manual_seed(0)
    return pipe("a dog", height=height, width=width, num_inference_steps=2, generator=generator, **options).images


def swap_scratch_vae(pipe, vae):
    """swap_vae with a VAE trained from scratch: the latent-space warning is expected."""
    with pytest.warns(LatentSpaceWarning):
        return swap_vae(pipe, vae)


@pytest.mark.parametrize("pipeline_class", ALL_PIPELINES, ids=lambda cls: cls.__name__)
@pytest.mark.parametrize("height, width", [(64, 64), (64, 96)], ids=["square", "wide"])
def test_every_pipeline_makes_images_of_the_requested_size(pipeline_class, height, width):
    pipe = tiny_pipeline(pipeline_class)
    vae = tiny_custom_vae()
    assert swap_scratch_vae(pipe, vae) is pipe
    assert pipe.vae is vae
    assert generate(pipe, height, width)[0].size == (width, height)


@pytest.mark.parametrize("pipeline_class", INPAINT_PIPELINES, ids=lambda cls: cls.__name__)
def test_scale_factor_and_image_processors_follow_the_vae(pipeline_class):
    pipe = tiny_pipeline(pipeline_class)  # built around an 8x AutoencoderKL
    old_image_settings, old_mask_settings = dict(pipe.image_processor.config), dict(pipe.mask_processor.config)
    swap_scratch_vae(pipe, tiny_custom_vae(block_out_channels=(8, 8)))  # 2x

    assert pipe.vae_scale_factor == 2
    assert dict(pipe.image_processor.config) == {**old_image_settings, "vae_scale_factor": 2}
    assert dict(pipe.mask_processor.config) == {**old_mask_settings, "vae_scale_factor": 2}
    assert pipe.mask_processor.config.do_binarize and not pipe.mask_processor.config.do_normalize
    assert generate(pipe, 32, 48)[0].size == (48, 32)


def test_plain_assignment_leaves_the_scale_factor_stale_and_swap_vae_fixes_it():
    pipe = tiny_pipeline()  # built around an 8x AutoencoderKL
    pipe.vae = tiny_custom_vae(block_out_channels=(8, 8))  # a 2x VAE: diffusers allows it...
    assert generate(pipe, 64, 64)[0].size == (16, 16)  # ...but 64 // 8 latents decode 2x into 16 pixels

    swap_scratch_vae(pipe, pipe.vae)
    assert generate(pipe, 64, 64)[0].size == (64, 64)


def test_save_and_reload_keeps_a_working_custom_vae(tmp_path):
    pipe = tiny_pipeline()
    vae = tiny_custom_vae(block_out_channels=(8, 8), latent_space="stable-diffusion")
    swap_vae(pipe, vae)
    pipe.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["vae"] == [
        "diffusers_custom_vae.modeling_custom_vae",
        "CustomVAE",
    ]

    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    reloaded.set_progress_bar_config(disable=True)
    assert isinstance(reloaded.vae, CustomVAE)
    assert tuple(reloaded.vae.config.block_out_channels) == (8, 8)
    assert reloaded.vae.config.latent_space == "stable-diffusion"
    for name, weight in vae.state_dict().items():
        torch.testing.assert_close(reloaded.vae.state_dict()[name], weight, rtol=0, atol=0)
    assert reloaded.vae_scale_factor == 2
    np.testing.assert_allclose(generate(reloaded, output_type="np"), generate(pipe, output_type="np"), atol=1e-6)


def test_pipelines_from_pretrained_with_vae_and_from_pipe(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path)
    vae = tiny_custom_vae(block_out_channels=(8, 8))
    pipe = DiffusionPipeline.from_pretrained(tmp_path, vae=vae, torch_dtype=torch.bfloat16)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae.dtype == torch.float32  # from_pretrained leaves a given VAE in its own dtype

    swap_scratch_vae(pipe, pipe.vae)
    assert pipe.vae.dtype == torch.bfloat16
    assert generate(pipe)[0].size == (96, 64)

    with pytest.raises(ValueError, match="expected .* but only"):  # from_pipe drops a VAE that's no AutoencoderKL
        StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    image_to_image = StableDiffusionImg2ImgPipeline.from_pipe(pipe, vae=pipe.vae)
    swap_scratch_vae(image_to_image, tiny_custom_vae())
    assert (image_to_image.vae_scale_factor, pipe.vae_scale_factor) == (8, 2)  # the first pipeline is untouched
    assert generate(image_to_image)[0].size == (96, 64)


def test_pipeline_qkv_fusion_refuses_a_custom_vae_and_vae_false_is_the_workaround():
    """diffusers' `pipe.fuse_qkv_projections()` takes only an AutoencoderKL; CustomVAE's q, k, v are fused already."""
    pipe = tiny_pipeline()
    swap_scratch_vae(pipe, tiny_custom_vae())
    expected = generate(pipe, output_type="np")
    with pytest.raises(ValueError, match="AutoencoderKL"):
        pipe.fuse_qkv_projections()
    pipe.unfuse_qkv_projections(vae=False)  # the refusal came after the UNet was fused
    pipe.fuse_qkv_projections(vae=False)
    np.testing.assert_allclose(generate(pipe, output_type="np"), expected, atol=1e-5)
    pipe.unfuse_qkv_projections(vae=False)
    np.testing.assert_allclose(generate(pipe, output_type="np"), expected, atol=1e-6)


def test_a_bfloat16_unet_gets_a_bfloat16_custom_vae():
    pipe = tiny_pipeline().to(torch.bfloat16)
    swap_scratch_vae(pipe, tiny_custom_vae())

    assert pipe.vae.dtype == torch.bfloat16
    images = generate(pipe, output_type="np")
    assert images.shape == (1, 64, 96, 3) and np.isfinite(images).all()


@pytest.mark.parametrize(
    "pipeline_class, dtype",
    [(StableDiffusionXLPipeline, torch.bfloat16), *((cls, torch.float16) for cls in SDXL_PIPELINES)],
    ids=lambda value: getattr(value, "__name__", str(value)),
)
def test_force_upcast_keeps_the_custom_vae_float32_in_a_half_precision_sdxl_pipeline(pipeline_class, dtype):
    pipe = tiny_pipeline(pipeline_class).to(dtype)
    swap_scratch_vae(pipe, tiny_custom_vae(force_upcast=True))
    assert pipe.vae.dtype == torch.float32 and pipe.unet.dtype == dtype

    # Image-to-image casts a force_upcast VAE to the pipeline's dtype after encoding (as it does AutoencoderKL), and
    # upcasts a float16 one again to decode, through `vae.post_quant_conv`: the second call takes that path.
    for _ in range(2):
        images = generate(pipe, output_type="np")
        assert images.shape == (1, 64, 96, 3) and np.isfinite(images).all()
    if pipeline_class is StableDiffusionXLPipeline:
        assert pipe.vae.dtype == torch.float32


class VAEWithoutBlocks(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, latent_channels: int = 4):
        super().__init__()

    def encode(self, x):
        raise NotImplementedError

    def decode(self, z):
        raise NotImplementedError


@pytest.mark.parametrize(
    "pipeline_class, vae, message",
    [
        (
            StableDiffusionPipeline,
            tiny_custom_vae(latent_channels=8),
            r"8 latent channels.*StableDiffusionPipeline.*4-channel",
        ),
        (
            StableDiffusionInpaintPipeline,
            tiny_custom_vae(latent_channels=8),
            r"4-channel latents.*9 input channels are 4 \+ 4 \+ 1",
        ),
        (
            StableDiffusionXLPipeline,
            tiny_custom_vae(block_out_channels=(8,) * 5),
            r"16x.*block_out_channels.*StableDiffusionXLPipeline.*multiples of 8",
        ),
        (StableDiffusionPipeline, VAEWithoutBlocks(), "VAEWithoutBlocks.*block_out_channels"),
    ],
    ids=["latent channels", "inpainting latent channels", "16x downsampling", "no block_out_channels"],
)
def test_incompatible_vaes_are_refused_and_the_pipeline_is_untouched(pipeline_class, vae, message):
    pipe = tiny_pipeline(pipeline_class)
    old_vae, old_processor = pipe.vae, pipe.image_processor
    with pytest.raises(ValueError, match=message):
        swap_vae(pipe, vae)
    assert pipe.vae is old_vae and pipe.image_processor is old_processor and pipe.vae_scale_factor == 8


@pytest.mark.parametrize(
    "not_a_vae, message",
    [
        (lambda pipe: pipe.unet, "got a UNet2DConditionModel"),
        (lambda pipe: pipe.text_encoder, "got a CLIPTextModel"),
        (lambda pipe: "my-vae", r"'my-vae'.*CustomVAE.from_pretrained\('my-vae'\)"),
        (lambda pipe: None, "got None"),
        (lambda pipe: pipe, "got a StableDiffusionPipeline"),
    ],
    ids=["unet", "text encoder", "repo id", "None", "pipeline"],
)
def test_what_is_not_a_vae_is_refused_with_a_type_error_naming_it(not_a_vae, message):
    pipe = tiny_pipeline()
    old_vae, old_processor = pipe.vae, pipe.image_processor
    with pytest.raises(TypeError, match=rf"VAE.*`vae`.*{message}"):
        swap_vae(pipe, not_a_vae(pipe))
    assert pipe.vae is old_vae and pipe.image_processor is old_processor


@pytest.mark.parametrize(
    "not_a_pipeline, message",
    [
        ("stable-diffusion-v1-5/stable-diffusion-v1-5", "got the str 'stable-diffusion-v1-5/stable-diffusion-v1-5'"),
        (None, "got None"),
        (tiny_custom_vae(), r"CustomVAE.*swap_vae\(pipe, vae\)"),
    ],
    ids=["repo id", "None", "arguments swapped"],
)
def test_what_is_not_a_pipeline_is_refused_with_a_type_error_naming_it(not_a_pipeline, message):
    with pytest.raises(TypeError, match=rf"pipeline.*`pipe`.*{message}"):
        swap_vae(not_a_pipeline, tiny_custom_vae())


def test_a_pipeline_without_unet_and_vae_is_refused():
    unet = UNet2DModel(
        block_out_channels=(4, 4),
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        norm_num_groups=2,
        add_attention=False,
    )
    pipe = DDPMPipeline(unet, DDPMScheduler())
    with pytest.raises(ValueError, match=r"DDPMPipeline.*\['scheduler', 'unet'\]"):
        swap_vae(pipe, tiny_custom_vae())


SD, SDXL = "the 'stable-diffusion' latent space", "the 'stable-diffusion-xl' latent space"
UNNAMED = "an unnamed latent space"


@pytest.mark.parametrize(
    "pipeline_class, original_vae, new_vae, warning",
    [
        (StableDiffusionPipeline, None, tiny_custom_vae(), (SD, "CustomVAE", UNNAMED)),  # from scratch into SD
        (StableDiffusionPipeline, None, tiny_custom_vae(latent_space="stable-diffusion"), None),
        (StableDiffusionXLPipeline, None, tiny_custom_vae(latent_space="stable-diffusion"), (SDXL, "CustomVAE", SD)),
        (StableDiffusionXLImg2ImgPipeline, None, tiny_custom_vae(latent_space="stable-diffusion-xl"), None),
        (StableDiffusionPipeline, None, tiny_autoencoder_kl(), None),  # the SD VAE itself, back in
        (
            StableDiffusionPipeline,
            tiny_autoencoder_kl(scaling_factor=0.5),
            tiny_autoencoder_kl(),
            (UNNAMED, "AutoencoderKL", SD),
        ),
        (StableDiffusionPipeline, tiny_custom_vae(latent_space="dogs"), tiny_custom_vae(latent_space="dogs"), None),
        (StableDiffusionPipeline, tiny_custom_vae(), tiny_custom_vae(), (UNNAMED, "CustomVAE", UNNAMED)),
    ],
    ids=[
        "scratch->SD",
        "SD-aligned->SD",
        "SD-aligned->SDXL",
        "SDXL-aligned->SDXL",
        "SD VAE->SD",
        "SD VAE->unknown",
        "named own space",
        "unnamed own spaces",
    ],
)
def test_latent_space_warning_appears_exactly_when_spaces_may_differ(pipeline_class, original_vae, new_vae, warning):
    pipe = tiny_pipeline(pipeline_class, vae=original_vae)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        swap_vae(pipe, new_vae)
    latent_space_warnings = [w for w in caught if w.category is LatentSpaceWarning]
    assert len(latent_space_warnings) == (warning is not None)
    if warning is not None:
        original_space, new_class, new_space = warning
        message = str(latent_space_warnings[0].message)
        assert f"expects latents of {original_space} (its original VAE's); " in message
        assert f"; the new {new_class} encodes into {new_space}. " in message
        assert "expect noise-like images" in message
        assert latent_space_warnings[0].filename == __file__  # it points at the caller of swap_vae


def test_latent_space_of_known_and_unknown_vaes():
    assert latent_space_of(tiny_autoencoder_kl(0.18215)) == "stable-diffusion"
    assert latent_space_of(tiny_autoencoder_kl(0.13025)) == "stable-diffusion-xl"
    assert latent_space_of(tiny_autoencoder_kl(0.5)) is None
    assert latent_space_of(tiny_custom_vae(latent_space="stable-diffusion-xl")) == "stable-diffusion-xl"
    assert latent_space_of(tiny_custom_vae(scaling_factor=0.18215)) is None  # its config says: its own space
    assert latent_space_of(None) is None


@pytest.mark.parametrize(
    "not_a_vae, got",
    [("user/dog-vae", "the str 'user/dog-vae'"), ({"latent_space": None}, "the dict {'latent_space': None}")],
    ids=["repo id", "config dict"],
)
def test_latent_space_of_refuses_what_is_not_a_vae(not_a_vae, got):
    with pytest.raises(TypeError, match=rf"VAE.*{re.escape(got)}"):
        latent_space_of(not_a_vae)


def unnamed_teacher(shift: float = 0.0):
    """A VAE trained from scratch (no name for its space); `shift` makes another one."""
    teacher = tiny_autoencoder_kl(scaling_factor=0.5)
    with torch.no_grad():
        teacher.encoder.conv_in.bias.add_(shift)
    return teacher


def test_students_of_one_unnamed_teacher_share_its_space_both_ways_and_with_each_other():
    teacher = unnamed_teacher()
    space = encoder_fingerprint(teacher)
    first, second = tiny_custom_vae(latent_space=space), tiny_custom_vae(latent_space=space, layers_per_block=2)
    assert shares_latent_space(first, teacher) and shares_latent_space(teacher, first)
    assert shares_latent_space(first, second) and shares_latent_space(second, first)
    stranger = tiny_custom_vae(latent_space=encoder_fingerprint(unnamed_teacher(shift=1.0)))
    assert not shares_latent_space(stranger, first) and not shares_latent_space(teacher, stranger)
    assert not shares_latent_space(tiny_custom_vae(), teacher) and not shares_latent_space(teacher, tiny_custom_vae())

    pipe = tiny_pipeline(vae=first)  # a UNet trained on the first student's latents, then the second swapped in
    with warnings.catch_warnings():
        warnings.simplefilter("error", LatentSpaceWarning)
        swap_vae(pipe, second)
    with pytest.warns(LatentSpaceWarning, match="distilled from"):
        swap_vae(pipe, stranger)


def test_a_student_swaps_into_a_sequentially_offloaded_pipeline_of_its_unnamed_teacher():
    """Sequential offload leaves meta tensors on the pipeline's VAE: its fingerprint is read through the hooks."""
    pipe = tiny_pipeline(vae=unnamed_teacher())
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert all(parameter.is_meta for parameter in pipe.vae.parameters())
    student = tiny_custom_vae(latent_space=encoder_fingerprint(unnamed_teacher()), scaling_factor=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LatentSpaceWarning)
        swap_vae(pipe, student)
    assert pipe.vae is student and hasattr(student, "_hf_hook")


def test_save_pipeline_over_an_earlier_custom_vae_save_writes_what_is_saved_now(tmp_path):
    pipe = tiny_pipeline()
    with pytest.warns(LatentSpaceWarning):
        swap_vae(pipe, tiny_custom_vae())
    save_pipeline(pipe, tmp_path)
    assert (tmp_path / "vae" / "modeling_custom_vae.py").is_file()
    (tmp_path / "unet" / "modeling_custom_vae.py").write_text("# the user's own file\n")

    swap_vae(pipe, tiny_autoencoder_kl())  # the pipeline's VAE again
    save_pipeline(pipe, tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert not (tmp_path / "vae" / "modeling_custom_vae.py").exists()
    assert (tmp_path / "unet" / "modeling_custom_vae.py").read_text() == "# the user's own file\n"  # not ours
    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path)
    assert isinstance(reloaded.vae, AutoencoderKL)


def test_with_the_package_imported_a_saved_pipeline_loads_its_own_custom_vae_and_runs_no_code_from_the_folder(
    tmp_path,
):
    pipe = tiny_pipeline()
    with pytest.warns(LatentSpaceWarning):
        swap_vae(pipe, tiny_custom_vae())
    save_pipeline(pipe, tmp_path)
    modeling_file = tmp_path / "vae" / "modeling_custom_vae.py"
    modeling_file.write_text("raise RuntimeError('code from the folder ran')\n" + modeling_file.read_text())

    reloaded = StableDiffusionPipeline.from_pretrained(tmp_path)  # no trust_remote_code: the package's class
    assert type(reloaded.vae) is CustomVAE
    assert torch.equal(reloaded.vae.decoder.conv_out.weight, pipe.vae.decoder.conv_out.weight)
    weights = tmp_path / "vae" / "diffusion_pytorch_model.safetensors"
    state_dict = load_file(weights)
    state_dict["decoder.conv_out.bias"][0] = float("nan")
    save_file(state_dict, weights)
    with pytest.raises(ValueError, match="decoder.conv_out.bias"):  # loaded as strictly as CustomVAE.from_pretrained
        StableDiffusionPipeline.from_pretrained(tmp_path)


def test_model_cpu_offload_hooks_move_to_the_new_vae():
    pipe = tiny_pipeline()
    pipe.enable_model_cpu_offload(device="cpu")  # the hooks work the same as with a GPU
    old_vae, hook_count = pipe.vae, len(pipe._all_hooks)

    swap_scratch_vae(pipe, tiny_custom_vae())
    assert hasattr(pipe.vae, "_hf_hook") and not hasattr(old_vae, "_hf_hook")
    assert len(pipe._all_hooks) == hook_count
    assert generate(pipe)[0].size == (96, 64)


# The example script, run in-process on tiny pipelines saved to folders.


def load_example():
    spec = importlib.util.spec_from_file_location("generate_with_sd", ROOT / "examples" / "generate_with_sd.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """Tiny SD and SDXL pipelines (sd/, sdxl/), a 2x CustomVAE (vae/), one with 8 latent channels, an image."""
    folder = tmp_path_factory.mktemp("saved")
    tiny_pipeline(StableDiffusionPipeline).save_pretrained(folder / "sd")
    tiny_pipeline(StableDiffusionXLPipeline).save_pretrained(folder / "sdxl")
    tiny_custom_vae(block_out_channels=(8, 8)).save_pretrained(folder / "vae")
    tiny_custom_vae(latent_channels=8).save_pretrained(folder / "vae-8-channels")
    Image.new("RGB", (48, 40), "teal").save(folder / "init.png")
    write_bomb_png(folder / "bomb.png")
    return folder


@pytest.mark.parametrize(
    "pipeline, extra, size",
    [
        ("sd", ["--height", "64", "--width", "96"], (96, 64)),
        ("sdxl", ["--image", "init.png", "--strength", "0.5", "--negative_prompt", "blurry"], (48, 40)),
        ("sd", ["--image", "init.png", "--height", "64", "--width", "64", "--guidance_scale", "3"], (64, 64)),
    ],
    ids=["sd text-to-image", "sdxl image-to-image", "sd image-to-image resized"],
)
def test_example_generates_a_png_of_the_requested_size(saved, tmp_path, pipeline, extra, size):
    extra = [str(saved / arg) if arg == "init.png" else arg for arg in extra]
    output = tmp_path / "out" / "dog.png"
    argv = ["--pipeline", str(saved / pipeline), "--vae", str(saved / "vae"), "--prompt", "a dog", "--steps", "2"]
    with pytest.warns(LatentSpaceWarning):  # the user is told what a from-scratch VAE will do
        assert load_example().main(argv + extra + ["--output", str(output)]) == output
    with Image.open(output) as image:
        assert (image.format, image.size) == ("PNG", size)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--vae", "{saved}/vae-8-channels"], "CustomVAE has 8 latent channels"),
        (["--height", "60"], "--height: .*multiple of 8.*60"),
        (["--steps", "0"], "--steps: .*at least 1.*0"),
        (["--strength", "0.5"], "--strength .*--image"),
        (["--image", "{saved}/init.png", "--strength", "1.5"], r"--strength: .*\(0, 1\].*1\.5"),
        (["--image", "missing.png"], "image 'missing.png'"),
        (["--image", "{saved}/bomb.png"], r"'.*bomb\.png'.*decompression bomb"),
        (["--vae", "no-such-vae"], "no-such-vae.*config.json"),
        (["--pipeline", "no-such-pipeline"], "no-such-pipeline.*model_index.json"),
        (["--output", "dog.jpg"], r"--output: .*\.png.*dog\.jpg"),
    ],
    ids=[
        "vae that doesn't fit",
        "size",
        "steps",
        "strength without image",
        "strength beyond 1",
        "missing image",
        "decompression bomb",
        "missing vae",
        "missing pipeline",
        "not png",
    ],
)
def test_example_refuses_bad_arguments_clearly(saved, tmp_path, capsys, extra, message):
    argv = ["--pipeline", str(saved / "sd"), "--vae", str(saved / "vae"), "--prompt", "a dog"]
    argv += ["--output", str(tmp_path / "dog.png"), *(arg.format(saved=saved) for arg in extra)]
    with pytest.raises(SystemExit) as exit_info:
        load_example().main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and re.search(f"error: .*{message}", error.splitlines()[-1]), error
