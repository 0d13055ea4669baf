"""Supervised fine-tuning of FineViT-VL on instruction conversations (paper Appendix B.1, B.2).

The model, its parallel layouts, the per-module freezing and learning-rate policies, the step
and its logs are Stage III's (``AlignStage``): only the data and the evaluation differ. Data:
conversations with 0..n images (``tools/import_conversations.py`` → shards + index), packed whole
into fixed LLM / ViT budgets by ``data.tasks.conversation_loader`` (multi-image, text-only and
reasoning samples side by side; loss on every assistant turn; a conversation longer than a pack
is skipped and counted, never truncated). Logged per kind: ``loss_text``, ``loss_image``,
``loss_multi_image``, ``loss_reasoning``.

Phases (B.1; both at lr 1e-5, everything trained): ``phase: 1`` packs 4,096 tokens, ``phase: 2``
10,240 — the default of ``data.llm_tokens`` (set it to override). Phase II of an 8B LLM needs
context parallelism (``examples/sft_phase2_8b.yaml``).

Where the weights start — one of, checked at start-up:

* ``checkpoint.load_dir``: a Stage III run (the whole FineViT-VL, weights only) — the paper's path;
* ``stage_config.vit_init_dir`` + ``llm_init_dir``: a Stage II encoder and a converted Qwen3 with a
  fresh projector — the MLLM ablations of B.2 (projector warm-up, ViT + projector, full, frozen
  ViT), which differ only in their module policies and learning rates (``examples/sft_ablation_*``);
* ``allow_random_init: true``: random weights (tests and smoke runs only).

A resume (``checkpoint.dir`` holding a checkpoint) sets every weight and ignores these.

Evaluation (``stage_config.eval_data_dir``): VQA accuracy against a majority-answer baseline on
held-out conversations (``training.stages.sft_eval``; ``python -m megatron_finevit.evaluate
--task vqa``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_finevit.data.resize import DEFAULT_MIN_PIXELS, STAGE_MAX_PIXELS
from megatron_finevit.training.stages.align import AlignStage, VLStageConfig

PHASE_LLM_TOKENS = {1: 4096, 2: 10240}  # paper Appendix B.1: max sequence per phase


@dataclass
class SFTDataSection:
    """Conversation packs (``data.tasks.conversation_loader.ConversationConfig``)."""

    dir: str = ""                  # conversation shards with index.zarr
    llm_tokens: int = 0            # LLM tokens per pack; 0: the phase's (4,096 / 10,240)
    vit_tokens: int = 16384        # ViT patches per pack
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = STAGE_MAX_PIXELS["align"]  # as Stage III: within 1000×1000
    buffer_size: int = 512
    min_fill: float = 0.9
    use_draft: bool = False
    decoder: str = "auto"          # as Stage III's (auto: DALI where it imports, else PIL)
    num_workers: int = 0           # as Stage III's (PIL decode processes; DALI's threads)
    # Mean LLM tokens per conversation, for `--dry-run` where data.dir has no index (with one,
    # the measured sizes are used); 0: estimate from the budgets alone.
    mean_llm_tokens_per_sample: float = 0.0


@dataclass
class SFTStageConfig(VLStageConfig):
    phase: int = 1                 # paper B.1 phase: 1 (4,096-token packs) or 2 (10,240)
    allow_random_init: bool = False  # start from random weights (tests, smoke runs)
    eval_max_samples: int = 64     # held-out conversations per evaluation
    data: SFTDataSection = field(default_factory=SFTDataSection)


class SFTStage(AlignStage):
    name = "sft"
    config_class = SFTStageConfig

    def _check_model(self, cfg, problems: list[str]) -> None:
        if cfg.phase not in PHASE_LLM_TOKENS:
            problems.append(f"stage_config.phase={cfg.phase} must be 1 or 2 (paper B.1)")
        elif not cfg.data.llm_tokens:
            cfg.data.llm_tokens = PHASE_LLM_TOKENS[cfg.phase]
        super()._check_model(cfg, problems)

    def _check_data(self, cfg, problems: list[str]) -> None:
        """Where the weights start (module docstring) and the data's numbers."""
        ck = self.run.checkpoint
        sources = [bool(ck.load_dir), bool(cfg.vit_init_dir and cfg.llm_init_dir),
                   cfg.allow_random_init]
        if sum(sources) != 1 and not (ck.dir and ck.resume and _has_checkpoint(ck.dir)):
            problems.append(
                "SFT starts from trained weights: set exactly one of checkpoint.load_dir (a "
                "Stage III run), stage_config.vit_init_dir + stage_config.llm_init_dir (the B.2 "
                "ablations) or stage_config.allow_random_init: true (tests)")
        d = cfg.data
        if d.vit_tokens < 1 or d.llm_tokens < 0 or d.buffer_size < 1:
            problems.append("stage_config.data.vit_tokens, llm_tokens and buffer_size must be "
                            "positive")
        if not 0.0 <= d.min_fill <= 1.0:
            problems.append(f"stage_config.data.min_fill={d.min_fill} must be in [0, 1]")

    @property
    def data_config(self):
        """The loader's ``ConversationConfig``."""
        from megatron_finevit.data.resize import ResizePolicy
        from megatron_finevit.data.tasks.conversation_loader import ConversationConfig

        d = self.cfg.data
        return ConversationConfig(
            llm_tokens=d.llm_tokens, vit_tokens=d.vit_tokens,
            policy=ResizePolicy(min_pixels=d.min_pixels, max_pixels=d.max_pixels),
            seed=self.run.seed, buffer_size=d.buffer_size, min_fill=d.min_fill,
            segment_multiple=self._segment_multiple())

    def _loader(self, data_dir: str, dp_rank: int, dp_size: int):
        from megatron_finevit.data.tasks.conversation_loader import ConversationLoader

        d = self.cfg.data
        return ConversationLoader(data_dir, self.data_config, self.template.tokenizer,
                                  dp_rank=dp_rank, dp_size=dp_size, use_draft=d.use_draft,
                                  norm=self.norm, decoder=d.decoder, num_workers=d.num_workers)

    def _mean_tokens_without_index(self) -> tuple[float, str]:
        """A lower bound of the conversations per pack: one per pack."""
        return float(self.cfg.data.llm_tokens), "llm_tokens"

    def _phase_details(self) -> dict:
        return {"phase": self.cfg.phase, "llm_tokens": self.cfg.data.llm_tokens}

    def evaluate(self, model_chunks: list) -> dict[str, float]:
        if not self.cfg.eval_data_dir:
            return {}
        from megatron_finevit.training.stages.sft_eval import evaluate_vqa

        return evaluate_vqa(self, model_chunks, self.cfg.eval_data_dir,
                            max_samples=self.cfg.eval_max_samples)


def _has_checkpoint(directory: str) -> bool:
    from megatron_finevit.training.checkpointing import latest_checkpoint

    return bool(latest_checkpoint(directory))
