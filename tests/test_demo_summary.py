"""`samtok demo`'s final summary: stage timings and the headline numbers next to their baselines."""

import json
from pathlib import Path

from samtok.demo import _print_summary


def _write(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_summary_shows_metrics_with_baselines_and_rl_changes(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _write(tmp_path / "runs/tokenizer/summary.json", {"stage1": {"val/rMaskIoU": 0.83, "val/rMaskIoU_first_code": 0.8}})
    _write(tmp_path / "runs/sft/summary.json", {"generation": {
        "res/cIoU": 0.058, "baseline/majority_span/res/cIoU": 0.3, "baseline/no_target/res/cIoU": 0.0,
        "gres/N-acc": 0.982, "baseline/no_target/gres/N-acc": 1.0}})
    _write(tmp_path / "runs/rl/summary.json", {"before": {"gIoU": 0.612, "N-acc": 0.9}, "after": {"gIoU": 0.602, "N-acc": 1.0}})
    _print_summary([("synth", "ok", 0.3), ("sft", "ok", 10.9)], 11.2 * 60)
    out = capsys.readouterr().out
    assert "sft              ok             10.9 min" in out and "11.2 min" in out
    assert "val rMaskIoU 0.830 (first code only 0.800)" in out
    assert "res/cIoU     0.058  [0.300 / 0.000]" in out
    assert "gres/N-acc   0.982  [- / 1.000]" in out  # no majority-span number: shown as "-"
    assert "gIoU         0.612 -> 0.602 (-0.010)" in out and "N-acc        0.900 -> 1.000 (+0.100)" in out
    assert "gres/gIoU" not in out  # absent metrics are skipped, not printed as nan
