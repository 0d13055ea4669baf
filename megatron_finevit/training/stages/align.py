"""Stage III: LLM alignment of FineViT on region-level QA (paper §3.2, Table 3, Eq. 3).

FineViT -> 2×2 merge projector -> Qwen3 (``models.vlm.FineViTVLModel``), trained with the
autoregressive loss on the answer tokens of global-caption, bbox↔caption and bbox↔OCR
conversations (``data.tasks``), packed into fixed LLM / ViT token budgets (THD in both towers).

Initialisation (``build_model``), each piece checked and named when it is missing or does not fit:

* the encoder from a Stage II (or Stage I) training run, ``vit_init_dir`` — its ``encoder.*``
  weights; the MAP head, text tower and SigLIP scalars of that run are not read;
* the language model from a megatron checkpoint of a Hugging Face Qwen3 directory, ``llm_init_dir``
  — converted once, before training, with ``tools/convert_checkpoint.py hf-to-mcore --model qwen3``
  (its ``model_config.json`` must describe this run's LLM);
* the projector fresh.

A resume sets every weight instead: then these two are not read. ``checkpoint.load_dir`` (e.g.
a Stage III run for SFT) is loaded after them and overwrites the weights it holds.

Trainable policy, per module (``vit``, ``projector``, ``llm``): ``train_from`` (the step it starts
training; None: frozen throughout) and ``lr_mult`` (its learning rate over ``optim.lr``, the
paper's ablations B.2: projector warm-up at 1e-3, ViT + projector mid-training, frozen ViT). Every
module has its own named optimiser groups from the start (``optim.named_overrides``), so a resume
pairs them exactly whatever the step. A frozen module keeps its parameters in DDP and the
optimiser (megatron's grad buffers are fixed at wrap time): its gradients are zeroed by a tensor
hook before they reach the grad buffer and its groups' learning rate is 0 (so neither Adam's
moments nor weight decay move it); a frozen encoder also runs under ``no_grad``.

Pipeline parallelism: the encoder and projector sit on the first stage with the LM's first
``first_stage_llm_layers`` layers; ``parallel.virtual_pipeline_parallel`` splits every rank's LM
layers into chunks (interleaved 1F1B; the trainer gives each chunk the step's packs in order). Every stage reads the same packs and decodes its images (the
text of a sample depends on its resized size): decoding is deterministic and DALI skips what PIL
skips (``data.decoder``; ``data.tasks.pack_loader``), so a corrupt image is skipped on every stage
alike.

Logged per step: ``loss`` (mean over answer tokens), ``loss_<task kind>`` over that kind's answer
tokens, image tokens/s (ViT patches), text tokens/s (LLM tokens that are not image placeholders),
and MFU over ViT + projector + LLM FLOPs (``planning.flops.vlm_flops``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from megatron_finevit.config.loader import ConfigError, parse_config
from megatron_finevit.config.llm import QWEN3_PRESETS
from megatron_finevit.config.presets import preset_config
from megatron_finevit.config.train import TrainConfig
from megatron_finevit.config.vit import VIT_PRESETS
from megatron_finevit.config.vlm import QWEN_IMAGE_PAD_ID, FineViTVLConfig
from megatron_finevit.data.decode_dali_packs import decoder_problems
from megatron_finevit.data.resize import DEFAULT_MIN_PIXELS, STAGE_MAX_PIXELS
from megatron_finevit.training.dry_run import MicrobatchPhase
from megatron_finevit.training.preflight import InputPath

MODULES = ("vit", "projector", "llm")
# parameter attribute marking which module a parameter belongs to (optimiser groups select it)
MODULE_PARAM_ATTR = {name: f"is_vlm_{name}" for name in MODULES}


@dataclass
class ModulePolicy:
    """When a module trains and at what learning rate."""

    train_from: int | None = 0     # step it starts training; None: frozen for the whole run
    lr_mult: float = 1.0           # its (max and min) learning rate over optim.lr / optim.min_lr


@dataclass
class AlignDataSection:
    """Region-QA packs (``data.tasks.region_qa_loader.RegionQAConfig``)."""

    dir: str = ""                  # shard directory with index.zarr (tools/build_index.py)
    llm_tokens: int = 4096         # LLM tokens per pack (image placeholders + text), fixed
    vit_tokens: int = 16384        # ViT patches per pack, fixed
    max_text_tokens: int = 1024    # cap of one image's conversation text
    max_turns: int = 8             # QA turns drawn per image
    box_coords: str = "relative"   # relative (0-1000) | absolute (resized-image pixels)
    mixture: dict = field(default_factory=dict)  # task kind -> weight (missing kinds: 1.0)
    min_pixels: int = DEFAULT_MIN_PIXELS
    max_pixels: int = STAGE_MAX_PIXELS["align"]  # within 1000×1000
    buffer_size: int = 512
    min_fill: float = 0.9
    use_draft: bool = False
    # "auto": DALI where nvidia.dali imports, else PIL (the choice is logged); "dali" | "pil".
    # Same packs and skips either way; pixels within the decoder bound. With DALI,
    # num_workers is its CPU thread count.
    decoder: str = "auto"
    # PIL processes decoding the next packs while the step computes (0: in the training process)
    num_workers: int = 0
    # Mean samples per pack, for `--dry-run` where data.dir has no index (with one, the index is
    # used); 0: estimate from the budgets alone.
    mean_llm_tokens_per_sample: float = 0.0


@dataclass
class VLStageConfig:
    """What every FineViT-VL stage (Stage III, SFT) sets: the model, where its weights start,
    the tokenizer, the per-module policies and the held-out split."""

    vit: str = "tiny_vit"                      # preset of config/vit.py
    vit_overrides: dict = field(default_factory=dict)
    llm: str = "tiny_qwen3"                    # preset of config/llm.py
    llm_overrides: dict = field(default_factory=dict)
    first_stage_llm_layers: int | None = None  # PP: LM layers beside the encoder (None: even)
    vit_init_dir: str | None = None            # a Stage II / I run's checkpoint directory
    llm_init_dir: str | None = None            # hf-to-mcore --model qwen3 output
    tokenizer_dir: str | None = None           # HF tokenizer.json dir (None: bundled Qwen ranks)
    vit_policy: ModulePolicy = field(default_factory=ModulePolicy)
    projector_policy: ModulePolicy = field(default_factory=ModulePolicy)
    llm_policy: ModulePolicy = field(default_factory=ModulePolicy)
    eval_data_dir: str | None = None           # held-out indexed shards for evaluate()
    eval_max_new_tokens: int = 24              # greedy decoding length

    def input_paths(self) -> list[InputPath]:
        """What the stage reads, for ``training.preflight``."""
        paths = [("stage_config.data.dir", self.data.dir, "shards"),
                 ("stage_config.eval_data_dir", self.eval_data_dir, "shards"),
                 ("stage_config.vit_init_dir", self.vit_init_dir, "run_checkpoint"),
                 ("stage_config.llm_init_dir", self.llm_init_dir, "checkpoint"),
                 ("stage_config.tokenizer_dir", self.tokenizer_dir, "directory")]
        return [InputPath(key, path, kind) for key, path, kind in paths if path]

    def policy(self, module: str) -> ModulePolicy:
        return getattr(self, f"{module}_policy")


@dataclass
class AlignStageConfig(VLStageConfig):
    eval_max_images: int = 64                  # held-out images per evaluation
    # the held-out question kinds (caption_to_bbox: grounding; bbox_to_caption; bbox_to_ocr)
    eval_kinds: list = field(default_factory=lambda: ["caption_to_bbox", "bbox_to_caption",
                                                      "bbox_to_ocr"])
    data: AlignDataSection = field(default_factory=AlignDataSection)


class AlignStage:
    name = "align"
    config_class = AlignStageConfig
    supports_virtual_pipeline = True  # build_model(vp_stage=): one FineViTVLModel per LM chunk

    def __init__(self, run: TrainConfig):
        """Parse and check ``stage_config`` (raises ``ConfigError`` with every problem); reads no
        file."""
        problems: list[str] = []
        self.run = run
        self.cfg = cfg = parse_config(self.config_class, run.stage_config, "stage_config.",
                                      problems)
        self._check_model(cfg, problems)
        self._check_data(cfg, problems)
        problems += decoder_problems(cfg.data.decoder, cfg.data.num_workers)
        if problems:
            raise ConfigError(problems)
        self.step = 0
        self.trainable = {module: True for module in MODULES}
        self.module = None
        self.loader = None
        self._template = None

    def _check_model(self, cfg, problems: list[str]) -> None:
        """The FineViT-VL config at the run's layout, the packs' divisibility and the module
        policies (shared by every stage of FineViT-VL)."""
        p = self.run.parallel
        vit = preset_config(VIT_PRESETS, cfg.vit, cfg.vit_overrides, "stage_config.vit",
                            "stage_config.vit_overrides", problems)
        llm = preset_config(QWEN3_PRESETS, cfg.llm, cfg.llm_overrides, "stage_config.llm",
                            "stage_config.llm_overrides", problems)
        self.vl = None
        if vit is not None and llm is not None:
            self.vl = FineViTVLConfig(vit=vit, llm=llm, image_token_id=QWEN_IMAGE_PAD_ID,
                                      first_stage_llm_layers=cfg.first_stage_llm_layers)
            problems += [f"stage_config: {problem}"
                         for problem in self.vl.problems(p.tensor_parallel, p.pipeline_parallel,
                                                         p.context_parallel,
                                                         p.virtual_pipeline_parallel)]
        d = cfg.data
        if not d.dir:
            problems.append("stage_config.data.dir must name an indexed shard directory")
        sp = p.tensor_parallel if p.sequence_parallel else 1
        for key in ("llm_tokens", "vit_tokens"):
            if getattr(d, key) % sp:
                problems.append(f"stage_config.data.{key}={getattr(d, key)} must be a multiple of "
                                f"tensor_parallel={sp} under sequence parallelism")
        cp = p.context_parallel
        # CP cuts every sample in 2·cp chunks (the loader pads each to a multiple of 2·cp) and
        # each CP rank's llm_tokens / cp splits over TP under sequence parallelism
        multiple = math.lcm(2 * cp, cp * sp)
        if cp > 1 and d.llm_tokens % multiple:
            problems.append(f"stage_config.data.llm_tokens={d.llm_tokens} must be a multiple of "
                            f"{multiple} (2 x context_parallel={cp}, and context_parallel x "
                            f"tensor_parallel under sequence parallelism)")
        if cp > 1 and cfg.eval_data_dir:
            problems.append("stage_config.eval_data_dir: held-out generation runs at "
                            "context_parallel=1 (evaluate a checkpoint of this run there)")
        if p.virtual_pipeline_parallel > 1 and cfg.eval_data_dir:
            problems.append("stage_config.eval_data_dir: held-out generation runs without "
                            "virtual pipeline stages (evaluate a checkpoint of this run)")
        for module in MODULES:
            policy = cfg.policy(module)
            if policy.train_from is not None and policy.train_from < 0:
                problems.append(f"stage_config.{module}_policy.train_from={policy.train_from} "
                                "must be >= 0 or null (frozen)")
            if policy.lr_mult < 0:
                problems.append(f"stage_config.{module}_policy.lr_mult={policy.lr_mult} must be "
                                ">= 0")
        if all(cfg.policy(m).train_from is None for m in MODULES):
            problems.append("every module is frozen (train_from: null): nothing would train")

    def _check_data(self, cfg, problems: list[str]) -> None:
        """Region-QA settings: the task mixture, the box convention, the evaluated kinds."""
        from megatron_finevit.data.tasks.boxes import BoxCodec
        from megatron_finevit.data.tasks.region_qa import TaskMixture
        from megatron_finevit.training.stages.align_eval import EVAL_KINDS

        unknown = sorted(set(cfg.eval_kinds) - set(EVAL_KINDS))
        if unknown or not cfg.eval_kinds:
            problems.append(f"stage_config.eval_kinds={cfg.eval_kinds} must be a non-empty "
                            f"subset of {list(EVAL_KINDS)}")
        try:
            self.mixture = TaskMixture.from_dict(cfg.data.mixture)
        except (TypeError, ValueError) as exc:
            problems.append(f"stage_config.data.mixture: {exc}")
        try:
            self.codec = BoxCodec(cfg.data.box_coords)
        except ValueError as exc:
            problems.append(f"stage_config.data.box_coords: {exc}")

    # --- shapes and configs ---------------------------------------------------------------------

    def model_dims(self) -> dict[str, int]:
        """The LM's heads and layers (the encoder's heads were checked with the VL config; it is
        not pipelined)."""
        llm = self.vl.llm
        return {"num_attention_heads": llm.num_attention_heads,
                "num_query_groups": llm.num_query_groups, "num_layers": llm.num_layers}

    def transformer_configs(self):
        """(encoder, LM) megatron TransformerConfigs at the run's layout."""
        p = self.run.parallel
        return self.vl.to_transformer_configs(
            tensor_parallel=p.tensor_parallel, pipeline_parallel=p.pipeline_parallel,
            sequence_parallel=p.sequence_parallel, params_dtype=self.run.params_dtype(),
            context_parallel=p.context_parallel, virtual_pipeline=p.virtual_pipeline_parallel,
            **p.transformer_overrides())

    def transformer_config(self):
        return self.transformer_configs()[1]

    def sequence_shape(self) -> tuple[int, int]:
        return self.cfg.data.llm_tokens, 1

    @property
    def data_config(self):
        """The loader's ``RegionQAConfig``."""
        from megatron_finevit.data.resize import ResizePolicy
        from megatron_finevit.data.tasks.region_qa_loader import RegionQAConfig

        d = self.cfg.data
        return RegionQAConfig(
            llm_tokens=d.llm_tokens, vit_tokens=d.vit_tokens, max_text_tokens=d.max_text_tokens,
            max_turns=d.max_turns, box_coords=d.box_coords, mixture=self.mixture,
            policy=ResizePolicy(min_pixels=d.min_pixels, max_pixels=d.max_pixels),
            seed=self.run.seed, buffer_size=d.buffer_size, min_fill=d.min_fill,
            segment_multiple=self._segment_multiple())

    def _segment_multiple(self) -> int:
        """LLM tokens every sample is padded to a multiple of: 2·cp, the zigzag CP split."""
        cp = self.run.parallel.context_parallel
        return 2 * cp if cp > 1 else 1

    @property
    def template(self):
        """The Qwen3 chat template over this run's tokenizer."""
        if self._template is None:
            from megatron_finevit.data.tasks.chat import Qwen3ChatTemplate
            from megatron_finevit.data.tokenizers import QwenTokenizer

            tokenizer = (QwenTokenizer.from_tokenizer_json(Path(self.cfg.tokenizer_dir)
                                                           / "tokenizer.json")
                         if self.cfg.tokenizer_dir else QwenTokenizer.from_tiktoken())
            self._template = Qwen3ChatTemplate(tokenizer)
            if self._template.tokenizer.vocab_size > self.vl.llm.vocab_size:
                raise ValueError(f"the tokenizer has {self._template.tokenizer.vocab_size} ids, "
                                 f"more than the LM's vocab_size {self.vl.llm.vocab_size}")
        return self._template

    @property
    def norm(self):
        from megatron_finevit.data.decode_pil import Normalization

        return Normalization()

    def microbatch_phases(self, data_parallel: int = 1) -> list[MicrobatchPhase]:
        """Samples per pack for ``--dry-run`` (one phase; ``data_parallel`` does not change the
        estimate): ``llm_tokens · min_fill`` over the mean LLM tokens
        a sample reserves — from the index of ``data.dir`` when it is here, else
        ``data.mean_llm_tokens_per_sample``, else a sample at the largest image plus
        ``max_text_tokens`` (a lower bound)."""
        from megatron_finevit.data.index import INDEX_NAME

        d = self.cfg.data
        if d.dir and (Path(d.dir) / INDEX_NAME).is_dir():
            sizes = self._loader(d.dir, 0, 1).sizes
            fits = sizes[(sizes[:, 0] <= d.vit_tokens) & (sizes[:, 1] <= d.llm_tokens), 1]
            mean, source = float(fits.mean()) if len(fits) else float(d.llm_tokens), "index"
        elif d.mean_llm_tokens_per_sample > 0:
            mean, source = d.mean_llm_tokens_per_sample, "config"
        else:
            mean, source = self._mean_tokens_without_index()
        return [MicrobatchPhase(0, d.llm_tokens * d.min_fill / mean, {
            **self._phase_details(), "mean_llm_tokens_per_sample": round(mean, 1),
            "samples_estimate": source, "pack_fill": d.min_fill})]

    def _mean_tokens_without_index(self) -> tuple[float, str]:
        """A lower bound of the samples per pack: each sample at the largest image plus the
        longest text."""
        d = self.cfg.data
        return d.max_pixels // (14 * 14) // 4 + 2 + d.max_text_tokens, "max_pixels"

    def _phase_details(self) -> dict:
        return {"max_pixels": self.cfg.data.max_pixels}

    # --- model -------------------------------------------------------------------------------------

    def build_model(self, pre_process: bool, post_process: bool, vp_stage: int | None = None):
        """This rank's FineViT-VL (its LM chunk ``vp_stage`` under a virtual pipeline)."""
        from megatron_finevit.models.vlm import FineViTVLModel
        from megatron_finevit.training.stages.align_init import load_llm_weights, load_vit_weights

        vit_config, llm_config = self.transformer_configs()
        model = FineViTVLModel(self.vl, vit_config, llm_config, pre_process, post_process,
                               vp_stage=vp_stage)
        if not vp_stage:  # the first chunk: the one with the encoder on the first rank
            self.module = model
        if not self._weights_come_from_a_checkpoint():
            if pre_process and self.cfg.vit_init_dir:
                load_vit_weights(model.encoder, self.cfg.vit_init_dir)
            if self.cfg.llm_init_dir:
                load_llm_weights(model.llm, self.vl.llm, self.cfg.llm_init_dir)
        parts = {"llm": model.llm}
        if pre_process:
            parts.update(vit=model.encoder, projector=model.projector)
        for module, part in parts.items():
            for param in part.parameters():
                setattr(param, MODULE_PARAM_ATTR[module], True)
                param.register_hook(self._gradient_gate(module))
        return model

    def _weights_come_from_a_checkpoint(self) -> bool:
        """Whether the trainer resumes (and so overwrites every weight after the build): then
        the initial pieces are not read. ``checkpoint.load_dir`` overwrites only the weights it
        holds, after these."""
        from megatron_finevit.training.checkpointing import latest_checkpoint

        ck = self.run.checkpoint
        return bool(ck.dir and ck.resume and latest_checkpoint(ck.dir))

    def _gradient_gate(self, module: str):
        """A tensor hook that zeroes a frozen module's gradients before they are accumulated."""
        def gate(grad: torch.Tensor) -> torch.Tensor:
            return grad if self.trainable[module] else torch.zeros_like(grad)
        return gate

    def optimizer_overrides(self) -> dict:
        from megatron.core.optimizer import ParamKey

        from megatron_finevit.training.optim import named_overrides

        o = self.run.optim
        return named_overrides(self.run, {module: (
            ParamKey(attr=MODULE_PARAM_ATTR[module]),
            {"max_lr": o.lr * self.cfg.policy(module).lr_mult,
             "min_lr": o.min_lr * self.cfg.policy(module).lr_mult}) for module in MODULES})

    def trainable_at(self, module: str, step: int) -> bool:
        start = self.cfg.policy(module).train_from
        return start is not None and step >= start

    def on_step(self, step: int, model_chunks: list, optimizer) -> None:
        from megatron_finevit.training.optim import groups_named

        self.step = step
        for module in MODULES:
            self.trainable[module] = self.trainable_at(module, step)
            if not self.trainable[module]:
                for group in groups_named(optimizer, module):
                    group["lr"] = 0.0
        if self.module is not None:
            self.module.encoder_trainable = self.trainable["vit"]

    # --- data ----------------------------------------------------------------------------------

    def _loader(self, data_dir: str, dp_rank: int, dp_size: int):
        from megatron_finevit.data.tasks.region_qa_loader import RegionQALoader

        d = self.cfg.data
        return RegionQALoader(data_dir, self.data_config, self.template.tokenizer,
                              dp_rank=dp_rank, dp_size=dp_size, use_draft=d.use_draft,
                              norm=self.norm, decoder=d.decoder, num_workers=d.num_workers)

    def build_data(self, dp_rank: int, dp_size: int):
        self.loader = self._loader(self.cfg.data.dir, dp_rank, dp_size)
        return self.loader

    def _trimmed(self, batch):
        """The pack without the LLM padding rows it does not need (``MultimodalBatch.trimmed``)
        where the sequence length may vary between micro-batches: not under pipeline
        parallelism (fixed p2p shapes). The multiple keeps CP's 2·cp chunks and SP's split."""
        from megatron_finevit.data.tasks.multimodal import LLM_TRIM_MULTIPLE

        p = self.run.parallel
        if p.pipeline_parallel > 1:
            return batch
        sp = p.tensor_parallel if p.sequence_parallel else 1
        cp = p.context_parallel
        return batch.trimmed(math.lcm(LLM_TRIM_MULTIPLE, 2 * cp, cp * sp))

    def forward_step(self, batch, model):
        from megatron_finevit.data.tasks.chat import IGNORE_INDEX
        from megatron_finevit.models.llm.packing import thd_packed_seq_params

        from megatron.core.utils import get_attr_wrapped_model

        batch = self._trimmed(batch)
        device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
        images = None  # also for a pack of text-only conversations (SFT)
        if get_attr_wrapped_model(model, "pre_process") and batch.images is not None:
            images = dataclasses.replace(batch.images, patches=batch.images.patches.to(device))
        labels = batch.labels.masked_fill(batch.labels == IGNORE_INDEX, 0)
        params = thd_packed_seq_params(batch.cu_seqlens.to(device))
        output = model(images, batch.input_ids[None].to(device),
                       batch.position_ids[None].to(device), labels=labels[None].to(device),
                       packed_seq_params=params, output_mask=batch.loss_mask[None].to(device))

        def loss_fn(token_loss):
            token_loss = token_loss.float().reshape(-1)
            mask = batch.loss_mask.to(token_loss.device)
            loss = (token_loss * mask).sum() / mask.sum().clamp(min=1.0)
            metrics = {"loss": loss.detach().clone()}
            task = batch.label_task.to(token_loss.device)
            for index, kind in enumerate(batch.kinds):
                selected = (task == index).float()
                metrics[f"task_loss_sum/{kind}"] = (token_loss.detach() * selected).sum()
                metrics[f"task_tokens/{kind}"] = selected.sum()
            return loss, metrics

        return output, loss_fn

    def finalize_metrics(self, metrics: dict[str, float]) -> dict[str, float]:
        """Per-task losses from the summed terms (averaged alike over micro-batches and DP
        replicas, so their ratio is the mean over the step's tokens of that kind); kinds absent
        from the step are left out."""
        out = {k: v for k, v in metrics.items() if not k.startswith("task_")}
        for key, tokens in metrics.items():
            if key.startswith("task_tokens/") and tokens > 0:
                kind = key.split("/", 1)[1]
                out[f"loss_{kind}"] = metrics[f"task_loss_sum/{kind}"] / tokens
        return out

    def work(self, batch):
        """(samples, LLM tokens, FLOPs, {image_tokens, text_tokens}) of one pack."""
        from megatron_finevit.planning.flops import vlm_flops

        bounds = batch.cu_seqlens.tolist()[: batch.num_samples + 1]
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        patches = batch.images.image_lengths if batch.images is not None else []
        placeholders = sum(patches) // 4
        flops = vlm_flops(self.vl, patches, lengths, vit_trainable=self.trainable["vit"],
                          llm_trainable=self.trainable["llm"],
                          projector_trainable=self.trainable["projector"],
                          output_rows=int((batch.loss_mask != 0).sum()))  # as forward_step
        return (float(batch.num_samples), float(sum(lengths)), flops,
                {"image_tokens": float(sum(patches)),
                 "text_tokens": float(sum(lengths) - placeholders)})

    def evaluate(self, model_chunks: list) -> dict[str, float]:
        if not self.cfg.eval_data_dir:
            return {}
        from megatron_finevit.training.stages.align_eval import evaluate_align

        return evaluate_align(self, model_chunks, self.cfg.eval_data_dir,
                              max_images=self.cfg.eval_max_images)
