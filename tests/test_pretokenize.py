"""Pre-tokenization: same codes as SAMTokenizer.encode, one image-encoder pass per image, crops,
atomic shards, resume after kill -9 (for real, in subprocesses), fingerprint checks, no duplicates."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from samtok.data.conversations import ImageRef, crop_mask, load_image_ref, region_crop_box
from samtok.data.pretokenize import (
    DONE,
    MANIFEST,
    CodeTable,
    MissingCodeError,
    PretokenizeConfig,
    PretokenizedMismatchError,
    PretokenizedTableError,
    committed_shards,
    finalize,
    join_key,
    load_code_table,
    load_plan,
    load_pretokenized,
    pretokenize,
    read_shard,
    remaining_units,
    scan_shards,
    shard_for_rank,
    table_info,
)
from samtok.tokenizer.checkpoints import file_fingerprint
from samtok.tokenizer.model import SAMTokModel, TokenizerModelConfig
from samtok.tokenizer.sam2_parts import SAM2Config

MICRO = SAM2Config(size="t", image_size=128, trunk_embed_dim=16, trunk_num_heads=1, trunk_stages=[1, 1, 2, 1],
                   trunk_global_att_blocks=[3])
CROP = {"min_side": 48, "context": 1.5, "min_short_side": 112}


def make_tokenizer(path, seed):
    from samtok.tokenizer import SAMTokenizer

    torch.manual_seed(seed)
    SAMTokenizer(SAMTokModel(TokenizerModelConfig(sam2=MICRO))).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tok")
    return make_tokenizer(root / "a", 0), make_tokenizer(root / "b", 1)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from samtok.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(out_dir=str(out), num_images=40, seed=0, progress=False))
    return out


@pytest.fixture(scope="module")
def mixture_yaml(synth, tmp_path_factory):
    root = str(synth)
    p = tmp_path_factory.mktemp("mix") / "mixture.yaml"
    p.write_text(f"""
entries:
  - {{name: train, kind: synthetic, args: {{root: "{root}", split: train}}, tasks: [res, gres, gcg, region_caption, region_vqa, mr_seg]}}
  - {{name: ov, kind: coco, args: {{instances: "{root}/instances_train.json", source: synth}}, tasks: [ov_seg], repeat: 0.5}}
  - {{name: val, kind: synthetic, args: {{root: "{root}", split: val}}, split: val}}
conversation: {{crop_min_side: {CROP['min_side']}, crop_context: {CROP['context']}, crop_min_short_side: {CROP['min_short_side']}}}
""")
    return p


def config(tok, data, out, **kw):
    base = dict(tokenizer=str(tok), data=str(data), out=str(out), accelerator="cpu", devices="1", threads=1,
                progress=False, batch_size=3, shard_rows=25)
    base.update(kw)
    return PretokenizeConfig(**base)


@pytest.fixture(scope="module")
def run(tokenizers, mixture_yaml, tmp_path_factory):
    """One in-process run over the mixture, counting the images the image encoder sees."""
    out = tmp_path_factory.mktemp("pretok")
    calls = []
    original = SAMTokModel.backbone

    def counting(self, images):
        calls.append(int(images.shape[0]))
        return original(self, images)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(SAMTokModel, "backbone", counting)
        result = pretokenize(config(tokenizers[0], mixture_yaml, out))
    units, spec, _ = load_plan(config(tokenizers[0], mixture_yaml, out))
    return {"out": out, "result": result, "calls": calls, "units": units, "spec": spec, "mixture": mixture_yaml}


# ------------------------------------------------------------------------------------------------


def test_table_has_every_planned_mask_and_crop_exactly_once(run, tokenizers):
    ds = load_pretokenized(run["out"], tokenizer=tokenizers[0])
    assert ds.column_names == ["source", "image_id", "ann_id", "c0", "c1"]
    keys = [(s, i, a) for s, i, a in zip(ds["source"], ds["image_id"], ds["ann_id"])]
    planned = [(u.source, u.image_id, k) for u in run["units"] for k, _ in u.masks]
    assert len(keys) == len(set(keys)) == len(planned) == run["result"].rows
    assert set(keys) == set(planned)
    assert keys == sorted(keys)
    crops = [k for k in keys if k[2].endswith("@crop")]
    assert crops and all((s, i, a[:-5]) in set(keys) for s, i, a in crops)
    assert all(0 <= c < 256 for c in list(ds["c0"]) + list(ds["c1"]))
    info = table_info(ds)
    assert info["fingerprint"] == file_fingerprint(tokenizers[0]) and info["crop"] == CROP
    assert len(committed_shards(run["out"])) > 1  # shard_rows = 25
    assert (run["out"] / DONE).is_file() and json.loads((run["out"] / MANIFEST).read_text())["rows"] == len(keys)


def test_the_image_encoder_runs_once_per_image_and_per_crop_in_batches(run):
    units = run["units"]
    full = [u for u in units if u.crop is None]
    assert len({(u.source, u.image_id) for u in full}) == len(full)  # one unit per image, all its masks
    assert sum(run["calls"]) == len(units)
    assert len(run["calls"]) == -(-len(units) // 3)  # batch_size 3
    assert run["result"].encoded == sum(len(u.masks) for u in units)


def test_codes_equal_calling_samtokenizer_encode_directly(run, tokenizers):
    from samtok.data.mixture import load_mixture, load_mixture_config
    from samtok.tokenizer import SAMTokenizer

    tok = SAMTokenizer.from_pretrained(tokenizers[0])
    codes = load_code_table(run["out"], tokenizer=tok)
    data = load_mixture(load_mixture_config(run["mixture"]))
    for r in data.images()[:15]:
        masks = np.stack([r.mask(a.ann_id) for a in r.anns])
        got = [codes.get(r.source, r.image_id, a.ann_id) for a in r.anns]
        assert [tuple(c) for c in tok.encode(str(r.path), masks).tolist()] == got
    crops = [u for u in run["units"] if u.crop is not None][:10]
    assert crops
    for u in crops:
        ann = u.masks[0][0][:-len("@crop")]
        r = data.records[(u.source, u.image_id)]
        crop = region_crop_box(r.box(ann), r.width, r.height, CROP["min_side"], CROP["context"])
        assert crop == u.crop
        image = load_image_ref(ImageRef(str(r.path), crop, CROP["min_short_side"]))
        mask = crop_mask(r.mask(ann), crop, CROP["min_short_side"])
        assert min(image.size) >= CROP["min_short_side"] and mask.shape == (image.height, image.width)
        assert tuple(tok.encode(image, mask[None])[0].tolist()) == codes.get(u.source, u.image_id, ann + "@crop")


def test_running_again_encodes_nothing_and_keeps_the_table(run, tokenizers, mixture_yaml):
    before = load_pretokenized(run["out"]).to_dict()
    again = pretokenize(config(tokenizers[0], mixture_yaml, run["out"]))
    assert again.encoded == 0 and again.rows == run["result"].rows
    assert load_pretokenized(run["out"]).to_dict() == before


def test_a_table_of_another_tokenizer_is_refused(run, tokenizers, mixture_yaml):
    other = tokenizers[1]
    assert file_fingerprint(other) != file_fingerprint(tokenizers[0])
    with pytest.raises(PretokenizedMismatchError, match="fingerprint"):
        load_pretokenized(run["out"], tokenizer=other)
    with pytest.raises(PretokenizedMismatchError, match="Re-run `samtok pretokenize"):
        load_code_table(run["out"], tokenizer=str(other))
    with pytest.raises(PretokenizedMismatchError):
        load_code_table(run["out"]).check_tokenizer(file_fingerprint(other))
    with pytest.raises(PretokenizedMismatchError, match="another --out"):
        pretokenize(config(other, mixture_yaml, run["out"]))
    load_code_table(run["out"], tokenizer=tokenizers[0])  # the right one passes


def test_code_table_lookup(run):
    ds = load_pretokenized(run["out"])
    table = load_code_table(run["out"])
    assert len(table) == ds.num_rows
    row = ds[5]
    key = (row["source"], row["image_id"], row["ann_id"])
    assert key in table and table.get(*key) == (row["c0"], row["c1"])
    assert table.span(*key) == f"<|mt_start|><|mt_{row['c0']:04d}|><|mt_{256 + row['c1']:04d}|><|mt_end|>"
    assert ("synth", "nope", "1") not in table
    with pytest.raises(MissingCodeError, match="mask synth/nope/1 is not in .*run `samtok pretokenize`"):
        table.get("synth", "nope", "1")


def test_duplicate_keys_cannot_enter_a_table(run, tmp_path):
    with pytest.raises(PretokenizedTableError, match="duplicate"):
        CodeTable.from_columns(["s", "s"], ["1", "1"], ["a", "a"], [1, 2], [3, 4])
    copy = tmp_path / "copy"
    shutil.copytree(run["out"], copy)
    first = committed_shards(copy)[0]
    shutil.copy(first, first.with_name("part-9999999999999-1-r000-000000.arrow"))
    assert scan_shards(copy).duplicates == read_shard(first).num_rows
    with pytest.raises(PretokenizedTableError, match="duplicate"):
        finalize(copy, run["units"], "fingerprint", CROP, "tokenizer", "data")
    # resume planning only hands out missing keys, and ranks never share a unit
    done = {join_key(u.source, u.image_id, k) for u in run["units"][::2] for k, _ in u.masks}
    left = remaining_units(run["units"], done)
    assert {k for u in left for k in u.keys}.isdisjoint(done)
    assert {k for u in left for k in u.keys} | done == {k for u in run["units"] for k in u.keys}
    for world in (1, 2, 3):
        parts = [shard_for_rank(left, r, world) for r in range(world)]
        keys = [k for p in parts for u in p for k in u.keys]
        assert len(keys) == len(set(keys)) == sum(len(u.keys) for u in left)


def test_half_written_files_are_never_read_as_shards(run, tokenizers, mixture_yaml, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(run["out"], copy)
    shard = committed_shards(copy)[0]
    (copy / "tmp").mkdir(exist_ok=True)
    (copy / "tmp" / "part-x.arrow.part").write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    again = pretokenize(config(tokenizers[0], mixture_yaml, copy))
    assert again.encoded == 0 and not list((copy / "tmp").glob("*"))
    assert load_pretokenized(copy).to_dict() == load_pretokenized(run["out"]).to_dict()
    # a truncated file under shards/ (never produced by a run: shards are renamed complete) is refused clearly
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(PretokenizedTableError, match="delete it"):
        scan_shards(copy)


def test_a_coco_json_is_read_as_kind_coco(tokenizers, synth, tmp_path):
    data = synth / "instances_val.json"
    result = pretokenize(config(tokenizers[0], data, tmp_path / "out", source="synth"))
    ds = load_pretokenized(tmp_path / "out")
    n_masks = sum(len(img_anns) for img_anns in _anns_per_image(data))
    assert result.rows == ds.num_rows == n_masks and set(ds["source"]) == {"synth"}
    assert not any(a.endswith("@crop") for a in ds["ann_id"])


def _anns_per_image(path):
    doc = json.loads(Path(path).read_text())
    by = {}
    for a in doc["annotations"]:
        by.setdefault(a["image_id"], []).append(a)
    return list(by.values())


def test_cli_parses_flags_and_overrides(tmp_path, capsys):
    from samtok.cli import main

    assert main(["pretokenize", "--tokenizer", "T", "--data", "D.yaml", "--out", "O", "--batch-size", "5",
                 "shard_rows=7", "--print-config"]) == 0
    err = capsys.readouterr().err
    assert "tokenizer: T" in err and "batch_size: 5" in err and "shard_rows: 7" in err
    assert main(["pretokenize", "--tokenizer", str(tmp_path), "--data", "D.yaml", "--out", "O"]) == 2


# ------------------------------------------------------------------------------------------------ kill -9


def _start(tok, data, out, log, *extra):
    cmd = [sys.executable, "-m", "samtok", "pretokenize", "--tokenizer", str(tok), "--data", str(data),
           "--out", str(out), "--source", "synth", "--no-progress", "accelerator=cpu", "threads=1",
           "batch_size=1", "shard_rows=4", *extra]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _kill_after_new_shard(proc, out, known, log_path, timeout=180):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        new = [p for p in committed_shards(out) if p.name not in known]
        if new:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        if proc.poll() is not None:
            pytest.fail(f"pretokenize exited ({proc.returncode}) before committing a shard:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    pytest.fail(f"no shard committed within {timeout} s:\n{log_path.read_text()[-3000:]}")


@pytest.mark.slow
def test_kill_9_at_any_moment_then_rerun_gives_the_uninterrupted_table(tokenizers, synth, tmp_path):
    """A single-process run and a 2-rank DDP run are each SIGKILLed right after committing a shard;
    a third run finishes. The table equals an uninterrupted run's: nothing missing, nothing twice."""
    tok, data = tokenizers[0], synth / "instances_train.json"
    reference = tmp_path / "reference"
    pretokenize(config(tok, data, reference, source="synth"))
    expected = load_pretokenized(reference).to_dict()
    total = len(expected["ann_id"])

    out = tmp_path / "killed"
    log_path = tmp_path / "log.txt"
    with open(log_path, "w") as log:
        proc = _start(tok, data, out, log)
        _kill_after_new_shard(proc, out, set(), log_path)
    assert proc.returncode == -signal.SIGKILL
    assert not (out / DONE).exists() and not (out / MANIFEST).exists()
    first = scan_shards(out)  # every committed shard reads back whole
    assert 0 < len(first.keys) < total and first.duplicates == 0
    with pytest.raises(PretokenizedTableError, match="no manifest"):
        load_pretokenized(out)

    with open(log_path, "a") as log:  # resume on two ranks, killed again (its child rank dies with it)
        proc = _start(tok, data, out, log, "devices=2", "strategy=ddp")
        _kill_after_new_shard(proc, out, {p.name for p, _ in first.shards}, log_path)
    second = scan_shards(out)
    assert len(first.keys) < len(second.keys) < total and second.duplicates == 0

    with open(log_path, "a") as log:
        proc = _start(tok, data, out, log)
        assert proc.wait(timeout=300) == 0, log_path.read_text()[-3000:]
    assert load_pretokenized(out, tokenizer=tok).to_dict() == expected
    assert scan_shards(out).duplicates == 0
