"""A QwenVL-SAMTok model behind an OpenAI-compatible server; spans decoded into masks here.

    from samtok.mllm.openai_client import ServerPredictor, predict_via_server
    pred = predict_via_server("http://localhost:8000", "street.jpg", "Please segment the red car in this image.",
                              tokenizer="exported/mask_tokenizer")
    pred.masks      # BoolTensor (N, H, W) at the image's size
    pred.labels     # ["red car"]

The server (``transformers serve`` or vLLM, see docs/serving.md) runs the language model only. The
client does everything else with the project's own code: a ``<mask>`` in the prompt becomes the
span of a given mask (encoded with the SAMTokenizer), the image is sent as a PNG data URL, and the
answer's spans are parsed with :class:`~samtok.tokenizer.codec.MaskCodec`'s repair rules and
decoded into masks at the image's size. :class:`ServerPredictor` is a
:class:`~samtok.mllm.inference.SamtokPredictor` whose generation step is an HTTP request, so it
returns the same :class:`~samtok.mllm.inference.Prediction` objects as local inference.

Servers decode answers with ``skip_special_tokens=True``. The mask words are ordinary tokens and
come back; special tokens do not, so Qwen's ``<|object_ref_start|>…<|object_ref_end|>`` markers of
grounded captions are missing from served answers (their masks are decoded, without labels).
Only the standard library is used for HTTP.
"""

from __future__ import annotations

import base64
import io
import json
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image

from samtok.core.errors import SamtokError
from samtok.mllm.generation import SamplingConfig
from samtok.mllm.inference import Completion, Prediction, SamtokPredictor
from samtok.mllm.sequences import IMAGE_PLACEHOLDER

CHAT_COMPLETIONS = "/v1/chat/completions"


def base_url(url: str) -> str:
    """``http://host:port`` from a server address given with or without ``/v1`` or the endpoint path."""
    u = url.strip().rstrip("/")
    if not u.startswith(("http://", "https://")):
        raise SamtokError(f"server URL must start with http:// or https://, got {url!r}")
    for suffix in (CHAT_COMPLETIONS, "/v1"):
        if u.endswith(suffix):
            u = u[: -len(suffix)]
    return u


def image_data_url(image: np.ndarray) -> str:
    """A ``(H, W, 3)`` uint8 image as a lossless PNG ``data:`` URL (what the OpenAI API accepts inline)."""
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def openai_messages(conversation: Sequence[dict], images: Sequence[np.ndarray]) -> list[dict]:
    """OpenAI chat messages for a conversation and its images.

    Images go where ``<image>`` placeholders are, or (without placeholders) at the start of the first
    user turn — the convention of :func:`samtok.mllm.sequences.with_image_placeholders`, so the server
    renders the same prompt as local inference. Messages without images keep plain-string content.
    """
    urls = [image_data_url(im) for im in images]
    n_placeholders = sum(str(m.get("content", "")).count(IMAGE_PLACEHOLDER) for m in conversation)
    if n_placeholders not in (0, len(urls)):
        raise SamtokError(f"the conversation has {n_placeholders} {IMAGE_PLACEHOLDER} placeholders but {len(urls)} images")
    out, next_image, placed = [], 0, n_placeholders > 0
    for m in conversation:
        text = str(m.get("content", ""))
        parts: list[dict] = []
        if not placed and m.get("role") == "user":
            parts += [{"type": "image_url", "image_url": {"url": u}} for u in urls]
            placed = True
        for k, piece in enumerate(text.split(IMAGE_PLACEHOLDER)):
            if k > 0:
                parts.append({"type": "image_url", "image_url": {"url": urls[next_image]}})
                next_image += 1
            if piece:
                parts.append({"type": "text", "text": piece})
        has_image = any(p["type"] == "image_url" for p in parts)
        out.append({"role": m["role"], "content": parts if has_image else text})
    return out


def request_body(messages: list[dict], sampling: SamplingConfig, model: Optional[str] = None) -> dict:
    """The ``/v1/chat/completions`` body: greedy is temperature 0; ``top_k`` has no OpenAI field and is not sent."""
    body: dict[str, Any] = {"messages": messages, "max_tokens": int(sampling.max_new_tokens), "stream": False}
    if model:
        body["model"] = model
    if sampling.do_sample:
        body.update(temperature=float(sampling.temperature), top_p=float(sampling.top_p))
    else:
        body["temperature"] = 0.0
    return body


def _http_json(url: str, body: Optional[dict], timeout: float, api_key: Optional[str]) -> dict:
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None if body is None else json.dumps(body).encode("utf-8")
    req = urllib.request.Request(url, data=data, headers=headers, method="GET" if body is None else "POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            payload = resp.read()
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:500]
        raise SamtokError(f"{url}: HTTP {exc.code}: {detail}") from exc
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise SamtokError(f"cannot reach the server at {url}: {reason}") from exc
    try:
        return json.loads(payload)
    except ValueError as exc:
        raise SamtokError(f"{url}: the answer is not JSON: {payload[:200]!r}") from exc


def completion_from_response(response: dict) -> Completion:
    """The assistant text of a chat-completion response (``finish_reason == "length"``: not finished)."""
    try:
        choice = response["choices"][0]
        text = choice["message"].get("content") or ""
    except (KeyError, IndexError, TypeError, AttributeError) as exc:
        raise SamtokError(f"unexpected chat-completion response: {json.dumps(response)[:300]}") from exc
    usage = response.get("usage") or {}
    return Completion(text=str(text), finished=choice.get("finish_reason") != "length",
                      num_tokens=int(usage.get("completion_tokens") or 0))


class ServerPredictor(SamtokPredictor):
    """:class:`SamtokPredictor` with generation done by an OpenAI-compatible server.

    Args:
        server_url: ``http://host:port`` (``/v1`` or the full endpoint path are accepted too).
        tokenizer: the SAMTokenizer the model was trained with (decodes the answers' spans).
        model: the model name to request; ``None``: the first entry of ``GET /v1/models``, or no
            name when the server does not list models (``transformers serve DIR`` serves DIR anyway).
        api_key: sent as ``Authorization: Bearer …`` (vLLM's ``--api-key``).
        timeout: seconds per request.
        parallel: requests in flight at once when several prompts are predicted.
        **kwargs: :class:`SamtokPredictor` options (``max_masks``, ``system_prompt``, ``batch_size``...).
    """

    def __init__(self, server_url: str, tokenizer, model: Optional[str] = None, api_key: Optional[str] = None,
                 timeout: float = 300.0, parallel: int = 4, **kwargs: Any):
        super().__init__(None, None, tokenizer, **kwargs)
        self.server_url = base_url(server_url)
        self.api_key = api_key
        self.timeout = float(timeout)
        self.parallel = max(1, int(parallel))
        self.model_name = model if model is not None else self._listed_model()

    @classmethod
    def connect(cls, server_url: str, tokenizer_dir: str | Path, device: str = "cpu", **kwargs: Any) -> "ServerPredictor":
        """Load the SAMTokenizer from ``tokenizer_dir`` and talk to ``server_url``."""
        from samtok.tokenizer.api import SAMTokenizer

        return cls(server_url, SAMTokenizer.from_pretrained(tokenizer_dir, device=device), **kwargs)

    def _listed_model(self) -> Optional[str]:
        try:
            data = _http_json(self.server_url + "/v1/models", None, min(self.timeout, 30.0), self.api_key)
            return str(data["data"][0]["id"])
        except (SamtokError, KeyError, IndexError, TypeError):
            return None

    def generate_texts(self, requests, sampling: SamplingConfig) -> list[Completion]:
        url = self.server_url + CHAT_COMPLETIONS
        bodies = [request_body(openai_messages(r.conversation, r.images), sampling, self.model_name) for r in requests]

        def send(body: dict) -> Completion:
            return completion_from_response(_http_json(url, body, self.timeout, self.api_key))

        if len(bodies) == 1 or self.parallel == 1:
            return [send(b) for b in bodies]
        with ThreadPoolExecutor(max_workers=min(self.parallel, len(bodies))) as pool:
            return list(pool.map(send, bodies))


def predict_via_server(server_url: str, image: Any, prompt: Any, tokenizer: Any,
                       masks: Optional[Sequence[Any]] = None, sampling: Optional[SamplingConfig] = None,
                       **kwargs: Any) -> Prediction:
    """One prompt about one image answered by the server, with the answer's masks decoded.

    Args:
        server_url: the OpenAI-compatible server.
        image: path, PIL image or ``(H, W, 3)`` array.
        prompt: a string (``<mask>`` placeholders allowed) or a conversation (list of messages).
        tokenizer: a :class:`~samtok.tokenizer.api.SAMTokenizer` or its directory.
        masks: the masks for the prompt's ``<mask>`` placeholders, in order.
        sampling: :class:`SamplingConfig` (default greedy, 256 tokens).
        **kwargs: :class:`ServerPredictor` options (``model``, ``api_key``, ``timeout``...).
    """
    if isinstance(tokenizer, (str, Path)):
        predictor = ServerPredictor.connect(server_url, tokenizer, **kwargs)
    else:
        predictor = ServerPredictor(server_url, tokenizer, **kwargs)
    [pred] = predictor.predict([image], [prompt], sampling, prompt_masks=[list(masks)] if masks else None)
    return pred
