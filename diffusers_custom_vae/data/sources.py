"""The two data sources a user brings: a folder of images, and a Hugging Face dataset (Hub, local, or streamed).

Held-out images never depend on the order files or rows come in. A folder's are chosen by a hash of their relative
paths (`hold_out`: about 5%, at most 200, at least 1), so adding files moves none between the splits. A dataset's
are its "test" (else "validation") split (its first 200 rows), else `held_out_count(n)` rows of its training split
drawn with the seed; when streaming, the first 200 rows whose image bytes hash into the lowest 5%, a choice that
DataLoader workers sharding the stream cannot change.
"""

import functools
import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from .datasets import DataSplits, ImageDataset, StreamingImageDataset, read_row
from .transforms import ImageOptions

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
# Held-out images: 5% of the data, at least 1 (from 2 images on), at most 200 (evaluation stays affordable).
HELD_OUT_FRACTION = 0.05
MAX_HELD_OUT_IMAGES = 200


def folder_splits(folder: str | os.PathLike, options: ImageOptions, class_labels: bool = False) -> DataSplits:
    """Train, validation and test splits of a folder of images, searched recursively (see `find_images`); with
    `class_labels`, its top-level subfolders are the classes (see `folder_classes`)."""
    paths, rejected = find_images(folder)
    class_names, class_of = folder_classes(folder, paths, rejected) if class_labels else ([], lambda path: 0)
    by_name = {path.relative_to(folder).as_posix(): path for path in paths}
    held_out = [by_name[name] for name in hold_out(list(by_name))]
    train = sorted(set(paths) - set(held_out))
    name = Path(folder).name
    test_description = f"{len(held_out)} whole images held out from the folder `{name}`"
    if not held_out:
        logger.warning(f"Image folder {os.fspath(folder)!r} holds one image: it is also the validation and test data")
        held_out, test_description = train, f"the only image of the folder `{name}`, also trained on"
    description = f"{len(train)} images from the folder `{name}`"
    if class_names:
        description += f" in {len(class_names)} classes (its subfolders)"
    held_out_labels = [class_of(path) for path in held_out]
    validation = validation_batch(ImageDataset(held_out, options.validation_transform), options)
    return DataSplits(
        train=ImageDataset(train, options.train_transform, seed=options.seed, labels=[class_of(p) for p in train]),
        validation=validation,
        test=ImageDataset(held_out, options.test_transform, labels=held_out_labels),
        description=description + (f" ({len(rejected)} unreadable files skipped)." if rejected else "."),
        test_description=test_description,
        rejected=rejected,
        class_names=class_names,
        validation_labels=held_out_labels[: len(validation)] if class_names else [],
    )


def folder_classes(folder: str | os.PathLike, paths: Sequence[Path], rejected: Sequence[tuple[str, str]]):
    """(class names, path -> class index) of a folder whose top-level subfolders (not hidden) are the classes,
    sorted by name; ([], all 0) when it has none. Raises `ValueError` naming a class folder that holds no readable
    image, or an image outside every class folder."""
    folder = Path(folder)
    class_names = sorted(
        entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith(".")
    )
    if not class_names:
        return [], lambda path: 0
    index = {name: i for i, name in enumerate(class_names)}
    counts = dict.fromkeys(class_names, 0)
    for path in paths:
        parts = path.relative_to(folder).parts
        if len(parts) == 1:
            raise ValueError(
                f"Image {os.fspath(path)!r} is not in a class folder: the classes of {os.fspath(folder)!r} are its "
                f"subfolders ({', '.join(class_names)}), so every image must be in one"
            )
        counts[parts[0]] += 1
    empty = [name for name, count in counts.items() if count == 0]
    if empty:
        unreadable = f" ({len(rejected)} unreadable files were skipped)" if rejected else ""
        raise ValueError(f"Class folder {os.fspath(folder / empty[0])!r} holds no readable images{unreadable}")
    return class_names, lambda path: index[path.relative_to(folder).parts[0]]


def find_images(folder: str | os.PathLike) -> tuple[list[Path], list[tuple[str, str]]]:
    """(readable images, [(path, reason) of unreadable ones]) under `folder`, recursively, sorted by path.

    Files with `IMAGE_EXTENSIONS` (any case) count; hidden files and folders are ignored. Symbolic links are
    followed, but each real folder is walked once and each real file counted once (its first path in sorted order),
    so a link loop ends and a file reachable by two paths cannot land in both the training and the held-out split.
    Each file is decoded once (JPEG at 1/8 scale, which still reads the whole stream), on threads, with a progress
    bar; unreadable ones are warned about. Raises `ValueError` naming the folder when it is missing or holds no
    readable image.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"Image folder {os.fspath(folder)!r} does not exist or is not a folder")
    walked, by_real_path = set(), {}
    for root, folders, names in os.walk(folder, followlinks=True):
        if os.path.realpath(root) in walked:  # a link back to a folder already walked: a loop, or a second way in
            folders[:] = []
            continue
        walked.add(os.path.realpath(root))
        folders[:] = sorted(name for name in folders if not name.startswith("."))  # prunes and orders the walk
        for name in sorted(filter(_is_image_name, names)):
            by_real_path.setdefault(os.path.realpath(Path(root, name)), Path(root, name))
    paths = sorted(by_real_path.values())
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


def held_out_count(num_images: int) -> int:
    """How many images to hold out: 5% of them, at least 1 from 2 images on, at most 200."""
    if num_images < 2:
        return 0
    return min(MAX_HELD_OUT_IMAGES, max(1, round(num_images * HELD_OUT_FRACTION)))


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


def validation_batch(held_out: ImageDataset, options: ImageOptions) -> torch.Tensor:
    """The first `options.num_validation_images` held-out images as one (N, 3, H, W) batch."""
    return torch.stack([held_out[i] for i in range(min(options.num_validation_images, len(held_out)))])


def dataset_splits(
    name: str,
    config_name: str | None,
    column: str,
    streaming: bool,
    cache_dir,
    options: ImageOptions,
    label_column: str | None = None,
) -> DataSplits:
    """Train, validation and test splits of a Hugging Face dataset: a Hub name, a folder `datasets.load_dataset`
    reads, or a folder written by `save_to_disk`; streamed or not. See the module docstring for the held-out rows.
    With `label_column`, its classes (see `dataset_classes`)."""
    if label_column is not None and streaming:
        raise ValueError("label_column needs a dataset that is not streamed (its classes are read up front)")
    splits = _load_dataset(name, config_name, cache_dir, streaming)
    train_key = "train" if "train" in splits or len(splits) > 1 else next(iter(splits))
    if train_key not in splits:
        raise ValueError(f"Dataset {name!r} has no 'train' split; its splits are {', '.join(splits)}")
    test_key = next((key for key in ("test", "validation") if key in splits and key != train_key), None)
    train = _image_rows(splits[train_key], column, f"{name!r} (split {train_key!r})", label_column)
    held_out = (
        _image_rows(splits[test_key], column, f"{name!r} (split {test_key!r})", label_column) if test_key else None
    )
    class_names, class_of = dataset_classes(train, held_out, label_column) if label_column else ([], None)

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
        parts = train.train_test_split(test_size=held_out_count(len(train)), seed=options.seed)
        train, held_out = parts["train"], parts["test"]
    else:
        held_out = held_out.select(range(min(MAX_HELD_OUT_IMAGES, len(held_out))))

    read = functools.partial(read_row, column=column)
    train_label, held_out_label = f"{name}[{train_key}]", f"{name}[{test_key or train_key}]"
    train_labels, held_out_labels = (
        ([class_of[value] for value in rows[label_column]] for rows in (train, held_out))
        if class_names
        else (None, None)
    )
    if streaming:
        train = StreamingImageDataset(train, column, options.train_transform, options.seed, label=train_label)
    else:
        train = ImageDataset(train, options.train_transform, read, options.seed, train_label, train_labels)
    validation = validation_batch(
        ImageDataset(held_out, options.validation_transform, read, label=held_out_label), options
    )
    dataset = f"`{name}`" + (f" ({config_name})" if config_name else "")
    drawn = "by content" if streaming else f"with seed {options.seed}"
    held_out_from = f"the {test_key!r} split" if test_key else f"rows held out {drawn} from the {train_key!r} split"
    return DataSplits(
        train=train,
        validation=validation,
        test=ImageDataset(held_out, options.test_transform, read, label=held_out_label, labels=held_out_labels),
        description=f"The {train_key!r} split of the Hugging Face dataset {dataset}, column {column!r}"
        + (f", {len(class_names)} classes from column {label_column!r}." if class_names else "."),
        test_description=f"{len(held_out)} whole images of {held_out_from} of {dataset}",
        dataset_ids=[] if Path(name).exists() else [name],
        class_names=class_names,
        validation_labels=held_out_labels[: len(validation)] if class_names else [],
    )


def dataset_classes(train, held_out, label_column: str) -> tuple[list[str], dict]:
    """(class names, {label value: class index}) of a dataset's label column: a `ClassLabel`'s names (its values
    are their indices), else the sorted distinct values of both splits, as strings."""
    import datasets

    feature = train.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return list(feature.names), {i: i for i in range(len(feature.names))}
    values = sorted({*train.unique(label_column), *(held_out.unique(label_column) if held_out is not None else [])})
    if any(value is None for value in values):
        raise ValueError(f"Label column {label_column!r} has rows without a label")
    values = sorted(values, key=str)
    return [str(value) for value in values], {value: i for i, value in enumerate(values)}


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


def _image_rows(split, column: str, name: str, label_column: str | None = None):
    """The split with only `column` (and `label_column`), its images left encoded (`datasets.Image(decode=False)`)
    for `read_row`."""
    import datasets

    columns = split.column_names or list(next(iter(split)))  # a stream may not know its columns before reading
    if column not in columns:
        raise ValueError(f"Dataset {name} has no image column {column!r}; its columns are {', '.join(columns)}")
    if label_column is not None and label_column not in columns:
        raise ValueError(f"Dataset {name} has no label column {label_column!r}; its columns are {', '.join(columns)}")
    kept = [column] if label_column is None else [column, label_column]
    return split.select_columns(kept).cast_column(column, datasets.Image(decode=False))


def _row_hash(row: dict, column: str) -> float:
    value = row[column] or {"bytes": None, "path": None}
    return _unit_hash(value["bytes"] or (value["path"] or "").encode())


def _is_low_hash_row(row: dict, column: str) -> bool:
    return _row_hash(row, column) < HELD_OUT_FRACTION


def _is_not_in(row: dict, hashes: frozenset[float], column: str) -> bool:
    return _row_hash(row, column) not in hashes
