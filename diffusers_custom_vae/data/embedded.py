"""The default data: photos that ship inside the scikit-image and scikit-learn wheels, so training needs no download.

Training samples are random multi-scale crops of the first three quarters of each training photo along its longer
side; the validation batch is cut from the last quarter; the test split is two whole photos never used for training.
"""

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from .datasets import DataSplits, ImageDataset
from .transforms import ImageOptions, MultiScaleCrop

# The embedded photos give this many random crops per photo per epoch.
CROPS_PER_PHOTO = 64

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


def embedded_splits(options: ImageOptions, class_labels: bool = False) -> DataSplits:
    """Train, validation and test splits of the embedded photos (see the module docstring); with `class_labels`,
    each training photo is its own class, named after it ("astronaut", "coffee", ...)."""
    if options.center_crop:
        raise ValueError("center_crop applies to a folder or a dataset; the embedded photos use random crops")
    train_photos, test_photos = embedded_photos()
    train, validation, test = photo_splits(train_photos, test_photos, options)
    names = ", ".join(name for _, name, _ in EMBEDDED_TEST_PHOTOS)
    class_names = [name.removesuffix(".jpg") for _, name, _ in EMBEDDED_TRAIN_PHOTOS] if class_labels else []
    if not class_labels:
        train.labels = [0] * len(train)
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
        class_names=class_names,
        validation_labels=photo_validation_labels(len(train_photos), options) if class_labels else [],
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
    options: ImageOptions,
) -> tuple[ImageDataset, torch.Tensor, ImageDataset]:
    """(train, validation, test) from a few photos, (H, W, 3) uint8 arrays.

    Train: `CROPS_PER_PHOTO` random multi-scale crops per training photo and epoch, each from its training region
    (`split_photo`). Validation: `options.num_validation_images` crops of the validation strips, photos taken in turn.
    Test: the whole test photos (`options.test_transform`).
    """
    regions, strips = zip(*(split_photo(photo) for photo in train_photos))
    train = ImageDataset(
        list(regions) * CROPS_PER_PHOTO,
        MultiScaleCrop(options.resolution, options.random_flip),
        Image.fromarray,
        options.seed,
        "crop",
        labels=list(range(len(regions))) * CROPS_PER_PHOTO,  # each crop's photo
    )
    counts = _validation_counts(len(strips), options)
    crops = [
        crop for strip, count in zip(strips, counts) for crop in validation_crops(strip, count, options.resolution)
    ]
    validation = torch.stack([options.validation_transform(Image.fromarray(crop), None) for crop in crops])
    test = ImageDataset(list(test_photos), options.test_transform, Image.fromarray, label="test photo")
    return train, validation, test


def _validation_counts(num_photos: int, options: ImageOptions) -> list[int]:
    """How many validation crops each photo gives: the photos are taken in turn."""
    return [len(range(p, options.num_validation_images, num_photos)) for p in range(num_photos)]


def photo_validation_labels(num_photos: int, options: ImageOptions) -> list[int]:
    """The photo (class) of each row of `photo_splits`' validation batch."""
    return [photo for photo, count in enumerate(_validation_counts(num_photos, options)) for _ in range(count)]
