"""Training data for the VAE: a folder of images, a Hugging Face dataset, or photos that ship inside wheels.

One entry point, `load_data(...) -> DataSplits`:

- `train`: a map-style `ImageDataset` (or, when streaming, a `StreamingImageDataset`) of (3, H, W) float tensors in
  [-1, 1] at the training resolution. Shuffle it with the DataLoader's sampler and call its `set_epoch(epoch)`
  before each epoch's iterator is made (call it yourself: accelerate's `DataLoaderShard.set_epoch` does not forward
  it when a distributed seedable sampler takes the call): every random crop and flip is drawn from a generator
  seeded by (seed, epoch, index), never from the global RNG, so a resumed run sees exactly the same samples.
- `validation`: a fixed (N, 3, H, W) batch at the training resolution, from pixels no training sample contains.
- `test`: a map-style `ImageDataset` of whole held-out images (3, h, w), sizes varying: images longer than 1024 px
  are downscaled to 1024 (Lanczos, aspect kept), then every image is centre-cropped to multiples of 8
  (`images.crop_to_multiple`), so VAEs that downsample up to 8x take them as they are. Evaluate one at a time.
- `description`, `test_description`, `dataset_ids`, `credits`: for the model card and metrics.json;
  `skipped`: (name, reason) for every image that could not be read, including those that DataLoader workers found
  (they mark a shared-memory tensor).

The three sources:

- A folder (`train_data_dir`): searched recursively for `IMAGE_EXTENSIONS`, hidden files ignored. Every file is
  decoded once up front (JPEG at 1/8 scale, which still reads the whole stream, on threads), so unreadable and
  truncated files are skipped, warned about and counted before training starts. The held-out files are chosen by
  a hash of their relative paths (`hold_out`: about 5%, at most 200, at least 1), so adding files moves none.
- A Hugging Face dataset (`dataset_name`: a Hub name, a local folder that `datasets.load_dataset` reads, or a folder
  written by `save_to_disk`): its "test" (else "validation") split is held out (its first 200 rows), else
  `held_out_count(n)` rows of its training split drawn with the seed; when streaming, the first 200 rows whose
  image bytes hash into the lowest 5% (a choice that DataLoader workers sharding the stream cannot change).
- Neither: photos from the scikit-image and scikit-learn wheels (`EMBEDDED_PHOTOS_CREDITS`), no network. Training
  samples are random multi-scale crops of the first three quarters of each training photo along its longer side;
  the validation batch is cut from the last quarter; the test split is two whole photos never used for training.
"""

import functools
import hashlib
import io
import logging
import math
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from .images import crop_to_multiple, load_image, pil_to_tensor

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
# Held-out images: 5% of the data, at least 1 (from 2 images on), at most 200 (evaluation stays affordable).
HELD_OUT_FRACTION = 0.05
MAX_HELD_OUT_IMAGES = 200
# Test images longer than this are downscaled, so evaluation memory stays bounded.
MAX_TEST_SIDE = 1024
# The embedded photos give this many random crops per photo per epoch.
CROPS_PER_PHOTO = 64

# (package, name, credit). Stereo pairs (Middlebury, no stated licence) and images that skimage downloads are left out.
EMBEDDED_TRAIN_PHOTOS = (
    ("skimage", "astronaut", "Eileen Collins, NASA Great Images database; public domain"),
    ("skimage", "coffee", "Rachel Michetti, courtesy of Pikolo Espresso Bar; CC0"),
    ("skimage", "rocket", "DSCOVR launch on Falcon 9, SpaceX; public domain"),
    (
        "sklearn",
        "china.jpg",
        "danielbuechele, https://www.flickr.com/photos/danielbuechele/6061409035; CC BY 2.0",
    ),
    ("skimage", "hubble_deep_field", "Hubble eXtreme Deep Field, NASA; public domain"),
    ("skimage", "immunohistochemistry", "Center for Microscopy And Molecular Imaging (CMMI); no known copyright"),
    ("skimage", "retina", "Mikael Häggström, Wikimedia Commons; CC0 1.0"),
)
EMBEDDED_TEST_PHOTOS = (
    ("skimage", "chelsea", "Chelsea the cat, Stefan van der Walt; CC0"),
    # scikit-learn's README credits danielbuechele for both photos; this one's link is vultilion's.
    ("sklearn", "flower.jpg", "vultilion, https://www.flickr.com/photos/vultilion/6056698931; CC BY 2.0"),
)
EMBEDDED_PHOTOS_CREDITS = "\n".join(
    [
        "Photos shipped with scikit-image (`skimage.data`) and scikit-learn (`load_sample_images`), cropped and "
        "resized for training and evaluation. The CC BY 2.0 photos (https://creativecommons.org/licenses/by/2.0/) "
        "require this credit.",
        "",
        *(f"- {name} (training): {credit}" for _, name, credit in EMBEDDED_TRAIN_PHOTOS),
        *(f"- {name} (test): {credit}" for _, name, credit in EMBEDDED_TEST_PHOTOS),
    ]
)

Transform = Callable[[Image.Image, np.random.Generator | None], torch.Tensor]


def parse_resolution(resolution: int | Sequence[int]) -> tuple[int, int]:
    """`256`, `[256]` or `(H, W)` -> (H, W). Raises `ValueError` unless both are positive multiples of 8."""
    sizes = tuple(resolution) if isinstance(resolution, (tuple, list)) else (resolution,)
    sizes = sizes * 2 if len(sizes) == 1 else sizes
    if len(sizes) != 2 or not all(isinstance(size, int) and size > 0 and size % 8 == 0 for size in sizes):
        raise ValueError(f"resolution must be one or two positive multiples of 8 (H W), got {resolution!r}")
    return sizes


def held_out_count(num_images: int) -> int:
    """How many images to hold out: 5% of them, at least 1 from 2 images on, at most 200."""
    if num_images < 2:
        return 0
    return min(MAX_HELD_OUT_IMAGES, max(1, round(num_images * HELD_OUT_FRACTION)))


@dataclass(frozen=True)
class ResizeCrop:
    """Scale (Lanczos) so the image covers the resolution, shorter side first, as diffusers' train_text_to_image
    does; then a centre or random crop to (H, W); then an optional random horizontal flip."""

    resolution: tuple[int, int]
    center_crop: bool = False
    random_flip: bool = False

    def __call__(self, image: Image.Image, rng: np.random.Generator | None) -> torch.Tensor:
        height, width = self.resolution
        scale = max(height / image.height, width / image.width)
        if scale != 1:
            size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.LANCZOS)
        if self.center_crop:
            top, left = (image.height - height) // 2, (image.width - width) // 2
        else:
            top, left = rng.integers(image.height - height + 1), rng.integers(image.width - width + 1)
        image = image.crop((left, top, left + width, top + height))
        return pil_to_tensor(_maybe_flip(image, self.random_flip, rng))


@dataclass(frozen=True)
class MultiScaleCrop:
    """A random crop of the resolution's aspect ratio, resized (Lanczos) to (H, W), then an optional random
    horizontal flip. Its scale is log-uniform between native pixels and the largest crop that fits (an image smaller
    than the resolution always gives its largest crop, upscaled)."""

    resolution: tuple[int, int]
    random_flip: bool = False

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        height, width = self.resolution
        largest = min(image.height / height, image.width / width)  # crop size / output size
        scale = math.exp(rng.uniform(math.log(min(1.0, largest)), math.log(largest)))
        crop_height, crop_width = min(image.height, round(height * scale)), min(image.width, round(width * scale))
        top, left = rng.integers(image.height - crop_height + 1), rng.integers(image.width - crop_width + 1)
        image = image.crop((left, top, left + crop_width, top + crop_height))
        image = image.resize((width, height), Image.Resampling.LANCZOS)
        return pil_to_tensor(_maybe_flip(image, self.random_flip, rng))


@dataclass(frozen=True)
class WholeImage:
    """The whole image for evaluation: downscaled (Lanczos) to at most `max_side`, then centre-cropped to multiples
    of `multiple`. Images smaller than `multiple` are enlarged to it."""

    max_side: int = MAX_TEST_SIDE
    multiple: int = 8

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        scale = max(min(1.0, self.max_side / max(image.size)), self.multiple / min(image.size))
        if scale != 1:
            size = (max(self.multiple, round(image.width * scale)), max(self.multiple, round(image.height * scale)))
            image = image.resize(size, Image.Resampling.LANCZOS)
        return crop_to_multiple(pil_to_tensor(image), self.multiple)


def _maybe_flip(image: Image.Image, random_flip: bool, rng: np.random.Generator | None) -> Image.Image:
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if random_flip and rng.random() < 0.5 else image


class ImageDataset(torch.utils.data.Dataset):
    """Map-style dataset: `transform(read_image(images[index]), rng)`, with `rng` seeded by (seed, epoch, index).

    An item that fails to read (`read_image` raises `ValueError`) is warned about, marked in a shared-memory tensor
    (so marks made in DataLoader workers reach the main process) and replaced by the next readable item; the random
    draws stay those of the requested index.

    Args:
        images (`Sequence`): what `read_image` reads: file paths, dataset rows, arrays...
        transform (`Transform`): PIL image and generator -> (3, H, W) tensor in [-1, 1].
        read_image (`Callable`, *optional*, defaults to `images.load_image`): item -> RGB PIL image.
        seed (`int`, *optional*, defaults to 0): seed of the augmentation.
        label (`str`, *optional*, defaults to "image"): names items that are not paths in warnings, as `label[index]`.
    """

    def __init__(
        self,
        images: Sequence,
        transform: Transform,
        read_image: Callable[[Any], Image.Image] = load_image,
        seed: int = 0,
        label: str = "image",
    ):
        self.images, self.transform, self.read_image = images, transform, read_image
        self.seed, self.label, self.epoch = seed, label, 0
        self._unreadable = torch.zeros(len(images), dtype=torch.bool).share_memory_()

    def __len__(self) -> int:
        return len(self.images)

    def set_epoch(self, epoch: int):
        """Changes the augmentation of every item. Call before creating the DataLoader iterator."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> torch.Tensor:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} images")  # ends `for image in dataset`
        index %= len(self)
        rng = np.random.default_rng([self.seed, self.epoch, index])
        for offset in range(len(self)):
            source = (index + offset) % len(self)
            if self._unreadable[source]:
                continue
            try:
                image = self.read_image(self.images[source])
            except ValueError as error:
                self._unreadable[source] = True
                logger.warning(f"Skipping unreadable {self._name(source)} (another image takes its place): {error}")
                continue
            return self.transform(image, rng)
        raise ValueError(f"None of the {len(self)} images of this dataset can be read")

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(name, reason) of the items found unreadable here or in any DataLoader worker."""
        reason = "unreadable when loaded (see the warning logged then)"
        return [(self._name(i), reason) for i in self._unreadable.nonzero().flatten().tolist()]

    def _name(self, index: int) -> str:
        image = self.images[index]
        return os.fspath(image) if isinstance(image, (str, os.PathLike)) else f"{self.label}[{index}]"


class StreamingImageDataset(torch.utils.data.IterableDataset):
    """Iterable dataset over a streamed Hugging Face dataset: shuffled through a buffer (seeded by seed + epoch),
    shared between DataLoader workers by shards, each sample transformed with a generator seeded by
    (seed, epoch, worker, position). Unreadable rows are warned about, skipped and counted across workers.

    Args:
        examples (`datasets.IterableDataset`): rows whose `column` is cast to `datasets.Image(decode=False)`.
        column (`str`): the image column.
        transform (`Transform`): PIL image and generator -> (3, H, W) tensor in [-1, 1].
        seed (`int`, *optional*, defaults to 0): seed of the shuffle and the augmentation.
        label (`str`, *optional*, defaults to "streamed image"): names rows in warnings.
        shuffle_buffer_size (`int`, *optional*, defaults to 1000): rows the shuffle draws from.
    """

    def __init__(
        self,
        examples,
        column: str,
        transform: Transform,
        seed: int = 0,
        label: str = "streamed image",
        shuffle_buffer_size: int = 1000,
    ):
        self.examples = examples.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
        self.column, self.transform, self.seed, self.label, self.epoch = column, transform, seed, label, 0
        self._num_unreadable = torch.zeros((), dtype=torch.int64).share_memory_()

    def set_epoch(self, epoch: int):
        """Changes the shuffle and the augmentation. Call before creating the DataLoader iterator."""
        self.epoch = epoch
        self.examples.set_epoch(epoch)

    def __iter__(self):
        worker = torch.utils.data.get_worker_info()
        worker_id = worker.id if worker is not None else 0
        for position, example in enumerate(self.examples):
            try:
                image = read_row(example, self.column)
            except ValueError as error:
                self._num_unreadable += 1
                logger.warning(f"Skipping unreadable {self.label} (worker {worker_id}, row {position}): {error}")
                continue
            yield self.transform(image, np.random.default_rng([self.seed, self.epoch, worker_id, position]))

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """One (name, reason) per unreadable row met so far, here or in any DataLoader worker."""
        return [(self.label, "unreadable when streamed (see the warning logged then)")] * int(self._num_unreadable)


def read_row(row: dict, column: str) -> Image.Image:
    """RGB image of a Hugging Face dataset row whose `column` is cast to `datasets.Image(decode=False)`."""
    value = row[column]  # {"bytes": bytes | None, "path": str | None}
    if value is None or (value["bytes"] is None and value["path"] is None):
        raise ValueError(f"Column {column!r} holds no image in this row")
    if value["bytes"] is None and "://" in value["path"]:  # a streamed file on the Hub or another remote store
        from datasets.utils.file_utils import xopen

        with xopen(value["path"], "rb") as file:
            return load_image(io.BytesIO(file.read()))
    return load_image(io.BytesIO(value["bytes"]) if value["bytes"] is not None else value["path"])


def _row_hash(row: dict, column: str) -> float:
    value = row[column] or {"bytes": None, "path": None}
    return _unit_hash(value["bytes"] or (value["path"] or "").encode())


def _is_low_hash_row(row: dict, column: str) -> bool:
    return _row_hash(row, column) < HELD_OUT_FRACTION


def _is_not_in(row: dict, hashes: frozenset[float], column: str) -> bool:
    return _row_hash(row, column) not in hashes


@dataclass
class DataSplits:
    """What `load_data` returns. See the module docstring.

    Args:
        train (`ImageDataset` or `StreamingImageDataset`): (3, H, W) tensors in [-1, 1] at the training resolution.
        validation (`torch.Tensor`): (N, 3, H, W), a fixed batch of held-out pixels at the training resolution.
        test (`ImageDataset`): whole held-out images (3, h, w), h and w multiples of 8, sizes varying.
        description (`str`): the training data in a sentence or two, for the model card.
        test_description (`str`): what `test` holds, in words ("2 whole photos held out from ..."), for metrics.
        dataset_ids (`list[str]`): Hub ids of the data, for the model card's `datasets:` metadata (empty if local).
        credits (`str`, *optional*): attribution the data's licences require, in Markdown.
        rejected (`list[tuple[str, str]]`): (path, reason) of the files the up-front check found unreadable.
    """

    train: ImageDataset | StreamingImageDataset
    validation: torch.Tensor
    test: ImageDataset
    description: str
    test_description: str
    dataset_ids: list[str] = field(default_factory=list)
    credits: str | None = None
    rejected: list[tuple[str, str]] = field(default_factory=list)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(name, reason) of every image skipped so far: up front, or later while training or testing."""
        return [*self.rejected, *self.train.skipped, *self.test.skipped]


def load_data(
    train_data_dir: str | os.PathLike | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    image_column: str = "image",
    resolution: int | Sequence[int] = 256,
    center_crop: bool = False,
    random_flip: bool = False,
    seed: int = 0,
    streaming: bool = False,
    cache_dir: str | os.PathLike | None = None,
    num_validation_images: int = 4,
) -> DataSplits:
    """Training, validation and test data from a folder, a Hugging Face dataset or (neither given) embedded photos.

    Args:
        train_data_dir (`str`, *optional*): a folder of images, searched recursively.
        dataset_name (`str`, *optional*): a Hugging Face dataset: Hub name or local path.
        dataset_config_name (`str`, *optional*): the dataset's configuration.
        image_column (`str`, *optional*, defaults to "image"): the dataset's column of images.
        resolution (`int` or `(H, W)`, *optional*, defaults to 256): training size, multiples of 8.
        center_crop (`bool`, *optional*, defaults to False): centre rather than random crops (folder and dataset).
        random_flip (`bool`, *optional*, defaults to False): random horizontal flips.
        seed (`int`, *optional*, defaults to 0): seed of the augmentation and of the held-out rows of a dataset.
        streaming (`bool`, *optional*, defaults to False): stream the dataset rather than download it first.
        cache_dir (`str`, *optional*): where `datasets` caches downloads.
        num_validation_images (`int`, *optional*, defaults to 4): size of the validation batch (at most what the
            held-out data holds).

    Raises `ValueError` on a bad resolution, a missing or empty folder, a missing column, or options that do not
    apply to the chosen source.
    """
    size = parse_resolution(resolution)
    if train_data_dir is not None and dataset_name is not None:
        raise ValueError("Give train_data_dir or dataset_name, not both")
    if dataset_name is None and (streaming or dataset_config_name is not None):
        raise ValueError("streaming and dataset_config_name apply only to a dataset given by dataset_name")
    if dataset_name is not None:
        return _dataset_splits(
            dataset_name,
            dataset_config_name,
            image_column,
            size,
            center_crop,
            random_flip,
            seed,
            streaming,
            cache_dir,
            num_validation_images,
        )
    if train_data_dir is not None:
        return _folder_splits(train_data_dir, size, center_crop, random_flip, seed, num_validation_images)
    if center_crop:
        raise ValueError("center_crop applies to a folder or a dataset; the embedded photos use random crops")
    train_photos, test_photos = embedded_photos()
    train, validation, test = photo_splits(train_photos, test_photos, size, random_flip, seed, num_validation_images)
    names = ", ".join(name for _, name, _ in EMBEDDED_TEST_PHOTOS)
    return DataSplits(
        train,
        validation,
        test,
        description=(
            f"{len(train_photos)} photos shipped with scikit-image and scikit-learn: random multi-scale crops of the "
            f"first three quarters of each (along its longer side), the last quarter held out for validation."
        ),
        test_description=f"{len(test_photos)} whole photos held out from the embedded data ({names})",
        credits=EMBEDDED_PHOTOS_CREDITS,
    )


def embedded_photos() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(training photos, test photos) as (H, W, 3) uint8 arrays, read from the scikit-image and scikit-learn wheels."""
    import skimage.data
    from sklearn.datasets import load_sample_image

    def read(package: str, name: str) -> np.ndarray:
        return getattr(skimage.data, name)() if package == "skimage" else load_sample_image(name)

    return [read(p, n) for p, n, _ in EMBEDDED_TRAIN_PHOTOS], [read(p, n) for p, n, _ in EMBEDDED_TEST_PHOTOS]


def split_photo(photo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(training region, validation strip) of an (H, W, 3) photo: the strip is the last quarter of its longer side."""
    height, width = photo.shape[:2]
    if width >= height:
        cut = width - width // 4
        return photo[:, :cut], photo[:, cut:]
    cut = height - height // 4
    return photo[:cut], photo[cut:]


def validation_crops(strip: np.ndarray, count: int, resolution: tuple[int, int]) -> list[np.ndarray]:
    """`count` crops of the resolution's aspect ratio, as large as the strip allows, evenly spaced along it."""
    height, width = strip.shape[:2]
    scale = min(height / resolution[0], width / resolution[1])
    crop_height, crop_width = int(resolution[0] * scale), int(resolution[1] * scale)
    tops = np.linspace(0, height - crop_height, count).round().astype(int)
    lefts = np.linspace(0, width - crop_width, count).round().astype(int)
    return [strip[top : top + crop_height, left : left + crop_width] for top, left in zip(tops, lefts)]


def photo_splits(
    train_photos: Sequence[np.ndarray],
    test_photos: Sequence[np.ndarray],
    resolution: tuple[int, int],
    random_flip: bool = False,
    seed: int = 0,
    num_validation_images: int = 4,
) -> tuple[ImageDataset, torch.Tensor, ImageDataset]:
    """(train, validation, test) from a few photos, (H, W, 3) uint8 arrays.

    Train: `CROPS_PER_PHOTO` random multi-scale crops per training photo and epoch, each from its training region
    (`split_photo`). Validation: `num_validation_images` crops of the validation strips, photos taken in turn.
    Test: the whole test photos (`WholeImage`).
    """
    regions, strips = zip(*(split_photo(photo) for photo in train_photos))
    train = ImageDataset(
        list(regions) * CROPS_PER_PHOTO, MultiScaleCrop(resolution, random_flip), Image.fromarray, seed, "crop"
    )
    counts = [len(range(p, num_validation_images, len(strips))) for p in range(len(strips))]
    crops = [crop for strip, count in zip(strips, counts) for crop in validation_crops(strip, count, resolution)]
    resize = ResizeCrop(resolution, center_crop=True)
    validation = torch.stack([resize(Image.fromarray(crop), None) for crop in crops])
    test = ImageDataset(list(test_photos), WholeImage(), Image.fromarray, label="test photo")
    return train, validation, test


def find_images(folder: str | os.PathLike) -> tuple[list[Path], list[tuple[str, str]]]:
    """(readable images, [(path, reason) of unreadable ones]) under `folder`, recursively, sorted by path.

    Files with `IMAGE_EXTENSIONS` (any case) count; hidden files and folders are ignored. Each file is decoded once
    (JPEG at 1/8 scale, which still reads the whole stream), on threads, with a progress bar; unreadable ones are
    warned about. Raises `ValueError` naming the folder when it is missing or holds no readable image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"Image folder {os.fspath(folder)!r} does not exist or is not a folder")
    paths = []
    for root, folders, names in os.walk(folder, followlinks=True):
        folders[:] = [name for name in folders if not name.startswith(".")]  # prunes the walk
        paths += [Path(root, name) for name in names if _is_image_name(name)]
    paths.sort()
    if not paths:
        raise ValueError(
            f"Image folder {os.fspath(folder)!r} holds no images with the extensions {', '.join(IMAGE_EXTENSIONS)} "
            "(searched recursively, any case)"
        )
    with ThreadPoolExecutor() as pool:  # PIL decodes without the GIL
        problems = list(tqdm(pool.map(_why_unreadable, paths), total=len(paths), desc="Checking images"))
    rejected = [(os.fspath(path), problem) for path, problem in zip(paths, problems) if problem is not None]
    for path, problem in rejected:
        logger.warning(f"Skipping unreadable image {path!r}: {problem}")
    readable = [path for path, problem in zip(paths, problems) if problem is None]
    if not readable:
        raise ValueError(f"Image folder {os.fspath(folder)!r}: none of its {len(paths)} images can be read")
    return readable, rejected


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _why_unreadable(path: Path) -> str | None:
    try:
        with Image.open(path) as image:
            image.draft("RGB", (1, 1))  # JPEG only: decode at the smallest scale
            image.load()
    except Exception as error:  # PIL raises many kinds on damaged files; any of them means "skip it"
        return f"{type(error).__name__}: {error}"
    return None


def hold_out(names: Sequence[str]) -> list[str]:
    """The names to hold out, lowest hash first: those whose SHA-256 falls in the lowest `HELD_OUT_FRACTION` (at most
    `MAX_HELD_OUT_IMAGES`), else the lowest one when there are at least 2. A name's fate depends on itself alone, so
    adding files moves none between the splits (until the cap is reached)."""
    if len(names) < 2:
        return []
    hashes = {name: _unit_hash(name.encode()) for name in names}
    ranked = sorted(names, key=hashes.get)
    return [name for name in ranked if hashes[name] < HELD_OUT_FRACTION][:MAX_HELD_OUT_IMAGES] or ranked[:1]


def _unit_hash(key: bytes) -> float:
    """SHA-256 of `key` as a number in [0, 1)."""
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big") / 2**64


def _folder_splits(folder, resolution, center_crop, random_flip, seed, num_validation_images) -> DataSplits:
    paths, rejected = find_images(folder)
    by_name = {path.relative_to(folder).as_posix(): path for path in paths}
    held_out = [by_name[name] for name in hold_out(list(by_name))]
    train = sorted(set(paths) - set(held_out))
    name = Path(folder).name
    test_description = f"{len(held_out)} whole images held out from the folder `{name}`"
    if not held_out:
        logger.warning(f"Image folder {os.fspath(folder)!r} holds one image: it is also the validation and test data")
        held_out, test_description = train, f"the only image of the folder `{name}`, also trained on"
    description = f"{len(train)} images from the folder `{name}`"
    return DataSplits(
        train=ImageDataset(train, ResizeCrop(resolution, center_crop, random_flip), seed=seed),
        validation=_validation_batch(ImageDataset(held_out, ResizeCrop(resolution, True)), num_validation_images),
        test=ImageDataset(held_out, WholeImage()),
        description=description + (f" ({len(rejected)} unreadable files skipped)." if rejected else "."),
        test_description=test_description,
        rejected=rejected,
    )


def _validation_batch(held_out: ImageDataset, num_images: int) -> torch.Tensor:
    return torch.stack([held_out[i] for i in range(min(num_images, len(held_out)))])


def _dataset_splits(
    name, config_name, column, resolution, center_crop, random_flip, seed, streaming, cache_dir, num_validation_images
) -> DataSplits:
    splits = _load_dataset(name, config_name, cache_dir, streaming)
    train_key = "train" if "train" in splits or len(splits) > 1 else next(iter(splits))
    if train_key not in splits:
        raise ValueError(f"Dataset {name!r} has no 'train' split; its splits are {', '.join(splits)}")
    test_key = next((key for key in ("test", "validation") if key in splits and key != train_key), None)
    train = _image_rows(splits[train_key], column, f"{name!r} (split {train_key!r})")
    held_out = _image_rows(splits[test_key], column, f"{name!r} (split {test_key!r})") if test_key else None

    if streaming and held_out is None:
        # By content: skip/take would hand held-out rows to training once DataLoader workers split the shards.
        held_out = list(train.filter(functools.partial(_is_low_hash_row, column=column)).take(MAX_HELD_OUT_IMAGES))
        held_out = held_out or list(train.take(1))
        hashes = frozenset(_row_hash(row, column) for row in held_out)
        train = train.filter(functools.partial(_is_not_in, hashes=hashes, column=column))
    elif streaming:
        held_out = list(held_out.take(MAX_HELD_OUT_IMAGES))
    elif held_out is None and held_out_count(len(train)) == 0:
        logger.warning(f"Dataset {name!r} holds one image: it is also the validation and test data")
        held_out = train
    elif held_out is None:
        parts = train.train_test_split(test_size=held_out_count(len(train)), seed=seed)
        train, held_out = parts["train"], parts["test"]
    else:
        held_out = held_out.select(range(min(MAX_HELD_OUT_IMAGES, len(held_out))))

    read = functools.partial(read_row, column=column)
    train_label, held_out_label = f"{name}[{train_key}]", f"{name}[{test_key or train_key}]"
    transform = ResizeCrop(resolution, center_crop, random_flip)
    if streaming:
        train = StreamingImageDataset(train, column, transform, seed, label=train_label)
    else:
        train = ImageDataset(train, transform, read, seed, label=train_label)
    validation = _validation_batch(
        ImageDataset(held_out, ResizeCrop(resolution, center_crop=True), read, label=held_out_label),
        num_validation_images,
    )
    dataset = f"`{name}`" + (f" ({config_name})" if config_name else "")
    held_out_from = f"the {test_key!r} split" if test_key else f"rows held out from the {train_key!r} split"
    return DataSplits(
        train=train,
        validation=validation,
        test=ImageDataset(held_out, WholeImage(), read, label=held_out_label),
        description=f"The {train_key!r} split of the Hugging Face dataset {dataset}, column {column!r}.",
        test_description=f"{len(held_out)} whole images of {held_out_from} of {dataset}",
        dataset_ids=[] if Path(name).exists() else [name],
    )


def _load_dataset(name: str, config_name: str | None, cache_dir, streaming: bool) -> dict:
    """{split name: datasets.Dataset or datasets.IterableDataset}, from the Hub, a local folder or `save_to_disk`."""
    import datasets

    if not any(Path(name, marker).is_file() for marker in ("state.json", "dataset_dict.json")):
        return dict(datasets.load_dataset(name, config_name, cache_dir=cache_dir, streaming=streaming))
    if config_name is not None:
        raise ValueError(f"{name!r} was written by save_to_disk: it has no configuration {config_name!r}")
    splits = datasets.load_from_disk(name)
    splits = dict(splits) if isinstance(splits, datasets.DatasetDict) else {"train": splits}
    if streaming:
        return {key: split.to_iterable_dataset(num_shards=min(64, len(split))) for key, split in splits.items()}
    return splits


def _image_rows(split, column: str, name: str):
    """The split with only `column`, its images left encoded (`datasets.Image(decode=False)`) for `read_row`."""
    import datasets

    columns = split.column_names or list(next(iter(split)))  # a stream may not know its columns before reading
    if column not in columns:
        raise ValueError(f"Dataset {name} has no image column {column!r}; its columns are {', '.join(columns)}")
    return split.select_columns([column]).cast_column(column, datasets.Image(decode=False))
