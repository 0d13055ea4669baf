"""A run config (``examples/stageN.yaml``) -> its ``Workload``: the stage object parses
``stage_config`` and estimates samples per pack per phase exactly as ``--dry-run`` does
(``Stage.microbatch_phases``); phases are cut again where Stage II's text tower unfreezes."""

from __future__ import annotations

import json
from pathlib import Path

from megatron_finevit.planning import flops
from megatron_finevit.planning.workload import PhaseSpec, Workload, contrastive_workload, \
    mim_workload, vlm_workload


def teacher_shape(teacher_dir: str) -> flops.EncoderShape:
    """The DINOv3 teacher's shapes from its ``config.json`` when the directory is here, else
    DINOv3 ViT-L/16 (the teacher ``examples/stage1_mim.yaml`` names)."""
    path = Path(teacher_dir or "") / "config.json"
    if not teacher_dir or not path.is_file():
        return flops.DINOV3_VITL16
    c = json.loads(path.read_text())
    return flops.EncoderShape(
        num_layers=c["num_hidden_layers"], hidden_size=c["hidden_size"],
        ffn_hidden_size=c["intermediate_size"], patch_dim=3 * c["patch_size"] ** 2,
        extra_tokens=1 + c.get("num_register_tokens", 0), gated=c.get("use_gated_mlp", False))


def _spans(starts: list[int], train_steps: int) -> list[tuple[int, int]]:
    ends = starts[1:] + [train_steps]
    return [(s, min(e, train_steps)) for s, e in zip(starts, ends) if s < train_steps]


def workload_from_config(cfg) -> Workload:
    """``cfg``: a validated ``TrainConfig`` of stage mim, contrastive, align or sft."""
    from megatron_finevit.training.stage import get_stage

    stage = get_stage(cfg.stage)(cfg)
    if cfg.stage not in ("mim", "contrastive", "align", "sft"):
        raise ValueError(f"the planner knows stages mim, contrastive, align and sft, not "
                         f"{cfg.stage!r}")
    phases = stage.microbatch_phases()
    starts = sorted({p.start_step for p in phases}
                    | ({stage.cfg.unfreeze_text_at} if cfg.stage == "contrastive"
                       and stage.cfg.unfreeze_text_at else set()))
    specs = []
    for start, end in _spans(starts, cfg.train_steps):
        phase = [p for p in phases if p.start_step <= start][-1]
        # with samples_per_step the packs per step follow the phase (training.batch_schedule;
        # here before the rounding to a multiple of DP, which depends on the layout)
        per_step = (cfg.samples_per_step / phase.samples if cfg.samples_per_step
                    else cfg.global_batch_at(start))
        micro_batches = round(per_step * (end - start))
        d = phase.details
        mean = d.get("mean_tokens_per_sample", d.get("mean_llm_tokens_per_sample"))
        pack = getattr(stage.cfg.data, "pack_tokens", None) or stage.cfg.data.llm_tokens
        specs.append(PhaseSpec(
            samples=phase.samples * micro_batches, micro_batches=micro_batches, pack_tokens=pack,
            mean_tokens=mean, context=d.get("context_length", 0),
            text_trainable=(cfg.stage != "contrastive" or stage.text_trainable_at(start)),
            details={"phase_start_step": start, "phase_steps": end - start, **d}))
    if cfg.stage == "mim":
        return mim_workload(stage.vit, teacher_shape(stage.cfg.teacher_dir), specs)
    if cfg.stage == "contrastive":
        return contrastive_workload(stage.vit, stage.text, specs, stage.cfg.loss_scope)
    trainable = tuple(stage.trainable_at(m, 0) for m in ("vit", "projector", "llm"))
    return vlm_workload(cfg.stage, stage.vl, specs, trainable)
