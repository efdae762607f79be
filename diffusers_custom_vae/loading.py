"""Loading any VAE the package works with (`CustomVAE`, diffusers' `AutoencoderKL`) from a folder or a Hub repo id,
as strictly as `CustomVAE.from_pretrained`: missing, unexpected, mismatched, non-floating or non-finite weights, a
config of another kind of model and a folder without a config are errors that name the path and what was expected.
The weight checks themselves are `StrictLoadingMixin`'s, in the model file (which also runs without this package)."""

import os

from diffusers import AutoencoderKL

from .modeling_custom_vae import CustomVAE, StrictLoadingMixin

VAE_CLASSES = {"CustomVAE": CustomVAE, "AutoencoderKL": AutoencoderKL}


def vae_class(config: dict, source: str) -> type:
    """The class a saved config (`config.json`, its `_class_name`) describes; CustomVAE when it names none."""
    name = config.get("_class_name", "CustomVAE")
    if name not in VAE_CLASSES:
        raise ValueError(
            f"{source} describes a {name}, not a VAE: expected the config of a {' or '.join(VAE_CLASSES)} "
            "(its `_class_name`)."
        )
    return VAE_CLASSES[name]


def load_vae(name_or_path: str | os.PathLike, **from_pretrained_kwargs) -> CustomVAE | AutoencoderKL:
    r"""
    Load the `CustomVAE` or `AutoencoderKL` that a folder or Hub repo holds, with the checks of
    [`StrictLoadingMixin.from_pretrained`] whichever class it is.

    Args:
        name_or_path (`str` or `os.PathLike`): A folder written by `save_pretrained`, or a Hub repo id.
        **from_pretrained_kwargs: Passed to `from_pretrained` (`subfolder="vae"` for the VAE of a pipeline,
            `torch_dtype`, `variant`, `cache_dir`, `device_map`, ...).

    Returns:
        `CustomVAE` or `AutoencoderKL`: the VAE, in eval mode.
    """
    source = os.fspath(name_or_path)
    subfolder = from_pretrained_kwargs.get("subfolder")
    if os.path.isdir(source):
        _check_folder(source, subfolder)
    elif os.path.isabs(source) or source.startswith((".", "~")) or os.path.exists(source):  # a path, not a repo id
        raise FileNotFoundError(f"{source} is not a folder: expected a VAE saved with save_pretrained, or a Hub id.")
    config_kwargs = ("subfolder", "cache_dir", "revision", "token", "local_files_only", "force_download", "proxies")
    config = CustomVAE.load_config(source, **{k: v for k, v in from_pretrained_kwargs.items() if k in config_kwargs})
    cls = vae_class(config, os.path.join(source, subfolder) if subfolder else source)
    if issubclass(cls, StrictLoadingMixin):  # CustomVAE: strict already, and also as remote code
        return cls.from_pretrained(source, **from_pretrained_kwargs)
    # diffusers builds the model with the class whose from_pretrained it runs: a subclass of the same name that adds
    # the checks, whose model then becomes a plain `cls`, as diffusers' own loader would give.
    strict = type(cls.__name__, (StrictLoadingMixin, cls), {"__module__": cls.__module__})
    loaded = strict.from_pretrained(source, **from_pretrained_kwargs)
    (loaded[0] if isinstance(loaded, tuple) else loaded).__class__ = cls  # with output_loading_info: (model, info)
    return loaded


def _check_folder(folder: str, subfolder: str | None):
    """A clear error for a local folder without a VAE's config.json (a pipeline folder names its `vae` subfolder)."""
    if os.path.isfile(os.path.join(folder, subfolder or "", CustomVAE.config_name)):
        return
    where = os.path.join(folder, subfolder) if subfolder else folder
    hint = ""
    if not subfolder and os.path.isfile(os.path.join(folder, "vae", CustomVAE.config_name)):
        hint = " It holds a pipeline: pass subfolder='vae' to load its VAE."
    raise OSError(
        f"{where} has no {CustomVAE.config_name}: expected a VAE saved with save_pretrained "
        f"(config.json and diffusion_pytorch_model.safetensors).{hint}"
    )
