"""The 514 mask words in the LLM vocabulary, and embedding rows for them (spec §2).

Two steps, each idempotent:

1. :func:`add_mask_tokens` appends ``MaskCodec().tokens`` (``<|mt_start|>``, ``<|mt_0000|>`` …
   ``<|mt_0511|>``, ``<|mt_end|>``) to a tokenizer as ordinary, NON-special added tokens, in that
   order, so they get consecutive ids (151665 … 152178 with Qwen2.5-VL's tokenizer) and survive
   ``decode(..., skip_special_tokens=True)``. A tokenizer that already holds all of them in order
   (the released Qwen2.5-VL-3B-SAMTok, or one of ours) is left alone; a partial or out-of-order set
   is an error.
2. :func:`resize_embeddings_for_mask_tokens` makes sure the model's embedding matrix has a row for
   every token and initialises the rows of NEW mask tokens. Qwen-VL matrices have more rows than the
   tokenizer has tokens (151,936 or 152,064 vs 151,665): the matrix is never shrunk, spare rows are
   used as they are, and grown only when needed. New input-embedding rows are
   ``mean + 0.02 · N(0, 1) · std`` with per-dimension mean and std (std clamped ≥ 1e-3) of the OLD
   vocabulary rows (ids below the first mask id); an untied ``lm_head`` gets the same rule from its
   own rows; tied weights stay tied.

"New" mask tokens are the ones :func:`add_mask_tokens` added to that very tokenizer object (the
tokenizer remembers them until their rows are initialised), plus every mask token whose row had to
be created by growing the matrix. Rows that already existed for a tokenizer that already had the
tokens (a trained SAMTok model) are never touched unless ``initialize=True``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from samtok.core.errors import SamtokError
from samtok.core.runtime import get_logger
from samtok.tokenizer.codec import MaskCodec

log = get_logger("samtok.mllm.vocab")

INIT_NOISE_SCALE = 0.02
INIT_MIN_STD = 1e-3
_PENDING_ATTR = "_samtok_mask_rows_to_init"  # set on a tokenizer object by add_mask_tokens


class MaskVocabularyError(SamtokError):
    """The tokenizer holds some mask words but not all of them, or not in the codec's order."""


@dataclass
class MaskVocabReport:
    """What :func:`add_mask_tokens` found or did."""

    added: int  # tokens added now (0 when they were already there)
    first_id: int  # id of <|mt_start|>
    last_id: int  # id of <|mt_end|>
    num_tokens: int  # 2 + depth × codebook_size (514)
    tokenizer_len: int  # len(tokenizer) afterwards
    special: bool = False  # True if the existing tokens are marked special (not how SAMTok adds them)

    @property
    def ids(self) -> list[int]:
        return list(range(self.first_id, self.last_id + 1))


@dataclass
class EmbeddingReport:
    """What :func:`resize_embeddings_for_mask_tokens` did to the model."""

    rows_before: int  # input-embedding rows before
    rows_after: int  # input-embedding rows after (never smaller)
    old_vocab_size: int  # rows used for the statistics (ids < first mask id)
    resized: bool  # the matrix had to grow
    spare_rows_used: int  # mask tokens whose rows existed beyond the old vocabulary before
    initialized_ids: list[int] = field(default_factory=list)  # rows (re)initialised, input and output
    tied: bool = False  # lm_head shares the input embedding matrix
    lm_head_initialized: bool = False  # an untied lm_head got its own initialisation

    @property
    def num_initialized(self) -> int:
        return len(self.initialized_ids)


def _codec(codec: Optional[MaskCodec]) -> MaskCodec:
    return codec if codec is not None else MaskCodec()


def _text_tokenizer(tokenizer_or_processor):
    return getattr(tokenizer_or_processor, "tokenizer", tokenizer_or_processor)


def _lookup(tokenizer, tokens: Sequence[str]) -> list[Optional[int]]:
    vocab = tokenizer.get_vocab()
    return [vocab.get(t) for t in tokens]


def mask_vocabulary_status(tokenizer, codec: Optional[MaskCodec] = None) -> Optional[MaskVocabReport]:
    """The mask words' place in ``tokenizer``: None when absent, a report when all are there in order.

    Raises :class:`MaskVocabularyError` for a partial set or one whose ids are not consecutive in
    the codec's order.
    """
    tokenizer = _text_tokenizer(tokenizer)
    tokens = _codec(codec).tokens
    ids = _lookup(tokenizer, tokens)
    present = [i for i in ids if i is not None]
    if not present:
        return None
    if len(present) != len(tokens):
        missing = [t for t, i in zip(tokens, ids) if i is None]
        raise MaskVocabularyError(
            f"the tokenizer holds {len(present)} of the {len(tokens)} mask tokens; missing e.g. {missing[:3]}"
        )
    first = ids[0]
    expected = list(range(first, first + len(tokens)))
    if ids != expected:
        bad = next(k for k, (a, b) in enumerate(zip(ids, expected)) if a != b)
        raise MaskVocabularyError(
            f"mask tokens are not consecutive in codec order: {tokens[bad]} has id {ids[bad]}, expected {expected[bad]}"
        )
    decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special = any(getattr(decoder.get(i), "special", False) for i in (ids[0], ids[1], ids[-1]))
    return MaskVocabReport(
        added=0, first_id=first, last_id=ids[-1], num_tokens=len(tokens), tokenizer_len=len(tokenizer), special=special
    )


def add_mask_tokens(tokenizer, codec: Optional[MaskCodec] = None) -> MaskVocabReport:
    """Append the mask words as non-special added tokens (idempotent). Accepts a processor too.

    Returns:
        :class:`MaskVocabReport`; ``added`` is 0 when the tokenizer already had them.
    """
    from tokenizers import AddedToken

    tokenizer = _text_tokenizer(tokenizer)
    codec = _codec(codec)
    status = mask_vocabulary_status(tokenizer, codec)
    if status is not None:
        if status.special:
            log.warning("the tokenizer's mask tokens are marked special: skip_special_tokens=True will drop them")
        return status
    tokens = codec.tokens
    start = len(tokenizer)
    new = [AddedToken(t, special=False, normalized=False, lstrip=False, rstrip=False, single_word=False) for t in tokens]
    added = tokenizer.add_tokens(new, special_tokens=False)
    report = mask_vocabulary_status(tokenizer, codec)
    if report is None or added != len(tokens):
        raise MaskVocabularyError(f"adding {len(tokens)} mask tokens added {added}")
    if report.first_id != start:
        raise MaskVocabularyError(f"mask tokens start at id {report.first_id}, expected len(tokenizer) = {start}")
    report.added = added
    setattr(tokenizer, _PENDING_ATTR, report.ids)
    return report


def mask_token_ids(tokenizer, codec: Optional[MaskCodec] = None) -> list[int]:
    """Ids of the mask words in codec order (start, codes…, end). Raises when they are missing."""
    status = mask_vocabulary_status(tokenizer, codec)
    if status is None:
        raise MaskVocabularyError("the tokenizer has no mask tokens: call samtok.mllm.vocab.add_mask_tokens first")
    return status.ids


def mask_code_token_ids(tokenizer, codec: Optional[MaskCodec] = None) -> list[int]:
    """Ids of the code words only (``<|mt_0000|>`` … ``<|mt_0511|>``), without start/end."""
    return mask_token_ids(tokenizer, codec)[1:-1]


def code_token_ids_by_depth(tokenizer, codec: Optional[MaskCodec] = None) -> tuple[list[int], list[int]]:
    """Ids of the depth-0 code words and of the depth-1 code words (``codec.codebook_size`` each)."""
    k = _codec(codec).codebook_size
    ids = mask_code_token_ids(tokenizer, codec)
    return ids[:k], ids[k:2 * k]


def _is_tied(model) -> bool:
    out = model.get_output_embeddings()
    if out is None:
        return True
    return out.weight is model.get_input_embeddings().weight or (
        out.weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    )


@torch.no_grad()
def column_statistics(matrix: torch.Tensor, chunk_rows: int = 16384) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column mean and (unbiased) std of ``(N, D)`` ``matrix`` as float32 CPU tensors ``(D,)``.

    Accumulated in float64 over row chunks, so a 152k × 3584 bf16 matrix needs no full float copy.
    """
    n = int(matrix.shape[0])
    total = torch.zeros(matrix.shape[1], dtype=torch.float64, device=matrix.device)
    for start in range(0, n, chunk_rows):
        total += matrix[start:start + chunk_rows].double().sum(dim=0)
    mean = total / n
    squares = torch.zeros_like(total)
    for start in range(0, n, chunk_rows):
        squares += ((matrix[start:start + chunk_rows].double() - mean) ** 2).sum(dim=0)
    std = (squares / max(n - 1, 1)).sqrt()
    return mean.float().cpu(), std.float().cpu()


@torch.no_grad()
def init_rows_from_statistics(
    weight: torch.Tensor, rows: Sequence[int], old_vocab_size: int, generator: Optional[torch.Generator] = None
) -> None:
    """``weight[rows] = mean + 0.02 · N(0,1) · max(std, 1e-3)`` with per-column stats of ``weight[:old_vocab_size]``.

    Args:
        weight: ``(num_rows, dim)`` matrix (embedding or lm_head), changed in place, dtype kept.
        rows: row indices to (re)initialise, all ``>= old_vocab_size``.
        old_vocab_size: rows ``[0, old_vocab_size)`` are the trusted old vocabulary.
        generator: CPU generator for the noise (reproducible initialisation).
    """
    if not rows:
        return
    if old_vocab_size < 2:
        raise ValueError(f"need at least two old rows for statistics, got {old_vocab_size}")
    if min(rows) < old_vocab_size:
        raise ValueError("refusing to re-initialise a row of the old vocabulary")
    mean, std = column_statistics(weight[:old_vocab_size])
    std = std.clamp_min(INIT_MIN_STD)
    noise = torch.randn((len(rows), weight.shape[1]), generator=generator, dtype=torch.float32)
    new = mean + INIT_NOISE_SCALE * noise * std
    index = torch.as_tensor(list(rows), dtype=torch.long, device=weight.device)
    weight.index_copy_(0, index, new.to(device=weight.device, dtype=weight.dtype))


def resize_embeddings_for_mask_tokens(
    model,
    tokenizer,
    codec: Optional[MaskCodec] = None,
    initialize: Optional[bool] = None,
    pad_to_multiple_of: Optional[int] = None,
    seed: int = 0,
) -> EmbeddingReport:
    """Give every token of ``tokenizer`` an embedding row and initialise the new mask rows.

    Args:
        model: a transformers model with input (and optionally output) embeddings.
        tokenizer: tokenizer (or processor) that already holds the mask words.
        codec: mask codec (default 2 × 256 → 514 words).
        initialize: None (default) initialises the rows of NEW mask tokens (see the module
            docstring); True re-initialises all mask rows; False initialises none (rows created by
            growing the matrix are still filled by the same rule: nothing is left uninitialised).
        pad_to_multiple_of: when the matrix must grow, round its new size up to this multiple.
        seed: seed of the initialisation noise.

    Returns:
        :class:`EmbeddingReport`.
    """
    tok = _text_tokenizer(tokenizer)
    ids = mask_token_ids(tok, codec)
    first = ids[0]
    emb = model.get_input_embeddings()
    if hasattr(emb.weight, "ds_id") or emb.weight.dim() != 2 or emb.weight.numel() == 0:
        raise MaskVocabularyError(
            "the embedding matrix is partitioned (DeepSpeed ZeRO-3): add the mask vocabulary before the model "
            "is wrapped by DeepSpeed (see docs/distributed.md)")
    rows_before = int(emb.weight.shape[0])
    tied = _is_tied(model)
    needed = max(len(tok), ids[-1] + 1)
    grown_rows: list[int] = []
    if needed > rows_before:
        target = needed
        if pad_to_multiple_of:
            target = int(math.ceil(needed / pad_to_multiple_of) * pad_to_multiple_of)
        model.resize_token_embeddings(target, mean_resizing=False)
        grown_rows = list(range(rows_before, target))
        emb = model.get_input_embeddings()
        if tied and not _is_tied(model):  # pragma: no cover - transformers re-ties on resize
            raise SamtokError("input and output embeddings became untied while resizing")
    rows_after = int(emb.weight.shape[0])

    pending = set(getattr(tok, _PENDING_ATTR, None) or [])
    if initialize is True:
        to_init = set(ids)
    elif initialize is False:
        to_init = set()
    else:
        to_init = {i for i in ids if i in pending}
        if any(i >= rows_before for i in ids):
            # Some mask rows did not exist: the model has never been trained with these words, so
            # the ones that sat in spare rows are untrained too.
            to_init |= set(ids)
    # Rows created by growing the matrix (mask rows and padding rows alike) never keep the resize's
    # own initialisation: the whole grown block follows the same rule.
    to_init |= set(grown_rows)
    rows = sorted(to_init)

    gen = torch.Generator().manual_seed(seed)
    init_rows_from_statistics(emb.weight, rows, first, generator=gen)
    lm_head_init = False
    if not tied:
        out = model.get_output_embeddings()
        if out.weight.shape[0] != rows_after:  # pragma: no cover - resize keeps them equal
            raise SamtokError(f"lm_head has {out.weight.shape[0]} rows, embeddings {rows_after}")
        init_rows_from_statistics(out.weight, rows, first, generator=gen)
        lm_head_init = bool(rows)
    if pending:
        try:
            delattr(tok, _PENDING_ATTR)
        except AttributeError:  # pragma: no cover
            pass
    spare = sum(1 for i in ids if i < rows_before)
    report = EmbeddingReport(
        rows_before=rows_before,
        rows_after=rows_after,
        old_vocab_size=first,
        resized=rows_after > rows_before,
        spare_rows_used=spare,
        initialized_ids=rows,
        tied=tied,
        lm_head_initialized=lm_head_init,
    )
    log.info(
        "mask embeddings: rows %d -> %d, %d spare rows used, %d rows initialised, %s",
        rows_before, rows_after, spare, len(rows), "tied" if tied else "untied lm_head",
    )
    return report


def add_mask_vocabulary(model, tokenizer, codec: Optional[MaskCodec] = None, seed: int = 0):
    """Both steps: :func:`add_mask_tokens` then :func:`resize_embeddings_for_mask_tokens`.

    Returns:
        ``(MaskVocabReport, EmbeddingReport)``.
    """
    vocab = add_mask_tokens(tokenizer, codec)
    emb = resize_embeddings_for_mask_tokens(model, tokenizer, codec, seed=seed)
    return vocab, emb


@torch.no_grad()
def init_code_rows_from_codebooks(model, tokenizer, codebooks: Sequence[torch.Tensor], seed: int = 0) -> int:
    """Initialise the embedding (and untied lm_head) rows of the code words from the tokenizer's codebooks.

    An option beyond the release (which uses :func:`init_rows_from_statistics`): code ``k`` of depth
    ``d`` gets ``Q · (codebooks[d][k] - mean_d)``, with ``Q`` a fixed random orthonormal map from the
    codebook width to the model width (a PCA to the model width when the codebook is wider), rescaled
    to the median norm of the text rows. Codes whose vectors are close — which decode to similar
    masks — then start with similar rows, so the output layer has a geometry in which a nearly right
    prediction picks a nearby mask. Returns the number of rows written.
    """
    ids = mask_code_token_ids(tokenizer)
    size = len(ids) // max(1, len(codebooks))
    emb = model.get_input_embeddings().weight
    hidden = emb.shape[1]
    first_mask_id = min(ids) - 1  # <|mt_start|> precedes the codes
    text_norm = emb[:first_mask_id].float().norm(dim=1).median()
    g = torch.Generator().manual_seed(seed)
    written = 0
    heads = [emb]
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != emb.data_ptr():
        heads.append(head.weight)
    for d, codes in enumerate(codebooks):
        v = codes.float().cpu()
        v = v - v.mean(0, keepdim=True)
        c = v.shape[1]
        if c <= hidden:
            q, _ = torch.linalg.qr(torch.randn(hidden, c, generator=g))
            rows = v @ q.t()
        else:
            _, _, vt = torch.linalg.svd(v, full_matrices=False)
            rows = v @ vt[:hidden].t()
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-8) * text_norm
        index = torch.as_tensor(ids[d * size:(d + 1) * size], dtype=torch.long)
        for w in heads:
            w.index_copy_(0, index.to(w.device), rows.to(w.device, w.dtype))
        written += len(index)
    return written


# ------------------------------------------------------------------------------------------------
# first-code rows from the boxes of the masks each code stands for (an option beyond the release)

GEOMETRY_FREQUENCIES = (1, 2, 4, 8, 16)


def code_box_centroids(table, records, codebook_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Mean box ``(cx, cy, w, h)`` (fractions of the image side) of the masks each first code stands for.

    Args:
        table: the :class:`~samtok.data.pretokenize.CodeTable` of the training data.
        records: ``{(source, image_id): ImageRecord}`` (``MixtureData.records``); masks absent from the
            table (e.g. another split) are skipped.

    Returns:
        ``(centroids (K, 4), counts (K,))``; a code no mask uses gets the mean box of all masks.
    """
    total = np.zeros((codebook_size, 4))
    counts = np.zeros(codebook_size)
    for (source, image_id), rec in records.items():
        for ann in rec.anns:
            if (source, image_id, ann.ann_id) not in table:
                continue
            c0, _ = table.get(source, image_id, ann.ann_id)
            x0, y0, x1, y1 = rec.box(ann.ann_id)  # inclusive pixels
            w, h = x1 - x0 + 1, y1 - y0 + 1
            total[c0] += ((x0 + w / 2) / rec.width, (y0 + h / 2) / rec.height, w / rec.width, h / rec.height)
            counts[c0] += 1
    if counts.sum() == 0:
        raise ValueError("no mask of the records is in the code table: nothing to take code geometry from")
    mean = total.sum(0) / counts.sum()
    centroids = np.where(counts[:, None] > 0, total / np.maximum(counts[:, None], 1), mean)
    return centroids, counts


def box_features(boxes: np.ndarray, frequencies: Sequence[float] = GEOMETRY_FREQUENCIES) -> torch.Tensor:
    """``(N, 4)`` boxes in [0, 1] → ``(N, 1 + 8·F)`` features: a constant, then sin and cos of
    ``pi · f · coordinate`` for every frequency ``f``. Their dot product is a kernel that peaks at
    equal boxes: ``1 + sum_f sum_coord cos(pi f (a - b))``."""
    b = torch.as_tensor(np.asarray(boxes), dtype=torch.float32)
    parts = [torch.ones(b.shape[0], 1)]
    for f in frequencies:
        parts += [torch.sin(math.pi * f * b), torch.cos(math.pi * f * b)]
    return torch.cat(parts, dim=1)


@torch.no_grad()
def init_first_code_rows_from_geometry(model, tokenizer, centroids: np.ndarray, seed: int = 0,
                                       head_norm: float = 1.0) -> list[int]:
    """First-code rows from the mean box of each code's masks (an option beyond the release).

    The first code of a mask is, to a good approximation, a cell of box space (docs/sft.md: nearest
    box centroid finds the code's mask with IoU 0.74 on held-out objects). Row ``k`` of the output
    head becomes ``Q · box_features(centroid_k)``, normalised to ``head_norm``, with ``Q`` a fixed random
    orthonormal map to the model width: the logits of the first code are then a kernel over boxes,
    so a hidden state that points at a place scores the codes of nearby masks together, and a nearly
    right answer picks a nearby mask. An untied input embedding gets the same directions at the
    median norm of its text rows. Depth-1 codes keep their rows. Returns the token ids written.
    """
    first_ids = code_token_ids_by_depth(tokenizer)[0][: len(centroids)]
    first = torch.as_tensor(first_ids, dtype=torch.long)
    emb = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    hidden = emb.shape[1]
    feats = box_features(centroids)
    if feats.shape[1] > hidden:
        raise ValueError(f"{feats.shape[1]} box features do not fit a model width of {hidden}")
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(hidden, feats.shape[1], generator=g))
    rows = feats @ q.t()
    rows = rows / rows.norm(dim=1, keepdim=True)
    untied = head is not None and head.weight.data_ptr() != emb.data_ptr()
    target = head.weight if untied else emb
    target.index_copy_(0, first.to(target.device), (rows * head_norm).to(target.device, target.dtype))
    if untied:
        text_norm = emb[: min(first_ids) - 1].float().norm(dim=1).median()  # rows below <|mt_start|>
        emb.index_copy_(0, first.to(emb.device), (rows * text_norm).to(emb.device, emb.dtype))
    return first.tolist()


def freeze_rows(weight: torch.nn.Parameter, rows: Sequence[int]):
    """Keep ``rows`` of a trained matrix at their values: their gradient is zeroed (with AdamW and
    weight decay 0 they then never move). Returns the hook handle."""
    keep = torch.ones(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
    keep[torch.as_tensor(list(rows), dtype=torch.long, device=weight.device)] = 0
    return weight.register_hook(lambda grad: grad * keep)
