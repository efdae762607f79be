"""Training data for the VAE: a folder of images, a Hugging Face dataset, or photos that ship inside wheels.

`load_data(...)` is the entry point; it returns `DataSplits` (train, validation, test). The modules: `sources`
(a folder, a Hugging Face dataset), `embedded` (the default photos), `transforms` (images -> tensors), `datasets`
(what the sources return).
"""

import os
from collections.abc import Sequence

from .datasets import DataSplits, ImageDataset
from .embedded import EMBEDDED_TEST_PHOTOS, EMBEDDED_TRAIN_PHOTOS, embedded_photos, embedded_splits, photo_splits
from .sources import (
    IMAGE_EXTENSIONS,
    MAX_HELD_OUT_IMAGES,
    StreamingImageDataset,
    dataset_splits,
    find_images,
    folder_splits,
    hold_out,
)
from .transforms import ImageOptions, MultiScaleCrop, ResizeCrop, WholeImage, parse_resolution


def load_data(
    train_data_dir: str | os.PathLike | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    image_column: str = "image",
    label_column: str | None = None,
    class_labels: bool = False,
    resolution: int | Sequence[int] = 256,
    center_crop: bool = False,
    random_flip: bool = False,
    seed: int = 0,
    streaming: bool = False,
    cache_dir: str | os.PathLike | None = None,
    num_validation_images: int = 4,
    downsample_factor: int = 8,
) -> DataSplits:
    r"""
    Training, validation and test data from a folder, a Hugging Face dataset or (neither given) the embedded photos.

    Args:
        train_data_dir (`str`, *optional*): A folder of images, searched recursively (`sources.find_images`).
        dataset_name (`str`, *optional*): A Hugging Face dataset: Hub name or local path.
        dataset_config_name (`str`, *optional*): The dataset's configuration.
        image_column (`str`, *optional*, defaults to "image"): The dataset's column of images.
        label_column (`str`, *optional*): The dataset's column of class labels (a `ClassLabel`: its names; else its
            sorted distinct values). Implies `class_labels`.
        class_labels (`bool`, *optional*, defaults to False): Read the data's classes into `DataSplits.class_names`
            and the datasets' `labels`: a folder's top-level subfolders (every image must be in one; an empty one is
            an error naming it; no subfolders: no classes), the dataset's `label_column`, or each embedded training
            photo its own class (its crops share its subject and colours, so samples of a class can be checked by
            eye against its photo). Without classes, every label is 0 and `class_names` is empty.
        resolution (`int` or `(H, W)`, *optional*, defaults to 256): Training size, multiples of `downsample_factor`.
        center_crop (`bool`, *optional*, defaults to False): Centre rather than random crops (folder and dataset).
        random_flip (`bool`, *optional*, defaults to False): Random horizontal flips.
        seed (`int`, *optional*, defaults to 0): Seed of the augmentation and of the held-out rows of a dataset.
        streaming (`bool`, *optional*, defaults to False): Stream the dataset rather than download it first.
        cache_dir (`str`, *optional*): Where `datasets` caches downloads.
        num_validation_images (`int`, *optional*, defaults to 4): Size of the validation batch (at most what the
            held-out data holds).
        downsample_factor (`int`, *optional*, defaults to 8): The model's (`downsample_factor_of(vae)`): training
            sizes must be its multiples, and test images are cropped to them.

    Returns:
        [`DataSplits`]: `train` (call `set_epoch` before each epoch), a fixed `validation` batch, whole `test` images.

    Raises `ValueError` on a bad resolution, a missing or empty folder, a missing column, or options that do not
    apply to the chosen source.
    """
    options = ImageOptions(
        resolution, downsample_factor, center_crop, random_flip, seed, num_validation_images
    )  # checks the resolution
    if train_data_dir is not None and dataset_name is not None:
        raise ValueError("Give train_data_dir or dataset_name, not both")
    if dataset_name is None and (streaming or dataset_config_name is not None):
        raise ValueError("streaming and dataset_config_name apply only to a dataset given by dataset_name")
    if label_column is not None and dataset_name is None:
        raise ValueError(
            "label_column applies to a dataset given by dataset_name; a folder's classes are its subfolders"
        )
    class_labels = class_labels or label_column is not None
    if dataset_name is not None:
        return dataset_splits(
            dataset_name, dataset_config_name, image_column, streaming, cache_dir, options, label_column
        )
    if train_data_dir is not None:
        return folder_splits(train_data_dir, options, class_labels)
    return embedded_splits(options, class_labels)


__all__ = [
    "EMBEDDED_TEST_PHOTOS",
    "EMBEDDED_TRAIN_PHOTOS",
    "IMAGE_EXTENSIONS",
    "MAX_HELD_OUT_IMAGES",
    "DataSplits",
    "ImageDataset",
    "ImageOptions",
    "MultiScaleCrop",
    "ResizeCrop",
    "StreamingImageDataset",
    "WholeImage",
    "embedded_photos",
    "find_images",
    "hold_out",
    "load_data",
    "parse_resolution",
    "photo_splits",
]
