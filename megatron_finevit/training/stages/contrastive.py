"""Stage II: SigLIP contrastive learning of FineViT with a text tower (paper §3.2, Eq. 2).

Images: FineViT -> MAP pooling head -> projection to the text embedding width, L2-normalised.
Captions: the SigLIP2 text tower (``models.text_tower``), L2-normalised. Loss: ``SigLIPLoss``
with learnable temperature and bias, computed ring-wise over the data-parallel group (the global
batch's pairs, never its ``B × B`` logits at once). The loss's ``t`` and ``b`` are parameters of
the model, so DDP, the optimiser and checkpoints handle them like any weight.

Schedules (all functions of the step, so a resumed run applies the same ones):

* **text tower frozen, then unfrozen** at ``unfreeze_text_at``: its parameters stay in DDP and
  the optimiser in their own group (``optimizer_overrides``); while frozen the tower runs under
  ``no_grad`` (no gradient reaches it, its grad buffer stays zero) and that group's learning rate
  is set to 0 before every step (so weight decay and Adam's moments cannot move it either);
* **resolution** ``data.max_pixels_schedule`` (336² -> 448²): the loader switches its resize
  policy at the step boundary, the pack size stays fixed;
* **text context** ``context_schedule`` (64 -> 256): the position table is allocated at the
  longest context from the start; rows are padded to the current context, and at the switch the
  trained rows are stretched in place over the longer context (``stretch_position_embeddings``),
  then the optimiser's main copy is refreshed — parameters are never replaced, so DDP buffers and
  optimiser state stay valid.

Loss scope (``loss_scope``): with ``micro_batch`` each micro-batch's forward computes its own
SigLIP loss over the pairs of that micro-batch index on every DP rank, so a step of ``M``
micro-batches sees ``M`` separate sets of negatives. With ``step`` (the gradient cache, Gao et
al. 2021) one loss spans every pair of the step: ``prepare_step`` embeds the step's micro-batches
without autograd, runs the ring loss over all of them and keeps the gradients w.r.t. the
embeddings (``logit_scale`` / ``logit_bias`` get theirs there); the schedule then re-runs each
micro-batch with autograd and backpropagates ``(emb · cached grad).sum()``. Activation memory
stays one micro-batch's; the towers run forward twice. Not under pipeline parallelism (the
no-autograd pass would need its own pipeline schedule).

Pipeline parallelism: the text tower, MAP head and loss live on the **last** pipeline stage next
to the encoder's final layers (the tower is small next to the ViT and its embeddings are needed
only by the loss); the first stage embeds patches, middle stages pass hidden states. Captions are
tokenised on the last stage only.

Evaluation (``eval_data_dir``): image -> text and text -> image recall@1/5/10 over a held-out
split, and zero-shot classification of the images holding a single shape into the synthetic
"colour shape" classes. Logged: ``loss``, ``logit_scale`` (t), ``logit_bias`` (b), throughput.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megatron_finevit.config.loader import ConfigError, parse_config
from megatron_finevit.config.presets import preset_config
from megatron_finevit.config.train import TrainConfig
from megatron_finevit.planning.flops import transformer_flops
from megatron_finevit.training.dry_run import MicrobatchPhase
from megatron_finevit.training.preflight import InputPath
from megatron_finevit.training.stages.vision import (
    DataSection,
    VisionStage,
    schedule_problems,
    shard_paths,
)


@dataclass
class ContrastiveStageConfig:
    vit: str = "tiny_vit"
    vit_overrides: dict = field(default_factory=dict)
    text: str = "tiny_text"                   # preset of config/text.py
    text_overrides: dict = field(default_factory=dict)
    text_init_dir: str | None = None          # converted SigLIP2 text weights (hf-to-mcore)
    tokenizer: str = ""                       # SentencePiece .model file
    lowercase: bool = False
    context_length: int = 64                  # text tokens per caption at step 0
    context_schedule: list = field(default_factory=list)  # [[step, length], ...] (64 -> 256)
    unfreeze_text_at: int | None = 0          # step the text tower starts training (None: never)
    # SigLIP's initial log-temperature / bias (log 10, −10: made for batches of thousands; a
    # tiny batch needs a bias near 0, else negatives exert no force at the start and the
    # embeddings collapse onto one direction)
    init_logit_scale: float = 2.302585092994046
    init_logit_bias: float = -10.0
    eval_data_dir: str | None = None          # held-out indexed shards for evaluate()
    # What one SigLIP loss spans: "micro_batch" (each pack's pairs against the packs of the same
    # micro-batch index on the other DP ranks) or "step" (every pair of the optimiser step:
    # all micro-batches of all DP ranks, by the gradient cache; DP/TP/CP only, no PP)
    loss_scope: str = "micro_batch"
    data: DataSection = field(default_factory=DataSection)

    def input_paths(self) -> list[InputPath]:
        """What the stage reads, for ``training.preflight`` (unset paths are config problems)."""
        return shard_paths(self.data, self.eval_data_dir) + [
            InputPath(key, path, kind) for key, path, kind in (
                ("stage_config.tokenizer", self.tokenizer, "file"),
                ("stage_config.text_init_dir", self.text_init_dir, "checkpoint")) if path]


TEXT_TOWER_GROUP = "text_tower"  # the optimiser groups of the text tower (optim.GROUP_NAME)


def _current(schedule: list[tuple[int, int]], step: int) -> int:
    return [value for start, value in schedule if start <= step][-1]


class ContrastiveModel(MegatronModule):
    """FineViT (+ MAP head, text tower and SigLIP loss on the last pipeline stage).

    ``forward(inp, text_ids [b, s])`` -> the loss of this rank (last stage) or hidden states;
    with ``embeddings=True`` -> ``{"image": [n, d], "text": [n, d]}`` unit vectors."""

    def __init__(self, vit, config, text, text_config, pre_process: bool, post_process: bool,
                 init_logit_scale: float, init_logit_bias: float):
        super().__init__(config=config)
        from megatron_finevit.losses import SigLIPLoss
        from megatron_finevit.models.heads import MAPHead
        from megatron_finevit.models.text_tower import build_text_tower
        from megatron_finevit.models.vit import FineViTModel

        self.encoder = FineViTModel(vit, config, pre_process, post_process)
        self.model_type = self.encoder.model_type
        self.share_embeddings_and_output_weights = False
        self.pre_process, self.post_process = pre_process, post_process
        self.text_trainable = True
        if post_process:
            self.map_head = MAPHead(config, text.projection_size)
            self.text_tower = build_text_tower(text, text_config)
            self.siglip = SigLIPLoss(init_logit_scale, init_logit_bias)

    def set_input_tensor(self, input_tensor) -> None:
        self.encoder.set_input_tensor(input_tensor)

    def set_text_trainable(self, trainable: bool) -> None:
        # Parameters keep requires_grad: megatron DDP's gradient hooks sit on their autograd
        # accumulators, which toggling requires_grad can replace (the tower would then never
        # train again). The frozen tower runs under no_grad instead, so no gradient reaches it.
        self.text_trainable = trainable

    def forward(self, inp, text_ids=None, embeddings: bool = False):
        from megatron.core import parallel_state as ps

        hidden = self.encoder(**inp.model_inputs())
        if not self.post_process:
            return hidden
        real = inp.gather_output(hidden, ps.get_context_parallel_group())
        image = F.normalize(self.map_head(real, inp.cu_seqlens[:inp.grids.shape[0] + 1]), dim=-1)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.text_trainable):
            text = F.normalize(self.text_tower(text_ids), dim=-1)
        if embeddings:
            return {"image": image, "text": text}
        return self.siglip(image, text, ps.get_data_parallel_group())


LOSS_SCOPES = ("micro_batch", "step")


def _loss_scope_problems(scope: str, run: TrainConfig) -> list[str]:
    if scope not in LOSS_SCOPES:
        return [f"stage_config.loss_scope must be one of {LOSS_SCOPES}, got {scope!r}"]
    if scope != "step":
        return []
    if run.parallel.pipeline_parallel > 1:
        return ["stage_config.loss_scope: step is DP/TP/CP only; use micro_batch under "
                f"pipeline_parallel={run.parallel.pipeline_parallel}"]
    if run.engine != "megatron":
        return [f"stage_config.loss_scope: step needs engine megatron, got {run.engine!r}"]
    return []


def _check_no_dropout(*configs) -> None:
    """``loss_scope: step`` runs every micro-batch twice and needs the same embeddings both
    times: no dropout (the presets have none)."""
    for config in configs:
        if config.hidden_dropout or config.attention_dropout:
            raise ConfigError("stage_config.loss_scope: step needs hidden_dropout = "
                              "attention_dropout = 0 (each micro-batch runs twice)")


class ContrastiveStage(VisionStage):
    name = "contrastive"
    config_class = ContrastiveStageConfig

    def __init__(self, run: TrainConfig):
        """Parse and check ``stage_config``: raises ``ConfigError`` listing every problem.
        Reads no file (``input_paths`` names them for ``training.preflight``)."""
        from megatron_finevit.config.text import TEXT_PRESETS

        problems: list[str] = []
        cfg = parse_config(ContrastiveStageConfig, run.stage_config, "stage_config.", problems)
        super().__init__(run, cfg, problems)
        schedule = schedule_problems("stage_config.context_schedule", cfg.context_schedule,
                                     "length")
        problems += schedule
        self.contexts = [(0, cfg.context_length)] + ([] if schedule else [
            (s, n) for s, n in cfg.context_schedule])
        lengths = [n for _, n in self.contexts]
        if lengths != sorted(lengths):
            problems.append(f"stage_config.context_schedule must not shorten the context, got "
                            f"{self.contexts}")
        self.text = preset_config(TEXT_PRESETS, cfg.text, {
            **cfg.text_overrides, "max_position_embeddings": max(lengths)}, "stage_config.text",
            "stage_config.text_overrides", problems)
        if self.text is not None:
            problems += [f"stage_config.text: {problem}"
                         for problem in self.text.problems(run.parallel.tensor_parallel)]
        problems += _loss_scope_problems(cfg.loss_scope, run)
        if not cfg.tokenizer:
            problems.append("stage_config.tokenizer must name a SentencePiece .model file "
                            "(tools/train_caption_tokenizer.py makes one for synthetic data)")
        if problems:
            raise ConfigError(problems)
        self._tokenizer = None
        self.module: ContrastiveModel | None = None
        # loss_scope=step: this step's (image, text) embedding gradients, one per micro-batch in
        # schedule order, and loss_r of the step (set by prepare_step, consumed by forward_step)
        self._cached_grads: deque = deque()
        self._step_loss: torch.Tensor | None = None
        self._num_microbatches = 0

    def microbatch_phases(self, data_parallel: int = 1) -> list[MicrobatchPhase]:
        """The resolution phases, cut again where the text context changes."""
        resolution = super().microbatch_phases(data_parallel)
        starts = sorted({p.start_step for p in resolution} | {s for s, _ in self.contexts})
        phases = []
        for start in starts:
            phase = [p for p in resolution if p.start_step <= start][-1]
            phases.append(replace(phase, start_step=start, details={
                **phase.details, "context_length": self.context_at(start)}))
        return phases

    # --- text -----------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from megatron_finevit.data.tokenizers import SentencePieceTokenizer

            self._tokenizer = SentencePieceTokenizer(self.cfg.tokenizer,
                                                     lowercase=self.cfg.lowercase)
            if self._tokenizer.vocab_size > self.text.vocab_size:
                raise ValueError(f"tokenizer {self.cfg.tokenizer} has {self._tokenizer.vocab_size}"
                                 f" pieces, more than the text tower's vocab_size "
                                 f"{self.text.vocab_size}")
        return self._tokenizer

    def context_at(self, step: int) -> int:
        return _current(self.contexts, step)

    def text_trainable_at(self, step: int) -> bool:
        from megatron_finevit.models.text_tower import text_tower_trainable

        return text_tower_trainable(step, self.cfg.unfreeze_text_at)

    def tokenize(self, captions: list[str], step: int) -> torch.Tensor:
        ids, _ = self.tokenizer.encode(captions, self.context_at(step))
        return ids.cuda() if torch.cuda.is_available() else ids

    # --- the stage interface --------------------------------------------------------------------

    def build_model(self, pre_process: bool, post_process: bool):
        config = self.transformer_config()
        p = self.run.parallel
        text_config = self.text.to_transformer_config(
            tensor_parallel=p.tensor_parallel, sequence_parallel=p.sequence_parallel,
            params_dtype=config.params_dtype, **p.transformer_overrides())
        if self.cfg.loss_scope == "step":
            _check_no_dropout(config, text_config)
        self.module = ContrastiveModel(self.vit, config, self.text, text_config, pre_process,
                                       post_process, self.cfg.init_logit_scale,
                                       self.cfg.init_logit_bias)
        if self.cfg.text_init_dir and post_process:
            from megatron_finevit.models.text_tower import load_tower_weights

            load_tower_weights(self.module.text_tower, self.cfg.text_init_dir)
        return self.module

    def build_data(self, dp_rank: int, dp_size: int):
        from megatron.core import parallel_state as ps

        self.loader = self.make_loader(self.cfg.data.dir, dp_rank, dp_size,
                                       decode_pixels=ps.is_pipeline_first_stage(), fill=True)
        return self.loader

    def model_input(self, batch):
        """(encoder input laid out for this rank, caption ids or None off the last stage)."""
        inp = self.encoder_input(batch)
        if torch.cuda.is_available():
            inp.patches = inp.patches.cuda()
        text_ids = self.tokenize(batch.captions, self.step) if self.module.post_process else None
        return inp, text_ids

    def prepare_step(self, data, model_chunks: list, num_microbatches: int):
        """Before the schedule (trainer hook): the iterator of micro-batches it should read.
        ``micro_batch`` scope: ``data`` itself. ``step`` scope: fetch the step's micro-batches
        once (the loader's position advances exactly as the schedule would move it, so resume
        is unchanged), cache the step loss's gradients w.r.t. their embeddings, and replay
        them."""
        if self.cfg.loss_scope != "step":
            return data
        batches = [next(data) for _ in range(num_microbatches)]
        self._num_microbatches = num_microbatches
        self._cache_embedding_grads(batches, model_chunks[0])
        return iter(batches)

    def _cache_embedding_grads(self, batches: list, model) -> None:
        """Embed ``batches`` without autograd ([n_k, d] per micro-batch), compute loss_r over
        their concatenation (every pair of the step, ring-wise over DP) and queue each
        micro-batch's slice of the embedding gradients for ``forward_step``."""
        from megatron.core import parallel_state as ps

        from megatron_finevit.losses.siglip import loss_and_embedding_grads

        with torch.no_grad():
            embedded = [model(*self.model_input(batch), embeddings=True) for batch in batches]
        sizes = [e["image"].shape[0] for e in embedded]
        trainable = self.module.text_trainable
        # no_sync: logit_scale / logit_bias grads land in the grad buffers now; megatron reduces
        # them with the others after the last micro-batch
        with model.no_sync():
            self._step_loss, g_image, g_text = loss_and_embedding_grads(
                self.module.siglip, torch.cat([e["image"] for e in embedded]),
                torch.cat([e["text"] for e in embedded]), ps.get_data_parallel_group(),
                text_grad=trainable)
        g_texts = g_text.split(sizes) if trainable else [None] * len(sizes)
        self._cached_grads = deque(zip(g_image.split(sizes), g_texts))

    def forward_step(self, batch, model):
        inp, text_ids = self.model_input(batch)
        if self.cfg.loss_scope == "step":
            return self._replay_step(inp, text_ids, model)
        output = model(inp, text_ids)
        touch = self._grad_ready_touch(step_scope=False)
        if touch is not None:
            output = output + touch

        def loss_fn(loss):
            return loss * inp.cp_loss_scale, self._metrics(loss)

        return output, loss_fn

    def _replay_step(self, inp, text_ids, model):
        """``loss_scope: step``: re-run one micro-batch with autograd; its loss is the surrogate
        ``Σ emb · cached grad`` whose gradients are the step loss's, the metric the step loss."""
        out = model(inp, text_ids, embeddings=True)
        g_image, g_text = self._cached_grads.popleft()
        surrogate = (out["image"] * g_image).sum()
        if g_text is not None:
            surrogate = surrogate + (out["text"] * g_text).sum()
        touch = self._grad_ready_touch(step_scope=True)
        if touch is not None:
            surrogate = surrogate + touch
        # megatron's schedule scales each micro-batch's loss by cp / num_microbatches; the
        # cached gradients already hold the whole step's loss (at weight 1), so undo that scale.
        undo = self._num_microbatches * inp.cp_loss_scale

        def loss_fn(output):
            return output * undo, self._metrics(self._step_loss)

        return surrogate, loss_fn

    def _grad_ready_touch(self, step_scope: bool) -> torch.Tensor | None:
        """With ``overlap_grad_reduce``: 0 × the parameters this micro-batch's backward would not
        reach — t and b under ``loss_scope: step`` (theirs came in ``prepare_step``), the frozen
        text tower — so they too report "grad ready" in the last micro-batch, as megatron
        expects of every parameter of a bucket (it adds an exact 0 to their grads). Else None."""
        if not self.run.parallel.overlap_grad_reduce or not self.module.post_process:
            return None
        params = list(self.module.siglip.parameters()) if step_scope else []
        if not self.module.text_trainable:
            params += list(self.module.text_tower.parameters())
        return 0.0 * sum(p.sum() for p in params) if params else None

    def _metrics(self, loss: torch.Tensor) -> dict[str, torch.Tensor]:
        siglip = self.module.siglip
        return {"loss": loss.detach().clone(),
                "logit_scale": siglip.logit_scale.detach().exp().reshape(()),
                "logit_bias": siglip.logit_bias.detach().reshape(())}

    def work(self, batch) -> tuple[float, float, float]:
        t = self.text
        text_params = t.num_layers * (4 * t.hidden_size ** 2 + 2 * t.hidden_size
                                      * t.ffn_hidden_size) + t.hidden_size * t.projection_size
        context = self.context_at(self.step)
        text = transformer_flops(text_params, [context] * batch.num_images, t.num_layers,
                                 t.hidden_size)
        if not self.text_trainable_at(self.step):
            text /= 3.0  # forward only
        return float(batch.num_images), float(sum(batch.image_tokens)), self.vit_flops(batch) + text

    def optimizer_overrides(self) -> dict:
        from megatron.core.optimizer import ParamKey

        from megatron_finevit.models.text_tower import TEXT_TOWER_PARAM_ATTR
        from megatron_finevit.training.optim import named_overrides

        # The tower in its own named groups (its biases and norms without weight decay, as the
        # ViT's), so on_step finds them and a checkpoint load pairs them with the saved ones.
        return named_overrides(self.run, {TEXT_TOWER_GROUP: ParamKey(attr=TEXT_TOWER_PARAM_ATTR)})

    def on_step(self, step: int, model_chunks: list, optimizer) -> None:
        from megatron_finevit.training.optim import groups_named

        super().on_step(step, model_chunks, optimizer)
        trainable = self.text_trainable_at(step)
        self.module.set_text_trainable(trainable)
        if not trainable:
            for group in groups_named(optimizer, TEXT_TOWER_GROUP):
                group["lr"] = 0.0
        for start, length in self.contexts[1:]:
            if step == start:
                self._extend_context(self.context_at(step - 1), length, optimizer)

    def _extend_context(self, old: int, new: int, optimizer) -> None:
        """Stretch the trained first ``old`` position rows over ``new`` positions, in place."""
        from megatron_finevit.models.text_tower import (
            DEFAULT_KEEP_POSITIONS,
            stretch_position_embeddings,
        )

        if self.module.post_process:
            table = self.module.text_tower.embedding.position_embeddings.weight
            with torch.no_grad():
                table[:new].copy_(stretch_position_embeddings(
                    table[:old], new, keep=min(DEFAULT_KEEP_POSITIONS, old - 2)))
        optimizer.reload_model_params()  # collective over the DP group: every rank calls it

    def evaluate(self, model_chunks: list) -> dict[str, float]:
        if not self.cfg.eval_data_dir:
            return {}
        from megatron_finevit.training.stages.contrastive_eval import evaluate_contrastive

        return evaluate_contrastive(self, model_chunks, self.cfg.eval_data_dir)
