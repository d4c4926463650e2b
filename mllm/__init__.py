"""samtok.mllm — Qwen-VL models that read and write masks as two words (spec §2, §3).

Modules (import them directly; nothing heavy is imported by ``import samtok.mllm``):

* :mod:`samtok.mllm.text_tokenizers` — the real Qwen2.5 vocabulary built offline, small BPE tokenizers,
  Qwen special tokens and chat templates.
* :mod:`samtok.mllm.vocab` — the 514 mask words in a tokenizer, embedding rows for them.
* :mod:`samtok.mllm.processor` — image+text processor without torchvision (PIL image backend).
* :mod:`samtok.mllm.models` — load a local Qwen2.5-VL / Qwen3-VL checkpoint, build a tiny random one, save.
* :mod:`samtok.mllm.sequences` — conversations → ``input_ids`` / ``labels`` / images, collators
  (shared by SFT, RL and evaluation).
* :mod:`samtok.mllm.loss` — next-token loss (parity with transformers), mask-token accuracy.
* :mod:`samtok.mllm.generation` — batched generation with decoded texts and per-token log-probs.

The most used names are also reachable lazily from this package (``samtok.mllm.build_tiny``).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "build_qwen2_5_tokenizer": "text_tokenizers",
    "train_bpe_tokenizer": "text_tokenizers",
    "add_mask_tokens": "vocab",
    "add_mask_vocabulary": "vocab",
    "resize_embeddings_for_mask_tokens": "vocab",
    "mask_token_ids": "vocab",
    "QwenVLImageTextProcessor": "processor",
    "build_image_processor": "processor",
    "load_processor": "processor",
    "TinyModelConfig": "models",
    "build_tiny": "models",
    "load_model_and_processor": "models",
    "save_model_and_processor": "models",
    "build_training_example": "sequences",
    "build_prompt_example": "sequences",
    "VLCollator": "sequences",
    "training_collator": "sequences",
    "generation_collator": "sequences",
    "causal_lm_loss": "loss",
    "mask_token_accuracy": "loss",
    "SamplingConfig": "generation",
    "generate": "generation",
    "completion_logprobs": "generation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'samtok.mllm' has no attribute {name!r}")
    return getattr(importlib.import_module(f"samtok.mllm.{module}"), name)


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
