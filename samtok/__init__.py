"""SAMTok: masks as two words for multimodal LLMs.

Sub-packages: ``samtok.core`` (shared utilities), ``samtok.tokenizer`` (the mask tokenizer),
``samtok.data`` (readers, synthetic world, conversations, pre-tokenization), ``samtok.mllm``
(QwenVL-SAMTok SFT and inference), ``samtok.rl`` (GRPO), ``samtok.eval`` (metrics, benchmarks).
"""

__version__ = "0.1.0"
