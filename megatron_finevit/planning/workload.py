"""What a stage asks of the hardware: FLOPs per sample, parameters, and the layer stacks whose
activations a micro-batch keeps — per phase of the run, built from the stage's own configs and
its ``microbatch_phases`` (the same estimate ``--dry-run`` prints).

Per-sample counts use the phase's mean tokens per sample for every sample (attention's ``n²``
term is then slightly low for a spread of image sizes). Stage III / SFT samples hold one image:
``text_tokens`` of text (default 300, ``examples/stage3_align.yaml``'s estimate), the rest of the
sample's LLM tokens its merged image tokens + 2 markers, 4 patches each.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_finevit.planning import flops, params
from megatron_finevit.planning.memory import LayerShape

TEXT_TOKENS_PER_SAMPLE = 300
# the loss and the output layer run on the answer rows only (models/llm/masked_output): ~15% of
# a FineViT-VL sample's tokens
ANSWER_FRACTION = 0.15


@dataclass(frozen=True)
class Stack:
    """``layers`` transformer layers of ``shape`` over ``tokens`` tokens per micro-batch;
    ``pipelined``: split over the pipeline stages (else whole on the first stage)."""

    name: str
    shape: LayerShape
    layers: int
    tokens: float
    pipelined: bool


@dataclass(frozen=True)
class Phase:
    """``samples`` samples (fwd + bwd ``flops_per_sample``, frozen-teacher forward
    ``teacher_flops_per_sample``) in ``micro_batches`` micro-batches of ``stacks``;
    ``extra_forward_flops_per_sample``: a forward the step runs besides (Stage II's
    ``loss_scope: step`` embeds every micro-batch once without autograd first). Like the teacher,
    it is work the step does but not model FLOPs: MFU leaves it out, the step time counts it."""

    samples: float
    micro_batches: float
    flops_per_sample: float
    teacher_flops_per_sample: float
    stacks: tuple[Stack, ...]
    details: dict = field(default_factory=dict)
    extra_forward_flops_per_sample: float = 0.0


@dataclass(frozen=True)
class Workload:
    """A stage: its phases, parameters in the optimizer (``trained_params``: every parameter of
    the megatron model, a module frozen for a while included — DDP keeps its buffers),
    ``frozen_params`` outside it (the teacher), ``pipelined_params`` (split over PP),
    ``tp_divisors`` (sizes TP must divide), ``pp_layers`` (layers PP splits), ``cp_tokens``
    (tokens per micro-batch CP splits) and the bytes of one micro-batch's logits."""

    stage: str
    phases: tuple[Phase, ...]
    trained_params: float
    frozen_params: float
    pipelined_params: float
    tp_divisors: tuple[int, ...]
    pp_layers: int
    logits_bytes: float = 0.0

    @property
    def samples(self) -> float:
        return sum(phase.samples for phase in self.phases)

    @property
    def flops(self) -> float:
        """Trained-model FLOPs (fwd + bwd) over the whole stage."""
        return sum(phase.samples * phase.flops_per_sample for phase in self.phases)

    @property
    def teacher_flops(self) -> float:
        return sum(phase.samples * phase.teacher_flops_per_sample for phase in self.phases)

    @property
    def extra_forward_flops(self) -> float:
        """The extra forward passes' FLOPs over the stage (``Phase``; not model FLOPs)."""
        return sum(phase.samples * phase.extra_forward_flops_per_sample for phase in self.phases)

    @property
    def work_flops(self) -> float:
        """Everything the GPUs compute: model, teacher and extra-forward FLOPs."""
        return self.flops + self.teacher_flops + self.extra_forward_flops

    def scaled_to(self, samples: float) -> "Workload":
        """The same stage run for ``samples`` samples (phases keep their shares)."""
        from dataclasses import replace

        factor = samples / self.samples
        return replace(self, phases=tuple(replace(p, samples=p.samples * factor,
                                                  micro_batches=p.micro_batches * factor)
                                          for p in self.phases))


# --- FineViT stages ---------------------------------------------------------------------------


def _vit_stack(vit, tokens: float) -> Stack:
    return Stack("vit", LayerShape.of(vit), vit.num_layers, tokens, pipelined=True)


def mim_workload(vit, teacher: flops.EncoderShape, phases) -> Workload:
    """Stage I: the ViT (+ mask token, MIM head to the teacher's width) trains; the frozen teacher
    runs forward on each image at its own patch size (same pixels)."""
    built = []
    for phase in phases:
        n = phase.mean_tokens
        pixels_per_teacher_patch = teacher.patch_dim // 3
        teacher_patches = round(n * vit.patch_size ** 2 / pixels_per_teacher_patch)
        vit_cost = flops.vit_tower_flops(vit, [n]).forward_backward(True, grad_into=False)
        head = flops.TowerFlops(0.0, flops.linear_flops(n, vit.hidden_size, teacher.hidden_size),
                                0.0).forward_backward(True, grad_into=True)
        built.append(Phase(phase.samples, phase.micro_batches, vit_cost + head,
                           flops.encoder_forward_flops(teacher, [teacher_patches]),
                           (_vit_stack(vit, phase.pack_tokens),), phase.details))
    teacher_params = teacher.num_layers * (4 * teacher.hidden_size ** 2 + (3 if teacher.gated else 2)
                                           * teacher.hidden_size * teacher.ffn_hidden_size)
    return Workload("mim", tuple(built),
                    params.vit_params(vit, mask_token=True)
                    + params.mim_head_params(vit, teacher.hidden_size),
                    teacher_params + teacher.patch_dim * teacher.hidden_size,
                    params.vit_params(vit), (vit.num_attention_heads, vit.ffn_hidden_size),
                    vit.num_layers)


def contrastive_workload(vit, text, phases, loss_scope: str = "micro_batch") -> Workload:
    """Stage II: ViT + MAP head trained; the text tower over each caption row of
    ``phase.context`` tokens, forward only while ``phase.text_trainable`` is False.
    ``loss_scope="step"`` adds the embedding pass: a forward of all three per sample."""
    built = []
    for phase in phases:
        n = phase.mean_tokens
        towers = (flops.vit_tower_flops(vit, [n]),
                  flops.map_head_flops(vit, text.projection_size, [n]),
                  flops.text_tower_flops(text, 1, phase.context))
        vit_cost = towers[0].forward_backward(True, grad_into=False)
        head = towers[1].forward_backward(True, True)
        tower = towers[2].forward_backward(phase.text_trainable, grad_into=False)
        embedding_pass = sum(t.forward for t in towers) if loss_scope == "step" else 0.0
        rows = phase.samples / phase.micro_batches
        text_stack = Stack("text", LayerShape.of(text), text.num_layers,
                           rows * phase.context if phase.text_trainable else 0, pipelined=False)
        built.append(Phase(phase.samples, phase.micro_batches, vit_cost + head + tower, 0.0,
                           (_vit_stack(vit, phase.pack_tokens), text_stack), phase.details,
                           embedding_pass))
    return Workload("contrastive", tuple(built),
                    params.vit_params(vit) + params.map_head_params(vit, text.projection_size)
                    + params.text_tower_params(text) + 2, 0.0, params.vit_params(vit),
                    (vit.num_attention_heads, vit.ffn_hidden_size, text.num_attention_heads,
                     text.ffn_hidden_size, text.padded_vocab_size), vit.num_layers)


# --- FineViT-VL stages (Stage III, SFT) ---------------------------------------------------------


def sample_patches(llm_tokens: float, text_tokens: float = TEXT_TOKENS_PER_SAMPLE) -> int:
    """ViT patches of a one-image sample of ``llm_tokens`` tokens (module docstring)."""
    return 4 * max(round(llm_tokens - text_tokens - 2), 1)


def vlm_workload(stage: str, vl, phases, trainable=(True, True, True),
                 text_tokens: float = TEXT_TOKENS_PER_SAMPLE) -> Workload:
    """FineViT-VL over one-image samples of ``phase.mean_tokens`` LLM tokens; ``trainable`` =
    (vit, projector, llm). The ViT and projector run whole on the first pipeline stage."""
    vit_trains, projector_trains, llm_trains = trainable
    built = []
    for phase in phases:
        n = phase.mean_tokens
        patches = sample_patches(n, text_tokens)
        cost = flops.vlm_flops(vl, [patches], [round(n)], vit_trains, llm_trains,
                               projector_trains, output_rows=round(ANSWER_FRACTION * n))
        per_pack = phase.samples / phase.micro_batches
        stacks = (Stack("vit", LayerShape.of(vl.vit), vl.vit.num_layers, patches * per_pack,
                        pipelined=False),
                  Stack("llm", LayerShape.of(vl.llm), vl.llm.num_layers, phase.pack_tokens,
                        pipelined=True))
        built.append(Phase(phase.samples, phase.micro_batches, cost, 0.0, stacks,
                           {**phase.details, "vit_patches_per_sample": patches}))
    llm = vl.llm
    # bf16 logits, fp32 softmax and its gradient on the answer rows
    logits = ANSWER_FRACTION * max(p.pack_tokens for p in phases) * llm.padded_vocab_size * 10
    return Workload(stage, tuple(built),
                    params.vit_params(vl.vit) + params.projector_params(vl)
                    + params.llm_params(llm), 0.0,
                    llm.num_layers * params.llm_layer_params(llm),
                    (vl.vit.num_attention_heads, vl.vit.ffn_hidden_size, llm.num_attention_heads,
                     llm.num_query_groups, llm.ffn_hidden_size, llm.padded_vocab_size),
                    llm.num_layers, logits)


@dataclass(frozen=True)
class PhaseSpec:
    """A phase's inputs: ``samples`` in ``micro_batches`` packs of ``pack_tokens`` tokens,
    ``mean_tokens`` per sample (ViT patches for FineViT stages, LLM tokens for FineViT-VL);
    Stage II's caption ``context`` and whether the text tower trains."""

    samples: float
    micro_batches: float
    pack_tokens: int
    mean_tokens: float
    context: int = 0
    text_trainable: bool = True
    details: dict = field(default_factory=dict)
