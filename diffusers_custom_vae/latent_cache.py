"""The latent cache of latent diffusion: a data set encoded once by a frozen VAE, reused by every epoch, rerun and
resume (the recipe of LDM and DiT: keep each image's posterior mean and std, sample z = mean + std * noise each step).

`cache_latents(vae, dataset, random_flip=...)` encodes the dataset's fixed view (`ImageDataset.fixed_view()`: one
image per item) with a progress bar, and the horizontally flipped images too with `random_flip`, into safetensors
shards (never pickle) in a folder of the Hugging Face cache (`$HF_HOME/diffusers_custom_vae/latents/<key>`, or
`cache_dir/<key>`). The key hashes all that decides the latents: the VAE's encoder weights, dtype and config, each
item's source (a file's path, size and modification time; a `datasets` table's fingerprint; an array's bytes), its
label, and the transform, so a changed VAE or data set never reads stale latents. The folder is written as
`<key>.partial-<pid>` and renamed when complete, so an interrupted run leaves no folder that looks finished. On
several processes only the main one encodes; the others wait and read.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import ImageDataset
from .latent_spaces import ENCODER_PARTS

# Bump when what a cache folder holds changes: old folders are then never read.
CACHE_FORMAT = 1
# Items per safetensors shard: bounds the memory used while encoding.
SHARD_SIZE = 4096


def default_cache_dir() -> Path:
    """`$HF_HOME/diffusers_custom_vae/latents` (huggingface_hub's cache home, `~/.cache/huggingface` by default)."""
    from huggingface_hub import constants

    return Path(constants.HF_HOME, "diffusers_custom_vae", "latents")


def cache_latents(
    vae,
    dataset: ImageDataset,
    *,
    random_flip: bool,
    cache_dir: str | os.PathLike | None = None,
    batch_size: int = 16,
    device: str | torch.device | None = None,
    desc: str = "encoding latents",
) -> "LatentDataset":
    r"""
    The posteriors of `dataset`'s images under `vae`, encoded once and then read from the cache.

    Args:
        vae (`ModelMixin`): A frozen VAE (`CustomVAE`, `AutoencoderKL`) in eval mode whose `encode(x).latent_dist`
            has `mean` and `std`; it runs in its own dtype.
        dataset (`ImageDataset`): The training data (`load_data(...).train`); its `fixed_view()` is encoded.
        random_flip (`bool`): Also encode each image flipped left-right; `LatentDataset` then serves either.
        cache_dir (`str`, *optional*): The folder of cache folders; defaults to `default_cache_dir()`.
        batch_size (`int`, *optional*, defaults to 16): Images per VAE call.
        device (`str` or `torch.device`, *optional*): Where the images go: the VAE's device (it is not moved);
            defaults to its parameters' device.
        desc (`str`, *optional*): The progress bar's label.

    Returns:
        [`LatentDataset`]: items {"mean", "std", "label"}; call `set_epoch(epoch)` before each epoch.

    Raises `ValueError` for a streamed dataset (it has no fixed items), and naming the image whose latents are not
    finite (nothing is cached then).
    """
    if not isinstance(dataset, ImageDataset):
        raise ValueError(
            f"The latent cache needs a map-style ImageDataset with one image per index, not {type(dataset).__name__} "
            "(a streamed dataset cannot be cached: load it without streaming)"
        )
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    view = dataset.fixed_view()
    path = Path(cache_dir if cache_dir is not None else default_cache_dir()) / cache_key(vae, view, random_flip)
    # The trainer's Accelerator made the state already; alone, read `accelerate launch`'s CPU flag as Accelerator does.
    with PartialState(
        cpu=parse_flag_from_env("ACCELERATE_USE_CPU")
    ).main_process_first():  # the main process encodes; then the others find the folder complete
        if not (path / "info.json").is_file():
            device = torch.device(device) if device is not None else next(vae.parameters()).device
            _encode(vae, view, random_flip, path, batch_size, device, desc)
    return LatentDataset(path, random_flip=random_flip, seed=dataset.seed)


def cache_key(vae, view: ImageDataset, random_flip: bool) -> str:
    """The hex digest naming the cache folder of `view` (a fixed view) encoded by `vae`; see the module docstring."""
    digest = hashlib.sha256()

    def add(*parts):
        digest.update(json.dumps(parts, default=str).encode())

    config = {name: value for name, value in vae.config.items() if not name.startswith("_")}  # not where it came from
    add(CACHE_FORMAT, type(vae).__name__, config, str(vae.dtype), random_flip, repr(view.transform))
    add(view.seed, view.labels, getattr(view.read_image, "__qualname__", repr(view.read_image)))
    for name, tensor in sorted(vae.state_dict().items()):  # the weights that make latents: the decoder does not
        if name.startswith(ENCODER_PARTS):
            add(name, tuple(tensor.shape), str(tensor.dtype))
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    fingerprint = getattr(view.images, "_fingerprint", None)  # a `datasets.Dataset`: its table's identity
    if fingerprint is not None:
        add("datasets", fingerprint, len(view.images))
    else:
        array_hashes = {}  # the embedded photos repeat one array per crop: hash each once
        for item in view.images:
            if isinstance(item, np.ndarray):
                if id(item) not in array_hashes:
                    array_hashes[id(item)] = hashlib.sha256(np.ascontiguousarray(item).tobytes()).hexdigest()
                add(item.shape, array_hashes[id(item)])
            elif isinstance(item, (str, os.PathLike)):
                stat = os.stat(item)
                add(os.fspath(item), stat.st_size, stat.st_mtime_ns)
            else:
                raise ValueError(f"Cannot identify {type(item).__name__} items for the latent cache")
    return digest.hexdigest()[:32]


@torch.no_grad()
def _encode(vae, view: ImageDataset, random_flip: bool, path: Path, batch_size: int, device, desc: str):
    """Writes the cache folder `path`: shards of {"mean", "std", ("flipped_mean", "flipped_std"), "labels"}."""
    partial = path.with_name(f"{path.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        shard, num_shards, latent_shape = {}, 0, None
        with tqdm(total=len(view), desc=desc, unit="image") as bar:
            for start in range(0, len(view), batch_size):
                indices = range(start, min(start + batch_size, len(view)))
                images = torch.stack([view[i] for i in indices]).to(device, vae.dtype)
                batch = _posterior(vae, images, view, indices, "")
                if random_flip:
                    batch |= _posterior(vae, images.flip(-1), view, indices, "flipped_")
                batch["labels"] = torch.tensor([view.labels[i] for i in indices], dtype=torch.int64)
                latent_shape = list(batch["mean"].shape[1:])
                for name, values in batch.items():
                    shard.setdefault(name, []).append(values)
                if sum(len(values) for values in shard["labels"]) >= SHARD_SIZE or indices[-1] == len(view) - 1:
                    tensors = {name: torch.cat(values).contiguous() for name, values in shard.items()}
                    save_file(tensors, partial / f"shard-{num_shards:05d}.safetensors")
                    shard, num_shards = {}, num_shards + 1
                bar.update(len(indices))
        info = {"format": CACHE_FORMAT, "count": len(view), "latent_shape": latent_shape, "random_flip": random_flip}
        info["skipped"] = view.skipped
        (partial / "info.json").write_text(json.dumps(info, indent=2))
        try:
            partial.rename(path)
        except OSError:  # another process finished the same folder first: its latents are these
            if not (path / "info.json").is_file():
                raise
            shutil.rmtree(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def _posterior(vae, images: torch.Tensor, view: ImageDataset, indices: range, prefix: str) -> dict:
    posterior = vae.encode(images).latent_dist
    mean, std = posterior.mean.float().cpu(), posterior.std.float().cpu()
    finite = torch.isfinite(mean).flatten(1).all(1) & torch.isfinite(std).flatten(1).all(1)
    if not finite.all():
        name = view.name(indices[int((~finite).nonzero()[0])])
        flipped = " (flipped)" if prefix else ""
        raise ValueError(
            f"The VAE's latents of {name}{flipped} are not finite (NaN or infinity): check the VAE's weights and dtype"
        )
    return {f"{prefix}mean": mean, f"{prefix}std": std}


class LatentDataset(torch.utils.data.Dataset):
    r"""
    Cached posteriors: item `i` is {"mean": (C, h, w) float32, "std": (C, h, w) float32, "label": int64 scalar}, of
    image `i` or, with `random_flip`, of its mirror image when `is_flipped(i)`: a choice that depends only on
    (seed, epoch, i), so a resumed run sees the same flips.

    Args:
        path (`str` or `os.PathLike`): A cache folder written by `cache_latents`.
        random_flip (`bool`, *optional*, defaults to False): Serve mirror images half of the time.
        seed (`int`, *optional*, defaults to 0): Seed of the flips.

    Attributes: `path`, `latent_shape` (C, h, w), `labels` (int64, one per item), `skipped` (the (name, reason) of
    items that were unreadable when encoded: another image took their place).
    """

    def __init__(self, path: str | os.PathLike, random_flip: bool = False, seed: int = 0):
        self.path, self.random_flip, self.seed, self.epoch = Path(path), random_flip, seed, 0
        info = json.loads((self.path / "info.json").read_text())
        names = ["mean", "std", "labels"] + (["flipped_mean", "flipped_std"] if random_flip else [])
        try:
            shards = [load_file(shard) for shard in sorted(self.path.glob("shard-*.safetensors"))]
            tensors = {name: torch.cat([shard[name] for shard in shards]) for name in names}
        except (KeyError, RuntimeError, SafetensorError) as error:
            raise ValueError(f"Latent cache folder {os.fspath(self.path)!r} is damaged ({error}): delete it") from None
        self.latent_shape = tuple(info["latent_shape"])
        for name, values in tensors.items():
            expected = (info["count"],) if name == "labels" else (info["count"], *self.latent_shape)
            if tuple(values.shape) != expected or not values.float().isfinite().all():
                raise ValueError(
                    f"Latent cache folder {os.fspath(self.path)!r} is damaged ({name}: shape {tuple(values.shape)}, "
                    f"expected {expected}, or not finite): delete it"
                )
        self.mean, self.std, self.labels = tensors["mean"], tensors["std"], tensors["labels"]
        self.flipped_mean, self.flipped_std = tensors.get("flipped_mean"), tensors.get("flipped_std")
        self.skipped = [tuple(item) for item in info["skipped"]]

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int):
        """Changes which items are flipped. Call before creating the DataLoader iterator."""
        self.epoch = epoch

    def is_flipped(self, index: int) -> bool:
        """Whether item `index` is served flipped this epoch: a coin drawn from (seed, epoch, index) alone."""
        return self.random_flip and np.random.default_rng([self.seed, self.epoch, index]).random() < 0.5

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} latents")
        index %= len(self)
        mean, std = (self.flipped_mean, self.flipped_std) if self.is_flipped(index) else (self.mean, self.std)
        return {"mean": mean[index], "std": std[index], "label": self.labels[index]}

    def scaled_std(self, scaling_factor: float, shift_factor: float | None = None) -> float:
        """The standard deviation of the latents the diffusion model sees, (z - shift) * scale with
        z = mean + std * noise, over all items and elements: Var z = E[mean^2 + std^2] - E[mean]^2 (a shift moves
        the mean only)."""
        mean, std = self.mean.double(), self.std.double()
        variance = (mean.square() + std.square()).mean() - mean.mean().square()
        return float(variance.clamp(min=0).sqrt() * abs(scaling_factor))
