"""diffusers_custom_vae.images: `load_image` on real files of every bit depth PIL can open (16-bit and float images
are scaled to 8 bits, not clipped; alpha and transparent colours are composited onto white), `pil_to_tensor` on the
same images in memory, `tensor_to_pil` and `crop_to_multiple` refusing what they cannot convert, and the grid of
originals above reconstructions."""

import io
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from image_files import bomb_png, png_chunk, write_bomb_png
from PIL import Image

from diffusers_custom_vae.images import crop_to_multiple, image_grid, load_image, pil_to_tensor, tensor_to_pil

# 16-bit levels and the 8-bit levels they scale to (round(v * 255 / 65535)); 65535 and 256 alike clipped to 255.
LEVELS_16 = np.array([[0, 256, 1000, 16448, 32896, 65535]], dtype=np.uint16)
LEVELS_8 = [0, 1, 4, 64, 128, 255]


def write_png(path, samples: np.ndarray, colour_type: int):
    """A 16-bit PNG of (H, W, C) samples, written by hand: PIL writes 16-bit greyscale but not 16-bit colour.
    Colour types: 0 grey, 2 RGB, 4 grey + alpha, 6 RGBA."""
    height, width = samples.shape[:2]
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in samples)  # filter 0 before each row
    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    png = png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(rows)) + png_chunk(b"IEND", b"")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + png)


def pixels(path) -> np.ndarray:
    image = load_image(path)
    assert image.mode == "RGB"
    return np.asarray(image)


@pytest.mark.parametrize(
    "write, mode",
    [
        (lambda path: Image.fromarray(LEVELS_16).save(path.with_suffix(".png")), "I;16"),
        (lambda path: Image.fromarray(LEVELS_16.astype(">u2")).save(path.with_suffix(".tiff")), "I;16B"),
        (lambda path: Image.fromarray(LEVELS_16.astype(np.int32)).save(path.with_suffix(".tiff")), "I"),
    ],
    ids=["16-bit PNG", "16-bit big-endian TIFF", "32-bit integer TIFF"],
)
def test_16_bit_greyscale_is_scaled_not_clipped_to_white(tmp_path, write, mode):
    write(tmp_path / "grey")
    (path,) = tmp_path.iterdir()
    with Image.open(path) as opened:
        assert opened.mode == mode  # the mode this test means to cover
    grey = pixels(path)
    assert grey[0, :, 0].tolist() == LEVELS_8
    assert (grey == grey[..., :1]).all()  # grey stays grey


def test_16_bit_greyscale_with_a_transparent_level_composites_it_onto_white(tmp_path):
    Image.fromarray(LEVELS_16).save(tmp_path / "grey.png", transparency=1000)
    assert pixels(tmp_path / "grey.png")[0, :, 0].tolist() == [0, 1, 255, 64, 128, 255]


OPAQUE = np.full_like(LEVELS_16, 65535)


@pytest.mark.parametrize(
    "colour_type, channels",
    [(2, [LEVELS_16, LEVELS_16 // 2, 65535 - LEVELS_16]), (4, [LEVELS_16, OPAQUE]), (6, [LEVELS_16] * 3 + [OPAQUE])],
    ids=["RGB", "grey + alpha", "RGBA"],
)
def test_16_bit_colour_and_alpha_are_scaled(tmp_path, colour_type, channels):
    """PIL opens these as 8-bit RGB, LA or RGBA itself (it keeps the high byte); this guards that it still does."""
    write_png(tmp_path / "image.png", np.stack(channels, axis=-1), colour_type)
    image = pixels(tmp_path / "image.png").astype(int)
    assert np.abs(image[0, :, 0] - LEVELS_8).max() <= 1
    if colour_type == 2:
        assert np.abs(image[0, :, 2] - (255 - np.array(LEVELS_8))).max() <= 1


def test_16_bit_alpha_composites_onto_white(tmp_path):
    grey, alpha = np.zeros_like(LEVELS_16), LEVELS_16  # black, from transparent to opaque
    write_png(tmp_path / "image.png", np.stack([grey, alpha], axis=-1), 4)
    assert np.abs(pixels(tmp_path / "image.png")[0, :, 0].astype(int) - (255 - np.array(LEVELS_8))).max() <= 1


def test_float_images_in_0_1_are_scaled(tmp_path):
    values = np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)
    Image.fromarray(values).save(tmp_path / "float.tiff")
    assert pixels(tmp_path / "float.tiff")[0, :, 0].tolist() == [0, 64, 128, 255]


@pytest.mark.parametrize(
    "values, message",
    [
        (np.array([[0.0, 2.5]], dtype=np.float32), r"mode F .*\[0, 2.5\].*\[0, 1\]"),
        (np.array([[0.0, np.nan]], dtype=np.float32), r"mode F .*NaN or infinite"),
        (np.array([[-1, 70000]], dtype=np.int32), r"mode I .*\[-1, 70000\].*\[0, 65535\]"),
    ],
    ids=["float beyond 1", "float NaN", "integers beyond 16 bits"],
)
def test_values_of_an_unknown_scale_are_refused_naming_the_file_and_range(tmp_path, values, message):
    Image.fromarray(values).save(tmp_path / "odd.tiff")
    with pytest.raises(ValueError, match=rf"'.*odd\.tiff'.*{message}"):
        load_image(tmp_path / "odd.tiff")


def test_a_decompression_bomb_is_refused_naming_the_file(tmp_path):
    """PIL raises `DecompressionBombError`, which is not an OSError: it escaped as a traceback."""
    with pytest.raises(ValueError, match=r"'.*bomb\.png'.*decompression bomb"):
        load_image(write_bomb_png(tmp_path / "bomb.png"))
    with pytest.raises(ValueError, match=r"'image data'.*decompression bomb"):
        load_image(io.BytesIO(bomb_png()))  # a dataset row's bytes


@pytest.mark.parametrize(
    "image, expected",
    [
        (Image.fromarray(np.array([[0, 128, 255]], dtype=np.uint8)), [0, 128, 255]),
        (Image.fromarray(np.array([[[0, 9, 9], [128, 9, 9], [255, 9, 9]]], dtype=np.uint8)), [0, 128, 255]),
        (Image.fromarray(np.array([[0, 128, 255]], dtype=np.uint8)).convert("P"), [0, 128, 255]),
    ],
    ids=["L", "RGB", "P"],
)
def test_8_bit_images_are_read_as_they_are(tmp_path, image, expected):
    image.save(tmp_path / "image.png")
    assert pixels(tmp_path / "image.png")[0, :, 0].tolist() == expected


@pytest.mark.parametrize("mode, transparent", [("L", 0), ("RGB", (0, 0, 0))])
def test_a_transparent_colour_composites_onto_white_as_alpha_does(tmp_path, mode, transparent):
    """PNG's tRNS colour in greyscale and RGB images, as palette images already had it: black became visible."""
    Image.fromarray(np.array([[0, 128]], dtype=np.uint8)).convert(mode).save(
        tmp_path / "t.png", transparency=transparent
    )
    assert pixels(tmp_path / "t.png")[0, :, 0].tolist() == [255, 128]


# ---------------------------------------------------------------------------------------------------- PIL <-> tensor


@pytest.mark.parametrize(
    "image, levels",
    [
        (Image.fromarray(LEVELS_16), LEVELS_8),  # mode I;16: convert("RGB") clipped every level above 255 to white
        (Image.fromarray(np.array([[0.0, 0.25, 0.5, 1.0]], dtype=np.float32)), [0, 64, 128, 255]),  # mode F
        (Image.fromarray(np.array([[[0, 0, 0, 0], [0, 0, 0, 255], [90, 90, 90, 255]]], dtype=np.uint8)), [255, 0, 90]),
    ],
    ids=["16-bit", "float", "RGBA: transparent black"],
)
def test_pil_to_tensor_converts_as_load_image_does(tmp_path, image, levels):
    """16-bit and float images scaled to 8 bits, not clipped; alpha composited onto white, not dropped to black."""
    tensor = pil_to_tensor(image)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, 1, len(levels))
    expected = torch.tensor(levels, dtype=torch.float32) / 127.5 - 1
    assert torch.equal(tensor, expected.expand(3, 1, -1))
    image.save(tmp_path / "image.tiff")
    assert torch.equal(tensor, pil_to_tensor(load_image(tmp_path / "image.tiff")))


def test_pil_to_tensor_refuses_what_it_cannot_convert():
    with pytest.raises(TypeError, match=r"PIL image.*numpy.ndarray"):
        pil_to_tensor(np.zeros((4, 4, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"mode F.*\[0, 2.5\]"):
        pil_to_tensor(Image.fromarray(np.array([[0.0, 2.5]], dtype=np.float32)))


def test_tensor_to_pil_round_trips_pil_to_tensor():
    pixels = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3) * 8
    assert np.array_equal(np.asarray(tensor_to_pil(pil_to_tensor(Image.fromarray(pixels)))), pixels)


@pytest.mark.parametrize(
    "images, error, message",
    [
        (
            torch.full((3, 2, 2), 255, dtype=torch.uint8),
            TypeError,
            r"floating-point.*torch.uint8",
        ),
        (torch.tensor([[[0.0, float("nan")]]]).expand(3, 1, 2), ValueError, r"3 NaN or infinite"),
        (torch.tensor([[[[0.0, float("inf")]]]]).expand(2, 3, 1, 2), ValueError, r"6 NaN or infinite"),
        (torch.zeros(1, 4, 4), ValueError, r"\(3, H, W\).*\(1, 4, 4\)"),
        (np.zeros((3, 4, 4), dtype=np.float32), TypeError, r"numpy.ndarray"),
    ],
    ids=["uint8 (would be white)", "NaN (would be black)", "inf", "one channel", "numpy"],
)
def test_tensor_to_pil_refuses_what_would_become_garbage(images, error, message):
    with pytest.raises(error, match=message):
        tensor_to_pil(images)


@pytest.mark.parametrize("multiple", [0, -8, 2.0, True], ids=["0", "negative", "float", "bool"])
def test_crop_to_multiple_refuses_a_multiple_that_is_not_a_positive_int(multiple):
    with pytest.raises(ValueError, match=rf"positive int.*{re.escape(repr(multiple))}"):
        crop_to_multiple(torch.zeros(3, 16, 16), multiple)


def test_crop_to_multiple_crops_the_centre_and_refuses_images_smaller_than_the_multiple():
    images = torch.arange(2 * 11 * 13, dtype=torch.float32).reshape(2, 1, 11, 13)
    assert torch.equal(crop_to_multiple(images, 4), images[..., 1:9, 0:12])
    with pytest.raises(ValueError, match=r"11x13.*multiple 16"):
        crop_to_multiple(images, 16)


@pytest.mark.parametrize("padding", [0, 3])
def test_image_grid_puts_each_batch_in_a_row_on_white_padding(padding):
    torch.manual_seed(0)
    rows = [torch.rand(3, 3, 5, 7) * 2 - 1, torch.rand(3, 3, 5, 7) * 2 - 1]  # 2 rows of 3 images, 5x7 px
    grid = np.asarray(image_grid(rows, padding=padding))

    assert grid.shape == (2 * (5 + padding) + padding, 3 * (7 + padding) + padding, 3)
    unpainted = np.ones(grid.shape[:2], dtype=bool)
    for r, row in enumerate(rows):
        for c, image in enumerate(tensor_to_pil(row)):
            top, left = padding + r * (5 + padding), padding + c * (7 + padding)
            np.testing.assert_array_equal(grid[top : top + 5, left : left + 7], np.asarray(image))
            unpainted[top : top + 5, left : left + 7] = False
    assert (grid[unpainted] == 255).all() and unpainted.sum() == grid.shape[0] * grid.shape[1] - 6 * 5 * 7


def test_image_grid_refuses_batches_of_different_shapes():
    with pytest.raises(ValueError, match=r"\(2, 3, 8, 8\), \(3, 3, 8, 8\)"):
        image_grid([torch.zeros(2, 3, 8, 8), torch.zeros(3, 3, 8, 8)])
    with pytest.raises(TypeError, match=r"\(B, 3, H, W\).*PIL.Image.Image"):
        image_grid([Image.new("RGB", (8, 8))])
