"""samtok.data — records, readers of every upstream format, the synthetic world, and the one data
layer every stage uses (mixtures, pre-tokenized mask codes, conversations, datamodules).

Nothing heavy is imported by ``import samtok.data``; the names below load their module on first use:

* :mod:`samtok.data.pretokenize` — ``load_pretokenized`` (→ ``datasets.Dataset``), ``load_code_table``
  / ``CodeTable`` (key → codes → span); ``pretokenize.pretokenize`` runs ``samtok pretokenize``.
* :mod:`samtok.data.conversations` — ``build_example`` / ``ChatExample`` / ``ImageRef`` /
  ``prompt_only`` / ``load_image_ref`` / ``ConversationConfig`` (spec §2 answer formats).
* :mod:`samtok.data.mixture` — ``MixtureConfig`` / ``load_mixture_config`` / ``load_mixture``.
* :mod:`samtok.data.datamodule` — ``SFTDataModule``, ``RLDataModule``, ``EvalDataset`` (imports Lightning).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_pretokenized": "pretokenize",
    "load_code_table": "pretokenize",
    "CodeTable": "pretokenize",
    "MissingCodeError": "pretokenize",
    "PretokenizedMismatchError": "pretokenize",
    "PretokenizeConfig": "pretokenize",
    "ImageRef": "conversations",
    "ChatExample": "conversations",
    "ConversationConfig": "conversations",
    "build_example": "conversations",
    "prompt_only": "conversations",
    "prompts_per_turn": "conversations",
    "load_image_ref": "conversations",
    "MixtureConfig": "mixture",
    "MixtureEntry": "mixture",
    "load_mixture_config": "mixture",
    "load_mixture": "mixture",
    "SFTDataModule": "datamodule",
    "RLDataModule": "datamodule",
    "RLPromptDataset": "datamodule",
    "EvalDataset": "datamodule",
    "LengthGroupedBatchSampler": "datamodule",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'samtok.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"samtok.data.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
