"""``samtok serve``: the web demo (Tokenize, Detokenize, Chat), a Gradio app on a local HTTP server.

* :mod:`samtok.serve.service` — what each tab does, as plain methods on :class:`DemoService`
  (input checking with messages meant for a person, locks, lazy model loading); no web framework.
* :mod:`samtok.serve.app` — the Gradio page over the service (its events are also a Gradio API).
* :mod:`samtok.serve.cli` — the command (defaults to the embedded default's ``runs/`` artefacts).
* :mod:`samtok.serve.browser` — Debian's Chromium driven by Playwright, for the browser tests and
  the README screenshots (:mod:`samtok.serve.screenshots`).

The model behind an OpenAI-compatible server is a different thing: see
:mod:`samtok.mllm.openai_client`, :mod:`samtok.mllm.serving` and docs/serving.md.
"""
