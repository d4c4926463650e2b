"""report.json / report.md of one benchmark run, their figures (drawn with PIL), and summary.md.

Figures (no matplotlib: plain PIL drawing):

* ``score_histogram.png`` — the per-item score (IoU, mIoU, ROUGE-L...) in equal bins over [0, 1];
* ``mask_iou_histogram.png`` — tokenizer benchmark: per-mask reconstruction IoU;
* ``best.png`` / ``worst.png`` — the items with the highest / lowest score: the prediction (left)
  and the ground truth (right) overlaid on the image, prompt and answers written below.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from samtok.core.render import caption_below, make_grid, overlay_masks

BG = (255, 255, 255)
FG = (0, 0, 0)
BAR = (0, 130, 200)


# ------------------------------------------------------------------------------------------ JSON
def plain(obj: Any) -> Any:
    """JSON-safe data: NaN/inf → None, numpy scalars → Python, tuples → lists."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        v = float(obj)
        return v if math.isfinite(v) else None
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: Path, data: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(plain(data), indent=2, sort_keys=False, allow_nan=False) + "\n")
    tmp.replace(path)
    return path


def dir_fingerprint(path: Optional[str | Path], full_limit: int = 64 << 20, edge: int = 4 << 20) -> Optional[str]:
    """SHA-256 (16 hex digits) of a model directory: every file's name and size, plus the bytes of
    files up to ``full_limit`` and the first and last ``edge`` bytes of larger ones (weights shards),
    so that a 7B checkpoint is fingerprinted in well under a second. ``None`` without a path."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        return None
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(p) if f != p else f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= full_limit:
                h.update(fh.read())
            else:
                h.update(fh.read(edge))
                fh.seek(size - edge)
                h.update(fh.read(edge))
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------ figures
def histogram(values: Sequence[float], bins: int = 10, lo: float = 0.0, hi: float = 1.0) -> dict:
    """Counts of finite ``values`` in ``bins`` equal bins over ``[lo, hi]`` (the last bin closed)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=np.float64)
    counts, edges = np.histogram(np.clip(v, lo, hi), bins=bins, range=(lo, hi))
    return {"edges": [float(e) for e in edges], "counts": [int(c) for c in counts], "count": int(v.size),
            "mean": float(v.mean()) if v.size else None}


def histogram_image(hist: dict, title: str, xlabel: str, width: int = 520, height: int = 320) -> Image.Image:
    """A bar chart of :func:`histogram`'s output."""
    img = Image.new("RGB", (width, height), BG)
    d = ImageDraw.Draw(img)
    left, right, top, bottom = 48, 16, 28, 44
    d.text((left, 8), title, fill=FG)
    x0, y0, x1, y1 = left, top, width - right, height - bottom
    d.line([(x0, y1), (x1, y1)], fill=FG)
    d.line([(x0, y0), (x0, y1)], fill=FG)
    counts = hist["counts"]
    top_count = max(counts) if counts and max(counts) > 0 else 1
    n = max(1, len(counts))
    bw = (x1 - x0) / n
    for k, c in enumerate(counts):
        bx0 = x0 + k * bw + 1
        # a non-empty bin gets at least one pixel of height and width (Pillow rejects inverted boxes)
        bh = max(1.0, (y1 - y0 - 14) * c / top_count)
        if c:
            d.rectangle([bx0, y1 - bh, max(bx0, bx0 + bw - 2), y1 - 1], fill=BAR)
            d.text((bx0 + 2, y1 - bh - 12), str(c), fill=FG)
    edges = hist["edges"]
    ticks = sorted(set(range(0, len(edges), max(1, len(edges) // 5))) | {len(edges) - 1})
    for k in ticks:
        tx = x0 + k * bw
        d.line([(tx, y1), (tx, y1 + 4)], fill=FG)
        d.text((tx - 8, y1 + 6), f"{edges[k]:.1f}", fill=FG)
    d.text(((x0 + x1) // 2 - 4 * len(xlabel) // 2, height - 16), xlabel, fill=FG)
    d.text((4, y0), str(top_count), fill=FG)
    d.text((4, y1 - 10), "0", fill=FG)
    return img


def _upscale(a: np.ndarray, f: int) -> np.ndarray:
    return a if f == 1 else np.repeat(np.repeat(a, f, axis=0), f, axis=1)


def example_panel(image: Any, pred_masks: Sequence[np.ndarray], gt_masks: Sequence[np.ndarray], text: str,
                  pred_labels: Optional[Sequence[str]] = None, min_width: int = 256) -> Image.Image:
    """Prediction (left) and ground truth (right) over the image, ``text`` below.

    Small images are first enlarged by an integer factor (nearest neighbour) to ``min_width``."""
    from samtok.core.images import as_rgb_array

    rgb = as_rgb_array(image)
    f = max(1, int(math.ceil(min_width / rgb.shape[1])))
    rgb = _upscale(rgb, f)
    left = overlay_masks(rgb, [_upscale(np.asarray(m, dtype=bool), f) for m in pred_masks],
                         list(pred_labels) if pred_labels else None)
    right = overlay_masks(rgb, [_upscale(np.asarray(m, dtype=bool), f) for m in gt_masks])
    pair = Image.new("RGB", (left.width + right.width + 6, max(left.height, right.height) + 14), BG)
    d = ImageDraw.Draw(pair)
    d.text((2, 1), "prediction", fill=FG)
    d.text((left.width + 8, 1), "ground truth", fill=FG)
    pair.paste(left, (0, 14))
    pair.paste(right, (left.width + 6, 14))
    return caption_below(pair, text)


def ranked(per_item: Sequence[float], n: int) -> tuple[list[int], list[int]]:
    """Indices of the ``n`` best and ``n`` worst finite scores (best first / worst first; ties by index)."""
    finite = [(s, k) for k, s in enumerate(per_item) if s is not None and math.isfinite(s)]
    best = [k for _, k in sorted(finite, key=lambda t: (-t[0], t[1]))[:n]]
    worst = [k for _, k in sorted(finite, key=lambda t: (t[0], t[1]))[:n]]
    return best, worst


# ------------------------------------------------------------------------------------------ markdown
def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if not math.isfinite(v):
            return "–"
        if v.is_integer() and abs(v) >= 1:
            return str(int(v))
        return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"
    return _cell(str(v))


def _cell(text: str) -> str:
    """Text safe inside a markdown table cell (mask words contain "|")."""
    return text.replace("|", "\\|")


def metrics_table(metrics: dict) -> list[str]:
    lines = ["| metric | value |", "|---|---|"]
    for k, v in metrics.items():
        lines.append(f"| {_cell(k)} | {_fmt(v)} |")
    return lines


def baselines_table(baselines: dict) -> list[str]:
    lines = [f"Mask-as-text representations of the same {baselines['masks']} masks; tokens counted with "
             f"`{baselines['text_tokenizer']}` (SAMTok rows: every mask of the benchmark).", "",
             "| representation | tokens (mean) | tokens (median) | tokens (max) | IoU (mean) | description |",
             "|---|---|---|---|---|---|"]
    for name, row in baselines["representations"].items():
        lines.append(f"| {name} | {_fmt(row.get('tokens_mean'))} | {_fmt(row.get('tokens_median'))} | "
                     f"{_fmt(row.get('tokens_max'))} | {_fmt(row.get('iou_mean'))} | {_cell(row.get('description', ''))} |")
    return lines


def report_markdown(report: dict) -> str:
    m, t = report["model"], report["tokenizer"]
    lines = [f"# {report['name']} — {m['name']}", ""]
    lines.append(f"- benchmark: `{report['benchmark']}` (protocol: docs/evaluation.md)")
    lines.append(f"- model: `{m.get('path')}` (fingerprint `{m.get('fingerprint')}`)")
    lines.append(f"- tokenizer: `{t.get('path')}` (fingerprint `{t.get('fingerprint')}`)")
    lines.append(f"- data: `{report['data']['kind']}` {json.dumps(report['data']['args'])}")
    lines.append(f"- samples: {report['num_samples']} ({report['num_items']} predictions)")
    if report.get("generation"):
        g = report["generation"]
        lines.append(f"- decoding: greedy, max_new_tokens {g['max_new_tokens']}, batch {g['batch_size']}")
    tm = report["timing"]
    lines.append(f"- time: {tm['total_seconds']:.1f} s (prediction {tm['predict_seconds']:.1f} s, "
                 f"{tm['items_per_second'] or 0:.2f} items/s; scoring {tm['score_seconds']:.1f} s)")
    lines += ["", "## Metrics", ""] + metrics_table(report["metrics"])
    if report.get("baselines"):
        lines += ["", "## Tokens per mask: SAMTok vs other mask-as-text representations", ""]
        lines += baselines_table(report["baselines"])
    figs = report.get("figures", {})
    if figs:
        lines += ["", "## Figures", ""]
        for key, title in (("score_histogram", f"Per-item {report['score']['name']}"),
                           ("mask_iou_histogram", "Per-mask reconstruction IoU"),
                           ("best", "Best predictions (left: prediction, right: ground truth)"),
                           ("worst", "Worst predictions (left: prediction, right: ground truth)")):
            if key in figs:
                lines += [f"### {title}", "", f"![{key}]({figs[key]})", ""]
    return "\n".join(lines).rstrip() + "\n"


SUMMARY_METRICS: dict[str, list[str]] = {
    "refcoco": ["cIoU", "gIoU", "Pr@0.5", "span_exact"],
    "gres": ["gIoU", "cIoU", "N-acc", "T-acc", "span_exact"],
    "gcg": ["AP50", "mIoU", "recall", "METEOR (exact-match only)", "CIDEr-D"],
    "region_caption": ["CIDEr-D", "METEOR (exact-match only)", "ROUGE-L", "BLEU-4"],
    "mr_seg": ["cIoU", "gIoU"],
    "tokenizer": ["rMaskIoU", "rMaskIoU_first_code", "count"],
}


def summary_markdown(rows: Sequence[dict]) -> str:
    """One table per benchmark, one row per model (``rows``: report.json contents)."""
    lines = ["# Evaluation summary", ""]
    by_bench: dict[str, list[dict]] = {}
    for r in rows:
        by_bench.setdefault(r["name"], []).append(r)
    for name, reports in by_bench.items():
        kind = reports[0]["benchmark"]
        keys = SUMMARY_METRICS.get(kind, list(reports[0]["metrics"])[:4])
        lines += [f"## {name} (`{kind}`, {reports[0]['num_samples']} samples)", "",
                  "| model | " + " | ".join(keys) + " | report |", "|---" * (len(keys) + 2) + "|"]
        for r in reports:
            vals = " | ".join(_fmt(r["metrics"].get(k)) for k in keys)
            lines.append(f"| {r['model']['name']} | {vals} | [report]({r['report_path']}) |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def save_figure(img: Image.Image, out_dir: Path, name: str, figures: dict, key: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    img.save(out_dir / name)
    figures[key] = name


def example_grids(
    out_dir: Path,
    per_item: Sequence[float],
    num: int,
    panel: Callable[[int], Optional[Image.Image]],
    figures: dict,
) -> None:
    """best.png and worst.png from ``panel(item index)``."""
    if num <= 0:
        return
    best, worst = ranked(per_item, num)
    for key, idx in (("best", best), ("worst", worst)):
        panels = [p for p in (panel(k) for k in idx) if p is not None]
        if panels:
            save_figure(make_grid(panels, cols=min(4, len(panels))), out_dir, f"{key}.png", figures, key)
