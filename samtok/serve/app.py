"""The web demo's page: a Gradio Blocks app over :class:`~samtok.serve.service.DemoService`.

Three tabs, each a thin layer of Gradio components over one service method:

* **Tokenize** — ``gr.ImageEditor`` (upload an image, paint the region with the brush, fix it with
  the eraser) or a mask file (``gr.File``) → the span, its two codes, the IoU, and two
  ``gr.AnnotatedImage`` views: your mask and the one decoded from the two words. A button carries
  the span and the image over to Detokenize.
* **Detokenize** — ``gr.Image`` + text holding spans → the masks over the image
  (``gr.AnnotatedImage``) and a table (``gr.Dataframe``) of codes and areas.
* **Chat** — ``gr.ImageEditor`` (image + optionally a painted region) and a prompt → the dialogue
  (``gr.Chatbot``; turns accumulate until the image changes or *New conversation*), every span of
  the last answer drawn and labelled (``gr.AnnotatedImage``), the raw answer and a table.

Bad input raises ``gr.Error`` with the service's message (shown in the page; the server goes on);
notes (a resized image, a repaired span) appear under each tab's results. Every event goes
through Gradio's queue with a concurrency limit; the service's locks serialise the tokenizer and
the model, so concurrent requests wait for each other and are all answered. The same functions
are a Gradio API (``/tokenize``, ``/detokenize``, ``/chat``; ``gradio_client`` can call them).

Nothing reaches the network: analytics are off (set before Gradio is imported), no share link is
made (so no tunnel binary is fetched), server-side rendering (a Node process) is off, and the
default theme uses the fonts shipped inside the gradio package.
"""

from __future__ import annotations

import functools
import hashlib
import html
import os
import re
from typing import Any, Callable, Optional

# Before gradio is imported: gradio reads these at import / Blocks creation.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import gradio as gr  # noqa: E402
import numpy as np  # noqa: E402

from samtok.core.errors import SamtokError  # noqa: E402
from samtok.serve.service import SPAN_EXAMPLE, DemoService, layer_mask, log  # noqa: E402

MASK_COLOR = "#ff1e5a"  # the brush's one colour
BRUSH_OPACITY = 0.6  # the image shows through the painting; painted = alpha >= 128 (service.layer_mask)
YOUR_MASK, DECODED, REGION = "your mask", "decoded from the two words", "your region"
_MASK_RUN = re.compile(r"(?:<\|mt_(?:start|end|\d{4})\|>)+")
_CODE = re.compile(r"```.*?(?:```|$)|`[^`\n]*`", re.S)
_PALETTE = ("#0082c8", "#46f0f0", "#f032e6", "#3cb44b", "#ffe119", "#911eb4", "#e6194b", "#f58230",
            "#d2f53c", "#fabed4", "#008080", "#aa6e28")
CSS = """
#status { font-size: 0.9em; }
#tok-span textarea, #chat-raw textarea, #det-text textarea { font-family: var(--font-mono); }
"""
TABLE_HEADERS = {
    "detokenize": ["mask", "codes", "area (px)", "area (%)"],  # the spans are in the text box
    "chat": ["mask", "label", "codes", "area (px)", "area (%)"],
}


# ------------------------------------------------------------------------------------------ helpers
def page_errors(fn: Callable) -> Callable:
    """Turn the service's exceptions into ``gr.Error`` (shown in the page); log real bugs with their traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except SamtokError as exc:  # bad input, nothing loaded, a check of the library's own
            raise gr.Error(html.escape(str(exc), quote=False), duration=None, print_exception=False) from None
        except Exception as exc:  # a bug: logged, reported, and the server goes on
            log.exception("%s failed", fn.__name__)
            message = f"Internal error ({type(exc).__name__}: {exc}). The server is still running."
            raise gr.Error(html.escape(message, quote=False), duration=None, print_exception=False) from None

    return wrapper


def markdown_text(text: str) -> str:
    """Text for Gradio's Markdown, shown as written.

    Code (fenced blocks, inline backticks) is kept as is; elsewhere ``&``, ``<``, ``>`` become
    entities (so ``<mask>`` is not taken for an HTML tag and dropped) and runs of mask words become
    inline code.
    """
    out, pos = [], 0
    for m in _CODE.finditer(text):
        out += [_plain_markdown(text[pos : m.start()]), m.group(0)]
        pos = m.end()
    out.append(_plain_markdown(text[pos:]))
    return "".join(out)


def _plain_markdown(text: str) -> str:
    out, pos = [], 0
    for m in _MASK_RUN.finditer(text):
        out += [html.escape(text[pos : m.start()], quote=False), f"`{m.group(0)}`"]
        pos = m.end()
    out.append(html.escape(text[pos:], quote=False))
    return "".join(out)


def notes_markdown(summary: str, notes: list[str]) -> str:
    lines = [summary] + [f"- ⚠ {markdown_text(n)}" for n in notes]
    return "\n".join(lines)


def annotated(image: np.ndarray, masks: list[tuple[np.ndarray, str]], colors: Optional[list[str]] = None):
    """An ``gr.AnnotatedImage`` update: the image with each ``(mask, label)`` in its own colour."""
    colors = colors or [_PALETTE[k % len(_PALETTE)] for k in range(len(masks))]
    return gr.AnnotatedImage(value=(image, [(m.astype(np.float32), label) for m, label in masks]),
                             color_map={label: c for (_, label), c in zip(masks, colors)})


def _upload_path(value: Any) -> Optional[str]:
    """The server-side path of an image as Gradio delivers it unprocessed (a file-data dict), or ``None``."""
    if isinstance(value, dict):
        return value.get("path")
    return value


def _editor_parts(value: Any) -> tuple[Any, Optional[np.ndarray]]:
    """``(background image, painted mask or None)`` of a ``gr.ImageEditor`` value (all layers merged)."""
    if not value:
        return None, None
    painted = None
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        m = layer_mask(layer)
        painted = m if painted is None or painted.shape != m.shape else painted | m
    return value.get("background"), painted


def _fingerprint(array: Any) -> Optional[str]:
    if array is None:
        return None
    a = np.ascontiguousarray(array)
    return hashlib.sha1(str(a.shape).encode() + (np.packbits(a) if a.dtype == bool else a).tobytes()).hexdigest()


def _status_markdown(info: dict) -> str:
    tok = (f"**tokenizer** `{info['tokenizer']}` ({info['codebook']} codes)" if info["tokenizer_ready"]
           else f"**tokenizer** not usable: {html.escape(info['tokenizer_error'] or '')}")
    model = {
        "none": "**model** none (Chat is off: start with `--model DIR`)",
        "loading": f"**model** `{info['model']}` loading…",
        "ready": f"**model** `{info['model']}` ready",
        "error": f"**model** not usable: {html.escape(info['model_error'] or '')}",
    }[info["model_status"]]
    return f"{tok} · {model} · images are worked on at up to {info['max_image_side']} px a side"


# ------------------------------------------------------------------------------------------ the page
def build_app(service: DemoService, brush_size: Optional[int] = None) -> gr.Blocks:
    """The Gradio app serving ``service`` (:func:`launch` builds, queues and starts it).

    Args:
        service: the started :class:`DemoService`.
        brush_size: the brush's default radius in image pixels (default: Gradio's).
    """
    cfg = service.config
    brush = gr.Brush(colors=[(MASK_COLOR, BRUSH_OPACITY)], color_mode="fixed", default_size=brush_size or "auto")

    def editor(elem_id: str, label: str) -> gr.ImageEditor:
        return gr.ImageEditor(label=label, type="numpy", image_mode="RGBA", format="png", sources=("upload", "clipboard"),
                              layers=False, transforms=(), brush=brush, height=440, elem_id=elem_id)

    # --------------------------------------------------------------------- handlers
    @page_errors
    def tokenize(editor_value, mask_file):
        image, painted = _editor_parts(editor_value)
        r = service.tokenize(image, painted, mask_file)
        summary = (f"**{r['width']}x{r['height']}** image · your mask **{r['area']}** px · decoded "
                   f"**{r['decoded_area']}** px · IoU **{r['iou']:.4f}** · {r['seconds']:.2f} s")
        return (r["span"], f"{r['codes'][0]} {r['codes'][1]}", r["iou"],
                annotated(r["image"], [(r["mask"], YOUR_MASK)], [MASK_COLOR]),
                annotated(r["image"], [(r["decoded"], DECODED)], [_PALETTE[0]]),
                notes_markdown(summary, r["notes"]), r["image"])

    def to_detokenize(image, span):
        if image is None or not span:
            raise gr.Error("Tokenize a mask first.")
        return image, span, gr.Tabs(selected="detokenize")

    @page_errors
    def detokenize(image, text):
        # Unprocessed input (preprocess=False): Gradio would open the image itself and answer a file that is
        # not an image with its own traceback-like message; the service opens it and says what it is.
        r = service.detokenize(_upload_path(image), text)
        rows = [[m["index"], f"{m['codes'][0]} {m['codes'][1]}", m["area"], m["percent"]] for m in r["masks"]]
        summary = f"**{len(rows)}** mask(s) decoded on the **{r['width']}x{r['height']}** image · {r['seconds']:.2f} s"
        return (annotated(r["image"], [(m, f"mask {k}") for k, m in enumerate(r["decoded"])]), rows,
                notes_markdown(summary, r["notes"]))

    @page_errors
    def chat(editor_value, prompt, max_new_tokens, state):
        image, region = _editor_parts(editor_value)
        image_key = _fingerprint(image)
        notes = []
        if state and state["image_key"] != image_key:
            state = None
            notes.append("The image changed: a new conversation was started.")
        state = state or {"image_key": image_key, "turns": [], "shown": [], "region_key": None}
        region_key = _fingerprint(region) if region is not None and region.any() else None
        has_placeholder = "<mask>" in (prompt or "")
        repeat = region_key is not None and region_key == state["region_key"] and not has_placeholder
        if repeat:
            notes.append("The painted region was sent in an earlier turn and is not added again (write <mask> to "
                         "send it again).")
        r = service.chat(image, prompt, region, state["turns"], max_new_tokens, append_region=not repeat)
        lines = [markdown_text(r["readable"]) or "*(empty answer)*"]
        for m in r["masks"]:
            lines.append(f"- **[mask {m['index']}]** {markdown_text(m['label'] or '(no label)')}: {m['area']} px "
                         f"({m['percent']}%), codes {m['codes'][0]} {m['codes'][1]}")
        shown = state["shown"] + [{"role": "user", "content": markdown_text(r["user_turn"])},
                                  {"role": "assistant", "content": "\n".join(lines)}]
        state = {"image_key": image_key, "turns": r["history"], "shown": shown,
                 "region_key": region_key if r["region"] is not None else state["region_key"]}
        masks = [(m, f"[mask {k}] {row['label'] or '(no label)'}")
                 for k, (m, row) in enumerate(zip(r["decoded"], r["masks"]))]
        colors = [_PALETTE[k % len(_PALETTE)] for k in range(len(masks))]
        if r["region"] is not None:
            masks, colors = [(r["region"], REGION)] + masks, [MASK_COLOR] + colors
        rows = [[m["index"], m["label"] or "", f"{m['codes'][0]} {m['codes'][1]}", m["area"], m["percent"]]
                for m in r["masks"]]
        summary = (f"**{r['num_tokens']}** tokens in {r['seconds']:.2f} s · **{len(rows)}** mask(s) in the answer · "
                   f"turn {len(r['history']) // 2}")
        return (shown, annotated(r["image"], masks, colors), r["answer"], rows, notes_markdown(summary, notes + r["notes"]),
                state)

    def new_conversation():
        return [], None, "", [], "New conversation: the next prompt starts from scratch.", None

    def status():
        info = service.info()
        return _status_markdown(info), gr.Timer(active=info["model_status"] == "loading")

    # --------------------------------------------------------------------- layout
    with gr.Blocks(title="samtok demo", analytics_enabled=False, delete_cache=(3600, 3600)) as app:
        gr.Markdown("## samtok — any mask as two words\nA mask tokenizer (SAMTok) and a QwenVL-SAMTok model: paint a "
                    "region, read its two words, decode words back into masks, chat about the image.")
        status_md = gr.Markdown(_status_markdown(service.info()), elem_id="status")
        timer = gr.Timer(2.0, active=service.info()["model_status"] == "loading")
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Tokenize", id="tokenize", elem_id="tab-tokenize"):
                with gr.Row():
                    with gr.Column():
                        tok_editor = editor("tok-editor", "Image: upload, then paint the region (brush; eraser to fix)")
                        tok_mask_file = gr.File(label="…or a mask file (PNG, 0 = background); used instead of the painting",
                                                file_types=["image"], type="filepath", height=90, elem_id="tok-mask-file")
                        tok_run = gr.Button("Tokenize", variant="primary", elem_id="tok-run")
                    with gr.Column():
                        tok_span = gr.Textbox(label="Span (the two words)", buttons=["copy"], interactive=False,
                                              elem_id="tok-span")
                        with gr.Row():
                            tok_codes = gr.Textbox(label="Codes (first, second)", interactive=False, elem_id="tok-codes")
                            tok_iou = gr.Number(label="IoU: your mask vs decoded", precision=4, interactive=False,
                                                elem_id="tok-iou")
                        with gr.Row():
                            tok_yours = gr.AnnotatedImage(label="Your mask", format="png", height=260, elem_id="tok-yours")
                            tok_decoded = gr.AnnotatedImage(label="Decoded from the two words", format="png", height=260,
                                                            elem_id="tok-decoded")
                        tok_notes = gr.Markdown(elem_id="tok-notes")
                        tok_send = gr.Button("Detokenize this span →", elem_id="tok-send")
                tok_image = gr.State(None)
            with gr.Tab("Detokenize", id="detokenize", elem_id="tab-detokenize"):
                with gr.Row():
                    with gr.Column():
                        det_image = gr.Image(label="Image", type="filepath", format="png", sources=("upload", "clipboard"),
                                             height=300, elem_id="det-image")
                        det_text = gr.Textbox(label="Text with spans (typed or pasted)", lines=4, placeholder=SPAN_EXAMPLE,
                                              elem_id="det-text")
                        det_run = gr.Button("Decode", variant="primary", elem_id="det-run")
                    with gr.Column():
                        det_overlay = gr.AnnotatedImage(label="Decoded masks", format="png", height=360, elem_id="det-overlay")
                        det_table = gr.Dataframe(headers=TABLE_HEADERS["detokenize"], interactive=False, elem_id="det-table")
                        det_notes = gr.Markdown(elem_id="det-notes")
            with gr.Tab("Chat", id="chat", elem_id="tab-chat"):
                chat_state = gr.State(None)
                with gr.Row():
                    with gr.Column():
                        chat_editor = editor("chat-editor", "Image (paint a region to ask about it: it goes in at <mask>)")
                        chat_prompt = gr.Textbox(label="Prompt", lines=2, elem_id="chat-prompt",
                                                 placeholder="Please segment the red star in this image.  /  "
                                                             "What is <mask>?")
                        with gr.Row():
                            chat_send = gr.Button("Send", variant="primary", elem_id="chat-send")
                            chat_new = gr.Button("New conversation", elem_id="chat-new")
                        chat_max = gr.Slider(1, cfg.max_new_tokens_limit, value=cfg.max_new_tokens, step=1,
                                             label="Max new tokens", elem_id="chat-max-tokens")
                    with gr.Column():
                        chatbot = gr.Chatbot(label="Dialogue", height=300, elem_id="chatbot")
                        chat_overlay = gr.AnnotatedImage(label="Masks of the last answer", format="png", height=300,
                                                         elem_id="chat-overlay")
                        chat_raw = gr.Textbox(label="Raw answer (the mask words as the model wrote them)", lines=2,
                                              buttons=["copy"], interactive=False, elem_id="chat-raw")
                        chat_table = gr.Dataframe(headers=TABLE_HEADERS["chat"], interactive=False, elem_id="chat-table")
                        chat_notes = gr.Markdown(elem_id="chat-notes")

        # ----------------------------------------------------------------- events
        tok_run.click(tokenize, [tok_editor, tok_mask_file],
                      [tok_span, tok_codes, tok_iou, tok_yours, tok_decoded, tok_notes, tok_image], api_name="tokenize")
        tok_send.click(to_detokenize, [tok_image, tok_span], [det_image, det_text, tabs], api_visibility="private")
        det_run.click(detokenize, [det_image, det_text], [det_overlay, det_table, det_notes], api_name="detokenize",
                      preprocess=False)
        chat_inputs = [chat_editor, chat_prompt, chat_max, chat_state]
        chat_outputs = [chatbot, chat_overlay, chat_raw, chat_table, chat_notes, chat_state]
        # Progress and errors show on the overlay and the raw answer, not over the dialogue (which an error
        # leaves as it was); the prompt is cleared only after an answer (after an error it stays, to be fixed).
        chat_progress = [chat_overlay, chat_raw]
        for event, api in ((chat_send.click, dict(api_name="chat")), (chat_prompt.submit, dict(api_visibility="private"))):
            event(chat, chat_inputs, chat_outputs, show_progress_on=chat_progress, **api).success(
                lambda: "", None, chat_prompt, api_visibility="private")
        chat_new.click(new_conversation, None, [chatbot, chat_overlay, chat_raw, chat_table, chat_notes, chat_state],
                       api_name="new_conversation")
        timer.tick(status, None, [status_md, timer], api_visibility="private", show_progress="hidden")
        app.load(status, None, [status_md, timer], api_visibility="private", show_progress="hidden")
    return app


def launch_options(service: DemoService, host: str = "127.0.0.1", port: int = 7860, quiet: bool = True) -> dict:
    """Keyword arguments for ``launch()``: local only, no share link, no Node SSR, uploads capped, errors shown."""
    return dict(server_name=host, server_port=port, share=False, ssr_mode=False, inbrowser=False, quiet=quiet,
                show_error=True, max_file_size=f"{int(service.config.max_upload_mb)}mb", css=CSS, mcp_server=False,
                footer_links=["api", "settings"], run_history=False, enable_monitoring=False)


def launch(service: DemoService, host: str = "127.0.0.1", port: int = 7860, concurrency: int = 4,
           brush_size: Optional[int] = None, max_queue: int = 64) -> gr.Blocks:
    """Build the app for ``service`` and serve it from a background thread; ``app.close()`` stops it.

    Gradio's queue runs ``concurrency`` requests of each kind at once and holds up to ``max_queue``
    waiting ones (the service's locks serialise the tokenizer and the model underneath).
    """
    app = build_app(service, brush_size=brush_size).queue(default_concurrency_limit=concurrency, max_size=max_queue)
    app.launch(**launch_options(service, host, port), prevent_thread_lock=True)
    return app
