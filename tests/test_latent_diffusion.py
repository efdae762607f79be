"""Latent diffusion (`examples/train_latent_diffusion.py`): a DiT trained on a VAE's latents, exported as a stock
`DiTPipeline`; `examples/generate.py` samples it by class name."""

import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import EXAMPLES, TINY_CONFIG
from diffusers import DiTPipeline
from huggingface_hub import HfApi
from huggingface_hub.utils import filter_repo_objects
from PIL import Image
from safetensors.torch import load_file
from test_remote_code import WITHOUT_PACKAGE

from diffusers_custom_vae import CustomVAE, load_dit_pipeline
from diffusers_custom_vae.training import (
    LatentDiffusionConfig,
    LatentDiffusionObjective,
    checkpoint_steps,
    latent_diffusion,
)

CLASSES = {"blue": (40, 60, 200), "red": (200, 40, 40)}
TINY_DIT = dict(num_layers=2, num_attention_heads=2, attention_head_dim=8)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """Two classes of 16 px images (a folder each), a tiny CustomVAE (2x: 8x8x4 latents) and a tiny DiT config."""
    root = tmp_path_factory.mktemp("latent_diffusion")
    rng = np.random.default_rng(0)
    for name, colour in CLASSES.items():
        (root / "images" / name).mkdir(parents=True)
        for index in range(12):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "images" / name / f"{index}.png")
    torch.manual_seed(0)
    CustomVAE(**TINY_CONFIG).save_pretrained(root / "vae")
    (root / "dit.json").write_text(json.dumps(TINY_DIT))
    return root


def flags(workdir: Path, output_dir, *extra) -> list[str]:
    return [
        *("--vae", str(workdir / "vae"), "--train_data_dir", str(workdir / "images"), "--resolution", "16"),
        *("--model_config", str(workdir / "dit.json"), "--train_batch_size", "4", "--report_to", "none"),
        *("--max_train_steps", "2", "--num_inference_steps", "2", "--cache_dir", str(workdir / "cache")),
        *("--output_dir", str(output_dir), *extra),
    ]


def error_of(run_example, capsys, script: str, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_example(script, argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error
    return error.rstrip("\n").split("\n")[-1]


# ------------------------------------------------------------------------------------------------------ the model


def test_the_trainer_imports_no_objective_and_three_objectives_share_one_interface():
    import ast

    from diffusers_custom_vae.training import DistillationObjective, Objective, VAEObjective, trainer

    tree = ast.parse(Path(trainer.__file__).read_text())
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert "Objective" in imported and not imported & {
        "VAEObjective",
        "DistillationObjective",
        "LatentDiffusionObjective",
    }
    for objective in (VAEObjective, DistillationObjective, LatentDiffusionObjective):
        assert issubclass(objective, Objective) and objective.output_patterns
        for step in ("load_data", "loss", "validate", "save"):
            assert getattr(objective, step) is not getattr(Objective, step), (objective, step)


def test_the_dit_fits_the_vaes_latents_and_has_diTPipelines_null_label(workdir):
    config = LatentDiffusionConfig(vae=str(workdir / "vae"), model_config="tiny", resolution=[16], report_to="none")
    objective = LatentDiffusionObjective(config)
    dit = objective.model
    assert (dit.config.in_channels, dit.config.out_channels, dit.config.sample_size) == (4, 4, 8)
    tables = [m.embedding_table for m in dit.modules() if isinstance(m, latent_diffusion.LabelEmbedding)]
    assert tables and all(table.num_embeddings == 1001 for table in tables)  # 1000 classes + the null label at 1000
    assert not objective.vae.training and not any(p.requires_grad for p in objective.vae.parameters())
    output = dit(torch.randn(2, 4, 8, 8), timestep=torch.tensor([0, 999]), class_labels=torch.tensor([0, 1000]))
    assert output.sample.shape == (2, 4, 8, 8) and torch.isfinite(output.sample).all()


def test_a_step_drops_labels_to_the_null_label_once_per_sample(workdir):
    config = LatentDiffusionConfig(
        vae=str(workdir / "vae"), model_config=str(workdir / "dit.json"), resolution=[16], class_dropout_prob=0.5
    )
    objective = LatentDiffusionObjective(config)
    seen = []
    hook = objective.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["class_labels"]), with_kwargs=True
    )
    batch = {
        "mean": torch.randn(64, 4, 8, 8),
        "std": torch.rand(64, 4, 8, 8),
        "label": torch.ones(64, dtype=torch.long),
    }
    torch.manual_seed(0)
    loss, terms = objective.loss(objective.model, batch, step=0)
    hook.remove()
    assert torch.isfinite(loss) and set(terms) == {"mse"}
    assert set(seen[0].tolist()) == {1, 1000} and 16 < (seen[0] == 1000).sum() < 48
    # diffusers' own per-block dropout is off: with the labels fixed, the training forward is deterministic
    labels = torch.zeros(2, dtype=torch.long)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    assert torch.equal(objective.model(x, t, labels).sample, objective.model(x, t, labels).sample)


def test_the_held_out_loss_is_one_deterministic_number(workdir):
    """Fixed noise and timesteps on the held-out latents: the same model scores the same, data loaded twice."""
    config = LatentDiffusionConfig(
        vae=str(workdir / "vae"),
        model_config=str(workdir / "dit.json"),
        train_data_dir=str(workdir / "images"),
        resolution=[16],
        cache_dir=str(workdir / "cache"),
    )
    objective = LatentDiffusionObjective(config)
    cpu = SimpleNamespace(device=torch.device("cpu"))
    first, second = objective.load_data(cpu).validation, objective.load_data(cpu).validation
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert first["timesteps"].min() == 0 and first["timesteps"].max() == 999  # spread over the whole schedule
    objective.model.eval()
    losses = [objective.held_out_loss(objective.model, batch) for batch in (first, second)]
    assert losses[0] == losses[1] and np.isfinite(losses[0])


# ----------------------------------------------------------------------------------------- a run and its export


@pytest.fixture(scope="module")
def trained(workdir):
    """Two steps through the command line: the output folder is a DiTPipeline."""
    spec = importlib.util.spec_from_file_location("example_tld", os.path.join(EXAMPLES, "train_latent_diffusion.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    metrics = module.main(flags(workdir, workdir / "dit"))
    return workdir / "dit", metrics


def test_the_output_folder_is_a_dit_pipeline_with_class_names_and_no_clipping(trained):
    folder, metrics = trained
    assert np.isfinite(metrics["held_out_loss"]) and metrics["latent_std"] > 0
    # FID needs torch-fidelity's Inception weights in the local cache: a number only when it was computed.
    assert (metrics["fid"] is None) == metrics["fid_note"].startswith("FID skipped: ")
    index = json.loads((folder / "model_index.json").read_text())
    assert index["id2label"] == {"0": "blue", "1": "red"} and index["_class_name"] == "DiTPipeline"
    # The VAE's code ships in vae/ for loading without the package; with it imported, its own class loads.
    assert type(DiTPipeline.from_pretrained(folder).vae) is CustomVAE
    pipe = load_dit_pipeline(folder)  # the package's own classes: no code from the folder runs
    assert isinstance(pipe.vae, CustomVAE) and pipe.scheduler.config.clip_sample is False
    assert pipe.get_label_ids(["red", "blue"]) == [1, 0]
    images = pipe([1, 0], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    assert Image.open(folder / "samples.png").height > 2 * 16  # a row per class
    card = (folder / "README.md").read_text()
    assert "blue, red" in card and "held-out denoising loss" in card and "![samples](samples.png)" in card
    assert metrics["fid_note"] in card
    assert 'load_dit_pipeline("path/to/this/folder")' in card and "trust_remote_code=True" in card


def test_the_pipeline_loads_where_the_package_cannot_be_imported(trained, tmp_path):
    folder, _ = trained
    script = (
        WITHOUT_PACKAGE
        + f"""
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True)
ids = pipe.get_label_ids(["red"])
images = pipe(ids, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
import numpy
print(type(pipe).__name__, type(pipe.vae).__name__, ids, images.shape, bool(numpy.isfinite(images).all()))
"""
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split("\n")[-2] == "DiTPipeline CustomVAE [1] (1, 16, 16, 3) True"


def test_generate_samples_by_class_name_and_names_the_known_ones(trained, run_example, capsys, tmp_path):
    folder, _ = trained
    run_example(
        "generate",
        [
            "--pipeline",
            str(folder),
            "--class_name",
            "red",
            "--class_name",
            "blue",
            "--num_images",
            "2",
            "--num_inference_steps",
            "2",
            "--output",
            str(tmp_path / "g.png"),
        ],
    )
    assert Image.open(tmp_path / "g.png").size[1] > 2 * 16
    error = error_of(
        run_example,
        capsys,
        "generate",
        ["--pipeline", str(folder), "--class_name", "green", "--output", str(tmp_path / "no.png")],
    )
    assert "'green'" in error and "blue, red" in error and not (tmp_path / "no.png").exists()


def test_stop_and_resume_ends_with_the_same_weights(workdir, tmp_path, run_example, monkeypatch):
    common = ["--max_train_steps", "4", "--lr_warmup_steps", "1", "--random_flip", "--validation_steps", "3"]
    run_example("train_latent_diffusion", flags(workdir, tmp_path / "straight", *common))
    original_loss, pressed = LatentDiffusionObjective.loss, []

    def ctrl_c_during_step_2(self, module, batch, step):
        if step == 1 and not pressed:
            pressed.append(os.kill(os.getpid(), signal.SIGINT))
        return original_loss(self, module, batch, step)

    monkeypatch.setattr(LatentDiffusionObjective, "loss", ctrl_c_during_step_2)
    with pytest.raises(SystemExit):
        run_example("train_latent_diffusion", flags(workdir, tmp_path / "resumed", *common))
    monkeypatch.undo()
    assert checkpoint_steps(tmp_path / "resumed") == [2]
    run_example(
        "train_latent_diffusion", flags(workdir, tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest")
    )
    straight = load_file(tmp_path / "straight" / "transformer" / "diffusion_pytorch_model.safetensors")
    resumed = load_file(tmp_path / "resumed" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)


def test_a_resume_names_the_vae_by_where_it_is(workdir, tmp_path, run_example, capsys, monkeypatch):
    """`--vae` by a relative path from elsewhere is the same VAE; a changed resolution is named as the flag."""
    run_example("train_latent_diffusion", flags(workdir, tmp_path / "out", "--checkpointing_steps", "1"))
    monkeypatch.chdir(workdir)
    resume = ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"]
    error = error_of(
        run_example, capsys, "train_latent_diffusion", flags(workdir, tmp_path / "out", *resume, "--resolution", "32")
    )
    assert "resolution [32, 32]" in error and "[16, 16]" in error and "sample_size" not in error
    argv = flags(workdir, tmp_path / "out", *resume)
    argv[argv.index("--vae") + 1] = "vae"
    run_example("train_latent_diffusion", argv)
    assert checkpoint_steps(tmp_path / "out") == [1, 2, 3]


def test_the_docs_python_snippets_run(trained, tmp_path, monkeypatch):
    """docs/latent-diffusion.md as printed, on a copy of the trained folder whose classes are named as there."""
    shutil.copytree(trained[0], tmp_path / "pets-dit")
    index_file = tmp_path / "pets-dit" / "model_index.json"
    index_file.write_text(json.dumps(json.loads(index_file.read_text()) | {"id2label": {"0": "cat", "1": "dog"}}))
    monkeypatch.chdir(tmp_path)
    docs = (Path(EXAMPLES).parent / "docs" / "latent-diffusion.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", docs, flags=re.S)
    assert len(snippets) == 3  # load_dit_pipeline; DiTPipeline after the import; trust_remote_code without it
    namespaces = [{}, {}, {}]
    for snippet, namespace in zip(snippets, namespaces):
        exec(compile(snippet, "docs/latent-diffusion.md", "exec"), namespace)
        assert type(namespace["pipe"]).__name__ == "DiTPipeline" and namespace["pipe"].labels == {"cat": 0, "dog": 1}
    assert type(namespaces[1]["pipe"].vae) is CustomVAE  # the package's class, not the folder's copy
    assert [image.size for image in namespaces[0]["images"]] == [(16, 16), (16, 16)]


def test_push_uploads_the_pipeline_folder_it_wrote(workdir, tmp_path, run_example, monkeypatch):
    """The same --push_to_hub as train_vae.py: the pipeline's subfolders go up; a user's file and checkpoints stay."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("private")
    uploaded = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: SimpleNamespace(repo_id=repo_id))

    def upload_folder(self, repo_id, folder_path, allow_patterns=None, ignore_patterns=None, **kwargs):
        files = [p.relative_to(folder_path).as_posix() for p in Path(folder_path).rglob("*") if p.is_file()]
        uploaded.extend(filter_repo_objects(files, allow_patterns=allow_patterns, ignore_patterns=ignore_patterns))
        return "https://huggingface.co/user/dit/commit/1"

    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    run_example("train_latent_diffusion", flags(workdir, out, "--push_to_hub", "--hub_model_id", "user/dit"))
    expected = {"model_index.json", "README.md", "samples.png", "metrics.json", "training_config.json"}
    expected |= {
        "transformer/config.json",
        "vae/config.json",
        "vae/modeling_custom_vae.py",
        "scheduler/scheduler_config.json",
    }
    assert expected <= set(uploaded) and "notes.txt" not in uploaded
    assert not any(name.startswith(("checkpoint-", "logs")) for name in uploaded)


# ------------------------------------------------------------------------------------------------------- refusals


def test_bad_input_is_one_line_and_writes_nothing(workdir, tmp_path, run_example, capsys):
    (tmp_path / "wrong.json").write_text(json.dumps({**TINY_DIT, "in_channels": 3}))
    (tmp_path / "empty").mkdir()
    cases = [
        (["--vae", str(tmp_path / "empty")], ["empty", "config.json"]),
        (["--model_config", str(tmp_path / "wrong.json")], ["in_channels 3", "in_channels 4"]),
        (["--resolution", "15"], ["resolution 15", "multiple"]),
        (["--model_config", "XL/9"], ["XL/9", "tiny"]),
        (["--class_dropout_prob", "1.5"], ["--class_dropout_prob"]),
    ]
    for extra, nouns in cases:
        error = error_of(run_example, capsys, "train_latent_diffusion", flags(workdir, tmp_path / "out", *extra))
        assert all(noun in error for noun in nouns), error
        assert not (tmp_path / "out").exists()


def test_a_vae_checkpoint_is_not_resumed_as_latent_diffusion(workdir, tmp_path, run_example, capsys):
    run_example(
        "train_vae",
        ["--train_data_dir", str(workdir / "images"), "--resolution", "16", "--max_train_steps", "1"]
        + [
            "--model_config",
            str(workdir / "vae" / "config.json"),
            "--report_to",
            "none",
            "--output_dir",
            str(tmp_path / "out"),
        ],
    )
    resume = ["--resume_from_checkpoint", "latest"]
    error = error_of(run_example, capsys, "train_latent_diffusion", flags(workdir, tmp_path / "out", *resume))
    assert "is a VAE training run" in error and "train_vae.py" in error


def test_without_arguments_it_asks_for_the_first_main_job(tmp_path, run_example, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    error = error_of(run_example, capsys, "train_latent_diffusion", [])
    assert "outputs/custom-vae" in error and "examples/train_vae.py" in error


# ---------------------------------------------------------------------------------------------------- quality (slow)


def colour_classes(root: Path, count: int = 48, size: int = 64) -> Path:
    """Two visually distinct classes of `size` px images: "warm" (reds and oranges) and "cool" (blues and greens),
    each a random two-colour gradient with a disc of a third colour of its class."""
    rng = np.random.default_rng(0)
    palettes = {
        "warm": [(230, 60, 30), (250, 160, 40), (190, 30, 60)],
        "cool": [(30, 90, 220), (30, 180, 150), (70, 40, 190)],
    }
    ramp = np.linspace(0, 1, size)[None, :, None]
    yy, xx = np.mgrid[:size, :size]
    for name, palette in palettes.items():
        (root / name).mkdir(parents=True)
        for index in range(count):
            a, b, c = (np.array(palette[i]) + rng.normal(0, 15, 3) for i in rng.permutation(3))
            pixels = (1 - ramp) * a + ramp * b + np.zeros((size, 1, 1))
            cy, cx, r = rng.uniform(16, 48, 2).tolist() + [rng.uniform(8, 18)]
            pixels[(yy - cy) ** 2 + (xx - cx) ** 2 < r**2] = c
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name / f"{index}.png")
    return root


@pytest.mark.slow
def test_samples_follow_their_class(tmp_path):
    """Issue 16, item 9: 1,500 steps at batch 32, learning rate 3e-4, the tiny DiT, 64 px images of two visually
    distinct classes; samples (guidance 4, 25 DDIM steps) are nearest their own class's mean colour."""
    data = colour_classes(tmp_path / "images")
    vae_flags = ["--train_data_dir", str(data), "--max_train_steps", "250", "--report_to", "none", "--random_flip"]
    run = lambda script, argv: subprocess.run(  # noqa: E731
        [sys.executable, os.path.join(EXAMPLES, script), *argv], check=True, timeout=1800
    )
    run("train_vae.py", [*vae_flags, "--output_dir", str(tmp_path / "vae")])
    run(
        "train_latent_diffusion.py",
        [*vae_flags[:2], "--vae", str(tmp_path / "vae"), "--output_dir", str(tmp_path / "dit"), "--report_to", "none"]
        + "--resolution 64 --max_train_steps 1500 --train_batch_size 32 --learning_rate 3e-4".split()
        + "--model_config tiny --guidance_scale 4 --num_inference_steps 25".split(),
    )
    pipe = load_dit_pipeline(tmp_path / "dit")
    class_means = {
        name: np.mean([np.asarray(Image.open(p), float).mean((0, 1)) for p in (data / name).glob("*.png")], 0)
        for name in ("cool", "warm")
    }
    hits = 0
    for name in ("cool", "warm"):
        images = pipe(
            pipe.get_label_ids([name]) * 12,
            guidance_scale=4.0,
            num_inference_steps=25,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images
        for image in images * 255:
            colour = image.mean((0, 1))
            nearest = min(class_means, key=lambda other: np.linalg.norm(colour - class_means[other]))
            hits += nearest == name
    image_grid_path = tmp_path / "dit" / "samples.png"
    assert image_grid_path.is_file()
    assert hits >= 20, f"{hits} of 24 samples are nearest their own class's mean colour"
