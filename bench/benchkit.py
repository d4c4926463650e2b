"""What every benchmark under ``bench/`` shares: timing, the device line, tables, docs/benchmarks.md.

A benchmark module defines ``NAME``, ``TITLE``, ``COLUMNS`` and ``run(device, quick, repeats) ->
BenchResult``, plus ``main(argv)`` to run alone. ``bench/run_all.py`` runs them all and rewrites
``docs/benchmarks.md``: one section per (benchmark, device kind) between HTML comment markers, so a
CPU run replaces the CPU sections and keeps the GPU ones, and the other way round.

Timings are wall-clock (``time.perf_counter``) after warm-up, with ``torch.cuda.synchronize()`` on a
GPU; every measurement is repeated and the median reported, with the spread (max / min).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "benchmarks.md"


# ------------------------------------------------------------------------------------------------ device
def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when a GPU is visible, else ``cpu``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda but torch.cuda.is_available() is False")
    return device


def kind_of(device: str) -> str:
    return "gpu" if device.startswith("cuda") else "cpu"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover - not Linux
        pass
    return platform.processor() or platform.machine()


def device_description(device: str) -> str:
    """``CPU: <model>, <n> cores visible, torch threads <t>`` or ``GPU: <name> (<GiB>), CUDA <v>``."""
    if kind_of(device) == "gpu":
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}, torch {torch.__version__}"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load = f", load average {os.getloadavg()[0]:.1f} when measured" if hasattr(os, "getloadavg") else ""
    return (f"CPU: {cpu_model()}, {cores} cores visible, torch threads {torch.get_num_threads()}, "
            f"torch {torch.__version__}{load}")


def synchronize(device: str) -> None:
    if kind_of(device) == "gpu":
        torch.cuda.synchronize(torch.device(device))


# ------------------------------------------------------------------------------------------------ timing
@dataclass
class Timing:
    """Seconds of each repeat of one measurement."""

    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """max / min over the repeats (1.0 = perfectly stable)."""
        lo = min(self.seconds)
        return max(self.seconds) / lo if lo > 0 else float("inf")


def measure(fn: Callable[[], Any], device: str, repeats: int = 3, warmup: int = 1) -> Timing:
    """Run ``fn`` ``warmup`` times, then time ``repeats`` runs (synchronising a GPU around each)."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    out = []
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        out.append(time.perf_counter() - t0)
    return Timing(out)


def peak_memory_gib(device: str) -> Optional[float]:
    if kind_of(device) != "gpu":
        return None
    return torch.cuda.max_memory_allocated(torch.device(device)) / 2**30


def reset_peak_memory(device: str) -> None:
    if kind_of(device) == "gpu":
        torch.cuda.reset_peak_memory_stats(torch.device(device))


# ------------------------------------------------------------------------------------------------ results
@dataclass
class BenchResult:
    """One benchmark's table on one device."""

    name: str
    title: str
    device: str  # cpu | cuda
    description: str  # the device line
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    command: str = ""

    @property
    def kind(self) -> str:
        return kind_of(self.device)

    def markdown(self) -> str:
        lines = [f"### {self.title} ({self.kind.upper()})", "", f"Device: {self.description}."]
        if self.command:
            lines += ["", f"Command: `{self.command}`"]
        lines += ["", format_table(self.columns, self.rows)]
        if self.notes:
            lines += [""] + [f"- {n}" for n in self.notes]
        return "\n".join(lines)


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}" if abs(value) >= 0.1 else f"{value:.3g}"
    return str(value)


def format_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    head = "| " + " | ".join(columns) + " |"
    rule = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join([head, rule, *body])


def command_line(name: str, device: str, repeats: int) -> str:
    """How to reproduce a table (``--threads`` on CPU: the count it was measured with)."""
    threads = f" --threads {torch.get_num_threads()}" if kind_of(device) == "cpu" else ""
    return f"python bench/{name}.py --device {device} --repeats {repeats}{threads}"


def pending_section(name: str, title: str, kind: str, note: str) -> str:
    return f"### {title} ({kind.upper()})\n\n{note}"


# ------------------------------------------------------------------------------------------------ the doc
_MARK = re.compile(r"<!-- bench:(?P<key>[\w.-]+:(?:cpu|gpu)) -->\n(?P<body>.*?)\n<!-- /bench:(?P=key) -->", re.S)


def read_sections(text: str) -> dict[str, str]:
    """``{"<name>:<cpu|gpu>": markdown}`` of every marked section of docs/benchmarks.md."""
    return {m.group("key"): m.group("body") for m in _MARK.finditer(text)}


def render_doc(header: str, order: Sequence[tuple[str, str]], sections: dict[str, str]) -> str:
    """The whole document: ``header``, then each ``(name, kind)`` of ``order`` that has a section."""
    parts = [header.rstrip(), ""]
    for name, kind in order:
        key = f"{name}:{kind}"
        if key in sections:
            parts += [f"<!-- bench:{key} -->", sections[key].strip("\n"), f"<!-- /bench:{key} -->", ""]
    return "\n".join(parts)


def update_doc(path: Path, header: str, order: Sequence[tuple[str, str]], new: dict[str, str],
               defaults: dict[str, str]) -> str:
    """Replace the sections in ``new``, keep the others already in ``path``, fill gaps with ``defaults``."""
    old = read_sections(path.read_text()) if path.is_file() else {}
    sections = {**defaults, **old, **new}
    text = render_doc(header, order, sections)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return text


# ------------------------------------------------------------------------------------------------ CLI
def standard_args(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--device", default="auto", help="auto (cuda if visible), cpu or cuda")
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median reported)")
    ap.add_argument("--quick", action="store_true", help="micro sizes (seconds; what the tests run)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0: leave torch's default)")
    return ap


def apply_threads(threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def script_main(run, doc: str, argv: Optional[Sequence[str]] = None) -> list["BenchResult"]:
    """The command line of one benchmark script: ``run(device, quick=, repeats=)`` with the
    standard flags (first line of the script's docstring as the description), offline, threads set."""
    args = standard_args(doc.splitlines()[0]).parse_args(argv)
    offline()
    apply_threads(args.threads)
    result = run(args.device, quick=args.quick, repeats=args.repeats)
    print(result.markdown())
    return [result]


def offline() -> None:
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ------------------------------------------------------------------------------------------------ models
#: Qwen-VL sizes for random-weight benchmarks (language model / vision tower dimensions of the releases)
QWEN_VL_SIZES: dict[str, dict[str, Any]] = {
    "tiny": {},  # samtok.mllm.models.TinyModelConfig defaults
    # "embedded": configs/sft/tiny.yaml's model.tiny (embedded_default_model)
    "qwen2_5_vl_3b": dict(family="qwen2_5_vl", hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                          num_attention_heads=16, num_key_value_heads=2, vision_depth=32, vision_hidden_size=1280,
                          vision_intermediate_size=3420, vision_num_heads=16, rope_theta=1e6,
                          max_position_embeddings=32768, min_pixels=4 * 28 * 28, max_pixels=2048 * 28 * 28),
}
QWEN2_5_VOCAB_ROWS = 151936  # embedding rows of Qwen2.5-VL-3B (more than its 151,665 tokens)


def embedded_default_model():
    """The tiny model block of ``configs/sft/tiny.yaml`` (size ``"embedded"``): what ``make sft`` trains."""
    from samtok.core.config import load_config
    from samtok.mllm.train_sft import SFTConfig

    return load_config(SFTConfig, Path(__file__).resolve().parents[1] / "configs" / "sft" / "tiny.yaml").model.tiny


def build_random_qwen_vl(size: str, device: str, dtype: torch.dtype = torch.float32, vocab_rows: Optional[int] = None,
                         corpus: Sequence[str] = ()):
    """A random-weight Qwen-VL of ``size`` with a small BPE tokenizer (+ the 514 mask words).

    ``vocab_rows`` sets the embedding rows (the real vocabulary's 151,936 for the GPU sizes, so the
    embedding / lm_head cost is the real one); the BPE ids all fall inside. Built directly on ``device``
    in ``dtype`` (a 3B model never goes through CPU float32).
    """
    from samtok.mllm.models import TinyModelConfig, _model_class, _set_generation_defaults, tiny_model_config
    from samtok.mllm.processor import QwenVLImageTextProcessor, build_image_processor
    from samtok.mllm.text_tokenizers import CHAT_TEMPLATES, train_bpe_tokenizer
    from samtok.mllm.vocab import add_mask_vocabulary

    cfg = embedded_default_model() if size == "embedded" else TinyModelConfig(**QWEN_VL_SIZES[size])
    cfg.validate()
    corpus = list(corpus) or ["Please segment the red blob in this image.", "A small green circle on the left.",
                              "Where is the blue square? Please respond with a segmentation mask."]
    tok = train_bpe_tokenizer(corpus, vocab_size=cfg.bpe_vocab_size, chat_template=CHAT_TEMPLATES[cfg.family])
    rows = vocab_rows or int(-(-len(tok) // cfg.vocab_multiple) * cfg.vocab_multiple)
    hf = tiny_model_config(cfg, rows, tok)
    hf._attn_implementation = cfg.attn_implementation  # noqa: SLF001
    torch.manual_seed(cfg.seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = _model_class(cfg.family)(hf)
    finally:
        torch.set_default_dtype(previous)
    add_mask_vocabulary(model, tok, seed=cfg.seed)
    _set_generation_defaults(model, tok)
    image_processor = build_image_processor(
        cfg.family, min_pixels=cfg.min_pixels or 4 * cfg.cell_pixels(), max_pixels=cfg.max_pixels or 64 * cfg.cell_pixels(),
        patch_size=cfg.resolved_patch_size(), merge_size=cfg.spatial_merge_size, temporal_patch_size=cfg.temporal_patch_size)
    return model, QwenVLImageTextProcessor(image_processor=image_processor, tokenizer=tok)


def random_image(size: int, seed: int = 0):
    """A (size, size, 3) uint8 RGB array of coloured rectangles (something for the vision tower to see)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    img = np.full((size, size, 3), 40, dtype=np.uint8)
    for _ in range(6):
        y0, x0 = rng.integers(0, size - 8, 2)
        h, w = rng.integers(4, max(5, size // 2), 2)
        img[y0:y0 + h, x0:x0 + w] = rng.integers(0, 256, 3)
    return img


def random_masks(n: int, height: int, width: int, seed: int = 0):
    """``n`` non-empty bool masks (rectangles and ellipses of random size) as a (n, H, W) tensor."""
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:height, :width]
    out = np.zeros((n, height, width), dtype=bool)
    for k in range(n):
        cy, cx = rng.integers(0, height), rng.integers(0, width)
        ry, rx = rng.integers(2, max(3, height // 3)), rng.integers(2, max(3, width // 3))
        if k % 2:
            out[k] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            out[k] = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
        out[k, min(cy, height - 1), min(cx, width - 1)] = True
    return torch.from_numpy(out)
