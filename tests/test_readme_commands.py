"""The README's commands as a new user runs them (subprocesses, exit codes, stderr):

- ``train``, ``evaluate``, ``tools/convert_checkpoint.py``, ``tools/smoke_parallel.py``,
  ``tools/make_tiny_teacher.py`` and ``tools/build_index.py`` print no third-party warnings,
  deprecations or progress bars of checkpoint loading (``megatron_finevit.logs``);
- ``build_index.py`` on an up-to-date index says "0 new samples", not "0 good samples";
- the README's ``AutoModel`` snippet, as written, runs on a FineViT exported from a checkpoint
  that ``train`` wrote, with the ``mcore-to-hf`` command the README shows.

One chain of commands (a 3-step tiny Stage I run, then the rest) serves every test.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_finevit.data.resize import smart_resize
from megatron_finevit.testing.stage_assets import make_stage_assets

REPO = Path(__file__).resolve().parents[1]
# An independent notion of noise (not the list the helper filters): any Python warning line, any
# WARNING log record, and transformers' per-checkpoint progress bars.
NOISE = re.compile(r"Warning: |\bWARNING\b|\[WARNING\]|Loading weights|Writing model shards")


def _free_port() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MASTER_PORT=_free_port())
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, (args, proc.stderr[-3000:])
    return proc


def readme_python_block(containing: str) -> str:
    """The README's ```python block that contains ``containing``."""
    blocks = re.findall(r"```python\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    (block,) = [b for b in blocks if containing in b]
    return block


@pytest.fixture(scope="module")
def commands(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("readme_commands")
    assets = make_stage_assets(root / "assets")
    ckpt, hf_dir = root / "stage1", root / "out" / "finevit"
    runs = {"train": _run(
        "-m", "megatron_finevit.train", "--config", "examples/stage1_mim_tiny.yaml",
        f"stage_config.data.dir={assets['train']}", f"stage_config.teacher_dir={assets['teacher']}",
        f"stage_config.eval_data_dir={assets['eval']}", f"checkpoint.dir={ckpt}",
        "train_steps=3", "global_batch_size=1", "optim.warmup_steps=0", "eval.at_start=false",
        "eval.at_end=false")}
    (iteration,) = [p for p in ckpt.iterdir() if p.name.startswith("iter_")]
    runs["evaluate"] = _run("-m", "megatron_finevit.evaluate", "--checkpoint", str(ckpt),
                            "--data", assets["eval"], "--task", "mim")
    runs["convert_checkpoint"] = _run(
        "tools/convert_checkpoint.py", "mcore-to-hf", "--model", "finevit", "--preset",
        "tiny_vit", "--megatron-prefix", "encoder.", "--mcore-dir", str(iteration),
        "--hf-dir", str(hf_dir))
    runs["smoke_parallel"] = _run("tools/smoke_parallel.py", "--steps", "20")
    runs["make_tiny_teacher"] = _run("tools/make_tiny_teacher.py", str(root / "teacher"))
    runs["build_index"] = _run("tools/build_index.py", assets["train"])  # already indexed
    snippet = readme_python_block("AutoModel.from_pretrained")
    assert 'MODEL_DIR = "out/finevit"' in snippet
    script = root / "readme_snippet.py"
    script.write_text(snippet.replace('MODEL_DIR = "out/finevit"', f'MODEL_DIR = "{hf_dir}"'))
    runs["readme_snippet"] = _run(str(script))
    return runs


@pytest.mark.parametrize("name", ["train", "evaluate", "convert_checkpoint", "smoke_parallel",
                                  "make_tiny_teacher", "build_index"])
def test_commands_print_no_third_party_noise(commands, name):
    noise = [line for line in commands[name].stderr.splitlines() if NOISE.search(line)]
    assert not noise, "\n".join(noise)


def test_commands_did_their_work(commands):
    assert "smoke_parallel: loss" in commands["smoke_parallel"].stdout
    assert "OK" in commands["smoke_parallel"].stdout
    assert "prediction-target cosine" in commands["evaluate"].stdout
    assert "teacher written to" in commands["make_tiny_teacher"].stdout


def test_build_index_on_an_up_to_date_index_says_0_new_samples(commands):
    stderr = commands["build_index"].stderr
    assert "is up to date: 0 new samples, 128 samples total" in stderr, stderr
    assert "good samples" not in stderr


def test_readme_automodel_snippet_runs_on_an_export(commands):
    """The snippet's printed shapes are the patch counts smart_resize gives its two photos
    (astronaut 512x512, coffee 400x600 at 448² pixels) by the tiny encoder's width."""
    from skimage import data

    from megatron_finevit.config.vit import tiny_vit

    tokens = [(h // 14) * (w // 14) for h, w in (
        smart_resize(*image.shape[:2], max_pixels=448 * 448)
        for image in (data.astronaut(), data.coffee()))]
    hidden = tiny_vit().hidden_size  # the exported preset
    want = (f"features ({sum(tokens)}, {hidden}) per image "
            f"{[(n, hidden) for n in tokens]}")
    assert want in commands["readme_snippet"].stdout, commands["readme_snippet"].stdout
