"""GCG (GLaMM protocol): AP50 through pycocotools, greedy mIoU pairing, phrase recall, captions."""

import math

import numpy as np
import pytest
import torch

from samtok.core.errors import SamtokError
from samtok.eval.gcg import (
    CharNgramSimilarity,
    EmbeddingPhraseSimilarity,
    coco_ap50,
    greedy_pairing_miou,
    greedy_phrase_matches,
    iou_matrix,
)
from samtok.eval.metrics import GCGMetric

H, W = 20, 30


def box(y0, y1, x0, x1):
    m = torch.zeros(H, W, dtype=torch.bool)
    m[y0:y1, x0:x1] = True
    return m


G1 = box(0, 10, 0, 10)  # 100 px
G2 = box(10, 20, 15, 25)  # 100 px
G3 = box(0, 5, 20, 30)  # 50 px
HALF_G2 = box(10, 15, 15, 25)  # IoU 0.5 with G2
ELSEWHERE = box(15, 20, 0, 10)  # touches no GT


def stack(*masks):
    return torch.stack(masks) if masks else torch.zeros(0, H, W, dtype=torch.bool)


# ------------------------------------------------------------------------------------------------
# mIoU pairing


def test_miou_more_predictions_than_gt():
    m = GCGMetric()
    m.update([stack(G1, HALF_G2, ELSEWHERE)], [stack(G1, G2)])
    out = m.compute()
    # pairs (G1, G1) = 1.0 and (HALF_G2, G2) = 0.5; the extra prediction is ignored (GLaMM)
    assert out["mIoU"] == pytest.approx(0.75)
    assert out["num_pred_masks"] == 3.0 and out["num_gt_masks"] == 2.0


def test_miou_more_gt_than_predictions_and_images_without_pairs():
    m = GCGMetric()
    m.update([stack(G1)], [stack(G1, G2, G3)])  # missed GT masks do not count: 1.0
    m.update([stack()], [stack(G1)])  # no prediction: 0
    m.update([stack(ELSEWHERE)], [stack(G1)])  # no overlapping prediction: 0
    out = m.compute()
    assert out["mIoU"] == pytest.approx(1 / 3)
    assert out["num_images"] == 3.0


def test_greedy_pairing_is_greedy_not_optimal():
    ious = np.array([[0.9, 0.8], [0.85, 0.1]])
    # greedy takes 0.9 first, leaving 0.1; the optimal assignment would be 0.8 + 0.85
    assert greedy_pairing_miou(ious) == pytest.approx(0.5)
    assert greedy_pairing_miou(np.zeros((2, 3))) == 0.0
    assert greedy_pairing_miou(np.zeros((0, 3))) == 0.0


def test_iou_matrix_values():
    ious = iou_matrix([G1.numpy(), HALF_G2.numpy()], [G1.numpy(), G2.numpy(), np.zeros((H, W), bool)])
    np.testing.assert_allclose(ious, [[1, 0, 0], [0, 0.5, 0]])


# ------------------------------------------------------------------------------------------------
# recall


def test_phrase_matches_glamm_stops_at_first_failing_pair():
    ious = np.array([[0.9, 0.0], [0.0, 0.7]])  # (GT, pred)
    sims = np.array([[0.1, 0.0], [0.0, 0.9]])  # the best-IoU pair has dissimilar phrases
    assert greedy_phrase_matches(ious, sims, mode="glamm") == []
    assert greedy_phrase_matches(ious, sims, mode="admissible") == [(1, 1)]
    assert greedy_phrase_matches(ious, np.ones_like(ious)) == [(0, 0), (1, 1)]
    assert greedy_phrase_matches(np.array([[0.49]]), np.ones((1, 1))) == []
    with pytest.raises(ValueError):
        greedy_phrase_matches(ious, sims, mode="hungarian")


def test_recall_over_all_gt_phrases():
    m = GCGMetric()
    m.update(
        [stack(G1, HALF_G2), stack()],
        [stack(G1, G2, G3), stack(G1)],
        pred_phrases=[["a red car", "the dog"], []],
        target_phrases=[["a red car", "a dog", "a tree"], ["a cat"]],
    )
    out = m.compute()
    # image 0: (G1, "a red car") matched (IoU 1, same phrase); then (G2, "a dog"/"the dog")
    # IoU 0.5 and char-trigram cosine >= 0.5; G3 unmatched. Image 1: nothing. 2 of 4 GT phrases.
    assert CharNgramSimilarity()(["a dog"], ["the dog"])[0, 0] >= 0.5
    assert out["recall"] == pytest.approx(2 / 4)
    assert out["num_gt_phrases"] == 4.0
    assert out["phrase_similarity"] == "char3-tf-cosine"


def test_recall_with_a_custom_similarity_callable():
    def always_similar(a, b):
        return np.ones((len(a), len(b)))

    m = GCGMetric(phrase_similarity=always_similar)
    m.update([stack(G1, G2)], [stack(G1, G2)], [["x", "y"]], [["completely", "different"]])
    out = m.compute()
    assert out["recall"] == 1.0 and out["phrase_similarity"] == "always_similar"
    strict = GCGMetric()
    strict.update([stack(G1, G2)], [stack(G1, G2)], [["x", "y"]], [["completely", "different"]])
    assert strict.compute()["recall"] == 0.0


def test_char_ngram_similarity():
    s = CharNgramSimilarity(3)
    sims = s(["a man", "The  MAN", ""], ["a man", "dog", ""])
    assert sims.shape == (3, 3)
    assert sims[0, 0] == pytest.approx(1.0)
    assert sims[0, 1] == 0.0
    assert sims[2, 2] == 0.0  # empty strings are not similar to anything
    assert 0.3 < sims[1, 0] < 1.0


def test_embedding_similarity_loads_a_local_model_only(tmp_path):
    from transformers import BertConfig, BertModel, BertTokenizer

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "the", "man", "dog", "red", "car"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    BertTokenizer(vocab_file=str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    cfg = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32)
    BertModel(cfg).save_pretrained(tmp_path)
    sim = EmbeddingPhraseSimilarity(str(tmp_path), batch_size=2)
    assert sim.name == f"embedding-mean:{tmp_path.name}"
    s = sim(["a man", "the red car", "dog"], ["a man", "dog"])
    assert s.shape == (3, 2)
    assert s[0, 0] == pytest.approx(1.0, abs=1e-6) and s[2, 1] == pytest.approx(1.0, abs=1e-6)
    # mean pooling ignores padding: a phrase embeds the same alone and in a padded batch
    np.testing.assert_allclose(sim.embed(["dog"]), sim.embed(["dog", "the red car"])[:1], atol=1e-6)
    m = GCGMetric(phrase_similarity=str(tmp_path))
    m.update([stack(G1)], [stack(G1)], [["a man"]], [["a man"]])
    out = m.compute()
    assert out["recall"] == 1.0 and out["phrase_similarity"] == sim.name
    with pytest.raises(SamtokError, match="not a local directory"):
        EmbeddingPhraseSimilarity(str(tmp_path / "bert-base-uncased"))


# ------------------------------------------------------------------------------------------------
# AP50


def test_ap50_perfect_disjoint_and_partial():
    perfect = GCGMetric()
    perfect.update([stack(G1, G2), stack(G3)], [stack(G1, G2), stack(G3)])
    assert perfect.compute()["AP50"] == pytest.approx(1.0)
    disjoint = GCGMetric()
    disjoint.update([stack(ELSEWHERE)], [stack(G1)])
    assert disjoint.compute()["AP50"] == 0.0
    nothing = GCGMetric()
    nothing.update([stack()], [stack(G1)])
    assert nothing.compute()["AP50"] == 0.0
    # one of two GT masks found, no false positive: precision 1 up to recall 0.5, i.e. 51 of
    # COCO's 101 recall points
    half = GCGMetric()
    half.update([stack(G1)], [stack(G1, G2)])
    assert half.compute()["AP50"] == pytest.approx(51 / 101)
    # IoU exactly 0.5 is a hit at the 0.5 threshold
    edge = GCGMetric()
    edge.update([stack(HALF_G2)], [stack(G2)])
    assert edge.compute()["AP50"] == pytest.approx(1.0)


def test_coco_ap50_without_gt_is_nan():
    from samtok.core.masks import encode_rle

    rle = encode_rle(G1.numpy())
    rle["counts"] = rle["counts"].encode()
    assert math.isnan(coco_ap50([(1, H, W)], [], [(1, rle)]))


# ------------------------------------------------------------------------------------------------
# captions and validation


def test_gcg_captions_strip_markup():
    m = GCGMetric()
    pred = ("<|object_ref_start|>A man<|object_ref_end|><|mt_start|><|mt_0001|><|mt_0300|><|mt_end|> "
            "rides a horse.")
    m.update([stack(G1)], [stack(G1)], pred_captions=[pred], target_captions=["a man rides a horse"])
    m.update([stack(G2)], [stack(G2)], pred_captions=["two dogs"], target_captions=[["two dogs", "dogs"]])
    out = m.compute()
    assert out["BLEU-1"] == pytest.approx(1.0)
    assert out["METEOR (exact-match only)"] == pytest.approx(1.0)
    assert out["ROUGE-L"] == pytest.approx(1.0)
    assert out["CIDEr-D"] > 0
    assert math.isnan(out["recall"])  # no phrases given


def test_gcg_validation():
    m = GCGMetric()
    with pytest.raises(SamtokError, match="image 0: 1 predicted phrases for 2 predicted masks"):
        m.update([stack(G1, G2)], [stack(G1)], [["a"]], [["b"]])
    with pytest.raises(SamtokError, match="image 1"):
        m.update([stack(G1), stack(G1)], [stack(G1), torch.zeros(1, H + 1, W, dtype=torch.bool)])
    with pytest.raises(SamtokError, match="both pred_captions and target_captions"):
        m.update([stack(G1)], [stack(G1)], pred_captions=["x"])
    with pytest.raises(SamtokError, match="one 2-D mask"):
        m.update([G1], [stack(G1)])
    m.update([stack(G1)], [stack(G1)], [["a"]], [["a"]])
    m.update([stack(G1)], [stack(G1)])
    with pytest.raises(SamtokError, match="phrases were given in some updates"):
        m.compute()


def test_gcg_image_ids_make_ap_order_independent():
    preds = [stack(G1, ELSEWHERE), stack(HALF_G2), stack(G3)]
    gts = [stack(G1), stack(G2, G3), stack(G3)]
    a = GCGMetric()
    a.update(preds, gts, image_ids=[7, 3, 5])
    b = GCGMetric()
    b.update(preds[::-1], gts[::-1], image_ids=[5, 3, 7])
    assert a.compute() == b.compute()
    with pytest.raises(SamtokError, match="not unique"):
        c = GCGMetric()
        c.update(preds[:2], gts[:2], image_ids=[1, 1])
        c.compute()
