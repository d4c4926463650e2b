"""Shared core: config loading, mask utilities, images, rendering, seeding and logging.

Depends on nothing else of ours, so every module (tokenizer, data, mllm, rl, eval) can use it.
"""
