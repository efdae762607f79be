"""A Gradio demo of one or more VAEs (and, optionally, a class-conditional latent diffusion pipeline).

    demo = build_demo(["outputs/custom-vae", "user/sd-tiny-vae"], pipeline="pets-dit")
    demo.launch(server_name="127.0.0.1", server_port=7860)

Tabs and their API names: Reconstruct (`reconstruct`), Compare (`compare`), Latents (`interpolate`) and, with a
pipeline, Generate (`generate`). Images of any size work: each is padded by reflection to the next multiple of the
VAE's downsampling factor, reconstructed, and cropped back, so the reconstruction has the input's exact size and the
metrics see every pixel. VAEs tile images larger than their tile size (bounded memory), and images with a side over
`max_image_side` are refused with a message. Gradio is imported only here (the `[app]` extra).
"""

import functools
import html
import itertools
import os
import queue
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline
from PIL import Image, ImageOps

from .evaluation import _synchronize
from .images import image_grid, load_image, pil_to_tensor, tensor_to_pil
from .loading import load_vae
from .metrics import psnr, ssim
from .modeling_custom_vae import downsample_factor_of

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no version check or analytics: the app runs offline
try:
    import gradio as gr
except ImportError as error:
    raise ImportError(f"The demo app needs gradio ({error}): pip install 'diffusers_custom_vae[app]'.") from error

# Error heat map: black for no error, bright yellow for an error of this fraction of the range (or more).
HEAT_MAP_FULL_SCALE = 0.25
# An "inferno"-like colour ramp: error 0 -> black ... HEAT_MAP_FULL_SCALE -> yellow.
_HEAT_COLOURS = np.array([[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]], np.float32)
_LATENT_PREVIEW_SIDE = 128  # latent channels are shown enlarged (nearest neighbour) to about this many pixels


def reconstruct_image(vae, image: Image.Image) -> tuple[Image.Image, torch.Tensor, dict]:
    """(reconstruction as a PIL image of the input's size, latents (C, h, w), metrics) of one RGB image.

    The image is padded by reflection to the next multiple of the VAE's downsampling factor and the reconstruction
    cropped back. `psnr` and `ssim` compare the returned 8-bit image with the input, as both are shown."""
    original = pil_to_tensor(image)[None]  # (1, 3, H, W) in [-1, 1]
    height, width = original.shape[-2:]
    factor = downsample_factor_of(vae)
    pad_bottom, pad_right = -height % factor, -width % factor
    mode = "reflect" if pad_bottom < height and pad_right < width else "replicate"  # reflect needs a wider image
    padded = F.pad(original, (0, pad_right, 0, pad_bottom), mode=mode).to(vae.device, vae.dtype)
    with torch.no_grad():
        latents, encode_ms = _timed(lambda: vae.encode(padded).latent_dist.mode(), vae)
        decoded, decode_ms = _timed(lambda: vae.decode(latents).sample, vae)
    reconstruction = tensor_to_pil(decoded[0, :, :height, :width].float().cpu())
    shown = pil_to_tensor(reconstruction)[None]  # the 8-bit image the page shows
    metrics = {
        "psnr": round(psnr(shown, original).item(), 3),
        "ssim": round(ssim(shown, original).item(), 4),
        "encode_ms": round(encode_ms, 1),
        "decode_ms": round(decode_ms, 1),
        "latent_shape": list(latents.shape[1:]),
        "image_size": [height, width],
        "padded_to": [height + pad_bottom, width + pad_right],
    }
    return reconstruction, latents[0].float().cpu(), metrics


def _timed(compute, vae) -> tuple[torch.Tensor, float]:
    """compute()'s result and the milliseconds it took (the device's queue drained on both sides)."""
    _synchronize(vae.device)
    start = time.perf_counter()
    result = compute()
    _synchronize(vae.device)
    return result, (time.perf_counter() - start) * 1000


def error_heat_map(reconstruction: Image.Image, original: Image.Image) -> Image.Image:
    """|reconstruction - original| averaged over RGB, black (0) to yellow (`HEAT_MAP_FULL_SCALE` of the range)."""
    difference = np.abs(np.asarray(reconstruction, np.float32) - np.asarray(original, np.float32)).mean(-1) / 255
    position = np.clip(difference / HEAT_MAP_FULL_SCALE, 0, 1) * (len(_HEAT_COLOURS) - 1)
    low = np.floor(position).astype(int).clip(max=len(_HEAT_COLOURS) - 2)
    weight = (position - low)[..., None]
    colours = _HEAT_COLOURS[low] * (1 - weight) + _HEAT_COLOURS[low + 1] * weight
    return Image.fromarray(colours.round().astype(np.uint8))


def latent_channel_images(latents: torch.Tensor) -> list[tuple[Image.Image, str]]:
    """(C, h, w) latents -> one greyscale image per channel (its own min..max stretched to black..white), enlarged,
    with a caption giving the channel's range."""
    scale = max(1, _LATENT_PREVIEW_SIDE // max(latents.shape[-2:]))
    images = []
    for index, channel in enumerate(latents):
        low, high = channel.min().item(), channel.max().item()
        levels = ((channel - low) / max(high - low, 1e-8) * 255).round().to(torch.uint8).numpy()
        image = Image.fromarray(levels).resize((levels.shape[1] * scale, levels.shape[0] * scale), Image.NEAREST)
        images.append((image, f"channel {index}: {low:.2f} to {high:.2f}"))
    return images


def interpolate_latents(vae, first: Image.Image, second: Image.Image, steps: int = 8, side: int = 256):
    """Both images centre-cropped to `side` x `side`, encoded, their latents mixed linearly in `steps` steps
    (first to second) and decoded: (B, 3, side, side) in [-1, 1]."""
    factor = downsample_factor_of(vae)
    side = max(factor, side // factor * factor)
    images = torch.stack([pil_to_tensor(ImageOps.fit(image, (side, side))) for image in (first, second)])
    with torch.no_grad():
        ends = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mode()
        weights = torch.linspace(0, 1, steps, device=ends.device, dtype=ends.dtype)[:, None, None, None]
        return vae.decode(ends[:1] * (1 - weights) + ends[1:] * weights).sample.float().cpu().clamp(-1, 1)


def _vae_names(vaes) -> list[tuple[str, object]]:
    """[(name, VAE)] from a mapping name -> VAE or folder, or a sequence of VAEs, folders and Hub ids."""
    items = vaes.items() if isinstance(vaes, Mapping) else [(None, vae) for vae in vaes]
    named = []
    for index, (name, vae) in enumerate(items):
        if isinstance(vae, (str, os.PathLike)):
            name, vae = name or os.fspath(vae), load_vae(vae)
        named.append((name or f"{type(vae).__name__} {index + 1}", vae))
    if not named:
        raise ValueError("build_demo needs at least one VAE (a folder, a Hub id or a loaded model).")
    return named


def _read_upload(path: str | None, max_side: int, what: str = "an image") -> Image.Image:
    """The uploaded file as RGB (`load_image`), or a `gr.Error` saying what is wrong with it. The size comes from the
    file's header: an image over the cap is refused before it is decoded."""
    if path is None:
        raise gr.Error(f"Nothing uploaded: upload {what} (or click an example) first.")
    try:
        with Image.open(path) as header:
            width, height = header.size
        if max(width, height) <= max_side:
            return load_image(path)
    except (OSError, SyntaxError, ValueError) as error:
        message = str(error).replace(os.path.dirname(path) + os.sep, "")  # the file's name, not the server's folder
        raise gr.Error(html.escape(message, quote=False)) from error
    raise gr.Error(
        f"This image is {width}x{height} pixels; this app takes images up to {max_side} pixels on a side (memory): "
        "downscale or crop it."
    )


def _image_input(label: str) -> gr.Image:
    """An image input that passes on a file path (`load_image` converts it as the library does: EXIF rotation,
    16-bit, alpha onto white), and whose unreadable uploads (not an image, a corrupt header) give a clear `gr.Error`.
    """
    component = gr.Image(label=label, type="filepath", image_mode=None, sources=["upload", "clipboard"])
    preprocess = component.preprocess

    # Wrapped on the instance: a subclass of gr.Image would make gradio write a .pyi stub beside this module.
    def checked_preprocess(payload):
        try:
            return preprocess(payload)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
            name = html.escape(getattr(payload, "orig_name", None) or "the upload", quote=False)
            raise gr.Error(
                f"Cannot read {name} as an image ({type(error).__name__}): upload a PNG or JPEG."
            ) from error

    component.preprocess = checked_preprocess
    return component


@functools.cache  # written once per process, whatever number of demos it builds
def _example_photos(max_side: int = 512) -> tuple[str, ...]:
    """The embedded photos (see `data.embedded`) as PNG files of at most `max_side` pixels, for gr.Examples."""
    from .data.embedded import embedded_photos

    folder = tempfile.mkdtemp(prefix="diffusers-custom-vae-examples-")
    paths = []
    train, test = embedded_photos()
    for index, photo in enumerate(test + train):
        image = Image.fromarray(photo).convert("RGB")
        image.thumbnail((max_side, max_side))
        paths.append(os.path.join(folder, f"photo-{index}.png"))
        image.save(paths[-1])
    return tuple(paths)


def build_demo(
    vaes: Sequence | Mapping,
    pipeline: str | os.PathLike | DiffusionPipeline | None = None,
    max_image_side: int = 2048,
    examples: bool = True,
    device: str | torch.device | None = None,
) -> gr.Blocks:
    r"""
    Build the demo app: reconstruct, compare, interpolate in latent space and, with a pipeline, generate.

    Args:
        vaes (sequence or mapping): The VAEs: folders or Hub ids (loaded with [`load_vae`], `CustomVAE` or
            `AutoencoderKL`), or loaded models; a mapping gives them names. The first is the main one (Reconstruct,
            Latents).
        pipeline (`str`, `os.PathLike` or `DiffusionPipeline`, *optional*): A class-conditional pipeline (a
            `DiTPipeline` folder written by `examples/train_latent_diffusion.py`) for the Generate tab.
        max_image_side (`int`, *optional*, defaults to 2048): Larger images are refused with a message (memory).
        examples (`bool`, *optional*, defaults to `True`): Offer the embedded photos as clickable examples.
        device (`str` or `torch.device`, *optional*): Where the models run; CUDA when available, else the CPU.

    Returns:
        `gr.Blocks`: the app, queued; start it with `launch()`.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    named_vaes = [(name, vae.to(device).eval()) for name, vae in _vae_names(vaes)]
    for _, vae in named_vaes:
        vae.enable_tiling()  # only images larger than the VAE's tile size are tiled
    if isinstance(pipeline, (str, os.PathLike)):
        pipeline = DiffusionPipeline.from_pretrained(pipeline)
    if pipeline is not None:
        pipeline.to(device)
    main_name, main_vae = named_vaes[0]

    def checked(path: str | None, what: str = "an image") -> Image.Image:
        return _read_upload(path, max_image_side, what)

    def reconstruct(path):
        image = checked(path)
        reconstruction, latents, metrics = reconstruct_image(main_vae, image)
        return reconstruction, image, error_heat_map(reconstruction, image), latent_channel_images(latents), metrics

    def compare(path):
        image = checked(path)
        gallery, rows = [], []
        for name, vae in named_vaes:
            reconstruction, _, metrics = reconstruct_image(vae, image)
            gallery.append((reconstruction, f"{name}: {metrics['psnr']:.2f} dB, decode {metrics['decode_ms']:.0f} ms"))
            rows.append([name] + [metrics[key] for key in ("psnr", "ssim", "encode_ms", "decode_ms")])
            rows[-1].append("x".join(map(str, metrics["latent_shape"])))
        return gallery, rows

    def interpolate(first_path, second_path, steps, side):
        first, second = checked(first_path, "a first image"), checked(second_path, "a second image")
        path = interpolate_latents(main_vae, first, second, int(steps), int(side))  # (steps, 3, S, S)
        frames = tensor_to_pil(path)
        gif = os.path.join(tempfile.mkdtemp(prefix="diffusers-custom-vae-"), "interpolation.gif")
        # there and back again, so that the loop has no jump
        frames[0].save(gif, save_all=True, append_images=frames[1:] + frames[-2:0:-1], duration=120, loop=0)
        return image_grid([path]), gif

    with gr.Blocks(title="diffusers_custom_vae", analytics_enabled=False) as demo:
        names = ", ".join(f"**{name}**" for name, _ in named_vaes)
        gr.Markdown(
            f"# VAE demo\nMain VAE: **{main_name}**. Loaded: {names}. Images up to {max_image_side} px a side."
        )
        example_paths = list(_example_photos()) if examples else []
        with gr.Tab("Reconstruct"):
            gr.Markdown("Upload an image (or click an embedded photo below it), then press **Reconstruct**.")
            with gr.Row():
                image_in = _image_input("Image")
                original = gr.Image(label="Original", format="png", interactive=False)
                reconstruction = gr.Image(label=f"Reconstruction ({main_name})", format="png", interactive=False)
            button = gr.Button("Reconstruct", variant="primary")
            if example_paths:
                gr.Examples([[path] for path in example_paths], image_in, label="Embedded photos (click one)")
            with gr.Row():
                heat_map = gr.Image(
                    label=f"Error |reconstruction − original|: black 0, yellow ≥ {HEAT_MAP_FULL_SCALE:.0%}",
                    format="png",
                    interactive=False,
                )
                metrics = gr.JSON(label="Metrics (PSNR and SSIM of the reconstruction as shown)")
            channels = gr.Gallery(
                label="Latent channels (each stretched to its own range)",
                format="png",
                columns=8,
                height="auto",
                object_fit="contain",
            )
            button.click(
                reconstruct,
                image_in,
                [reconstruction, original, heat_map, channels, metrics],
                api_name="reconstruct",
                concurrency_id="models",
            )
        with gr.Tab("Compare"):
            compare_in = _image_input("Image")
            compare_button = gr.Button("Compare", variant="primary")
            if example_paths:
                gr.Examples([[path] for path in example_paths], compare_in, label="Embedded photos (click one)")
            compare_gallery = gr.Gallery(
                label="Reconstructions, in the order given",
                format="png",
                columns=4,
                object_fit="contain",
                height="auto",
            )
            compare_table = gr.Dataframe(
                headers=["vae", "psnr", "ssim", "encode_ms", "decode_ms", "latent_shape"], label="Metrics per VAE"
            )
            compare_button.click(
                compare, compare_in, [compare_gallery, compare_table], api_name="compare", concurrency_id="models"
            )
        with gr.Tab("Latents"):
            with gr.Row():
                first_in, second_in = _image_input("First image"), _image_input("Second image")
            with gr.Row():
                steps_in = gr.Slider(3, 16, value=8, step=1, label="Steps")
                side_in = gr.Slider(64, 512, value=256, step=32, label="Size (both images centre-cropped to a square)")
            interpolate_button = gr.Button("Interpolate", variant="primary")
            if example_paths:
                gr.Examples([example_paths[:2]], [first_in, second_in], label="Two embedded photos")
            strip = gr.Image(label=f"Decoded path, first to second ({main_name})", format="png", interactive=False)
            gif = gr.Image(label="As a GIF", type="filepath", format="gif", interactive=False)
            interpolate_button.click(
                interpolate,
                [first_in, second_in, steps_in, side_in],
                [strip, gif],
                api_name="interpolate",
                concurrency_id="models",
            )
        if pipeline is not None:
            _generate_tab(pipeline)
        if example_paths:
            gr.Markdown(_credits())
    return demo.queue(default_concurrency_limit=1)  # one model call at a time (memory); the others wait their turn


def _generate_tab(pipeline):
    """The Generate tab of a class-conditional pipeline (DiT): class, count, seed, guidance, steps -> images."""
    labels = sorted(getattr(pipeline, "labels", {}) or {})
    if not labels:
        raise ValueError(
            f"The Generate tab needs a class-conditional pipeline with class names (a DiTPipeline with id2label in "
            f"its model_index.json), got a {type(pipeline).__name__} without labels."
        )

    def generate(label, count, seed, guidance, steps):
        """Yields previews (the noisy latents of about every fifth of the steps, decoded), then the images."""
        count, steps = int(count), int(steps)
        generator = torch.Generator(pipeline.device).manual_seed(int(seed))
        updates, calls = queue.Queue(), itertools.count()  # (final, images or an exception), from the run's thread

        # DiTPipeline has no step callback: a pre-hook on its transformer sees each step's latents instead.
        def preview(module, args, kwargs):
            if next(calls) % max(1, steps // 5) == 0:
                latents = (args[0] if args else kwargs["hidden_states"])[:count]  # doubled under guidance: 1st half
                vae = pipeline.vae
                decoded = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
                updates.put((False, tensor_to_pil(decoded.float().cpu())))

        def run():
            try:
                class_labels = [pipeline.labels[label]] * count
                images = pipeline(
                    class_labels, guidance_scale=float(guidance), generator=generator, num_inference_steps=steps
                ).images
                updates.put((True, images))
            except Exception as error:  # raised again in the request's thread, where gradio reports it
                updates.put((True, error))

        hook = pipeline.transformer.register_forward_pre_hook(preview, with_kwargs=True)
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        try:
            final = False
            while not final:
                final, images = updates.get()
                if isinstance(images, Exception):
                    raise images
                yield images
        finally:
            thread.join()
            hook.remove()

    with gr.Tab("Generate"):
        with gr.Row():
            label_in = gr.Dropdown(labels, value=labels[0], label="Class")
            count_in = gr.Slider(1, 8, value=4, step=1, label="Images")
            seed_in = gr.Number(0, precision=0, label="Seed")
        with gr.Row():
            guidance_in = gr.Slider(1.0, 10.0, value=4.0, step=0.5, label="Guidance")
            steps_in = gr.Slider(2, 100, value=25, step=1, label="Steps")
        button = gr.Button("Generate", variant="primary")
        gallery = gr.Gallery(
            label="Generated (while it runs: the latents of every fifth of the steps, decoded)",
            format="png",
            columns=4,
            object_fit="contain",
        )
        button.click(
            generate,
            [label_in, count_in, seed_in, guidance_in, steps_in],
            gallery,
            api_name="generate",
            concurrency_id="models",
        )


def _credits() -> str:
    from .data.embedded import EMBEDDED_TEST_PHOTOS, EMBEDDED_TRAIN_PHOTOS

    credits = "; ".join(f"{name}: {credit}" for _, name, credit in EMBEDDED_TEST_PHOTOS + EMBEDDED_TRAIN_PHOTOS)
    return f"<small>Example photos from scikit-image and scikit-learn. {html.escape(credits)}</small>"
