"""The README's promises: its Quick start is what CI runs, and its code, and docs/'s, runs as printed."""

import re
from pathlib import Path
from types import SimpleNamespace

import torch
from huggingface_hub import HfApi

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()
DOCS = {path.name: path.read_text() for path in sorted((REPO / "docs").glob("*.md"))}


def code_blocks(language: str, after_heading: str, text: str = README) -> list[str]:
    section = text.split(after_heading, 1)[1]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


def test_quick_start_has_two_commands_and_ci_runs_the_test_command_verbatim():
    commands = [line for line in code_blocks("bash", "## Quick start")[0].splitlines() if line.strip()]
    assert len(commands) == 2
    assert "examples/train_vae.py" in commands[0] and "pytest" in commands[1]
    ci_lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert commands[1] in ci_lines


def test_the_model_snippet_runs(tmp_path, monkeypatch):
    """`## The model` as printed, offline: the upload is intercepted at huggingface_hub's API."""
    uploaded = []
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: SimpleNamespace(repo_id=repo_id))
    monkeypatch.setattr(HfApi, "file_exists", lambda self, *args, **kw: False)
    monkeypatch.setattr(
        HfApi, "upload_folder", lambda self, folder_path, **kw: uploaded.append(sorted(Path(folder_path).iterdir()))
    )
    monkeypatch.chdir(tmp_path)
    snippet = code_blocks("python", "## The model")[0]
    torch.manual_seed(0)
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    for images in (namespace["reconstruction"], namespace["output"].sample):
        assert images.shape == (2, 3, 256, 256) and torch.isfinite(images).all()
    assert (tmp_path / "dog-vae" / "config.json").exists()
    assert [p.name for p in uploaded[0]] == [
        "README.md",
        "config.json",
        "diffusion_pytorch_model.safetensors",
        "modeling_custom_vae.py",
    ]


def test_the_scaling_factor_snippet_runs(tiny_vae, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    snippet = code_blocks("python", "## Scaling factor", DOCS["stable-diffusion.md"])[0]
    namespace = {"vae": tiny_vae, "images": torch.rand(4, 3, 16, 16) * 2 - 1}
    exec(compile(snippet, "docs/stable-diffusion.md", "exec"), namespace)
    assert tiny_vae.config.scaling_factor == namespace["scaling_factor"] != 1.0
    assert (tmp_path / "dog-vae" / "config.json").exists()


def test_every_example_benchmark_and_link_the_readme_and_docs_name_exists():
    for name, text in {"README.md": README, **DOCS}.items():
        folder = REPO if name == "README.md" else REPO / "docs"
        for script in set(re.findall(r"examples/(\w+)\.py", text)):
            assert (REPO / "examples" / f"{script}.py").exists(), (name, script)
        benchmarks = re.findall(r"benchmarks/(\w+)\.py", text) + re.findall(r"python -m benchmarks\.(\w+)", text)
        for module in set(benchmarks):
            assert (REPO / "benchmarks" / f"{module}.py").exists(), (name, module)
        for link in re.findall(r"\]\(([^)#:]+)\)", text):  # relative links: images and other documents
            assert (folder / link).exists(), (name, link)


def test_the_readme_is_short_and_every_doc_is_linked_from_it():
    assert len(README.splitlines()) <= 160
    for name in DOCS:
        assert f"(docs/{name})" in README, name
