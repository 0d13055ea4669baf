"""Stage I: masked image modelling against a frozen DINOv3 teacher (paper §3.2, Eq. 1).

Each image of a pack gets 75% of its patches replaced by a learned mask token; the encoder's
output at the masked positions goes through the MIM head (a linear map to the teacher's width)
and regresses the teacher's features of the *unmasked* image:
``L = Σ_{i∈M} ‖Φ(x)_i − T(x)_i‖² / |M|`` (``losses.mim_loss``): Eq. 1's sum over the masked
patches, divided by their count over the global batch (nearly constant at a fixed mask ratio, so
it only rescales the learning rate), on the raw teacher features by default as Eq. 1 has them;
``normalize_target: true`` standardises each teacher token first — our option, not the paper's.

Placement. The mask token and patch embedding live on the first pipeline stage, the MIM head on
the last; the teacher runs only on the last stage (it needs the decoded images, the first stage
needs the patches, middle stages only the layout). The teacher is a transformers DINOv3 model
loaded from ``stage_config.teacher_dir`` (never downloaded); it is not part of the megatron
model, so DDP, the optimiser and checkpoints never see it. Under CP the loss is computed on the
gathered pack on every CP rank and scaled by ``1/cp`` (``EncoderInput.gather_output``).

Logged: ``loss`` (per masked token, summed over the teacher's features), ``masked_tokens`` per
pack, and the trainer's throughput (images/s, tokens/s, TFLOP/s, MFU).

Evaluation (``eval_data_dir``): the same loss on a held-out split with fixed masks (seed 0), and
the mean cosine similarity between prediction and target at the masked patches — the fraction of
the teacher's feature direction the student recovers, comparable across target normalisations
and feature widths (0 for a random head, 1 when the prediction is exact up to scale).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from megatron.core.transformer.module import MegatronModule

from megatron_finevit.config.loader import ConfigError, parse_config
from megatron_finevit.config.train import TrainConfig
from megatron_finevit.training.preflight import InputPath
from megatron_finevit.training.stages.vision import DataSection, VisionStage, shard_paths


@dataclass
class MIMStageConfig:
    vit: str = "tiny_vit"                 # preset of config/vit.py
    vit_overrides: dict = field(default_factory=dict)
    teacher_dir: str = ""                 # local transformers DINOv3 checkpoint directory
    teacher_cache_dir: str | None = None  # zarr feature cache (TeacherFeatureCache), optional
    mask_ratio: float = 0.75
    normalize_target: bool = False        # Eq. 1: raw teacher features; true departs from it
    eval_data_dir: str | None = None      # held-out indexed shards for evaluate()
    data: DataSection = field(default_factory=DataSection)

    def input_paths(self) -> list[InputPath]:
        """What the stage reads, for ``training.preflight`` (unset paths are config problems)."""
        teacher = [InputPath("stage_config.teacher_dir", self.teacher_dir, "hf_model")]
        return shard_paths(self.data, self.eval_data_dir) + (teacher if self.teacher_dir else [])


def teacher_feature_dim(teacher_dir: str) -> int:
    config = Path(teacher_dir) / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"stage_config.teacher_dir={teacher_dir} has no config.json: give "
                                "a local DINOv3 checkpoint (tools/make_tiny_teacher.py makes a "
                                "tiny random one for tests)")
    return int(json.loads(config.read_text())["hidden_size"])


class MIMModel(MegatronModule):
    """FineViT with the mask token (first stage) and the MIM head (last stage).

    ``forward(inp: EncoderInput, masked bool [t])`` -> on the last stage the predictions for the
    real tokens of the whole pack ``[N, teacher_dim]``; elsewhere the encoder's hidden states."""

    def __init__(self, vit, config, teacher_dim: int, pre_process: bool, post_process: bool):
        super().__init__(config=config)
        from megatron_finevit.models.heads import MIMHead
        from megatron_finevit.models.vit import FineViTModel

        self.encoder = FineViTModel(vit, config, pre_process, post_process, mask_token=True)
        self.model_type = self.encoder.model_type
        self.share_embeddings_and_output_weights = False
        self.pre_process, self.post_process = pre_process, post_process
        if post_process:
            self.head = MIMHead(config, teacher_dim)

    def set_input_tensor(self, input_tensor) -> None:
        self.encoder.set_input_tensor(input_tensor)

    def forward(self, inp, masked):
        from megatron.core import parallel_state

        hidden = self.encoder(**inp.model_inputs(), masked=masked)
        if not self.post_process:
            return hidden
        return self.head(inp.gather_output(hidden, parallel_state.get_context_parallel_group()))


class MIMStage(VisionStage):
    name = "mim"
    config_class = MIMStageConfig

    def __init__(self, run: TrainConfig):
        """Parse and check ``stage_config``: raises ``ConfigError`` listing every problem.
        Reads no file (``input_paths`` names them for ``training.preflight``)."""
        problems: list[str] = []
        cfg = parse_config(MIMStageConfig, run.stage_config, "stage_config.", problems)
        if not 0.0 < cfg.mask_ratio < 1.0:
            problems.append(f"stage_config.mask_ratio={cfg.mask_ratio} must be in (0, 1)")
        if not cfg.teacher_dir:
            problems.append("stage_config.teacher_dir must name a local DINOv3 checkpoint "
                            "directory (tools/make_tiny_teacher.py makes a tiny random one)")
        super().__init__(run, cfg, problems)
        if problems:
            raise ConfigError(problems)
        self.teacher = None
        self.cache = None

    @functools.cached_property
    def teacher_dim(self) -> int:
        """The teacher's feature width (read from its config.json when the model is built)."""
        return teacher_feature_dim(self.cfg.teacher_dir)

    def build_model(self, pre_process: bool, post_process: bool):
        if post_process:
            self._load_teacher()
        return MIMModel(self.vit, self.transformer_config(), self.teacher_dim, pre_process,
                        post_process)

    def _load_teacher(self) -> None:
        from megatron_finevit.models.teacher import DINOv3Teacher, TeacherFeatureCache

        device = torch.cuda.current_device() if torch.cuda.is_available() else None
        self.teacher = DINOv3Teacher.from_pretrained(self.cfg.teacher_dir, device=device)
        if self.cfg.teacher_cache_dir:
            self.cache = TeacherFeatureCache(self.cfg.teacher_cache_dir,
                                             self.teacher.cache_signature())

    def build_data(self, dp_rank: int, dp_size: int):
        from megatron.core import parallel_state as ps

        # Pixels: the first stage embeds them, the last feeds them to the teacher.
        need_pixels = ps.is_pipeline_first_stage() or ps.is_pipeline_last_stage()
        self.loader = self.make_loader(self.cfg.data.dir, dp_rank, dp_size, need_pixels,
                                       mask_ratio=self.cfg.mask_ratio, fill=True)
        return self.loader

    def teacher_targets(self, batch) -> torch.Tensor:
        """``[N, teacher_dim]`` teacher features of the pack's real tokens, in pack order."""
        if self.cache is not None:
            features = self.teacher.cached_features(batch.images, batch.keys, self.cache)
        else:
            features = self.teacher.features(batch.images)
        return torch.cat(features)

    def _predict(self, batch, model):
        """(model output for the pack — predictions ``[N, teacher_dim]`` on the last stage —,
        teacher targets ``[N, teacher_dim]`` or None off the last stage, mask ``[N]``, layout)."""
        inp = self.encoder_input(batch)
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        inp.patches = inp.patches.to(device)
        masked = inp.to_local(batch.mim_mask, fill=False).to(device)
        output = model(inp, masked)
        targets = self.teacher_targets(batch) if self.teacher is not None else None
        return output, targets, batch.mim_mask.to(device), inp

    def forward_step(self, batch, model):
        from megatron_finevit.losses import mim_loss

        output, targets, mask, inp = self._predict(batch, model)

        def loss_fn(predictions):
            out = mim_loss(predictions, targets.to(predictions.device), mask,
                           normalize_target=self.cfg.normalize_target)
            loss = out.loss / out.num_masked.clamp(min=1) * inp.cp_loss_scale
            return loss, {"loss": out.mean_per_token.detach().clone(),
                          "masked_tokens": out.num_masked.float()}

        return output, loss_fn

    def work(self, batch) -> tuple[float, float, float]:
        return float(batch.num_images), float(sum(batch.image_tokens)), self.vit_flops(batch)

    def optimizer_overrides(self) -> dict:
        from megatron_finevit.training.optim import named_overrides

        return named_overrides(self.run, {})  # the ViT and MIM head: one policy, no named groups

    def evaluate(self, model_chunks: list) -> dict[str, float]:
        """``{"mim_loss", "mim_cosine", "masked_tokens", "num_images"}`` over ``eval_data_dir`` on
        the last pipeline stage (every data-parallel rank's share summed); {} elsewhere."""
        if not self.cfg.eval_data_dir:
            return {}
        import torch.distributed as dist
        import torch.nn.functional as F
        from megatron.core import parallel_state as ps

        from megatron_finevit.losses import mim_loss
        from megatron_finevit.losses.mim import normalize_teacher_features
        from megatron_finevit.training.stages.vision import forward_over_split

        def forward(batch, model):
            output, targets, mask, _ = self._predict(batch, model)

            def collect(predictions):
                target = targets.to(predictions.device)
                out = mim_loss(predictions, target, mask, normalize_target=self.cfg.normalize_target)
                if self.cfg.normalize_target:
                    target = normalize_teacher_features(target)
                cosine = F.cosine_similarity(predictions[mask].float(), target[mask].float(), dim=-1)
                return torch.stack([out.loss.detach().double(), cosine.sum().double(),
                                    out.num_masked.double(),
                                    torch.tensor(float(batch.num_images), dtype=torch.float64,
                                                 device=predictions.device)])

            return output, collect

        kept = forward_over_split(self, model_chunks, self.cfg.eval_data_dir, forward,
                                  mask_ratio=self.cfg.mask_ratio, pixels_on_last_stage=True)
        if kept is None:
            return {}
        totals = torch.stack(kept).sum(0)  # on the compute device: NCCL reduces CUDA tensors
        if ps.get_data_parallel_world_size() > 1:
            dist.all_reduce(totals, group=ps.get_data_parallel_group())
        loss, cosine, masked, images = totals.tolist()
        return {"mim_loss": loss / max(masked, 1.0), "mim_cosine": cosine / max(masked, 1.0),
                "masked_tokens": masked, "num_images": images}
