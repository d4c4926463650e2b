"""The benchmarks under bench/ run at micro size and produce the tables docs/benchmarks.md is made of.

Nothing here checks a speed (benchmarks measure, tests do not time): only that every script runs,
fills every column with a sensible value, that the GPU configurations (LoRA, bf16, gradient
checkpointing) run at micro size on CPU, and that rewriting docs/benchmarks.md keeps the sections
of the other device kind.
"""

from __future__ import annotations

import importlib
import math
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
NAMES = ["tokenizer_throughput", "pretokenize_throughput", "sft_step", "grpo_rollout"]

pytestmark = pytest.mark.slow


@pytest.fixture
def bench(monkeypatch):
    """Import a bench script by name, the way `python bench/<name>.py` sees its siblings."""
    monkeypatch.syspath_prepend(str(BENCH))
    torch.set_num_threads(1)
    return importlib.import_module


def _check_table(result, module, min_rows=1):
    assert result.columns == module.COLUMNS
    assert len(result.rows) >= min_rows
    for row in result.rows:
        assert set(row) == set(module.COLUMNS)
        for col in module.COLUMNS:
            v = row[col]
            if isinstance(v, float) and ("/s" in col or col.startswith("step")):
                per_mask_skipped = "per-mask" in col and row.get("images/call", 1) > 1  # measured with 1 image
                assert (math.isnan(v) if per_mask_skipped else math.isfinite(v) and v > 0), (col, v)
    md = result.markdown()
    assert md.startswith(f"### {module.TITLE} (CPU)") and "| " + " | ".join(module.COLUMNS) + " |" in md
    assert "Device: CPU: " in md and "cores visible" in md


@pytest.mark.parametrize("name", NAMES)
def test_each_benchmark_runs_at_micro_size(bench, name):
    module = bench(name)
    result = module.run("cpu", quick=True, repeats=1)
    assert result.name == module.NAME == name and result.kind == "cpu"
    if name == "grpo_rollout" and module.rl_module_available():
        assert not result.rows and "Skipped" in result.notes[0]
        return
    _check_table(result, module)
    if name == "tokenizer_throughput":
        assert [r["masks/image"] for r in result.rows] == [1, 4]


def test_gpu_configurations_run_at_micro_size_on_cpu(bench):
    """The GPU rows' settings (LoRA, bf16 weights + autocast, gradient checkpointing, micro-batches)
    on the tiny model, so that a GPU session does not discover a broken code path."""
    sft = bench("sft_step")
    case = sft.SFTCase("tiny, LoRA r=4, bf16, grad. ckpt", lora_r=4, bf16=True, gradient_checkpointing=True,
                       batch=2, steps=1)
    result = sft.run("cpu", repeats=1, cases=[case])
    _check_table(result, sft)
    row = result.rows[0]
    assert row["precision"] == "bf16" and row["trainable (M)"] < row["params (M)"]
    assert 0 < row["GFLOP/step"] < 10 and row["GFLOP/s"] > 0
    grpo = bench("grpo_rollout")
    if grpo.rl_module_available():
        pytest.skip("the RL Lightning module is not available")
    case = grpo.GRPOCase("tiny, LoRA r=4, bf16", lora_r=4, bf16=True, prompts=2, group=2, max_new_tokens=3,
                         micro_batch_size=2)
    _check_table(grpo.run("cpu", repeats=1, cases=[case]), grpo)


def test_the_embedded_default_model_rows_count_its_flops(bench):
    """The model `make sft` trains (configs/sft/tiny.yaml), fp32 and bf16-mixed, one step each: the
    FLOP count is the same in both and grows with the batch (it is counted, not assumed)."""
    sft = bench("sft_step")
    cases = [sft.SFTCase("embedded", size="embedded", freeze_vision=False, batch=1, image_px=128, steps=1),
             sft.SFTCase("embedded, 2", size="embedded", freeze_vision=False, batch=2, image_px=128, steps=1),
             sft.SFTCase("embedded, mixed", size="embedded", mixed=True, freeze_vision=False, batch=1, image_px=128,
                         steps=1)]
    result = sft.run("cpu", repeats=1, cases=cases)
    _check_table(result, sft, min_rows=3)
    one, two, mixed = result.rows
    assert mixed["precision"] == "bf16-mixed" and one["precision"] == "fp32"
    assert one["trainable (M)"] == one["params (M)"] > 4  # full fine-tuning, the vision tower included
    assert one["GFLOP/step"] == pytest.approx(mixed["GFLOP/step"])
    assert 1.8 < two["GFLOP/step"] / one["GFLOP/step"] < 2.6  # the second sample is a few tokens longer


def test_several_images_per_call_as_on_a_gpu(bench):
    module = bench("tokenizer_throughput")
    result = module.run("cpu", repeats=1, masks_per_image=[2], images_per_call=[1, 2])
    _check_table(result, module, min_rows=2)
    assert [r["images/call"] for r in result.rows] == [1, 2] and result.rows[1]["encode speed-up"] == "-"


def test_a_bench_script_main_parses_its_flags(bench, capsys):
    results = bench("tokenizer_throughput").main(["--device", "cpu", "--quick", "--repeats", "1"])
    assert len(results) == 1 and "encode cached masks/s" in capsys.readouterr().out


def test_the_doc_keeps_a_section_per_benchmark_and_device(bench, tmp_path):
    kit, run_all = bench("benchkit"), bench("run_all")
    doc = tmp_path / "benchmarks.md"
    # an earlier GPU run left its own section; a CPU run must not lose it
    kit.update_doc(doc, run_all.HEADER, run_all.order(), {"sft_step:gpu": "### SFT (GPU)\n\nmeasured on an H100"},
                   run_all.defaults())
    results = run_all.run_all("cpu", only=["tokenizer_throughput"], quick=True, repeats=1, doc=doc)
    text = doc.read_text()
    sections = kit.read_sections(text)
    assert set(sections) == {f"{n}:{k}" for n in NAMES for k in ("cpu", "gpu")}
    assert sections["sft_step:gpu"] == "### SFT (GPU)\n\nmeasured on an H100"
    assert sections["tokenizer_throughput:cpu"] == results[0].markdown()
    assert "GPU numbers pending" in sections["tokenizer_throughput:gpu"]
    assert "not measured yet" in sections["pretokenize_throughput:cpu"]
    # sections appear in the registry's order, each once
    keys = [k for k in (f"{n}:{d}" for n, d in run_all.order()) if f"<!-- bench:{k} -->" in text]
    assert [text.index(f"<!-- bench:{k} -->") for k in keys] == sorted(text.index(f"<!-- bench:{k} -->") for k in keys)
    assert text.startswith("# Benchmarks")


def test_the_committed_doc_has_every_section(bench):
    kit = bench("benchkit")
    sections = kit.read_sections((BENCH.parent / "docs" / "benchmarks.md").read_text())
    assert set(sections) == {f"{n}:{k}" for n in NAMES for k in ("cpu", "gpu")}
