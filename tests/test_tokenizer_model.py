"""Parity of our SAM 2 image and decoder paths with the sam2 package's own SAM2Base, and the
token layout of the SAMTok encoder/decoder prompts."""

import pytest
import torch

from samtok.tokenizer.model import SAMTokModel, TokenizerModelConfig, state_dict_shapes
from samtok.tokenizer.sam2_parts import SAM2Config, build_sam2_base

MICRO = dict(size="t", image_size=128, trunk_embed_dim=16, trunk_num_heads=1, trunk_stages=[1, 1, 2, 1],
             trunk_global_att_blocks=[3])


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    sam2cfg = SAM2Config(**MICRO)
    base = build_sam2_base(sam2cfg).eval()
    ours = SAMTokModel(TokenizerModelConfig(sam2=sam2cfg, gate_with_object_score=True)).eval()
    own = ours.state_dict()
    shared = {k: v for k, v in base.state_dict().items() if k in own}
    assert len(shared) == sum(1 for k in own if not k.startswith(("sam_mask_encoder", "quantizer")))
    ours.load_state_dict(shared, strict=False)
    return base, ours


def reference_features(base, x):
    out = base.forward_image(x)
    _, feats, _, sizes = base._prepare_backbone_features(out)
    feats[-1] = feats[-1] + base.no_mem_embed
    b = x.shape[0]
    embed = feats[-1].permute(1, 2, 0).reshape(b, -1, *sizes[-1])
    return embed, out["backbone_fpn"][0], out["backbone_fpn"][1]


@torch.no_grad()
def test_image_path_matches_sam2(pair):
    base, ours = pair
    x = torch.randn(2, 3, 128, 128)
    embed, s0, s1 = reference_features(base, x)
    f = ours.encode_image(x)
    torch.testing.assert_close(f.embed, embed)
    torch.testing.assert_close(f.high_res[0], s0)
    torch.testing.assert_close(f.high_res[1], s1)
    assert f.embed.shape == (2, 256, 8, 8)


@torch.no_grad()
@pytest.mark.parametrize("prompt", ["points", "mask", "none"])
def test_prompted_decoder_matches_sam2_forward_sam_heads(pair, prompt):
    base, ours = pair
    x = torch.randn(2, 3, 128, 128)
    embed, s0, s1 = reference_features(base, x)
    idx = torch.tensor([0, 1, 1])
    points = mask = None
    if prompt == "points":
        points = (torch.tensor([[[30.0, 40.0]], [[90.0, 20.0]], [[64.0, 64.0]]]), torch.ones(3, 1, dtype=torch.int32))
    if prompt == "mask":
        mask = (torch.rand(3, 1, 128, 128) > 0.5).float()
    ref = base._forward_sam_heads(
        backbone_features=embed[idx],
        point_inputs=None if points is None else {"point_coords": points[0], "point_labels": points[1]},
        mask_inputs=mask,
        high_res_features=[s0[idx], s1[idx]],
        multimask_output=True,
    )
    got = ours.decode_prompts(ours.encode_image(x), idx, points=points, mask_inputs=mask)
    torch.testing.assert_close(got.logits, ref[0])
    torch.testing.assert_close(got.iou_pred, ref[2])
    torch.testing.assert_close(got.best_logits, ref[3])


@torch.no_grad()
def test_encoder_prompts_are_box_corners_plus_padding(pair):
    _, ours = pair
    pe = ours.sam_prompt_encoder
    boxes = torch.tensor([[10.0, 20.0, 70.0, 100.0], [0.0, 0.0, 127.0, 127.0]])
    sparse, _ = pe(points=ours.box_prompt(boxes), boxes=None, masks=None)
    assert sparse.shape == (2, 3, 256)
    box_tokens, _ = pe(points=None, boxes=boxes, masks=None)  # SAM's own box embedding
    torch.testing.assert_close(sparse[:, :2], box_tokens)
    torch.testing.assert_close(sparse[:, 2], pe.not_a_point_embed.weight.expand(2, -1))


@torch.no_grad()
def test_code_decoder_token_layout(pair):
    _, ours = pair
    f = ours.encode_image(torch.randn(1, 3, 128, 128))
    codes = torch.tensor([[3, 7], [5, -1]])
    ours.cfg.gate_with_object_score = False  # the release never gates the decoded mask
    try:
        got = ours.decode_codes(f, torch.zeros(2, dtype=torch.long), codes)
    finally:
        ours.cfg.gate_with_object_score = True
    pe = ours.sam_prompt_encoder
    cb = ours.quantizer.codebooks
    vec = torch.stack([cb[0].weight[3] + cb[1].weight[7], cb[0].weight[5]])
    sparse = torch.cat([pe.not_a_point_embed.weight.expand(2, 2, -1), vec[:, None]], dim=1)
    dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(2, -1, 8, 8)
    logits, iou, _, _ = ours.sam_mask_decoder(
        image_embeddings=f.embed.expand(2, -1, -1, -1), image_pe=pe.get_dense_pe(), sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense, multimask_output=True, repeat_image=False,
        high_res_features=[h.expand(2, -1, -1, -1) for h in f.high_res],
    )
    torch.testing.assert_close(got.logits, logits)
    assert got.logits.shape == (2, 3, 32, 32)
    assert torch.equal(got.best_index, iou.argmax(1))


@torch.no_grad()
def test_minus_one_means_first_code_only_and_release_compat(pair):
    _, ours = pair
    q = ours.quantizer
    v_skip = q.embed_codes(torch.tensor([[4, -1]]))
    torch.testing.assert_close(v_skip, q.codebooks[0].weight[4:5])
    v_compat = q.embed_codes(torch.tensor([[4, -1]]), minus_one_as_code0=True)
    torch.testing.assert_close(v_compat, q.codebooks[0].weight[4:5] + q.codebooks[1].weight[0:1])
    assert torch.count_nonzero(q.codebooks[1].weight[-1]) == 0  # the padding row is zero


def test_every_hiera_size_builds_on_meta_device():
    import math

    expected = {"t": 39.0e6, "s": 46.1e6, "b+": 80.9e6, "l": 224.4e6}
    for size, n_sam2 in expected.items():
        shapes = state_dict_shapes(TokenizerModelConfig(sam2=SAM2Config(size=size, image_size=1024)))
        count = lambda pred: sum(math.prod(s) for k, s in shapes.items() if pred(k))  # noqa: E731
        sam2_params = count(lambda k: not k.startswith(("sam_mask_encoder", "quantizer", "sam_prompt_encoder.pe_layer")))
        # SAM2Base also holds ~4-6 M video-memory parameters that the tokenizer does not build
        assert 0.75 * n_sam2 < sam2_params < n_sam2, (size, sam2_params)
        assert count(lambda k: k.startswith("sam_mask_encoder")) == 3_291_520


def test_bad_trunk_config_is_refused():
    from samtok.core.errors import SamtokError

    with pytest.raises(SamtokError, match="not be its first block"):
        SAMTokModel(TokenizerModelConfig(sam2=SAM2Config(**{**MICRO, "trunk_global_att_blocks": [2]})))
    with pytest.raises(SamtokError, match="one of"):
        SAMTokModel(TokenizerModelConfig(sam2=SAM2Config(size="xl")))
