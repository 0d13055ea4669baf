"""SigLIP sigmoid loss (Eq. 2): single process vs a naive full-matrix reference, closed forms at
init, and the ring implementation over data-parallel ranks (DP = 4 on the world, DP = 2 on two
sub-groups of non-adjacent ranks) vs the single-process loss over the global batch.

Under DP the contract is: the mean over ranks of the returned losses is the global loss, and the
gradients of that mean (what Megatron's DDP averaging optimises) equal the global gradients.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from megatron_finevit.losses import SigLIPLoss
from megatron_finevit.testing.multirank import run_world

RTOL = 1e-6
DIM = 24
SCALE, BIAS = math.log(4.0), -2.5  # away from init so every pair's gradient is sizeable


def reference_loss(image, text, logit_scale, logit_bias):
    """Eq. 2 over one batch, the textbook way: full [n, n] logits and ±1 labels."""
    n = image.shape[0]
    logits = logit_scale.exp() * image @ text.T + logit_bias
    labels = 2 * torch.eye(n, dtype=logits.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / n


def _embeddings(n, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, DIM, generator=gen, dtype=torch.float64), dim=-1)
    text = F.normalize(image + 0.8 * torch.randn(n, DIM, generator=gen, dtype=torch.float64),
                       dim=-1)
    return image.to(dtype), text.to(dtype)


def _reference_with_grads(image, text, scale=SCALE, bias=BIAS):
    # The module stores its parameters in float32: round them the same way.
    params = [torch.tensor(v, dtype=torch.float32).to(image.dtype).requires_grad_()
              for v in (scale, bias)]
    leaves = [image.clone().requires_grad_(), text.clone().requires_grad_(), *params]
    loss = reference_loss(*leaves)
    return loss.detach(), torch.autograd.grad(loss, leaves)


def _module(scale=SCALE, bias=BIAS):
    return SigLIPLoss(init_logit_scale=scale, init_logit_bias=bias)


def _assert_close(got, want, rtol=RTOL, what=""):
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= rtol * max(scale, 1e-12), f"{what}: max abs error {err:.3g} vs scale {scale:.3g}"


def test_single_process_matches_reference():
    image, text = _embeddings(9, seed=0, dtype=torch.float64)
    want_loss, want_grads = _reference_with_grads(image, text)
    module = _module().double()
    leaves = [image.clone().requires_grad_(), text.clone().requires_grad_()]
    loss = module(*leaves)
    loss.backward()
    got = [leaves[0].grad, leaves[1].grad, module.logit_scale.grad, module.logit_bias.grad]
    _assert_close(loss.detach(), want_loss, 1e-12, "loss")
    for name, g, w in zip(("image", "text", "logit_scale", "logit_bias"), got, want_grads):
        _assert_close(g, w, 1e-12, name)


def test_init_values_and_closed_forms():
    module = SigLIPLoss()
    assert module.logit_scale.item() == pytest.approx(math.log(10.0))
    assert module.logit_bias.item() == pytest.approx(-10.0)
    n = 6
    eye = torch.eye(n, 2 * n, dtype=torch.float64)  # orthonormal rows
    # x_i = y_i, orthogonal across pairs: positives have z = 10·1 − 10 = 0 (cost log 2 each),
    # negatives z = −10 (cost log(1 + e^−10) each); the sum divides by n. (rel 1e-6: the
    # parameters are float32, so t = exp(fp32(log 10)) is 10 to ~1e-7.)
    want = math.log(2.0) + (n - 1) * math.log1p(math.exp(-10.0))
    assert module.double()(eye, eye).item() == pytest.approx(want, rel=1e-6)
    # every image orthogonal to every text: all z = −10.
    other = torch.eye(n, 2 * n, dtype=torch.float64).roll(n, dims=1)
    want = math.log1p(math.exp(10.0)) + (n - 1) * math.log1p(math.exp(-10.0))
    assert module(eye, other).item() == pytest.approx(want, rel=1e-6)


def test_frozen_text_and_bf16_inputs():
    image, text = _embeddings(5, seed=1)
    _, want_grads = _reference_with_grads(image.double(), text.double())
    module = _module()
    leaf = image.clone().requires_grad_()
    module(leaf, text).backward()  # text without grad: the frozen text tower
    _assert_close(leaf.grad, want_grads[0], 1e-5, "image (frozen text)")

    bf_image, bf_text = (t.bfloat16().requires_grad_() for t in (image, text))
    loss = _module()(bf_image, bf_text)
    loss.backward()
    assert loss.dtype == torch.float32 and bf_image.grad.dtype == torch.bfloat16
    want_loss, _ = _reference_with_grads(bf_image.detach().double(), bf_text.detach().double())
    _assert_close(loss.detach(), want_loss, 1e-6, "bf16 loss (computed in fp32)")


# --- data parallel ---------------------------------------------------------------------------


def _dp_case(image, text, sizes, group, group_rank, frozen_text=False):
    """This rank's slice of the global batch through SigLIPLoss; loss, grads, block shapes."""
    import megatron_finevit.losses.siglip as siglip

    start = sum(sizes[:group_rank])
    rows = slice(start, start + sizes[group_rank])
    x = image[rows].clone().requires_grad_()
    y = text[rows].clone().requires_grad_(not frozen_text)
    module = _module()

    blocks, saved = [], []
    original = siglip._block_loss

    def recording_block_loss(img, txt, *args, **kwargs):
        blocks.append((img.shape[0], txt.shape[0]))
        return original(img, txt, *args, **kwargs)

    siglip._block_loss = recording_block_loss
    try:
        with torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
            loss = module(x, y, group)
        loss.backward()
    finally:
        siglip._block_loss = original
    return {"loss": loss.detach(), "image": x.grad, "text": y.grad,
            "logit_scale": module.logit_scale.grad, "logit_bias": module.logit_bias.grad,
            "blocks": blocks, "saved": saved}


def _dp_world(rank, world_size, image, text, cases):
    import torch.distributed as dist

    # DP = 2 on sub-groups {0, 2} and {1, 3}: group ranks differ from global ranks.
    pairs = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    out = {}
    for name, sizes, dp, frozen in cases:
        if dp == world_size:
            group, group_rank = dist.group.WORLD, rank
        else:
            group, group_rank = pairs[rank % 2], rank // 2
        out[name] = _dp_case(image, text, sizes, group, group_rank, frozen)
    return out


# (name, per-rank batch sizes, DP size, frozen text)
CASES = [
    ("dp4_equal", [4, 4, 4, 4], 4, False),
    ("dp4_unequal", [2, 5, 1, 3], 4, False),
    ("dp4_frozen_text", [3, 3, 3, 3], 4, True),
    ("dp2_unequal", [3, 6], 2, False),
]


@pytest.fixture(scope="module")
def dp_results():
    n = max(sum(sizes) for _, sizes, _, _ in CASES)
    image, text = _embeddings(n, seed=7)
    return image, text, run_world(_dp_world, 4, args=(image, text, CASES))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dp_equals_global_batch(dp_results, case):
    name, sizes, dp, frozen = case
    image, text, per_rank = dp_results
    total = sum(sizes)
    want_loss, want = _reference_with_grads(image[:total].double(), text[:total].double())
    # The two DP = 2 groups run the same slices; check both.
    groups = [list(range(4))] if dp == 4 else [[0, 2], [1, 3]]
    for ranks in groups:
        results = [per_rank[r][name] for r in ranks]
        _assert_close(torch.stack([r["loss"] for r in results]).mean(), want_loss, what="loss")
        # Gradients of the DP objective mean_r(loss_r): per-rank grads / dp, concatenated.
        _assert_close(torch.cat([r["image"] for r in results]) / dp, want[0], what="image grad")
        if frozen:
            assert all(r["text"] is None for r in results)
        else:
            _assert_close(torch.cat([r["text"] for r in results]) / dp, want[1], what="text grad")
        for i, param in ((2, "logit_scale"), (3, "logit_bias")):
            _assert_close(torch.stack([r[param] for r in results]).mean(), want[i], what=param)


def test_dp_peak_block_is_local_by_local(dp_results):
    """Forward and backward only ever form [b_r, b_s] blocks (one per ring step each way), and
    autograd keeps nothing larger than the local embeddings."""
    _, _, per_rank = dp_results
    for name, sizes, dp, frozen in CASES:
        if dp != 4:
            continue
        for rank in range(4):
            got = per_rank[rank][name]
            ring_order = [(sizes[rank], sizes[(rank - step) % 4]) for step in range(4)]
            assert got["blocks"] == ring_order * 2, (name, rank, got["blocks"])
            assert max(math.prod(s) for s in got["saved"]) <= sizes[rank] * DIM, got["saved"]
