"""The demo app (diffusers_custom_vae.app): its image functions, and the real server driven by gradio_client."""

import concurrent.futures
import io
import json
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio")
gradio_client = pytest.importorskip("gradio_client")

from conftest import TINY_CONFIG  # noqa: E402
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel  # noqa: E402

from diffusers_custom_vae import CustomVAE  # noqa: E402
from diffusers_custom_vae.app import (  # noqa: E402
    build_demo,
    error_heat_map,
    interpolate_latents,
    latent_channel_images,
    reconstruct_image,
)
from diffusers_custom_vae.images import pil_to_tensor  # noqa: E402
from diffusers_custom_vae.metrics import psnr  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
LABELS = {"0": "cat", "1": "dog"}


def photo(height: int, width: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB image (something a tiny VAE can roughly reconstruct)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return Image.fromarray(small).resize((width, height), Image.BILINEAR)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict:
    """Saved folders: a tiny CustomVAE (2x), a tiny AutoencoderKL (2x) and a tiny DiTPipeline using the CustomVAE."""
    folder = tmp_path_factory.mktemp("app-models")
    torch.manual_seed(0)
    custom = CustomVAE(**TINY_CONFIG).eval()
    custom.save_pretrained(folder / "custom-vae")
    AutoencoderKL(
        block_out_channels=(4, 8),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=2,
    ).save_pretrained(folder / "akl")
    transformer = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=1,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=1000,
    )
    pipe = DiTPipeline(transformer=transformer, vae=custom, scheduler=DDIMScheduler(clip_sample=False))
    pipe.save_pretrained(folder / "dit")
    index_path = folder / "dit" / "model_index.json"
    index_path.write_text(json.dumps({**json.loads(index_path.read_text()), "id2label": LABELS}))
    return {"custom": folder / "custom-vae", "akl": folder / "akl", "dit": folder / "dit"}


@pytest.fixture(scope="module")
def network_lookups():
    """For the module's server and clients: every name lookup of another host than the loopback one, refused."""
    lookups, lookup = [], socket.getaddrinfo

    def loopback_only(host, *args, **kwargs):
        if host not in ("127.0.0.1", "localhost", "::1"):
            lookups.append(host)
            raise OSError(f"tests reach no network: {host}")
        return lookup(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(socket, "getaddrinfo", loopback_only)
        yield lookups


@pytest.fixture(scope="module")
def server(models, tmp_path_factory, network_lookups):
    """One real server per module on 127.0.0.1 (a free port), and a gradio_client connected to it."""
    pipeline = DiTPipeline.from_pretrained(models["dit"])
    demo = build_demo([str(models["custom"]), str(models["akl"])], pipeline=pipeline, max_image_side=300)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    client = gradio_client.Client(f"http://127.0.0.1:{port}/", verbose=False)
    images = tmp_path_factory.mktemp("app-images")
    yield demo, client, images
    client.close()
    demo.close()


def save(image: Image.Image, folder: Path, name: str) -> str:
    path = folder / name
    image.save(path)
    return str(path)


# The functions behind the tabs


def test_odd_sizes_come_back_whole_and_metrics_are_of_the_image_as_shown(tiny_vae):
    image = photo(37, 50)  # neither a multiple of the 2x factor
    reconstruction, latents, metrics = reconstruct_image(tiny_vae, image)
    assert reconstruction.size == image.size
    assert metrics["padded_to"] == [38, 50] and metrics["latent_shape"] == [4, 19, 25] == list(latents.shape)
    assert metrics["psnr"] == pytest.approx(
        psnr(pil_to_tensor(reconstruction)[None], pil_to_tensor(image)[None]).item(), abs=1e-3
    )
    assert all(np.isfinite(metrics[key]) for key in ("psnr", "ssim", "encode_ms", "decode_ms"))
    assert metrics["encode_ms"] > 0 and metrics["decode_ms"] > 0


def test_a_perfect_reconstruction_has_a_black_heat_map_and_errors_light_up():
    image = photo(16, 16)
    assert np.asarray(error_heat_map(image, image)).max() <= 4  # the ramp's black
    inverted = Image.fromarray(255 - np.asarray(image))
    heat = np.asarray(error_heat_map(inverted, image)).astype(int)
    assert heat.shape == (16, 16, 3) and heat.sum(-1).mean() > 200


def test_latent_channels_are_one_enlarged_image_each():
    latents = torch.randn(4, 8, 12)
    images = latent_channel_images(latents)
    assert len(images) == 4
    image, caption = images[2]
    assert image.size[0] >= 96 and image.mode == "L" and caption.startswith("channel 2")
    assert np.asarray(image).min() == 0 and np.asarray(image).max() == 255  # each stretched to its own range


def test_interpolation_ends_are_the_two_reconstructions(tiny_vae):
    first, second = photo(40, 60, seed=1), photo(50, 30, seed=2)
    path = interpolate_latents(tiny_vae, first, second, steps=5, side=32)
    assert path.shape == (5, 3, 32, 32) and torch.isfinite(path).all()
    assert not torch.allclose(path[0], path[-1])
    assert (path[2] - (path[0] + path[-1]) / 2).abs().mean() < (path[0] - path[-1]).abs().mean()


def test_importing_the_app_writes_nothing_beside_it():
    import diffusers_custom_vae.app as app

    assert not Path(app.__file__).with_suffix(".pyi").exists()  # gradio writes stubs for component subclasses


def test_a_pipeline_without_class_names_is_refused(tiny_vae):
    class Unlabelled:
        labels = {}

        def to(self, device):
            return self

    with pytest.raises(ValueError, match="class-conditional"):
        build_demo([tiny_vae], pipeline=Unlabelled(), examples=False)


# The real server, driven by gradio_client


def test_reconstruct_returns_the_reconstruction_first_and_its_metrics(server):
    _, client, folder = server
    image = photo(45, 61)
    reconstruction, original, heat_map, channels, metrics = client.predict(
        gradio_client.handle_file(save(image, folder, "odd.png")), api_name="/reconstruct"
    )
    returned = Image.open(reconstruction).convert("RGB")
    assert returned.size == image.size and Image.open(original).size == image.size
    assert Image.open(heat_map).size == image.size
    assert len(channels) == 4  # one image per latent channel
    assert {"psnr", "ssim", "encode_ms", "decode_ms", "latent_shape"} <= metrics.keys()
    assert metrics["latent_shape"] == [4, 23, 31]
    # the PSNR is of the image the page shows: recompute it from the file the client received
    shown = psnr(pil_to_tensor(returned)[None], pil_to_tensor(image)[None]).item()
    assert metrics["psnr"] == pytest.approx(shown, abs=1e-3)


def test_compare_gives_one_reconstruction_and_one_row_per_vae_in_order(server):
    _, client, folder = server
    gallery, table = client.predict(
        gradio_client.handle_file(save(photo(32, 48), folder, "compare.png")), api_name="/compare"
    )
    assert len(gallery) == 2
    assert "custom-vae" in gallery[0]["caption"] and "akl" in gallery[1]["caption"]
    rows = table["data"]
    assert [Path(row[0]).name for row in rows] == ["custom-vae", "akl"]
    assert table["headers"][4] == "decode_ms" and all(row[4] > 0 for row in rows)
    assert all(Image.open(item["image"]).size == (48, 32) for item in gallery)


def test_generate_shows_the_steps_then_gives_the_requested_number_of_images(server):
    _, client, _ = server
    job = client.submit("dog", 3, 7, 2.0, 10, api_name="/generate")
    images = job.result(timeout=60)
    assert len(images) == 3
    arrays = [np.asarray(Image.open(item["image"])) for item in images]
    assert arrays[0].shape == (16, 16, 3) and arrays[0].std() > 0  # 8 latents, 2x VAE
    previews = job.outputs()[:-1]
    assert len(previews) == 5 and all(len(preview) == 3 for preview in previews)  # every 2nd of 10 steps
    first_preview = np.asarray(Image.open(previews[0][0]["image"]))
    assert first_preview.shape == arrays[0].shape and not np.array_equal(first_preview, arrays[0])


def test_generate_names_an_unknown_class(server):  # the dropdown's own check
    _, client, _ = server
    with pytest.raises(gradio_client.exceptions.AppError, match="horse.*'cat', 'dog'"):
        client.predict("horse", 1, 0, 2.0, 2, api_name="/generate")


@pytest.mark.parametrize(
    "upload, message",
    [
        (None, "Nothing uploaded"),
        ("not-an-image.txt", "as an image"),
        ("corrupt.png", "Cannot read image .corrupt.png.: image file is truncated"),
        ("huge.png", "up to 300 pixels"),
    ],
)
def test_bad_input_is_a_clear_error_and_the_server_keeps_serving(server, upload, message):
    _, client, folder = server
    if upload == "not-an-image.txt":
        (folder / upload).write_text("hello")
    elif upload == "corrupt.png":
        data = (folder / Path(save(photo(64, 64), folder, "whole.png")).name).read_bytes()
        (folder / upload).write_bytes(data[: len(data) // 2])  # the header is whole, the pixels are not
    elif upload == "huge.png":
        save(photo(40, 301), folder, upload)
    argument = None if upload is None else gradio_client.handle_file(str(folder / upload))
    with pytest.raises(gradio_client.exceptions.AppError, match=message):
        client.predict(argument, api_name="/reconstruct")
    metrics = client.predict(
        gradio_client.handle_file(save(photo(8, 8), folder, "next.png")), api_name="/reconstruct"
    )[-1]
    assert np.isfinite(metrics["psnr"])


def test_concurrent_requests_are_queued_and_all_answered(server):
    demo, client, folder = server
    paths = [save(photo(24, 24 + 2 * i, seed=i), folder, f"user-{i}.png") for i in range(6)]
    url = client.src
    users = [gradio_client.Client(url, verbose=False) for _ in range(3)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        jobs = [
            pool.submit(users[i % 3].predict, gradio_client.handle_file(path), api_name="/reconstruct")
            for i, path in enumerate(paths)
        ]
        results = [job.result(timeout=60) for job in jobs]
    assert [Image.open(result[0]).size for result in results] == [(24 + 2 * i, 24) for i in range(6)]


def test_the_server_and_its_clients_look_up_no_other_host(server, network_lookups):
    _, client, folder = server
    client.predict(gradio_client.handle_file(save(photo(16, 16), folder, "offline.png")), api_name="/reconstruct")
    assert network_lookups == []  # gradio's analytics and version check are off


def test_the_space_entry_point_builds_the_same_app(models, monkeypatch):
    monkeypatch.setenv("VAES", f"{models['custom']},{models['akl']}")
    monkeypatch.setenv("PIPELINE", str(models["dit"]))
    import importlib.util

    spec = importlib.util.spec_from_file_location("space_app", ROOT / "space" / "app.py")
    space = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(space)
    direct = build_demo([str(models["custom"]), str(models["akl"])], pipeline=str(models["dit"]))

    def endpoints(demo):
        return {
            name: [c["label"] for c in info["parameters"]]
            for name, info in demo.get_api_info()["named_endpoints"].items()
        }

    assert endpoints(space.demo) == endpoints(direct)
    assert {"/reconstruct", "/compare", "/interpolate", "/generate"} <= endpoints(direct).keys()


# A real browser (Debian's chromium through Playwright)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def reconstruct_in_browser(url: str, image_path: str, screenshots: Path, viewport=(1280, 900)) -> dict:
    """Opens the app, uploads `image_path`, presses Reconstruct and waits for the reconstruction and its metrics.

    Returns {"psnr": the PSNR the page shows, "reconstruction": the image the page shows (PIL), "outside": addresses
    of requests that left 127.0.0.1}; screenshots of the page go to `screenshots`."""
    from playwright.sync_api import expect, sync_playwright

    screenshots.mkdir(parents=True, exist_ok=True)
    outside = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        local = ("http://127.0.0.1", "data:", "blob:")
        page.on("request", lambda request: request.url.startswith(local) or outside.append(request.url))
        page.goto(url)
        button = page.get_by_role("button", name="Reconstruct", exact=True)
        button.wait_for(timeout=30_000)
        page.screenshot(path=screenshots / "1-opened.png", full_page=True)
        page.locator("input[type=file]").first.set_input_files(image_path)
        button.click()
        metrics = page.get_by_test_id("json")
        expect(metrics).to_contain_text('"psnr"', timeout=60_000)
        reconstruction = page.locator(".block", has_text="Reconstruction (").locator("img").first
        expect(reconstruction).to_be_visible(timeout=30_000)
        page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=reconstruction.element_handle())
        page.screenshot(path=screenshots / "2-reconstructed.png", full_page=True)
        shown_psnr = float(re.search(r'"psnr"\s*:\s*([-\d.]+)', metrics.inner_text()).group(1))
        image_bytes = page.request.get(reconstruction.get_attribute("src")).body()
        browser.close()
    return {
        "psnr": shown_psnr,
        "reconstruction": Image.open(io.BytesIO(image_bytes)).convert("RGB"),
        "outside": outside,
    }


@pytest.mark.slow
def test_a_browser_uploads_a_photo_and_sees_the_reconstruction_and_its_psnr(server, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"no {CHROMIUM}: apt-get install chromium (.ci/run does)")
    pytest.importorskip("playwright")
    demo, _, folder = server
    image = photo(120, 200, seed=3)
    screenshots = Path(os.environ.get("APP_SCREENSHOTS", tmp_path / "screenshots"))
    print(f"screenshots: {screenshots}")
    seen = reconstruct_in_browser(demo.local_url, save(image, folder, "browser.png"), screenshots)
    assert seen["reconstruction"].size == image.size
    recomputed = psnr(pil_to_tensor(seen["reconstruction"])[None], pil_to_tensor(image)[None]).item()
    assert np.isfinite(seen["psnr"]) and seen["psnr"] == pytest.approx(recomputed, abs=1e-3)
    assert seen["outside"] == []  # the page asked nothing of the internet (fonts, analytics, ...)
    assert (screenshots / "2-reconstructed.png").stat().st_size > 10_000


def test_interpolate_decodes_the_path_as_a_strip_and_a_gif(server):
    _, client, folder = server
    first, second = save(photo(40, 60, seed=4), folder, "a.png"), save(photo(64, 48, seed=5), folder, "b.png")
    strip, gif = client.predict(
        gradio_client.handle_file(first), gradio_client.handle_file(second), 5, 64, api_name="/interpolate"
    )
    with Image.open(gif) as animation:
        assert animation.format == "GIF" and animation.n_frames == 8  # 5 steps there, 3 back
    assert Image.open(strip).width > 5 * Image.open(strip).height - 20  # five frames in a row


def test_large_images_are_tiled_and_come_back_whole(tiny_vae):
    tiny_vae.enable_tiling(tile_sample_min_size=32, tile_overlap=8)
    image = photo(50, 90)
    reconstruction, latents, metrics = reconstruct_image(tiny_vae, image)
    assert reconstruction.size == image.size and list(latents.shape) == [4, 25, 45]
    assert np.isfinite(metrics["psnr"]) and torch.isfinite(latents).all()


def test_the_example_photos_are_the_embedded_ones_downscaled():
    from diffusers_custom_vae.app import _example_photos
    from diffusers_custom_vae.data.embedded import EMBEDDED_TEST_PHOTOS, EMBEDDED_TRAIN_PHOTOS

    paths = _example_photos(max_side=128)
    assert len(paths) == len(EMBEDDED_TEST_PHOTOS) + len(EMBEDDED_TRAIN_PHOTOS)
    assert all(max(Image.open(path).size) == 128 for path in paths)


def test_the_command_line_serves_on_the_loopback_address_by_default(models, run_example, monkeypatch):
    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs, demo=self))
    run_example("app", ["--vae", str(models["custom"]), "--vae", str(models["akl"]), "--port", "7861"])
    assert {k: launched[k] for k in ("server_name", "server_port", "share")} == {
        "server_name": "127.0.0.1",
        "server_port": 7861,
        "share": False,
    }
    assert "/compare" in launched["demo"].get_api_info()["named_endpoints"]


def test_the_command_line_names_a_missing_vae_in_one_line(run_example, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        run_example("app", ["--vae", str(tmp_path / "no-such-vae")])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "no-such-vae" in error and "Traceback" not in error and len(error.strip().splitlines()) == 1
