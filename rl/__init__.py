"""samtok.rl — GRPO for QwenVL-SAMTok models with rewards computed on text (spec §4).

Modules (import them directly; ``import samtok.rl`` imports nothing heavy):

* :mod:`samtok.rl.rewards` — answer matching (the paper's reward) and its variants; pure functions.
* :mod:`samtok.rl.grpo` — the GRPO objective on plain tensors (advantages, clipping, k3 KL, aggregation).
* :mod:`samtok.rl.algorithm` — rollouts (sample, score, advantages, old/reference log-probs) and
  micro-batch losses for a Qwen-VL policy, in plain PyTorch.
* :mod:`samtok.rl.lightning` — the LightningModule: manual optimisation around the algorithm.
* :mod:`samtok.rl.config` — ``GRPOConfig``, every default documented.
* :mod:`samtok.rl.train_rl` — the ``samtok rl`` recipe (before/after evaluation, ``final/``, summary).
"""
