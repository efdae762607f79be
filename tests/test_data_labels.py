"""Classes of the data (issue 16, item 2): a folder's subfolders, a dataset's label column, the embedded photos."""

from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from diffusers_custom_vae.data import EMBEDDED_TRAIN_PHOTOS, load_data

RNG = np.random.default_rng(0)


def save_images(folder: Path, count: int, colour: tuple[int, int, int]):
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        Image.new("RGB", (20, 24), colour).save(folder / f"{index}.png")


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    save_images(tmp_path / "pets" / "dog", 12, (200, 0, 0))
    save_images(tmp_path / "pets" / "cat" / "kittens", 9, (0, 0, 200))  # nested: still the class of its top folder
    return tmp_path / "pets"


def test_folder_subfolders_are_the_classes(class_folder):
    splits = load_data(class_folder, resolution=16, class_labels=True)
    assert splits.class_names == ["cat", "dog"]
    for dataset in (splits.train, splits.test):
        assert len(dataset.labels) == len(dataset)
        for path, label in zip(dataset.images, dataset.labels):
            assert label == ("cat", "dog").index(Path(path).relative_to(class_folder).parts[0])
    assert sorted(set(splits.train.labels)) == [0, 1]
    # Each validation row's label is its image's: red is a dog (1), blue a cat (0).
    assert len(splits.validation_labels) == len(splits.validation)
    for image, label in zip(splits.validation, splits.validation_labels):
        assert label == (1 if image[0].mean() > image[2].mean() else 0)
    assert "2 classes" in splits.description


def test_without_class_labels_everything_is_one_class(class_folder):
    splits = load_data(class_folder, resolution=16)
    assert splits.class_names == []
    assert set(splits.train.labels) == {0} and splits.validation_labels == [0] * len(splits.validation)


def test_folder_without_subfolders_is_unconditional(tmp_path):
    save_images(tmp_path / "flat", 5, (1, 2, 3))
    splits = load_data(tmp_path / "flat", resolution=16, class_labels=True)
    assert splits.class_names == [] and set(splits.train.labels) == {0}


def test_empty_class_folder_is_named(class_folder):
    (class_folder / "bird").mkdir()
    (class_folder / "bird" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match=r"Class folder .*bird.* no readable images"):
        load_data(class_folder, resolution=16, class_labels=True)


def test_image_outside_the_class_folders_is_named(class_folder):
    save_images(class_folder / "loose", 1, (0, 0, 0))
    Image.new("RGB", (20, 20)).save(class_folder / "stray.png")
    with pytest.raises(ValueError, match=r"stray\.png.* not in a class folder"):
        load_data(class_folder, resolution=16, class_labels=True)


def dataset_with_labels(path: Path, labels, feature) -> Path:
    images = [Image.new("RGB", (16, 16), (10 * i, 0, 0)) for i in range(len(labels))]
    features = datasets.Features({"image": datasets.Image(), "kind": feature})
    datasets.Dataset.from_dict({"image": images, "kind": labels}, features=features).save_to_disk(path)
    return path


def test_dataset_class_label_names(tmp_path):
    path = dataset_with_labels(tmp_path / "ds", [0, 1, 2] * 8, datasets.ClassLabel(names=["ant", "bee", "cow"]))
    splits = load_data(dataset_name=str(path), label_column="kind", resolution=16)
    assert splits.class_names == ["ant", "bee", "cow"]
    assert len(splits.train.labels) == len(splits.train) and set(splits.train.labels) <= {0, 1, 2}
    rows = splits.train.images
    assert splits.train.labels == list(rows["kind"])  # ClassLabel values are the indices
    assert len(splits.validation_labels) == len(splits.validation)


def test_dataset_string_labels_are_sorted(tmp_path):
    path = dataset_with_labels(tmp_path / "ds", ["zebra", "ant"] * 6, datasets.Value("string"))
    splits = load_data(dataset_name=str(path), label_column="kind", resolution=16)
    assert splits.class_names == ["ant", "zebra"]
    assert splits.train.labels == [["ant", "zebra"].index(kind) for kind in splits.train.images["kind"]]


def test_missing_label_column_is_named(tmp_path):
    path = dataset_with_labels(tmp_path / "ds", [0, 1] * 3, datasets.Value("int64"))
    with pytest.raises(ValueError, match="label column 'species'.*image, kind"):
        load_data(dataset_name=str(path), label_column="species", resolution=16)
    with pytest.raises(ValueError, match="label_column applies to a dataset"):
        load_data(tmp_path, label_column="kind", resolution=16)


def test_embedded_photos_are_one_class_each():
    splits = load_data(resolution=32, class_labels=True, num_validation_images=9)
    names = [name.removesuffix(".jpg") for _, name, _ in EMBEDDED_TRAIN_PHOTOS]
    assert splits.class_names == names
    # Item i is a crop of photo i % 7, its label.
    photos = splits.train.images
    assert all(photos[i] is photos[label] for i, label in enumerate(splits.train.labels))
    assert splits.validation_labels == [0, 0, 1, 1, 2, 3, 4, 5, 6]  # crops grouped by photo, taken in turn
    assert load_data(resolution=32).class_names == []


def test_fixed_view_gives_one_image_per_item(class_folder):
    train = load_data(class_folder, resolution=16, random_flip=True, class_labels=True).train
    fixed = train.fixed_view()
    fixed.set_epoch(3)
    assert fixed.labels == train.labels and fixed.transform.center_crop and not fixed.transform.random_flip
    embedded = load_data(resolution=32, random_flip=True).train.fixed_view()
    assert not embedded.transform.random_flip
    assert (embedded[5] == embedded.fixed_view()[5]).all()
