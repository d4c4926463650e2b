"""Batched generation and completion log-probabilities, for evaluation and RL (model-agnostic).

:func:`generate` runs ``model.generate`` on a LEFT-padded batch (``samtok.mllm.sequences.generation_collator``)
and returns, per row, the completion ids up to and including the first stop token, a mask of those
tokens, the decoded text (up to the stop token, special and mask tokens KEPT: mask words are
non-special added tokens, and GCG answers need Qwen's ``<|object_ref_*|>`` tokens, which are special),
and optionally the per-token log-probabilities of the chosen tokens.

Log-probabilities are ``log_softmax(logits / T)`` of the raw model logits at the sampling
temperature ``T`` (1 for greedy), before top-p/top-k truncation — the convention of TRL's GRPO.
:func:`completion_logprobs` recomputes them in one forward pass (with gradients) from the prompt batch
and the completion ids; both agree (a test checks it), so RL can use either.

For groups of samples per prompt (GRPO), repeat the prompt examples before collating
(:func:`repeat_examples`) rather than relying on ``num_return_sequences``: Qwen-VL's flattened image
patches must be repeated per image, not per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from samtok.mllm.sequences import build_prompt_example, generation_collator, model_inputs


@dataclass
class SamplingConfig:
    r"""How to decode (greedy by default).

    Parameters:
        max_new_tokens (`int`, defaults to `256`):
            Most tokens generated per row, the stop token included.
        do_sample (`bool`, defaults to `False`):
            Sample from the distribution (`True`) or take the argmax (`False`).
        temperature (`float`, defaults to `1.0`):
            Softmax temperature when sampling; also the temperature of the returned log-probs.
        top_p (`float`, defaults to `1.0`):
            Nucleus-sampling mass; `1.0` = off.
        top_k (`int`, defaults to `0`):
            Keep only the k most likely tokens when sampling; `0` = off.
        repetition_penalty (`float`, defaults to `1.0`):
            transformers' repetition penalty; `1.0` = off.
        stop_token_ids (`list[int]` or `None`, defaults to `None`):
            Ids that end a completion; `None` = the tokenizer's eos (`<|im_end|>`) and pad
            (`<|endoftext|>`) ids plus the model's generation-config eos ids.
        span_grammar (`bool`, defaults to `False`):
            Constrain decoding to well-formed mask spans (:class:`MaskSpanGrammar`): after
            `<|mt_start|>` one depth-0 code, one depth-1 code, then `<|mt_end|>`; code words and
            `<|mt_end|>` nowhere else. For evaluation and inference; refused with log-probs (RL), whose
            ratios need the unconstrained distribution.
    """

    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    stop_token_ids: Optional[List[int]] = None
    span_grammar: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {self.top_p}")


@dataclass
class GenerationResult:
    """Completions of a batch of N prompts (T = longest completion)."""

    completion_ids: torch.Tensor  # (N, T) long; pad id after the stop token
    completion_mask: torch.Tensor  # (N, T) long; 1 on generated tokens up to and including the stop token
    texts: list[str]  # decoded completions, without the stop token, special/mask tokens kept
    finished: torch.Tensor  # (N,) bool; True when a stop token was generated (not cut by max_new_tokens)
    logprobs: Optional[torch.Tensor] = None  # (N, T) float32 log p(chosen token); 0 where the mask is 0
    prompt_length: int = 0  # P, columns of the (left-padded) prompt batch
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lengths(self) -> torch.Tensor:
        return self.completion_mask.sum(dim=1)


class MaskSpanGrammar:
    """A transformers logits processor that only lets well-formed mask spans out.

    After ``<|mt_start|>`` only depth-0 code words may follow, after a depth-0 code only depth-1 codes,
    after a depth-1 code only ``<|mt_end|>``; anywhere else code words and ``<|mt_end|>`` are masked.
    Text and ``<|mt_start|>`` are never restricted, so the model still decides whether and where a
    mask goes. Greedy decoding only changes where the model would have written a malformed span.
    """

    def __init__(self, tokenizer, codebook_size: Optional[int] = None):
        from samtok.mllm.vocab import code_token_ids_by_depth, mask_token_ids
        from samtok.tokenizer.codec import MaskCodec

        codec = MaskCodec(codebook_size) if codebook_size else None
        ids = mask_token_ids(tokenizer, codec)  # <|mt_start|>, the codes, <|mt_end|>
        c0, c1 = code_token_ids_by_depth(tokenizer, codec)
        self.start, self.end = ids[0], ids[-1]
        self.c0, self.c1 = torch.as_tensor(c0), torch.as_tensor(c1)
        self.inside = torch.cat([self.c0, self.c1, torch.tensor([self.end])])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        last = input_ids[:, -1]
        device = scores.device
        c0, c1 = self.c0.to(device), self.c1.to(device)
        allowed = torch.zeros_like(scores, dtype=torch.bool)
        after_start = last == self.start
        after_c0 = torch.isin(last, c0)
        after_c1 = torch.isin(last, c1)
        allowed[after_start.nonzero(as_tuple=True)[0][:, None], c0[None]] = True
        allowed[after_c0.nonzero(as_tuple=True)[0][:, None], c1[None]] = True
        allowed[after_c1, self.end] = True
        outside = ~(after_start | after_c0 | after_c1)
        allowed[outside] = True
        allowed[outside.nonzero(as_tuple=True)[0][:, None], self.inside.to(device)[None]] = False
        return scores.masked_fill(~allowed, float("-inf"))


def stop_ids_for(tokenizer, model=None, extra: Optional[Sequence[int]] = None) -> list[int]:
    """Stop tokens: explicit ones, else the tokenizer's eos and pad and the model's eos ids."""
    if extra:
        return sorted({int(i) for i in extra})
    ids = set()
    for value in (tokenizer.eos_token_id, tokenizer.pad_token_id):
        if value is not None:
            ids.add(int(value))
    gen_cfg = getattr(model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    if eos is not None:
        ids.update(int(i) for i in (eos if isinstance(eos, (list, tuple)) else [eos]))
    return sorted(ids)


def _transformers_config(config: SamplingConfig, stop_ids: list[int], pad_id: int, return_logits: bool):
    from transformers import GenerationConfig

    kwargs: dict[str, Any] = dict(
        max_new_tokens=config.max_new_tokens,
        do_sample=config.do_sample,
        eos_token_id=stop_ids,
        pad_token_id=pad_id,
        repetition_penalty=config.repetition_penalty,
        return_dict_in_generate=True,
        output_logits=return_logits,
        use_cache=True,
    )
    if config.do_sample:
        # Explicit values so that a checkpoint's generation_config.json (often top_k=1, tiny
        # temperature) cannot silently turn sampling into greedy decoding.
        kwargs.update(temperature=config.temperature, top_p=config.top_p, top_k=config.top_k)
    return GenerationConfig(**kwargs)


def _trim(sequences: torch.Tensor, stop_ids: list[int], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut each row after its first stop token: (ids with pads after, mask, finished)."""
    n, t = sequences.shape
    if t == 0:
        empty = sequences.new_zeros((n, 0))
        return empty, empty, torch.zeros(n, dtype=torch.bool)
    is_stop = torch.isin(sequences, torch.as_tensor(stop_ids, device=sequences.device))
    finished = is_stop.any(dim=1)
    first = torch.where(finished, is_stop.float().argmax(dim=1), torch.full((n,), t - 1, device=sequences.device))
    cols = torch.arange(t, device=sequences.device).unsqueeze(0)
    mask = (cols <= first.unsqueeze(1)).long()
    ids = torch.where(mask.bool(), sequences, torch.full_like(sequences, pad_id))
    return ids, mask, finished


def decode_completions(
    tokenizer, completion_ids: torch.Tensor, completion_mask: torch.Tensor, finished: torch.Tensor
) -> list[str]:
    """Texts of completions without their stop token; special and mask tokens are kept."""
    texts = []
    for ids, mask, done in zip(completion_ids.tolist(), completion_mask.tolist(), finished.tolist()):
        n = sum(mask) - (1 if done else 0)
        texts.append(tokenizer.decode(ids[:n], skip_special_tokens=False, clean_up_tokenization_spaces=False))
    return texts


@torch.no_grad()
def generate(
    model,
    tokenizer,
    batch: Mapping[str, Any],
    config: Optional[SamplingConfig] = None,
    return_logprobs: bool = False,
) -> GenerationResult:
    """Generate completions for a left-padded prompt batch.

    Args:
        model: any transformers generative model (Qwen-VL here); put in eval mode by the caller.
        tokenizer: its tokenizer (or processor) for pad/stop ids and decoding.
        batch: collated prompts (``input_ids``, ``attention_mask``, and for Qwen-VL
            ``mm_token_type_ids``, ``pixel_values``, ``image_grid_thw``), LEFT-padded.
        config: :class:`SamplingConfig`.
        return_logprobs: also return per-token log-probs of the chosen tokens.

    Returns:
        :class:`GenerationResult`.
    """
    config = config or SamplingConfig()
    tok = getattr(tokenizer, "tokenizer", tokenizer)
    inputs = model_inputs(batch, with_labels=False)
    attention = inputs.get("attention_mask")
    if attention is not None and attention.shape[0] > 1 and bool((attention[:, -1] == 0).any()):
        raise ValueError("generation needs a LEFT-padded batch (use samtok.mllm.sequences.generation_collator)")
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    stop_ids = stop_ids_for(tok, model, config.stop_token_ids)
    pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0])
    gen_cfg = _transformers_config(config, stop_ids, pad_id, return_logprobs)
    extra: dict[str, Any] = {}
    if config.span_grammar:
        if return_logprobs:
            raise ValueError("span_grammar with log-probs: RL needs the unconstrained distribution's log-probs")
        from transformers import LogitsProcessorList

        extra["logits_processor"] = LogitsProcessorList([MaskSpanGrammar(tok)])
    out = model.generate(**inputs, generation_config=gen_cfg, **extra)
    prompt_len = int(inputs["input_ids"].shape[1])
    new = out.sequences[:, prompt_len:]
    ids, mask, finished = _trim(new, stop_ids, pad_id)
    logprobs = None
    if return_logprobs:
        temperature = config.temperature if config.do_sample else 1.0
        steps = []
        for k, step_logits in enumerate(out.logits):  # raw logits, one (N, V) tensor per step
            lp = F.log_softmax(step_logits.float() / temperature, dim=-1)
            steps.append(lp.gather(1, new[:, k: k + 1]).squeeze(1))
        logprobs = torch.stack(steps, dim=1) if steps else new.new_zeros(new.shape, dtype=torch.float32)
        logprobs = logprobs * mask.to(logprobs.dtype)
    texts = decode_completions(tok, ids.cpu(), mask.cpu(), finished.cpu())
    return GenerationResult(
        completion_ids=ids,
        completion_mask=mask,
        texts=texts,
        finished=finished,
        logprobs=logprobs,
        prompt_length=prompt_len,
    )


def completion_logprobs(
    model,
    batch: Mapping[str, Any],
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Log-probs of given completions under ``model`` (one forward, differentiable).

    Args:
        model: the policy (or reference) model.
        batch: the LEFT-padded prompt batch the completions were generated from (rows aligned).
        completion_ids: ``(N, T)`` completion tokens (right-padded).
        completion_mask: ``(N, T)`` 1 on real completion tokens.
        temperature: divide logits by this before the softmax (use the sampling temperature).

    Returns:
        ``(N, T)`` float32 log-probs, 0 where ``completion_mask`` is 0.
    """
    inputs = model_inputs(batch, with_labels=False)
    device = next(model.parameters()).device
    inputs = {k: v.to(device) for k, v in inputs.items()}
    completion_ids = completion_ids.to(device)
    completion_mask = completion_mask.to(device).long()
    t = completion_ids.shape[1]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], completion_ids], dim=1)
    inputs["attention_mask"] = torch.cat([inputs["attention_mask"], completion_mask], dim=1)
    if "mm_token_type_ids" in inputs:
        inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(completion_ids)], dim=1)
    logits = model(**inputs, logits_to_keep=t + 1, use_cache=False).logits[:, :-1, :]
    lp = F.log_softmax(logits.float() / temperature, dim=-1).gather(2, completion_ids.unsqueeze(-1)).squeeze(-1)
    return lp * completion_mask.to(lp.dtype)


def repeat_examples(examples: Sequence[Mapping[str, Any]], n: int) -> list[Mapping[str, Any]]:
    """Each example ``n`` times in a row (prompt-major order, as GRPO groups expect)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [e for e in examples for _ in range(n)]


def greedy_texts(model, processor, prompts: Sequence[tuple[Sequence[Mapping[str, Any]], Sequence[Any]]],
                 batch_size: int = 16, max_new_tokens: int = 96) -> list[str]:
    """Greedy answers of ``model`` to ``(messages, images)`` prompts, in order, ``batch_size`` at a time
    (left-padded batches; puts the model in eval mode)."""
    model.eval()
    collate = generation_collator(processor)
    texts: list[str] = []
    for lo in range(0, len(prompts), batch_size):
        batch = collate([build_prompt_example(processor, messages, images)
                         for messages, images in prompts[lo:lo + batch_size]])
        with torch.no_grad():
            texts.extend(generate(model, processor, batch, SamplingConfig(max_new_tokens=max_new_tokens)).texts)
    return texts
