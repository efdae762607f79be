"""The latent cache (issue 16, item 3): keys, reuse, invalidation, flips, non-finite refusal."""

import os
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_custom_vae.data import load_data
from diffusers_custom_vae.latent_cache import LatentDataset, cache_latents, default_cache_dir

RNG = np.random.default_rng(0)


@pytest.fixture
def pets(tmp_path: Path) -> Path:
    for kind in ("cat", "dog"):
        (tmp_path / "pets" / kind).mkdir(parents=True)
        for index in range(5):
            Image.fromarray(RNG.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(
                tmp_path / "pets" / kind / f"{index}.png"
            )
    return tmp_path / "pets"


def train_data(folder, resolution=8):
    return load_data(folder, resolution=resolution, downsample_factor=2, class_labels=True).train


class CountingVAE(torch.nn.Module):
    """Wraps a VAE and counts the images it encodes."""

    def __init__(self, vae):
        super().__init__()
        self.vae, self.encoded = vae, 0
        self.config, self.encoder = vae.config, vae.encoder

    @property
    def dtype(self):
        return self.vae.dtype

    def encode(self, images):
        self.encoded += len(images)
        return self.vae.encode(images)


def test_encodes_once_then_reuses(pets, tiny_vae, tmp_path):
    train = train_data(pets)
    vae = CountingVAE(tiny_vae)
    first = cache_latents(vae, train, random_flip=False, cache_dir=tmp_path / "cache", batch_size=3)
    assert vae.encoded == len(train) == len(first)
    second = cache_latents(vae, train, random_flip=False, cache_dir=tmp_path / "cache")
    assert vae.encoded == len(train)  # the second call never ran the VAE
    assert second.path == first.path and [p.name for p in (tmp_path / "cache").iterdir()] == [first.path.name]
    assert first.path.parent == tmp_path / "cache" and list(first.path.glob("*.safetensors"))
    assert not list(first.path.rglob("*.pkl")) and not list(first.path.rglob("*.bin"))
    # The cached values are the VAE's posterior of each item's fixed (centre-cropped) image, with its label.
    fixed = train.fixed_view()
    posterior = tiny_vae.encode(torch.stack([fixed[i] for i in range(len(fixed))])).latent_dist
    torch.testing.assert_close(torch.stack([second[i]["mean"] for i in range(len(second))]), posterior.mean)
    torch.testing.assert_close(torch.stack([second[i]["std"] for i in range(len(second))]), posterior.std)
    assert [int(second[i]["label"]) for i in range(len(second))] == train.labels
    assert second[0]["label"].dtype == torch.int64 and second.latent_shape == (4, 4, 4)
    assert second.skipped == [] and all(torch.isfinite(second[i]["mean"]).all() for i in range(len(second)))


def test_lives_in_the_hugging_face_cache(pets, tiny_vae, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HOME", str(tmp_path / "hf"))
    latents = cache_latents(tiny_vae, train_data(pets), random_flip=False)
    assert default_cache_dir() == tmp_path / "hf" / "diffusers_custom_vae" / "latents"
    assert latents.path.parent == default_cache_dir()


def test_invalidated_by_weights_files_and_transform(pets, tiny_vae, tmp_path):
    cache = tmp_path / "cache"
    train = train_data(pets)
    key = cache_latents(tiny_vae, train, random_flip=False, cache_dir=cache).path.name
    decoder_only = [p for n, p in tiny_vae.named_parameters() if n.startswith("decoder.")]
    with torch.no_grad():
        decoder_only[0].add_(1.0)  # the decoder does not make latents: the same cache serves
    assert cache_latents(tiny_vae, train, random_flip=False, cache_dir=cache).path.name == key
    with torch.no_grad():
        tiny_vae.encoder.conv_in.weight.mul_(1.01)
    changed_vae = cache_latents(tiny_vae, train, random_flip=False, cache_dir=cache).path.name
    assert changed_vae != key
    # A changed image file (size and modification time) means new latents.
    image = Path(train.images[0])
    Image.fromarray(RNG.integers(0, 256, (22, 28, 3), dtype=np.uint8)).save(image)
    os.utime(image, ns=(10**18, 10**18))
    changed_file = cache_latents(tiny_vae, train_data(pets), random_flip=False, cache_dir=cache)
    assert changed_file.path.name not in (key, changed_vae)
    changed_size = cache_latents(tiny_vae, train_data(pets, resolution=12), random_flip=False, cache_dir=cache)
    assert changed_size.latent_shape == (4, 6, 6) and changed_size.path.name != changed_file.path.name
    flipped = cache_latents(tiny_vae, train_data(pets), random_flip=True, cache_dir=cache)
    assert flipped.path.name != changed_file.path.name
    assert len(list(cache.iterdir())) == 5 and not list(cache.glob("*.partial*"))


def test_flips_are_the_mirror_images_chosen_per_epoch(pets, tiny_vae, tmp_path):
    train = train_data(pets)
    latents = cache_latents(tiny_vae, train, random_flip=True, cache_dir=tmp_path)
    fixed = train.fixed_view()
    mirrored = torch.stack([fixed[i].flip(-1) for i in range(len(fixed))])
    torch.testing.assert_close(latents.flipped_mean, tiny_vae.encode(mirrored).latent_dist.mean)
    choices = []
    for epoch in range(3):
        latents.set_epoch(epoch)
        chosen = [latents.is_flipped(i) for i in range(len(latents))]
        assert chosen == [np.random.default_rng([train.seed, epoch, i]).random() < 0.5 for i in range(len(latents))]
        for i, flip in enumerate(chosen):
            torch.testing.assert_close(latents[i]["mean"], (latents.flipped_mean if flip else latents.mean)[i])
        choices.append(chosen)
    assert choices[0] != choices[1] and any(choices[0]) and not all(choices[0])
    # A resumed run (a new LatentDataset on the same folder) makes the same choices.
    resumed = LatentDataset(latents.path, random_flip=True, seed=train.seed)
    resumed.set_epoch(2)
    assert [resumed.is_flipped(i) for i in range(len(resumed))] == choices[2]
    unflipped = LatentDataset(latents.path)
    assert not any(unflipped.is_flipped(i) for i in range(len(unflipped)))


def test_embedded_photos_cache_a_fixed_set_of_crops(tiny_vae, tmp_path):
    train = load_data(resolution=8, downsample_factor=2, class_labels=True).train
    train.images, train.labels = train.images[:14], train.labels[:14]  # 2 crops of each photo: a quick test
    latents = cache_latents(tiny_vae, train, random_flip=False, cache_dir=tmp_path)
    train.set_epoch(5)  # the training epoch does not change what is cached
    assert cache_latents(tiny_vae, train, random_flip=False, cache_dir=tmp_path).path == latents.path
    assert [int(latents[i]["label"]) for i in range(14)] == list(range(7)) * 2


def test_non_finite_latents_name_the_image_and_cache_nothing(pets, tiny_vae, tmp_path):
    train = train_data(pets)
    poisoned = Path(train.images[3])
    original = tiny_vae.encode

    def encode(images):
        output = original(images)
        fixed = train.fixed_view()
        for row, image in enumerate(images):
            if torch.equal(image, fixed[3]):
                output.latent_dist.mean[row, 0, 0, 0] = float("nan")
        return output

    tiny_vae.encode = encode
    with pytest.raises(ValueError, match=rf"latents of .*{poisoned.parent.name}/{poisoned.name}.* not finite"):
        cache_latents(tiny_vae, train, random_flip=False, cache_dir=tmp_path / "cache", batch_size=2)
    assert list((tmp_path / "cache").iterdir()) == []


def test_damaged_cache_is_refused(pets, tiny_vae, tmp_path):
    latents = cache_latents(tiny_vae, train_data(pets), random_flip=False, cache_dir=tmp_path)
    with pytest.raises(ValueError, match=rf"{latents.path.name}.* damaged.*flipped_mean"):
        LatentDataset(latents.path, random_flip=True)  # encoded without flips
    for shard in latents.path.glob("shard-*"):
        shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ValueError, match=rf"{latents.path.name}.* damaged.*delete it"):
        LatentDataset(latents.path)


def test_streamed_data_is_refused(tiny_vae, tmp_path):
    with pytest.raises(ValueError, match="streamed dataset cannot be cached"):
        cache_latents(tiny_vae, torch.utils.data.TensorDataset(torch.zeros(2)), random_flip=False, cache_dir=tmp_path)


def test_scaled_std(pets, tiny_vae, tmp_path):
    latents = cache_latents(tiny_vae, train_data(pets), random_flip=False, cache_dir=tmp_path)
    torch.manual_seed(0)
    samples = latents.mean + latents.std * torch.randn((2000, *latents.mean.shape))
    assert latents.scaled_std(0.5) == pytest.approx(float(samples.std() * 0.5), rel=0.02)


def test_a_datasets_table_is_keyed_by_its_fingerprint(tiny_vae, tmp_path):
    import datasets

    images = [Image.fromarray(RNG.integers(0, 256, (12, 12, 3), dtype=np.uint8)) for _ in range(6)]
    features = datasets.Features({"image": datasets.Image(), "kind": datasets.ClassLabel(names=["a", "b"])})
    rows = {"image": images, "kind": [0, 1] * 3}
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "ds")

    def train():
        return load_data(
            dataset_name=str(tmp_path / "ds"), label_column="kind", resolution=8, downsample_factor=2
        ).train

    vae = CountingVAE(tiny_vae)
    first = cache_latents(vae, train(), random_flip=False, cache_dir=tmp_path / "cache")
    encoded = vae.encoded
    assert cache_latents(vae, train(), random_flip=False, cache_dir=tmp_path / "cache").path == first.path
    assert vae.encoded == encoded  # the same table, loaded again: reused
    rows["image"] = rows["image"][::-1]
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(tmp_path / "ds2")
    other = load_data(dataset_name=str(tmp_path / "ds2"), label_column="kind", resolution=8, downsample_factor=2)
    assert cache_latents(vae, other.train, random_flip=False, cache_dir=tmp_path / "cache").path != first.path


ENCODE_ON_EVERY_RANK = """
import sys, torch
from accelerate import PartialState
from diffusers_custom_vae import CustomVAE
from diffusers_custom_vae.data import load_data
from diffusers_custom_vae.latent_cache import cache_latents

folder, cache, config = sys.argv[1], sys.argv[2], eval(sys.argv[3])
torch.manual_seed(0)
vae = CustomVAE(**config).eval()
calls = []
original = vae.encode
vae.encode = lambda images: calls.append(len(images)) or original(images)
train = load_data(folder, resolution=8, downsample_factor=2, class_labels=True).train
latents = cache_latents(vae, train, random_flip=True, cache_dir=cache)
print(f"rank {PartialState().process_index} encoded {sum(calls)} read {len(latents)} from {latents.path.name}")
"""


@pytest.mark.slow
def test_on_two_processes_only_the_main_one_encodes(pets, tmp_path, tiny_config):
    """Two CPU processes (gloo) fill one cache: rank 0 encodes (each image and its mirror), rank 1 reads."""
    import subprocess
    import sys

    script = tmp_path / "encode.py"
    script.write_text(ENCODE_ON_EVERY_RANK)
    accelerate = "-m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1".split()
    accelerate += "--mixed_precision no --dynamo_backend no".split()
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, *accelerate, str(script), str(pets), str(tmp_path / "cache"), repr(tiny_config)]
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    count = len(train_data(pets))
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank"))
    assert [line.split(" from ")[0] for line in lines] == [
        f"rank 0 encoded {2 * count} read {count}",
        f"rank 1 encoded 0 read {count}",
    ]
    assert len({line.split(" from ")[1] for line in lines}) == 1 and len(list((tmp_path / "cache").iterdir())) == 1
