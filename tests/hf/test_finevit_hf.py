"""The transformers classes of megatron_finevit.hf on tiny random models:

- Auto* registration: ``save_pretrained`` -> ``AutoModel`` / ``AutoModelForImageTextToText``
  ``.from_pretrained`` gives the same class and outputs;
- FineViT: a pack of images equals each image encoded alone; the 2D RoPE angles equal
  ``models.vit.rope2d`` (megatron's table);
- FineViT-VL: placeholders take the image features (against an embedding built by hand),
  the image features equal FineViT + projector run separately, and greedy ``generate()`` (KV
  cache) equals a greedy loop that re-runs the whole sequence each step.
"""

import pytest
import torch

import megatron_finevit.hf as hf
from megatron_finevit.models.vit import pack_images
from megatron_finevit.models.vit.rope2d import image_rope_angles

IMAGE_TOKEN = 5
VISION = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2)
TEXT = dict(model_type="qwen3", vocab_size=96, hidden_size=48, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
            initializer_range=0.2, bos_token_id=None, eos_token_id=None, pad_token_id=0)
SIZES = [(56, 28), (28, 84), (28, 28)]  # (H, W) pixels: 8, 12 and 4 patches


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    packed = pack_images([torch.randn(3, h, w, generator=g) for h, w in SIZES])
    grids = torch.cat([torch.ones(len(packed.grids), 1, dtype=torch.long), packed.grids], dim=1)
    return packed.patches, grids


def _randomise_norms(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    return _randomise_norms(hf.FineViTHFModel(hf.FineViTHFConfig(**VISION))).eval()


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def vl(request):
    torch.manual_seed(1)
    config = hf.FineViTVLHFConfig(vision_config=VISION,
                                  text_config={**TEXT, "tie_word_embeddings": request.param},
                                  image_token_id=IMAGE_TOKEN)
    return _randomise_norms(hf.FineViTVLForConditionalGeneration(config)).eval()


def _prompt():
    """Text, image 1's 2 + image 2's 3 + image 3's 1 placeholders (one per 2x2 window), text."""
    tokens = [11, 12] + [IMAGE_TOKEN] * 2 + [13] + [IMAGE_TOKEN] * 3 + [IMAGE_TOKEN] + [14, 15]
    return torch.tensor([tokens])


def test_vit_pack_equals_each_image_alone(vit):
    pixel_values, grids = _inputs()
    with torch.no_grad():
        packed = vit(pixel_values, grids).last_hidden_state
        alone = [vit(p, g[None]).last_hidden_state
                 for p, g in zip(pixel_values.split((grids[:, 1] * grids[:, 2]).tolist()), grids)]
    assert packed.std() > 0.1
    assert (packed - torch.cat(alone)).abs().max() <= 1e-5


def test_vit_rope_matches_megatron_table(vit):
    grids = [(4, 6), (2, 2)]
    cos, sin = vit.rotary(grids, merge_size=2)
    angles = torch.cat([image_rope_angles(h, w, vit.config.head_dim) for h, w in grids])
    assert torch.allclose(cos, angles.cos(), atol=1e-6)
    assert torch.allclose(sin, angles.sin(), atol=1e-6)


def test_vit_rejects_mismatched_grids(vit):
    pixel_values, grids = _inputs()
    with pytest.raises(ValueError, match="grids imply"):
        vit(pixel_values[:-4], grids)


def test_auto_classes_round_trip(vit, vl, tmp_path):
    from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

    vit.save_pretrained(tmp_path / "vit")
    vl.save_pretrained(tmp_path / "vl")
    assert AutoConfig.from_pretrained(tmp_path / "vl").model_type == "finevit_vl"
    loaded_vit = AutoModel.from_pretrained(tmp_path / "vit").eval()
    loaded_vl = AutoModelForImageTextToText.from_pretrained(tmp_path / "vl").eval()
    assert type(loaded_vit) is hf.FineViTHFModel
    assert type(loaded_vl) is hf.FineViTVLForConditionalGeneration
    pixel_values, grids = _inputs()
    with torch.no_grad():
        assert torch.equal(loaded_vit(pixel_values, grids).last_hidden_state,
                           vit(pixel_values, grids).last_hidden_state)
        args = dict(input_ids=_prompt(), pixel_values=pixel_values, image_grid_thw=grids)
        assert torch.equal(loaded_vl(**args).logits, vl(**args).logits)


def test_vl_image_features_are_vit_plus_projector(vl):
    pixel_values, grids = _inputs()
    with torch.no_grad():
        features = vl.get_image_features(pixel_values, grids)
        separately = vl.projector(vl.visual(pixel_values, grids).last_hidden_state)
    assert features.shape == (6, TEXT["hidden_size"])
    assert torch.equal(features, separately)


def test_vl_placeholders_take_the_image_features(vl):
    pixel_values, grids = _inputs()
    ids = _prompt()
    with torch.no_grad():
        features = vl.get_image_features(pixel_values, grids)
        table = vl.get_input_embeddings().weight
        rows, next_feature = [], 0
        for token in ids[0].tolist():  # built token by token, independently of masked_scatter
            if token == IMAGE_TOKEN:
                rows.append(features[next_feature])
                next_feature += 1
            else:
                rows.append(table[token])
        want = vl.language_model(inputs_embeds=torch.stack(rows)[None]).logits
        got = vl(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grids).logits
        text_only = vl(input_ids=ids.masked_fill(ids == IMAGE_TOKEN, 1)).logits
    assert torch.equal(got, want)
    assert (got - text_only).abs().max() > 1e-3  # the image changes the prediction
    with pytest.raises(ValueError, match="image tokens"):
        vl(input_ids=ids[:, :-3], pixel_values=pixel_values, image_grid_thw=grids)


def test_vl_generate_equals_manual_greedy_loop(vl):
    pixel_values, grids = _inputs()
    ids, steps = _prompt(), 6
    generated = vl.generate(input_ids=ids, pixel_values=pixel_values, image_grid_thw=grids,
                            max_new_tokens=steps, do_sample=False)
    manual = ids
    with torch.no_grad():
        for _ in range(steps):  # no cache: the whole sequence, with the image, every step
            logits = vl(input_ids=manual, pixel_values=pixel_values, image_grid_thw=grids,
                        use_cache=False).logits
            manual = torch.cat([manual, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(generated, manual)
    assert len(set(manual[0, ids.shape[1]:].tolist())) > 1  # not a degenerate repetition


def test_paper_preset_exports_to_the_same_parameter_count():
    from megatron_finevit.config.vit import finevit_0p86b
    from megatron_finevit.convert.finevit import vit_hf_config

    paper = finevit_0p86b()
    fields = {k: v for k, v in vit_hf_config(paper).items() if k != "model_type"}
    with torch.device("meta"):
        model = hf.FineViTHFModel(hf.FineViTHFConfig(**fields))
    assert sum(p.numel() for p in model.parameters()) == paper.num_parameters() == 859_774_464
