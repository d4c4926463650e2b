"""Driving the demo page in a real browser: Debian's Chromium through Playwright's Python package.

Used by the browser tests (tests/test_serve_browser.py) and by the README screenshots
(:mod:`samtok.serve.screenshots`). Playwright is pointed at the system browser
(``/usr/bin/chromium``, installed by ``make install`` with apt); ``playwright install``, which
downloads a browser of its own, is never needed.

Each ``*_flow`` function does what a person does on one tab of the Gradio page — upload files with
the components' file inputs, paint with the mouse, click the buttons — waits until the answer is
shown (the outputs' progress indicators are gone) or an error message popped up, and returns what
the page shows, read from the page (texts, tables, and the masks of the annotated images, fetched
as the browser fetches them).
"""

from __future__ import annotations

import io
import os
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
# Headless, and quiet on a machine without network: no background connections, updates or sync.
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
                 "--disable-dev-shm-usage")
TIMEOUT_MS = 60_000


def find_chromium() -> Optional[str]:
    """The browser executable: ``$SAMTOK_CHROMIUM``, else Debian's chromium, else ``chromium`` on PATH."""
    env = os.environ.get("SAMTOK_CHROMIUM")
    if env:
        return env if Path(env).is_file() else None
    for path in CHROMIUM_CANDIDATES:
        if Path(path).is_file():
            return path
    return shutil.which("chromium")


def unavailable_reason() -> Optional[str]:
    """Why browser tests cannot run here (``None`` when they can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the Python package playwright is not installed (make install installs it with the test extra)"
    try:
        import gradio  # noqa: F401
    except ImportError:
        return "gradio is not installed (make install installs it with the serve extra)"
    if find_chromium() is None:
        return ("no Chromium found (/usr/bin/chromium): `make install` installs Debian's chromium with apt-get when "
                "run as root; elsewhere install it (apt-get install chromium) or set SAMTOK_CHROMIUM")
    return None


@contextmanager
def chromium_page(width: int = 1360, height: int = 1000, external: Optional[list] = None) -> Iterator:
    """A fresh headless Chromium page (its own temporary profile), closed on exit.

    ``external``, when given, collects the URL of every request the page makes to anything but
    the local server (the demo must make none).
    """
    from playwright.sync_api import sync_playwright

    executable = find_chromium()
    if executable is None:
        raise RuntimeError(unavailable_reason())
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, args=list(CHROMIUM_ARGS), headless=True)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(TIMEOUT_MS)
            if external is not None:
                local = re.compile(r"^(https?://(127\.0\.0\.1|localhost|\[::1\])[:/]|data:|blob:)")
                page.on("request", lambda r: None if local.match(r.url) else external.append(r.url))
            uploads = set()  # the image editor sends its layers in the background: let them finish before closing
            page.on("request", lambda r: uploads.add(r) if "/upload" in r.url else None)
            page.on("requestfinished", lambda r: uploads.discard(r))
            page.on("requestfailed", lambda r: uploads.discard(r))
            yield page
            for _ in range(30):
                if not uploads:
                    break
                page.wait_for_timeout(100)
        finally:
            browser.close()


# ------------------------------------------------------------------------------------------ page parts
def open_demo(page, url: str, wait_for_model: bool = True) -> str:
    """Load the page; wait until its status line is there (and the model loaded). Returns the status."""
    page.goto(url)
    page.wait_for_selector("#status")
    if wait_for_model:
        page.wait_for_function("() => !document.querySelector('#status').textContent.includes('loading')")
    return page.inner_text("#status")


def select_tab(page, name: str) -> None:
    """Click the tab called ``name`` (Tokenize, Detokenize, Chat)."""
    page.get_by_role("tab", name=name, exact=True).click()


def errors(page) -> list[str]:
    """The error messages the page shows (Gradio's toasts), oldest first."""
    return [t.strip() for t in page.locator("[data-testid=toast-text]").all_inner_texts()]


def dismiss_errors(page) -> None:
    """Close every error message (their × buttons)."""
    page.evaluate("() => document.querySelectorAll('[data-testid=toast-close]').forEach(b => b.click())")
    page.wait_for_function("() => !document.querySelector('[data-testid=toast-body]')")


def _mark_errors_seen(page) -> None:
    # Gradio groups messages into one toast: each message (not each toast) is marked.
    page.evaluate("() => document.querySelectorAll('[data-testid=toast-text]').forEach(t => t.dataset.seen = '1')")


def _tracker(output: str) -> str:
    return f"document.querySelector('#{output} [data-testid=status-tracker]')"


def click_and_wait(page, button: str, output: str) -> Optional[str]:
    """Click ``#button``; wait until ``#output`` is updated or an error pops up. Returns the new error, if any."""
    _mark_errors_seen(page)
    page.click(f"#{button}")
    try:  # the progress indicator appears as soon as the event is sent
        page.wait_for_function(f"() => {{ const t = {_tracker(output)}; return t && !t.classList.contains('hide'); }}",
                               timeout=5000)
    except Exception:  # already finished (or never shown): the next wait settles it
        pass
    page.wait_for_function(
        f"() => document.querySelector('[data-testid=toast-text]:not([data-seen])') || "
        f"(({_tracker(output)} || {{classList: {{contains: () => true}}}}).classList.contains('hide'))")
    new = page.locator("[data-testid=toast-text]:not([data-seen])").all_inner_texts()
    if new:
        page.wait_for_timeout(400)  # the message fades in; a screenshot taken now shows it
    return new[-1].strip() if new else None


def upload_error(page, component: str, path: Path) -> Optional[str]:
    """Upload a file Gradio should refuse into ``#component``; the error message it shows (``None``: none)."""
    _mark_errors_seen(page)
    upload(page, component, path)
    try:
        page.wait_for_selector("[data-testid=toast-text]:not([data-seen])", timeout=5000)
    except Exception:
        return None
    return page.locator("[data-testid=toast-text]:not([data-seen])").first.inner_text().strip()


def upload(page, component: str, path: Path) -> None:
    """Put a file into the upload input of ``#component`` (an image editor, image or file component).

    A file or image component holding a file shows it instead of its upload input: it is cleared
    first (its *Clear* button), as a person replaces a file.
    """
    clear = page.locator(f"#{component} button[aria-label='Clear']")
    if clear.count():
        clear.first.click()
    page.locator(f"#{component} input[type=file]").first.set_input_files(str(path))


def upload_to_editor(page, editor: str, path: Path) -> None:
    """Upload an image into the image editor ``#editor`` and wait until it is shown on the canvas."""
    upload(page, editor, path)
    page.wait_for_function(f"() => /\\d+%/.test(document.querySelector('#{editor}').innerText) && "
                           f"!document.querySelector('#{editor}').innerText.includes('Upload an image')")
    page.wait_for_timeout(300)  # the canvas draws the image on the next frames


def editor_image_box(page, editor: str, image_size: tuple[int, int]) -> tuple[float, float, float, float]:
    """Where the ``(H, W)`` image lies on the screen in ``#editor``: ``(x, y, scale, 0)``.

    The editor draws the image centred on its canvas at the zoom it shows (``480%``).
    """
    canvas = page.locator(f"#{editor} canvas").first
    canvas.scroll_into_view_if_needed()
    r = canvas.bounding_box()
    zoom = float(re.search(r"(\d+)%", page.inner_text(f"#{editor}")).group(1)) / 100.0
    h, w = image_size
    return r["x"] + r["width"] / 2 - w * zoom / 2, r["y"] + r["height"] / 2 - h * zoom / 2, zoom, 0.0


def paint(page, editor: str, image_size: tuple[int, int], box: tuple[float, float, float, float], step_px: float = 6.0):
    """Paint a rectangle on ``#editor`` with the brush; ``box = (x0, y0, x1, y1)`` as fractions of the image.

    One stroke zigzags across the box in rows ``step_px`` image pixels apart (at most the brush's
    diameter, so the rows touch); the painted region is the box grown by the brush's radius. Every
    mouse event costs a redraw of the canvas (a third of a second in software rendering on a busy
    machine), so the stroke uses two events a row.
    """
    page.locator(f"#{editor} button[aria-label='Brush']").click()
    x, y, zoom, _ = editor_image_box(page, editor, image_size)
    h, w = image_size
    x0, x1 = x + box[0] * w * zoom, x + box[2] * w * zoom
    y0, y1 = y + box[1] * h * zoom, y + box[3] * h * zoom
    rows = max(1, int(np.ceil((y1 - y0) / (step_px * zoom))) + 1)
    page.mouse.move(x0, y0)
    page.mouse.down()
    for k, yy in enumerate(np.linspace(y0, y1, rows)):
        start, end = (x0, x1) if k % 2 == 0 else (x1, x0)
        if k:
            page.mouse.move(start, yy)
        page.mouse.move(end, yy)
    page.mouse.up()
    page.wait_for_timeout(200)


def annotations(page, component: str) -> list[tuple[str, np.ndarray]]:
    """``(label, bool mask)`` of every annotation a ``gr.AnnotatedImage`` shows, fetched like the browser does."""
    from PIL import Image

    labels = [t.strip() for t in page.locator(f"#{component} .legend-item").all_inner_texts()]
    out = []
    for k, src in enumerate(page.locator(f"#{component} img.mask").evaluate_all("els => els.map(e => e.src)")):
        body = page.request.get(src).body()
        alpha = np.asarray(Image.open(io.BytesIO(body)).convert("RGBA"))[..., 3]
        out.append((labels[k] if k < len(labels) else "", alpha > 0))
    return out


def table_rows(page, component: str) -> list[list[str]]:
    """The cells of a ``gr.Dataframe``, row by row, as text."""
    rows = page.locator(f"#{component} table").first.locator("tbody tr")
    out = []
    for i in range(rows.count()):
        cells = [c.strip() for c in rows.nth(i).locator("td").all_text_contents()]
        if any(cells):
            out.append(cells)
    return out


def chat_messages(page) -> list[tuple[str, str]]:
    """``(role, text)`` of every message in the dialogue, in order."""
    msgs = page.locator("#chatbot [data-testid='user'], #chatbot [data-testid='bot']")
    return [(msgs.nth(i).get_attribute("data-testid"), msgs.nth(i).inner_text().strip()) for i in range(msgs.count())]


# ------------------------------------------------------------------------------------------ flows
def tokenize_flow(page, image: Optional[Path], image_size: Optional[tuple[int, int]] = None,
                  mask_file: Optional[Path] = None, box: Optional[tuple[float, float, float, float]] = None) -> dict:
    """Tokenize tab: upload ``image`` (``(H, W)`` = ``image_size``), then a mask file and/or paint ``box``; click Tokenize."""
    select_tab(page, "Tokenize")
    if image is not None:
        upload_to_editor(page, "tok-editor", image)
    if mask_file is not None:
        upload(page, "tok-mask-file", mask_file)
        page.wait_for_function("() => document.querySelector('#tok-mask-file').innerText.includes('.')")
    if box is not None:
        paint(page, "tok-editor", image_size, box)
    error = click_and_wait(page, "tok-run", "tok-span")
    out = {"state": "error" if error else "done", "error": error, "notes": page.inner_text("#tok-notes")}
    if not error:
        out.update(span=page.input_value("#tok-span textarea"),
                   codes=[int(v) for v in page.input_value("#tok-codes textarea").split()],
                   iou=float(page.input_value("#tok-iou input")))
    return out


def detokenize_flow(page, text: str, image: Optional[Path] = None) -> dict:
    """Detokenize tab: (optionally upload ``image``), type ``text``, click Decode."""
    select_tab(page, "Detokenize")
    if image is not None:
        upload(page, "det-image", image)
        page.wait_for_selector("#det-image img")
    page.fill("#det-text textarea", text)
    error = click_and_wait(page, "det-run", "det-overlay")
    out = {"state": "error" if error else "done", "error": error, "notes": page.inner_text("#det-notes")}
    if not error:
        out.update(rows=table_rows(page, "det-table"), masks=annotations(page, "det-overlay"))
    return out


def chat_flow(page, prompt: str, image: Optional[Path] = None, image_size: Optional[tuple[int, int]] = None,
              region: Optional[tuple[float, float, float, float]] = None, max_new_tokens: Optional[int] = None,
              step_px: float = 6.0) -> dict:
    """Chat tab: (optionally upload ``image``), paint ``region`` (rows ``step_px`` apart), type ``prompt``, click Send."""
    select_tab(page, "Chat")
    if image is not None:
        upload_to_editor(page, "chat-editor", image)
    if region is not None:
        paint(page, "chat-editor", image_size, region, step_px)
    if max_new_tokens is not None:
        box = page.locator("#chat-max-tokens input[type=number]")
        box.fill(str(max_new_tokens))
        box.press("Enter")
    page.fill("#chat-prompt textarea", prompt)
    error = click_and_wait(page, "chat-send", "chat-overlay")
    out = {"state": "error" if error else "done", "error": error, "notes": page.inner_text("#chat-notes"),
           "messages": chat_messages(page)}
    if not error:
        users = [t for role, t in out["messages"] if role == "user"]
        bots = [t for role, t in out["messages"] if role == "bot"]
        out.update(user_turn=users[-1], answer=bots[-1], raw=page.input_value("#chat-raw textarea"),
                   rows=table_rows(page, "chat-table"), masks=annotations(page, "chat-overlay"))
    return out
