"""Tiny assets the Stage I / II tests and tools share: synthetic train + eval shards (indexed), a
tiny random DINOv3 teacher and a SentencePiece model trained on the captions, and run configs of
the two stages over them."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

from megatron_finevit.config.train import TrainConfig

ROOT = Path(__file__).resolve().parents[2]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_stage_assets(root: str | Path, num_train: int = 128, num_eval: int = 48) -> dict:
    from megatron_finevit.data.index import build_index
    from megatron_finevit.data.synthetic import make_synthetic_shards

    root = Path(root)
    for split, num, seed in (("train", num_train, 0), ("eval", num_eval, 1)):
        make_synthetic_shards(root / split, num, seed=seed, samples_per_shard=64, progress=False)
        build_index(root / split, progress=False)
    _tool("make_tiny_teacher").make_tiny_teacher(root / "teacher", hidden=32, layers=1, heads=2)
    _tool("train_caption_tokenizer").train_caption_tokenizer(root / "train", root / "tok.model")
    return {k: str(root / v) for k, v in (("train", "train"), ("eval", "eval"),
                                          ("teacher", "teacher"), ("tokenizer", "tok.model"))}


def tiny_run(stage: str, assets: dict, steps: int, global_batch: int = 2, tp: int = 1,
             pp: int = 1, cp: int = 1, sp: bool = False, **stage_config) -> TrainConfig:
    """A tiny fp32 run config of ``stage`` ("mim" or "contrastive") over ``assets`` at the
    parallel layout ``tp`` x ``pp`` x ``cp`` (+ ``sp``), data parallel over the remaining ranks."""
    cfg = TrainConfig(stage=stage, train_steps=steps, global_batch_size=global_batch,
                      precision="fp32")
    p = cfg.parallel
    p.tensor_parallel, p.pipeline_parallel, p.context_parallel, p.sequence_parallel = tp, pp, cp, sp
    cfg.optim.lr, cfg.optim.eps, cfg.optim.warmup_steps = 3e-3, 1e-8, 0
    cfg.eval.at_start = cfg.eval.at_end = False
    cfg.logging.log_interval, cfg.logging.progress_bar = 1000, False
    # decoder pinned to PIL: under "auto" (DALI here) test_stage_mim's DP=2 run took 72 s of
    # wall time instead of 24 s on this 2-core machine (DALI's threads per rank); DALI in the
    # loader has its own tests (tests/data/test_loader_dali.py)
    data = {"dir": assets["train"], "pack_tokens": 128, "max_pixels": 84 * 84,
            "buffer_size": 64, "use_draft": True, "decoder": "pil"}
    common = {"vit": "tiny_vit", "vit_overrides": {"num_layers": 2}, "data": data}
    if stage == "mim":
        common["teacher_dir"] = assets["teacher"]
    else:
        common.update(tokenizer=assets["tokenizer"], context_length=24,
                      text_overrides={"vocab_size": 128, "num_layers": 1})
    cfg.stage_config = {**common, **stage_config}
    return cfg


def assets_and_world(tmp_path_factory, name: str, world, world_size: int = 2):
    """For a module fixture: fresh assets, a checkpoint directory, and ``world(rank, world_size,
    assets, ckpt_dir)`` run on ``world_size`` ranks -> ``(assets, ckpt_dir, per-rank results)``."""
    from megatron_finevit.testing.multirank import run_world

    root = tmp_path_factory.mktemp(name)
    assets = make_stage_assets(root / "assets")
    ckpt = str(root / "ckpt")
    return assets, ckpt, run_world(world, world_size, args=(assets, ckpt))


def run_evaluate_cli(checkpoint: str, data: str, task: str, master_port: int,
                     json_path: str | Path | None = None):
    """``python -m megatron_finevit.evaluate`` on ``checkpoint`` in one process. With
    ``json_path``: asserts success and returns ``(stdout, metrics)``; without: returns the
    completed process (for the error paths)."""
    import json

    env = dict(os.environ, MASTER_PORT=str(master_port), OMP_NUM_THREADS="1")
    extra = ["--json", str(json_path)] if json_path else []
    proc = subprocess.run([sys.executable, "-m", "megatron_finevit.evaluate", "--checkpoint",
                           checkpoint, "--data", data, "--task", task, *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if not json_path:
        return proc
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, json.loads(Path(json_path).read_text())


def make_align_assets(root: str | Path, num_train: int = 64, num_eval: int = 16) -> dict:
    """Stage III assets: synthetic train + eval shards (indexed) and a random tiny HF Qwen3
    (2 layers) converted to megatron (``llm_init``)."""
    from megatron_finevit.convert.pipeline import hf_to_megatron
    from megatron_finevit.data.index import build_index
    from megatron_finevit.data.synthetic import make_synthetic_shards

    root = Path(root)
    for split, num, seed in (("train", num_train, 0), ("eval", num_eval, 1)):
        make_synthetic_shards(root / split, num, seed=seed, samples_per_shard=32, progress=False)
        build_index(root / split, progress=False)
    _tool("make_tiny_qwen3").make_tiny_qwen3(root / "qwen3_hf", num_layers=2)
    hf_to_megatron("qwen3", str(root / "qwen3_hf"), str(root / "llm_init"), progress=False)
    return {k: str(root / k) for k in ("train", "eval", "qwen3_hf", "llm_init")}


def tiny_align_run(assets: dict, steps: int, global_batch: int = 2, tp: int = 1, pp: int = 1,
                   sp: bool = False, **stage_config) -> TrainConfig:
    """A tiny fp32 Stage III run over ``assets`` (``make_align_assets``): a 2-layer tiny FineViT
    and a 2-layer tiny Qwen3, packs of 128 LLM tokens and 256 ViT patches (images up to 112²)."""
    cfg = TrainConfig(stage="align", train_steps=steps, global_batch_size=global_batch,
                      precision="fp32")
    p = cfg.parallel
    p.tensor_parallel, p.pipeline_parallel, p.sequence_parallel = tp, pp, sp
    cfg.optim.lr, cfg.optim.eps, cfg.optim.warmup_steps = 1e-3, 1e-8, 0
    cfg.eval.at_start = cfg.eval.at_end = False
    cfg.logging.log_interval, cfg.logging.progress_bar = 1000, False
    data = {"dir": assets["train"], "llm_tokens": 128, "vit_tokens": 256, "max_text_tokens": 64,
            "max_turns": 2, "max_pixels": 112 * 112, "buffer_size": 32, "use_draft": True,
            "decoder": "pil"}  # as tiny_run: the layout tests' reference loaders decode with PIL
    cfg.stage_config = {"vit": "tiny_vit", "vit_overrides": {"num_layers": 2},
                        "llm": "tiny_qwen3", "llm_overrides": {"num_layers": 2},
                        "data": data, **stage_config}
    return cfg


def tiny_sft_run(assets: dict, steps: int, global_batch: int = 2, tp: int = 1, pp: int = 1,
                 sp: bool = False, **stage_config) -> TrainConfig:
    """A tiny fp32 SFT run (the models of ``tiny_align_run``) over ``assets["sft"]``
    (``testing.conversations.make_conversation_shards``): packs of 256 LLM tokens and 256 ViT
    patches, images up to 112²."""
    cfg = tiny_align_run(assets, steps, global_batch, tp, pp, sp)
    cfg.stage = "sft"
    data = {"dir": assets["sft"], "llm_tokens": 256, "vit_tokens": 256,
            "max_pixels": 112 * 112, "buffer_size": 32, "use_draft": True, "decoder": "pil"}
    cfg.stage_config = {**{k: v for k, v in cfg.stage_config.items() if k != "data"},
                        "data": data, **stage_config}
    return cfg



def train_tiny_sft_and_evaluate(rank: int, world_size: int, assets: dict, ckpt_dir: str,
                                steps: int = 2, results_json: str | None = None) -> dict:
    """A ``run_world`` rank: ``steps`` SFT steps from random weights on ``assets["sft"]``, saved
    to ``ckpt_dir``, then the trainer's own evaluation (``eval_data_dir=assets["eval"]``) of the
    saved weights at the end of the run (``eval.at_end``, recorded in ``results_json``). Lives
    here, not in a test module, so spawned ranks import no test files."""
    from megatron_finevit.training.trainer import Trainer

    cfg = tiny_sft_run(assets, steps, allow_random_init=True, eval_data_dir=assets["eval"],
                       eval_max_new_tokens=4)
    cfg.checkpoint.dir = ckpt_dir
    cfg.eval.at_start, cfg.eval.at_end, cfg.eval.results_json = False, True, results_json
    return Trainer(cfg).train()["evaluations"]["end"]


class Interleaved:
    """One rank's iterator over the packs of several DP ranks' loaders, in turn."""

    def __init__(self, loaders):
        self.loaders, self.turn = loaders, 0

    def __iter__(self):
        return self

    def __next__(self):
        loader = self.loaders[self.turn % len(self.loaders)]
        self.turn += 1
        return next(loader)
