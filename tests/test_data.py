import io
import json
import math
import os
import random
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from image_files import bomb_png, write_bomb_png
from PIL import Image

from diffusers_custom_vae.data import (
    EMBEDDED_TEST_PHOTOS,
    EMBEDDED_TRAIN_PHOTOS,
    MAX_HELD_OUT_IMAGES,
    ImageDataset,
    ImageOptions,
    ResizeCrop,
    StreamingImageDataset,
    WholeImage,
    embedded_photos,
    hold_out,
    load_data,
    parse_resolution,
    photo_splits,
)

RNG = np.random.default_rng(0)


def noise(height: int, width: int, channels: int = 3) -> np.ndarray:
    return RNG.integers(0, 256, (height, width, channels) if channels > 1 else (height, width), dtype=np.uint8)


def in_range(images: torch.Tensor) -> bool:
    """Pixels in [-1, 1], which NaN is not: the check that shape-only assertions would miss."""
    return bool(((images >= -1) & (images <= 1)).all())


def jpeg_bytes(height: int = 40, width: int = 56) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(noise(height, width)).save(buffer, format="JPEG")
    return buffer.getvalue()


GOOD_FILES = [
    "cats/a.jpg",
    "cats/b.JPG",
    "dogs/puppies/c.png",
    "dogs/d.webp",
    "e.bmp",
    "grey.png",
    "palette.png",
    "transparent.png",
]
BAD_FILES = ["broken.jpg", "cats/truncated.jpeg", "dogs/bomb.png"]


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Nested class folders: good files in 4 formats and 4 modes, 3 bad files, and files that must be ignored."""
    root = tmp_path / "images"
    for name in ("cats/a.jpg", "cats/b.JPG", "dogs/puppies/c.png", "dogs/d.webp", "e.bmp"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        file_format = Image.registered_extensions()[Path(name).suffix.lower()]
        Image.fromarray(noise(40, 56)).save(root / name, format=file_format)
    Image.fromarray(noise(24, 64, channels=1)).save(root / "grey.png")
    Image.fromarray(noise(32, 32)).convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.png")
    Image.new("RGBA", (48, 36), (255, 0, 0, 0)).save(root / "transparent.png")  # fully transparent red
    (root / "broken.jpg").write_bytes(b"not an image at all" * 10)
    (root / "cats/truncated.jpeg").write_bytes(jpeg_bytes()[:400])
    write_bomb_png(root / "dogs/bomb.png")  # a decompression bomb
    (root / "notes.txt").write_text("not an image")
    (root / ".hidden").mkdir()
    (root / ".hidden/x.png").write_bytes(b"junk")
    (root / "._a.jpg").write_bytes(b"macOS resource fork")
    return root


def relative(paths, root: Path) -> set[str]:
    return {Path(path).relative_to(root).as_posix() for path in paths}


def test_folder_loads_every_good_image_and_skips_bad_ones(image_folder):
    splits = load_data(train_data_dir=image_folder, resolution=16)

    assert relative(splits.train.images + splits.test.images, image_folder) == set(GOOD_FILES)
    assert len(splits.test) >= 1 and not set(splits.train.images) & set(splits.test.images)
    assert relative([path for path, _ in splits.skipped], image_folder) == set(BAD_FILES)
    assert all(reason for _, reason in splits.skipped)
    for i in range(len(splits.train)):
        image = splits.train[i]
        assert image.shape == (3, 16, 16) and image.dtype == torch.float32
        assert -1 <= image.min() and image.max() <= 1
    for i in range(len(splits.test)):
        height, width = splits.test[i].shape[1:]
        assert height % 8 == 0 and width % 8 == 0 and 0 < height <= 40 and 0 < width <= 64
    assert splits.validation.shape == (min(4, len(splits.test)), 3, 16, 16) and in_range(splits.validation)
    assert "3 unreadable files skipped" in splits.description
    assert len(list(splits.test)) == len(splits.test)  # iteration ends


def test_greyscale_palette_and_alpha_become_rgb(image_folder):
    dataset = ImageDataset([image_folder / name for name in GOOD_FILES], ResizeCrop((16, 16), center_crop=True))
    images = [dataset[i] for i in range(len(dataset))]
    assert all(image.shape == (3, 16, 16) and in_range(image) for image in images)
    grey = images[GOOD_FILES.index("grey.png")]
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert torch.all(images[GOOD_FILES.index("transparent.png")] == 1)  # composited onto white


def test_dataloader_workers_skip_a_file_broken_after_the_check(image_folder):
    splits = load_data(train_data_dir=image_folder, resolution=(16, 24))
    broken_later = splits.train.images[1]
    broken_later.write_bytes(jpeg_bytes()[:300])

    loader = torch.utils.data.DataLoader(splits.train, batch_size=2, num_workers=2)
    batches = list(loader)

    assert sum(len(batch) for batch in batches) == len(splits.train)  # another image took its place
    assert all(batch.shape[1:] == (3, 16, 24) and in_range(batch) for batch in batches)
    skipped = [path for path, _ in splits.skipped]
    assert len(skipped) == 4 and str(broken_later) in skipped  # marked in a worker, seen here


@pytest.mark.parametrize("make", ["missing", "empty", "no_images", "only_unreadable"])
def test_folder_without_readable_images_is_a_clear_error(tmp_path, make):
    folder = tmp_path / "data"
    if make != "missing":
        folder.mkdir()
    if make == "no_images":
        (folder / "notes.txt").write_text("text")
    if make == "only_unreadable":
        (folder / "broken.png").write_bytes(b"junk")
    expected = {"missing": "does not exist", "only_unreadable": "none of its 1 images"}.get(make, r"\.jpg")
    with pytest.raises(ValueError, match=expected) as error:
        load_data(train_data_dir=folder, resolution=16)
    assert str(folder) in str(error.value)


def test_held_out_files_depend_on_their_own_path_only():
    names = [f"class{i % 3}/image{i}.jpg" for i in range(1000)]
    held_out = hold_out(names)
    assert 0.03 < len(held_out) / len(names) < 0.07
    assert hold_out(random.Random(0).sample(names, len(names))) == held_out  # order does not matter

    more = names + [f"class{i % 3}/new{i}.jpg" for i in range(1000)]
    assert set(hold_out(more)) & set(names) == set(held_out)  # adding files moves none between the splits

    assert len(hold_out([f"{i}.jpg" for i in range(10_000)])) == MAX_HELD_OUT_IMAGES
    assert len(hold_out(["a.jpg", "b.jpg"])) == 1 and hold_out(["a.jpg"]) == []


def test_one_image_folder_is_train_and_held_out(tmp_path):
    (tmp_path / "only.png").write_bytes(b"")
    Image.fromarray(noise(20, 20)).save(tmp_path / "only.png")
    splits = load_data(train_data_dir=tmp_path, resolution=8)
    assert len(splits.train) == len(splits.test) == len(splits.validation) == 1


def rgb_image(height: int, width: int, mode: str = "RGB") -> Image.Image:
    return Image.fromarray(noise(height, width)).convert(mode)


def save_dataset(path: Path, images: list[Image.Image], test_images: list[Image.Image] | None = None) -> str:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})

    def make(images):
        return datasets.Dataset.from_dict({"image": images, "label": list(range(len(images)))}, features=features)

    dataset = make(images) if test_images is None else datasets.DatasetDict(train=make(images), test=make(test_images))
    dataset.save_to_disk(path)
    return str(path)


def test_local_hf_dataset_map_style(tmp_path):
    images = [rgb_image(30, 40), rgb_image(50, 20, "L"), rgb_image(32, 32, "RGBA"), rgb_image(24, 60, "P")] * 6
    path = save_dataset(tmp_path / "ds", images)
    splits = load_data(dataset_name=path, resolution=(16, 24), random_flip=True, num_validation_images=8)

    assert isinstance(splits.train, ImageDataset) and len(splits.train) + len(splits.test) == len(images)
    assert len(splits.test) == 1 and splits.validation.shape == (1, 3, 16, 24)  # 5% of 24, at least 1
    assert in_range(splits.validation)
    for i in range(len(splits.train)):
        image = splits.train[i]
        assert image.shape == (3, 16, 24) and -1 <= image.min() and image.max() <= 1
    assert splits.test[0].shape[1] % 8 == 0 and splits.test[0].shape[2] % 8 == 0
    assert splits.dataset_ids == [] and splits.skipped == []

    with_test = save_dataset(tmp_path / "dd", images[:6], test_images=images[:3])
    splits = load_data(dataset_name=with_test, resolution=16)
    assert len(splits.train) == 6 and len(splits.test) == 3 and "'test' split" in splits.test_description


def test_missing_column_lists_the_columns(tmp_path):
    path = save_dataset(tmp_path / "ds", [rgb_image(16, 16)] * 3)
    with pytest.raises(ValueError, match="column 'pixels'.*image, label"):
        load_data(dataset_name=path, image_column="pixels", resolution=16)


def solid_images(count: int) -> list[Image.Image]:
    """Image i is the colour (i, 100, 200), so every sample says which row it came from."""
    return [Image.new("RGB", (20 + i % 3 * 8, 24), (i, 100, 200)) for i in range(count)]


def row_ids(images: torch.Tensor) -> list[int]:
    return ((images[..., 0, 0, 0] + 1) * 127.5).round().int().flatten().tolist()


def test_local_hf_dataset_streaming_holds_out_rows_by_content(tmp_path):
    path = save_dataset(tmp_path / "ds", solid_images(60))
    splits = load_data(dataset_name=path, resolution=16, center_crop=True, streaming=True, seed=3)
    assert isinstance(splits.train, StreamingImageDataset)
    held_out = [row_ids(splits.test[i]) for i in range(len(splits.test))]

    def epoch(number: int, num_workers: int = 0) -> list[int]:
        splits.train.set_epoch(number)
        loader = torch.utils.data.DataLoader(splits.train, batch_size=4, num_workers=num_workers)
        return [i for batch in loader for i in row_ids(batch)]

    first = epoch(0)
    assert sorted(first + sum(held_out, [])) == list(range(60))  # every row once, in train or held out
    assert sorted(epoch(0, num_workers=2)) == sorted(first)  # workers sharding the stream change nothing
    assert epoch(0) == first and epoch(1) != first  # the shuffle follows the epoch


def test_local_hf_dataset_streaming_uses_its_test_split(tmp_path):
    path = save_dataset(tmp_path / "ds", [rgb_image(30, 40)] * 4, test_images=[rgb_image(20, 20)] * 2)
    splits = load_data(dataset_name=path, resolution=16, streaming=True)
    assert len(splits.test) == 2 and splits.validation.shape == (2, 3, 16, 16)
    batches = list(torch.utils.data.DataLoader(splits.train, batch_size=3))
    assert [tuple(batch.shape) for batch in batches] == [(3, 3, 16, 16), (1, 3, 16, 16)]
    assert all(in_range(batch) for batch in batches)


def test_decompression_bomb_rows_are_skipped_and_reported_as_unreadable_files_are(
    tmp_path, run_example, capsys, tiny_config
):
    """A bomb in a --dataset_name dataset stopped training with a traceback; image folders already skipped them."""
    bomb = {"bytes": bomb_png(), "path": None}
    path = save_dataset(tmp_path / "ds", [*[rgb_image(24, 32)] * 3, bomb], test_images=[bomb, rgb_image(24, 32)])
    streamed = load_data(dataset_name=path, resolution=16, streaming=True)
    assert len(list(streamed.train)) == 3 and len(streamed.skipped) == 1

    model_config = tmp_path / "tiny.json"
    model_config.write_text(json.dumps(tiny_config))
    flags = f"--resolution 16 --train_batch_size 4 --max_train_steps 1 --report_to none --model_config {model_config}"
    out = tmp_path / "out"
    metrics = run_example("train_vae", [*flags.split(), "--dataset_name", path, "--output_dir", str(out)])
    assert math.isfinite(metrics["psnr"]) and (out / "config.json").is_file()
    assert "Skipped 2 unreadable image file(s)" in capsys.readouterr().out  # one training row, one test row


def paint(photo_shape: tuple[int, int], validation_red: bool) -> np.ndarray:
    """Red 255 on the last quarter of the longer side (the documented validation strip), 0 elsewhere; noisy green."""
    height, width = photo_shape
    photo = np.zeros((height, width, 3), np.uint8)
    photo[..., 1] = noise(height, width, channels=1)
    if width >= height:
        photo[:, width - width // 4 :, 0] = 255 * validation_red
    else:
        photo[height - height // 4 :, :, 0] = 255 * validation_red
    return photo


def test_photo_splits_keep_validation_and_test_pixels_out_of_training():
    train_photos = [paint(shape, True) for shape in [(60, 100), (90, 50), (40, 40), (20, 36), (12, 20)]]
    test_photos = [np.full((30, 45, 3), (0, 0, 255), np.uint8), np.full((17, 64, 3), (0, 0, 255), np.uint8)]
    options = ImageOptions((16, 24), random_flip=True, seed=1, num_validation_images=6)
    train, validation, test = photo_splits(train_photos, test_photos, options)

    for epoch in (0, 1):
        train.set_epoch(epoch)
        crops = torch.stack([train[i] for i in range(len(train))])
        assert crops.shape == (len(train), 3, 16, 24)
        assert torch.all(crops[:, 0] == -1)  # no validation (red) pixel in any training crop
        assert torch.all(crops[:, 2] == -1)  # no test (blue) pixel either
    assert validation.shape == (6, 3, 16, 24) and torch.all(validation[:, 0] == 1)  # only validation pixels
    assert [tuple(test[i].shape) for i in range(len(test))] == [(3, 24, 40), (3, 16, 64)]  # whole, multiples of 8
    assert all(torch.all(test[i][2] == 1) for i in range(len(test)))


@pytest.mark.parametrize("size, shape", [((2000, 1000), (3, 512, 1024)), ((30, 21), (3, 16, 24)), ((5, 3), (3, 8, 8))])
def test_whole_test_images_are_bounded_and_multiples_of_8(size, shape):
    image = WholeImage()(Image.new("RGB", size))
    assert image.shape == shape and in_range(image)


def test_embedded_default_data():
    splits = load_data(resolution=(16, 24), random_flip=True)
    assert len(splits.train) > 0 and splits.train[0].shape == (3, 16, 24) and in_range(splits.train[0])
    assert splits.validation.shape == (4, 3, 16, 24) and in_range(splits.validation)
    # The test split is the whole held-out photos, cropped to multiples of 8, and none of them is trained on.
    _, test_photos = embedded_photos()
    assert [tuple(splits.test[i].shape[1:]) for i in range(len(splits.test))] == [
        (photo.shape[0] // 8 * 8, photo.shape[1] // 8 * 8) for photo in test_photos
    ]
    assert not {name for _, name, _ in EMBEDDED_TEST_PHOTOS} & {name for _, name, _ in EMBEDDED_TRAIN_PHOTOS}
    assert not any(np.shares_memory(region, photo) for region in splits.train.images for photo in splits.test.images)
    assert "CC BY 2.0" in splits.credits and "china.jpg" in splits.credits and splits.dataset_ids == []


def test_augmentation_comes_from_seed_epoch_and_index_only(image_folder):
    def sample(epoch: int = 0, seed: int = 0, index: int = 5) -> torch.Tensor:
        dataset = load_data(resolution=16, random_flip=True, seed=seed).train
        dataset.set_epoch(epoch)
        return dataset[index]

    reference = sample()
    torch.manual_seed(123), np.random.seed(123), random.seed(123)  # the global RNGs play no part
    assert torch.equal(sample(), reference)
    assert not torch.equal(sample(epoch=1), reference)
    assert not torch.equal(sample(seed=1), reference)

    folder = load_data(train_data_dir=image_folder, resolution=16, random_flip=True).train
    folder.set_epoch(3)
    expected = torch.stack([folder[i] for i in range(len(folder))])
    loaded = torch.cat(list(torch.utils.data.DataLoader(folder, batch_size=2, num_workers=2)))
    assert torch.equal(loaded, expected)  # workers see the epoch and draw the same crops


@pytest.mark.parametrize("resolution", [250, (256, 250), (12,)])
def test_resolution_must_be_multiples_of_8(resolution):
    with pytest.raises(ValueError, match="resolution.*multiples of 8"):
        load_data(resolution=resolution)


@pytest.mark.parametrize("resolution", [0, -8, (), (8, 8, 8), "256", 25.6, True])
def test_resolution_must_be_one_or_two_positive_integers(resolution):
    with pytest.raises(ValueError, match="resolution.*positive integers"):
        load_data(resolution=resolution)


def test_the_models_downsampling_factor_sets_the_multiples(image_folder):
    """A 16x model needs training sizes and test images in multiples of 16; a 2x model takes any even size."""
    with pytest.raises(ValueError, match="multiples of 16.*24"):
        load_data(train_data_dir=image_folder, resolution=24, downsample_factor=16)
    splits = load_data(train_data_dir=image_folder, resolution=32, downsample_factor=16)
    assert all(size % 16 == 0 for i in range(len(splits.test)) for size in splits.test[i].shape[1:])
    assert load_data(train_data_dir=image_folder, resolution=(18, 22), downsample_factor=2).train[0].shape == (
        3,
        18,
        22,
    )


@pytest.mark.parametrize("resolution, size", [(16, (16, 16)), ([16], (16, 16)), ((16, 24), (16, 24))])
def test_resolution_forms(resolution, size):
    assert parse_resolution(resolution) == size


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(train_data_dir="a", dataset_name="b"), "not both"),
        (dict(streaming=True), "streaming.*dataset"),
        (dict(center_crop=True), "embedded photos.*random crops"),
    ],
)
def test_options_that_do_not_apply_are_errors(options, message):
    with pytest.raises(ValueError, match=message):
        load_data(resolution=16, **options)


def test_symlink_loops_end_and_each_real_image_counts_once(tmp_path):
    """One loop used to turn 3 images into 123 paths, in both splits; two loops never finished walking."""
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir()
    for index in range(3):
        Image.fromarray(noise(20, 20)).save(root / "a" / f"{index}.png")
    os.symlink(root, root / "a" / "loop")  # back to the top
    os.symlink(root / "a", root / "b" / "to_a")
    os.symlink(root / "b", root / "a" / "to_b")  # a second loop, through b
    os.symlink(root / "a" / "0.png", root / "b" / "same_as_0.png")  # one file, two paths
    splits = load_data(train_data_dir=root, resolution=16)
    names = relative(splits.train.images + splits.test.images, root)
    assert names == {"a/0.png", "a/1.png", "a/2.png"}
    assert not set(splits.train.images) & set(splits.test.images)


def test_an_extreme_aspect_ratio_costs_no_more_memory_than_the_output(monkeypatch):
    """A 140-byte 20000x1 PNG took 5.7 GB: the whole image was upscaled before cropping, and the test images' size
    cap could be overridden by the aspect ratio. Every resize now makes at most what the transform returns."""
    largest = []
    resize = Image.Image.resize

    def recording_resize(self, size, *args, **kwargs):
        largest.append(size[0] * size[1])
        return resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", recording_resize)
    line, column = Image.new("RGB", (20000, 1), "red"), Image.new("RGB", (1, 20000), "red")
    for image in (line, column):
        for transform in (ResizeCrop((64, 64)), ResizeCrop((64, 64), center_crop=True)):
            crop = transform(image, np.random.default_rng(0))
            assert crop.shape == (3, 64, 64) and in_range(crop)
        assert max(WholeImage()(image).shape[1:]) <= 1024
    assert WholeImage()(line).shape == (3, 8, 1024) and WholeImage()(column).shape == (3, 1024, 8)
    assert max(largest) <= 1024 * 8
