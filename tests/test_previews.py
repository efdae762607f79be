"""Live previews: LivePreviews decodes a pipeline's intermediate latents with a small VAE into PNG frames and a GIF,
and leaves the pipeline's images as they were; examples/generate_with_sd.py --preview_vae runs it."""

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderTiny,
    DDPMPipeline,
    DDPMScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
    UNet2DModel,
)
from diffusers.callbacks import MultiPipelineCallbacks, SDCFGCutoffCallback
from PIL import Image
from tiny_pipelines import (
    INPAINT_PIPELINES,
    SD_SCALING_FACTOR,
    SDXL_PIPELINES,
    tiny_autoencoder_kl,
    tiny_custom_vae,
    tiny_pipeline,
)

from diffusers_custom_vae import CustomVAE, LatentSpaceWarning
from diffusers_custom_vae.images import tensor_to_pil
from diffusers_custom_vae.latent_spaces import encoder_fingerprint
from diffusers_custom_vae.previews import LivePreviews

TEXT_TO_IMAGE = (StableDiffusionPipeline, StableDiffusionXLPipeline)


def sd_preview_vae(**config):
    """A tiny CustomVAE that says it lives in SD's latent space (as one distilled from SD's VAE would)."""
    return tiny_custom_vae(**{"latent_space": "stable-diffusion", "scaling_factor": SD_SCALING_FACTOR, **config})


def preview_vae_for(pipeline_class):
    space = "stable-diffusion-xl" if pipeline_class in SDXL_PIPELINES else "stable-diffusion"
    return tiny_custom_vae(latent_space=space)


def generate(pipe, steps: int = 3, batch: int = 1, height: int = 64, width: int = 96, **options):
    """Runs a tiny pipeline (with a grey image and a full mask where it takes them), classifier-free guidance on."""
    if type(pipe) not in TEXT_TO_IMAGE:
        options.setdefault("strength", 1.0)  # all `steps` steps run
        options.update(image=Image.new("RGB", (width, height), "grey"))
    if type(pipe) in INPAINT_PIPELINES:
        options.update(mask_image=Image.new("L", (width, height), 255))
    generator = torch.Generator().manual_seed(0)
    return pipe(
        "a dog",
        height=height,
        width=width,
        num_inference_steps=steps,
        num_images_per_prompt=batch,
        guidance_scale=5.0,
        generator=generator,
        **{"output_type": "np", **options},
    ).images


def frame_sizes(paths) -> list[tuple[str, tuple[int, int]]]:
    sizes = []
    for path in paths:
        with Image.open(path) as frame:
            sizes.append((frame.format, frame.size))
    return sizes


@pytest.mark.parametrize(
    "pipeline_class",
    [
        StableDiffusionPipeline,
        StableDiffusionImg2ImgPipeline,
        StableDiffusionInpaintPipeline,
        StableDiffusionXLPipeline,
        StableDiffusionXLImg2ImgPipeline,
    ],
    ids=lambda cls: cls.__name__,
)
def test_previews_write_a_row_per_step_and_leave_the_images_unchanged(pipeline_class, tmp_path):
    pipe = tiny_pipeline(pipeline_class)
    without_previews = generate(pipe, batch=2)
    previews = LivePreviews(pipe, preview_vae_for(pipeline_class), tmp_path / "frames")

    with_previews = generate(pipe, batch=2, callback_on_step_end=previews)
    assert with_previews.shape == (2, 64, 96, 3) and np.array_equal(with_previews, without_previews)
    assert previews.frames == [tmp_path / "frames" / f"step-00{step}.png" for step in (1, 2, 3)]
    assert sorted((tmp_path / "frames").iterdir()) == previews.frames
    # Guidance doubles the UNet's batch, not the latents': one row of the 2 images, each 64x96 (8x VAE).
    assert frame_sizes(previews.frames) == [("PNG", (2 * 96, 64))] * 3
    with Image.open(previews.frames[0]) as first, Image.open(previews.frames[-1]) as last:
        assert not np.array_equal(np.asarray(first), np.asarray(last))  # the latents changed between the steps


@pytest.mark.parametrize("steps, every, written", [(5, 2, (2, 4, 5)), (4, 2, (2, 4)), (3, 5, (3,))])
def test_every_n_steps_and_the_last_one(tmp_path, steps, every, written):
    pipe = tiny_pipeline()
    previews = LivePreviews(pipe, sd_preview_vae(), tmp_path, every=every)
    generate(pipe, steps=steps, callback_on_step_end=previews)
    assert [path.name for path in previews.frames] == [f"step-{step:03d}.png" for step in written]


def test_image_to_image_counts_the_steps_it_runs(tmp_path):
    pipe = tiny_pipeline(StableDiffusionImg2ImgPipeline)
    previews = LivePreviews(pipe, sd_preview_vae(), tmp_path, every=2)
    generate(pipe, steps=10, strength=0.5, callback_on_step_end=previews)  # 5 of the 10 steps run
    assert [path.name for path in previews.frames] == ["step-002.png", "step-004.png", "step-005.png"]


def test_a_frame_is_the_preview_vaes_decode_of_the_unscaled_latents(tmp_path):
    pipe = tiny_pipeline()
    vae = sd_preview_vae(scaling_factor=0.5, shift_factor=0.25)
    latents = generate(pipe, output_type="latent")  # the final latents, as the last callback sees them
    expected = tensor_to_pil(vae.decode(latents / 0.5 + 0.25).sample[0].detach())

    previews = LivePreviews(pipe, vae, tmp_path)
    generate(pipe, callback_on_step_end=previews)
    with Image.open(previews.frames[-1]) as frame:
        assert np.array_equal(np.asarray(frame), np.asarray(expected))


def test_with_the_pipelines_own_vae_the_last_frame_is_the_image(tmp_path):
    pipe = tiny_pipeline()
    previews = LivePreviews(pipe, pipe.vae, tmp_path)
    image = generate(pipe, callback_on_step_end=previews)[0]
    with Image.open(previews.frames[-1]) as frame:
        difference = np.abs(np.asarray(frame, dtype=np.int16) - np.rint(image * 255).astype(np.int16))
    assert difference.max() <= 1  # the pipeline rounds [0, 1] images, we [-1, 1] ones: a level apart at most


def test_a_preview_vae_of_another_resolution_and_dtype(tmp_path):
    pipe = tiny_pipeline().to(torch.bfloat16)
    vae = sd_preview_vae(block_out_channels=(8, 8))  # 2x: it decodes 8x12 latents into 16x24 pixels
    previews = LivePreviews(pipe, vae, tmp_path, every=3)
    images = generate(pipe, callback_on_step_end=previews)
    assert np.isfinite(images).all() and vae.dtype == torch.float32  # the preview VAE keeps its dtype
    assert frame_sizes(previews.frames) == [("PNG", (24, 16))]


def test_each_run_starts_its_own_frames_and_the_gif_shows_them(tmp_path):
    pipe = tiny_pipeline()
    previews = LivePreviews(pipe, sd_preview_vae(), tmp_path / "frames")
    generate(pipe, steps=5, callback_on_step_end=previews)
    generate(pipe, steps=3, callback_on_step_end=previews)
    assert [path.name for path in previews.frames] == ["step-001.png", "step-002.png", "step-003.png"]

    gif = previews.save_gif()
    assert gif == tmp_path / "frames" / "previews.gif"
    durations = []
    with Image.open(gif) as animation:
        assert (animation.format, animation.size, animation.n_frames) == ("GIF", (96, 64), 3)
        assert animation.info["loop"] == 0
        for index in range(animation.n_frames):
            animation.seek(index)
            durations.append(animation.info["duration"])
    assert durations == [100, 100, 1000]
    assert previews.save_gif(tmp_path / "elsewhere" / "dog.GIF", frame_duration=50).is_file()


def test_gif_needs_frames_and_a_gif_name(tmp_path):
    pipe = tiny_pipeline()
    previews = LivePreviews(pipe, sd_preview_vae(), tmp_path)
    with pytest.raises(ValueError, match="preview frames.*GIF"):
        previews.save_gif()
    generate(pipe, steps=1, callback_on_step_end=previews)
    with pytest.raises(ValueError, match=r"\.gif.*'.*dog\.png'"):
        previews.save_gif(tmp_path / "dog.png")
    assert not (tmp_path / "dog.png").exists()


def test_diffusers_autoencoder_tiny_previews_too(tmp_path):
    """TAESD's own class: scaling factor 1 (it decodes scaled latents). It records no latent space, but is distilled
    into a pretrained VAE's: previewing a pipeline whose VAE's space is named needs no warning; one of its own does."""
    torch.manual_seed(0)
    blocks = dict(encoder_block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4)
    taesd = AutoencoderTiny(**blocks, num_encoder_blocks=(1,) * 4, num_decoder_blocks=(1,) * 4)
    pipe = tiny_pipeline()
    with warnings.catch_warnings():
        warnings.simplefilter("error", LatentSpaceWarning)
        previews = LivePreviews(pipe, taesd, tmp_path)
    generate(pipe, steps=2, callback_on_step_end=previews)
    assert frame_sizes(previews.frames) == [("PNG", (96, 64))] * 2
    with pytest.warns(LatentSpaceWarning, match="AutoencoderTiny"):
        LivePreviews(tiny_pipeline(vae=tiny_custom_vae()), taesd, tmp_path)


def test_a_frame_that_does_not_decode_to_finite_values_is_skipped_with_one_warning(tmp_path):
    pipe = tiny_pipeline()
    expected = generate(pipe, steps=3)
    overflowing = sd_preview_vae()
    with torch.no_grad():
        overflowing.decoder.conv_out.bias.fill_(float("inf"))  # as a float16 VAE that overflows
    previews = LivePreviews(pipe, overflowing, tmp_path / "frames")
    with pytest.warns(RuntimeWarning, match="not finite") as caught:
        images = generate(pipe, steps=3, callback_on_step_end=previews)
    assert len([w for w in caught if w.category is RuntimeWarning]) == 1
    assert np.array_equal(images, expected) and np.isfinite(images).all()
    assert previews.frames == [] and previews.skipped == [1, 2, 3]
    assert not (tmp_path / "frames").exists()


def test_a_student_of_an_unnamed_teacher_previews_a_sequentially_offloaded_pipeline(tmp_path):
    """The pipeline's VAE weights are meta tensors under accelerate's hooks: its fingerprint is read from them."""
    teacher = tiny_autoencoder_kl(scaling_factor=0.5)  # a space with no name
    pipe = tiny_pipeline(vae=teacher)
    student = tiny_custom_vae(latent_space=encoder_fingerprint(teacher), scaling_factor=0.5)
    pipe.enable_sequential_cpu_offload(device="cpu")
    assert all(parameter.is_meta for parameter in pipe.vae.parameters())
    with warnings.catch_warnings():
        warnings.simplefilter("error", LatentSpaceWarning)
        LivePreviews(pipe, student, tmp_path)  # (running it: accelerate 1.16's hooks fail on CPU with torch 2.13)
    other_teacher = tiny_autoencoder_kl(scaling_factor=0.5)
    with torch.no_grad():
        other_teacher.encoder.conv_in.bias.add_(1.0)
    with pytest.warns(LatentSpaceWarning, match="unnamed"):
        LivePreviews(pipe, tiny_custom_vae(latent_space=encoder_fingerprint(other_teacher)), tmp_path)


def test_previews_combine_with_other_callbacks(tmp_path):
    pipe = tiny_pipeline()
    cutoff = SDCFGCutoffCallback(cutoff_step_ratio=0.5)  # asks for prompt_embeds; previews ask for latents
    previews = LivePreviews(pipe, sd_preview_vae(), tmp_path)
    generate(pipe, steps=4, callback_on_step_end=MultiPipelineCallbacks([cutoff, previews]))
    assert len(previews.frames) == 4


def test_previews_without_the_latents_say_so(tmp_path):
    pipe = tiny_pipeline()
    previews = LivePreviews(pipe, sd_preview_vae(), tmp_path)
    with pytest.raises(ValueError, match=r"\['prompt_embeds'\].*'latents'.*callback_on_step_end_tensor_inputs"):
        generate(pipe, callback_on_step_end=previews, callback_on_step_end_tensor_inputs=["prompt_embeds"])


SD, SDXL, UNNAMED = "the 'stable-diffusion' latent space", "the 'stable-diffusion-xl' latent space", "an unnamed"


@pytest.mark.parametrize(
    "pipeline_class, vae, spaces",
    [
        (StableDiffusionPipeline, tiny_custom_vae(), (UNNAMED, SD)),
        (StableDiffusionPipeline, tiny_custom_vae(latent_space="stable-diffusion-xl"), (SDXL, SD)),
        (StableDiffusionXLPipeline, tiny_autoencoder_kl(), (SD, SDXL)),  # SD's own VAE, in SDXL
        (StableDiffusionPipeline, sd_preview_vae(), None),
        (StableDiffusionXLPipeline, tiny_custom_vae(latent_space="stable-diffusion-xl"), None),
        (StableDiffusionPipeline, tiny_autoencoder_kl(), None),
    ],
    ids=["scratch->SD", "SDXL-aligned->SD", "SD VAE->SDXL", "SD-aligned->SD", "SDXL-aligned->SDXL", "SD VAE->SD"],
)
def test_latent_space_warning_exactly_when_the_spaces_may_differ(pipeline_class, vae, spaces, tmp_path):
    pipe = tiny_pipeline(pipeline_class)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        LivePreviews(pipe, vae, tmp_path)
    caught = [w for w in caught if w.category is LatentSpaceWarning]
    assert len(caught) == (spaces is not None)
    if spaces is not None:
        message = str(caught[0].message)
        assert f"The preview {type(vae).__name__} decodes latents of {spaces[0]}" in message
        assert f"the UNet of {pipeline_class.__name__} denoises latents of {spaces[1]}" in message
        assert caught[0].filename == __file__  # it points at the caller


def test_the_pipelines_own_vae_needs_no_warning_even_in_an_unnamed_space(tmp_path):
    pipe = tiny_pipeline(vae=tiny_custom_vae())  # as if its UNet were trained on this VAE's latents
    with warnings.catch_warnings():
        warnings.simplefilter("error", LatentSpaceWarning)
        LivePreviews(pipe, pipe.vae, tmp_path)
    with pytest.warns(LatentSpaceWarning, match="unnamed latent space"):
        LivePreviews(pipe, tiny_custom_vae(), tmp_path)  # the same weights, but nothing says it is the same space


@pytest.mark.parametrize(
    "make_vae, error, message",
    [
        (
            lambda pipe: tiny_custom_vae(latent_channels=8, latent_space="stable-diffusion"),
            ValueError,
            r"CustomVAE.*8 latent channels.*StableDiffusionPipeline.*latent_channels=4",
        ),
        (lambda pipe: "user/sd-tiny-vae", TypeError, r"preview VAE.*'user/sd-tiny-vae'"),
        (lambda pipe: None, TypeError, "preview VAE.*None"),
        (lambda pipe: pipe.unet, TypeError, "preview VAE.*UNet2DConditionModel"),
    ],
    ids=["8 latent channels", "repo id", "None", "unet"],
)
def test_what_cannot_preview_is_refused_naming_it(make_vae, error, message, tmp_path):
    pipe = tiny_pipeline()
    with pytest.raises(error, match=message):
        LivePreviews(pipe, make_vae(pipe), tmp_path / "frames")
    assert not (tmp_path / "frames").exists()


def test_a_pipeline_without_unet_and_vae_and_a_bad_every_are_refused(tmp_path):
    unet = UNet2DModel(
        block_out_channels=(4, 4),
        down_block_types=("DownBlock2D",) * 2,
        up_block_types=("UpBlock2D",) * 2,
        norm_num_groups=2,
        add_attention=False,
    )
    with pytest.raises(ValueError, match="`unet`.*`vae`.*DDPMPipeline"):
        LivePreviews(DDPMPipeline(unet, DDPMScheduler()), sd_preview_vae(), tmp_path)
    for every in (0, 2.5, True):
        with pytest.raises(ValueError, match=rf"`every`.*at least 1.*{every}"):
            LivePreviews(tiny_pipeline(), sd_preview_vae(), tmp_path, every=every)


# The example script, run in-process on tiny pipelines saved to folders.


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """Tiny SD and SDXL pipelines (sd/, sdxl/), preview VAEs in SD's space (sd-preview/), in their own space
    (scratch-preview/), with 8 latent channels (preview-8-channels/), and an image."""
    folder = tmp_path_factory.mktemp("saved")
    tiny_pipeline(StableDiffusionPipeline).save_pretrained(folder / "sd")
    tiny_pipeline(StableDiffusionXLPipeline).save_pretrained(folder / "sdxl")
    sd_preview_vae().save_pretrained(folder / "sd-preview")
    tiny_custom_vae().save_pretrained(folder / "scratch-preview")
    tiny_custom_vae(latent_channels=8).save_pretrained(folder / "preview-8-channels")
    Image.new("RGB", (48, 40), "teal").save(folder / "init.png")
    return folder


def run_example(load_example, saved, output, *extra) -> Path:
    argv = ["--pipeline", str(saved / "sd"), "--prompt", "a dog", "--steps", "3", "--output", str(output)]
    return load_example("generate_with_sd").main(argv + [arg.format(saved=saved) for arg in extra])


def test_example_writes_previews_and_the_pipelines_own_image(load_example, saved, tmp_path):
    plain = run_example(load_example, saved, tmp_path / "plain.png")  # no --vae: the pipeline keeps its VAE
    with warnings.catch_warnings():
        warnings.simplefilter("error", LatentSpaceWarning)  # a preview VAE in SD's space: no warning
        output = run_example(
            load_example, saved, tmp_path / "out" / "dog.png", "--preview_vae", "{saved}/sd-preview",
            "--preview_every", "2", "--preview_gif",
        )  # fmt: skip

    with Image.open(plain) as expected, Image.open(output) as image:
        assert np.array_equal(np.asarray(image), np.asarray(expected))  # previews change nothing
    frames = tmp_path / "out" / "dog-previews"
    assert sorted(path.name for path in frames.iterdir()) == ["previews.gif", "step-002.png", "step-003.png"]
    assert frame_sizes(sorted(frames.glob("*.png"))) == [("PNG", (64, 64))] * 2  # the tiny pipeline's default size
    with Image.open(frames / "previews.gif") as animation:
        assert animation.n_frames == 2


def test_example_previews_sdxl_image_to_image_with_a_custom_vae_and_folder(load_example, saved, tmp_path):
    argv = ["--pipeline", str(saved / "sdxl"), "--vae", str(saved / "scratch-preview"), "--image"]
    argv += [str(saved / "init.png"), "--strength", "1", "--preview_vae", str(saved / "scratch-preview")]
    argv += ["--preview_dir", str(tmp_path / "frames"), "--prompt", "a dog", "--steps", "2"]
    with pytest.warns(LatentSpaceWarning) as caught:  # the swap and the previews: both from-scratch VAEs
        load_example("generate_with_sd").main(argv + ["--output", str(tmp_path / "dog.png")])
    assert len([w for w in caught if w.category is LatentSpaceWarning]) == 2
    assert frame_sizes(sorted((tmp_path / "frames").iterdir())) == [("PNG", (48, 40))] * 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--preview_every", "2"], "--preview_every .*--preview_vae"),
        (["--preview_gif", "--preview_dir", "x"], "--preview_dir, --preview_gif .*--preview_vae"),
        (["--preview_vae", "{saved}/sd-preview", "--preview_every", "0"], "--preview_every: .*at least 1.*0"),
        (["--preview_vae", "{saved}/init.png"], r"init\.png .*not a folder"),
        (["--preview_vae", "no-such-vae"], "no-such-vae.*config.json"),
        (["--preview_vae", "{saved}/preview-8-channels"], "preview CustomVAE has 8 latent channels.*UNet"),
        (
            ["--preview_vae", "{saved}/sd-preview", "--preview_dir", "{saved}/init.png"],
            r"--preview_dir: .*folder.*init\.png",
        ),
        (["--vae", "no-such-vae"], "no-such-vae.*config.json"),
    ],
    ids=[
        "every without vae",
        "options without vae",
        "every 0",
        "not a vae",
        "missing vae",
        "8 latent channels",
        "folder is a file",
        "missing --vae",
    ],
)
def test_example_refuses_bad_preview_arguments_in_one_line(load_example, saved, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exit_info:
        run_example(load_example, saved, tmp_path / "out" / "dog.png", *extra)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert exit_info.value.code == 2 and re.fullmatch(f"\\S+: error: .*{message}.*", error), error
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_the_readme_snippet_runs(tmp_path, monkeypatch):
    """docs/distillation.md's "Live previews" snippet as printed, on a tiny pipeline (50 steps, its default)."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "distillation.md").read_text()
    snippet = re.findall(r"```python\n(.*?)```", docs.split("## Live previews", 1)[1], flags=re.S)[0]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(CustomVAE, "from_pretrained", lambda name: sd_preview_vae())  # "user/sd-tiny-vae"
    namespace = {"pipe": tiny_pipeline()}
    exec(compile(snippet, "docs/distillation.md", "exec"), namespace)
    frames = sorted(path.name for path in (tmp_path / "previews").glob("*.png"))
    assert frames == [f"step-{step:03d}.png" for step in range(5, 51, 5)]
    assert namespace["gif"] == Path("previews") / "previews.gif" and namespace["gif"].is_file()
    assert namespace["image"].size == (64, 64)
