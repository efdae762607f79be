"""What the data sources return: `ImageDataset` (map-style; augmentation seeded by (seed, epoch, index); unreadable
items skipped and counted), `StreamingImageDataset` (a streamed Hugging Face dataset) and `DataSplits` (train,
validation and test, with what the model card says of them)."""

import io
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..images import load_image
from .transforms import Transform

logger = logging.getLogger(__name__)


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
        labels (`Sequence[int]`, *optional*): each item's class index (see `DataSplits.class_names`); all 0 (one
            class: unconditional) when not given.
    """

    def __init__(
        self,
        images: Sequence,
        transform: Transform,
        read_image: Callable[[Any], Image.Image] = load_image,
        seed: int = 0,
        label: str = "image",
        labels: Sequence[int] | None = None,
    ):
        self.images, self.transform, self.read_image = images, transform, read_image
        self.seed, self.label, self.epoch = seed, label, 0
        self.labels = list(labels) if labels is not None else [0] * len(images)
        if len(self.labels) != len(images):
            raise ValueError(f"{len(self.labels)} labels for {len(images)} images")
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

    def fixed_view(self) -> "ImageDataset":
        """The same items with one fixed image each, for caching their latents: the transform's `fixed()` (no flip;
        a centre crop, or the multi-scale crop drawn at epoch 0) and the epoch left at 0."""
        return ImageDataset(self.images, self.transform.fixed(), self.read_image, self.seed, self.label, self.labels)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(name, reason) of the items found unreadable here or in any DataLoader worker."""
        reason = "unreadable when loaded (see the warning logged then)"
        return [(self._name(i), reason) for i in self._unreadable.nonzero().flatten().tolist()]

    def name(self, index: int) -> str:
        """The item in words: its path, or `label[index]`."""
        return self._name(index)

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


@dataclass
class DataSplits:
    """What `load_data` returns.

    Args:
        train (`ImageDataset` or `StreamingImageDataset`): (3, H, W) tensors in [-1, 1] at the training resolution,
            augmented from (seed, epoch, index) only: call its `set_epoch(epoch)` before each epoch's iterator is made
            (accelerate's `DataLoaderShard.set_epoch` does not forward it when a seedable sampler takes the call).
        validation (`torch.Tensor`): (N, 3, H, W), a fixed batch of held-out pixels at the training resolution.
        test (`ImageDataset`): whole held-out images (3, h, w), sizes varying: downscaled to at most 1024 px, then
            cropped to multiples of the model's downsampling factor. Evaluate one at a time.
        description (`str`): the training data in a sentence or two, for the model card.
        test_description (`str`): what `test` holds, in words ("2 whole photos held out from ..."), for metrics.
        dataset_ids (`list[str]`): Hub ids of the data, for the model card's `datasets:` metadata (empty if local).
        credits (`str`, *optional*): attribution the data's licences require, in Markdown.
        rejected (`list[tuple[str, str]]`): (path, reason) of the files the up-front check found unreadable.
            `skipped` adds those found later, in DataLoader workers included.
        class_names (`list[str]`): the classes `load_data(..., class_labels=True)` found (a folder's subfolders, a
            dataset's label column, the embedded photos' names), indexed by the items' labels (`train.labels`,
            `test.labels`); empty when there are none: one class, unconditional, every label 0.
        validation_labels (`list[int]`): the class of each row of `validation` (all 0 without classes).
    """

    train: ImageDataset | StreamingImageDataset
    validation: torch.Tensor
    test: ImageDataset
    description: str
    test_description: str
    dataset_ids: list[str] = field(default_factory=list)
    credits: str | None = None
    rejected: list[tuple[str, str]] = field(default_factory=list)
    class_names: list[str] = field(default_factory=list)
    validation_labels: list[int] = field(default_factory=list)

    def __post_init__(self):
        if not self.validation_labels:
            self.validation_labels = [0] * len(self.validation)

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(name, reason) of every image skipped so far: up front, or later while training or testing."""
        return [*self.rejected, *self.train.skipped, *self.test.skipped]
