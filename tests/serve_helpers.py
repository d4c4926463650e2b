"""Tiny artefacts for the serving tests (web demo, OpenAI-compatible server, browser).

:func:`build_serving_artefacts` writes, under one folder, a micro mask tokenizer (random weights,
decoding at logit threshold 0 so that every code decodes to a non-empty mask that depends on the
code and the image — at the usual 0.5 a random decoder's logits, all within ±0.6, give empty masks), a
tiny Qwen-VL model that has MEMORISED one answer holding a mask span (a few hundred steps of
teacher forcing on a handful of random images, ~10 s on one core), and its export
(``samtok export --model``). The answer is known, so tests can check that the span travels back
intact through a server, a page or a client, and decodes to a mask at the image's size.

The artefacts are built once per test session (cached under pytest's base temp folder) and shared
by every serving test module.
"""

from __future__ import annotations

import json
import os
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import pytest

MICRO_SAM2 = dict(size="t", image_size=128, trunk_embed_dim=16, trunk_num_heads=1, trunk_stages=[1, 1, 2, 1],
                  trunk_global_att_blocks=[3])
PROMPT = "Please segment the chair in this image."
ANSWER_CODES = (17, 45)
ANSWER_LABEL = "chair"


def answer_text() -> str:
    from samtok.tokenizer.codec import MaskCodec

    span = MaskCodec().format(*ANSWER_CODES)
    return "```json\n" + json.dumps([{"mask_2d": span, "label": ANSWER_LABEL}]) + "\n```"


def random_image(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _memorise(model, processor, images, conversation, max_steps: int = 400) -> int:
    """Teacher-force ``conversation`` on every image until greedy decoding reproduces the answer."""
    import torch

    from samtok.mllm.generation import SamplingConfig, generate
    from samtok.mllm.sequences import build_prompt_example, build_training_example, generation_collator
    from samtok.mllm.sequences import model_inputs, training_collator

    train = training_collator(processor)([build_training_example(processor, conversation, [im]) for im in images])
    prompts = generation_collator(processor)([build_prompt_example(processor, conversation[:-1], [im]) for im in images])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    target = conversation[-1]["content"]
    for step in range(1, max_steps + 1):
        model.train()
        loss = model(**model_inputs(train)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            model.eval()
            texts = generate(model, processor, prompts, SamplingConfig(max_new_tokens=48)).texts
            if all(t == target for t in texts):
                return step
    raise RuntimeError(f"the tiny model did not memorise its answer in {max_steps} steps")


def build_serving_artefacts(root: Path) -> dict:
    """``{"tok", "model", "exported", "answer", "prompt"}`` under ``root`` (built once; reused if present)."""
    root = Path(root)
    done = root / "DONE"
    paths = {"tok": root / "tok", "model": root / "model", "exported": root / "exported",
             "answer": answer_text(), "prompt": PROMPT}
    if done.is_file():
        return paths
    import torch

    from samtok.mllm.export import export_model, save_trained_model
    from samtok.mllm.models import TinyModelConfig, build_tiny
    from samtok.tokenizer.checkpoints import save_tokenizer_dir
    from samtok.tokenizer.model import SAMTokModel, TokenizerModelConfig
    from samtok.tokenizer.sam2_parts import SAM2Config

    torch.manual_seed(0)
    save_tokenizer_dir(SAMTokModel(TokenizerModelConfig(sam2=SAM2Config(**MICRO_SAM2), mask_threshold=0.0)), paths["tok"])
    model, processor = build_tiny(TinyModelConfig(), corpus=[PROMPT, answer_text(), "What is this region?", "No target."])
    conversation = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": answer_text()}]
    images = [random_image(60, 90, 0), random_image(96, 64, 1), random_image(80, 80, 2), random_image(40, 120, 3)]
    steps = _memorise(model, processor, images, conversation)
    model.eval()
    save_trained_model(model, processor, paths["model"], paths["tok"], {"stage": "test", "steps": steps})
    export_model(paths["model"], paths["exported"])
    done.write_text(str(steps))
    return paths


def shared_artefacts(tmp_path_factory) -> dict:
    """The session's serving artefacts (one build shared by every serving test module)."""
    return build_serving_artefacts(tmp_path_factory.getbasetemp() / "serving_artefacts")


# Fixtures of the serving test modules (each imports them: `from serve_helpers import artefacts, tok`).
@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    import torch

    torch.set_num_threads(1)
    return shared_artefacts(tmp_path_factory)


@pytest.fixture(scope="module")
def tok(artefacts):
    """The micro mask tokenizer of the artefacts."""
    from samtok.tokenizer.api import SAMTokenizer

    return SAMTokenizer.from_pretrained(artefacts["tok"])


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_http(url: str, timeout_s: float, process=None) -> None:
    """Poll ``url`` until it answers 200 (fail early if ``process`` exits)."""
    import time
    import urllib.error
    import urllib.request

    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server process exited with code {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


@contextmanager
def server_process(cmd: list[str], ready_url: str, log: Path, timeout_s: float = 120, env: Optional[dict] = None):
    """Run ``cmd`` (a server) as its own process until the block ends; fails the test with its log if it never answers."""
    full_env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                    GRADIO_ANALYTICS_ENABLED="False", **(env or {}))
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=full_env)
    try:
        try:
            wait_for_http(ready_url, timeout_s, proc)
        except (RuntimeError, TimeoutError) as exc:
            pytest.fail(f"{exc}\n{' '.join(cmd)}\n{log.read_text()[-3000:]}")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
