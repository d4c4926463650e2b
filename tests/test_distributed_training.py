"""Training across processes on CPU (gloo DDP), checked for real — one torchrun launch for everything.

The launch is two torchrun agents on this machine (``--nnodes 2 --nproc_per_node 1``, the multi-node
recipe of docs/distributed.md with 127.0.0.1 as the master), so Lightning sees ``num_nodes=2``,
``devices=1`` from torchrun's environment. Inside it, each rank runs, in order:

1. the tokenizer recipe's ``run_stage`` (stage ``samtok``: quantizer bypass, k-means init, EMA,
   buffer restarts) for 3 steps on the micro SAM 2 → per-rank weights, codebooks, image keys seen;
2. SFT with the real ``SFTDataModule`` / ``SFTLightningModule`` / ``build_trainer``, 2 samples per
   rank, 4 steps (2 epochs of 7 samples) → per-rank losses, token counts and sample ids; the same
   with the loss normalised by the global token count (``distributed_token_mean``); checkpoints
   recorded at the CheckpointIO level;
3. SFT resumed from a checkpoint written by ONE process (below) → steps 3-4 at world size 2.

Around it, in the pytest process (world size 1): the reference SFT run with 4 samples per step
(its step-2 checkpoint feeds 3.), and a resume of the 2-process step-2 checkpoint with one process.

Run ``python tests/test_distributed_training.py --help`` for the worker entry point.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.slow

HERE = Path(__file__).resolve()
STEPS = 4  # SFT optimiser steps: 2 epochs of 7 samples at a global batch of 4
GLOBAL_BATCH = 4
NUM_SAMPLES = 7  # odd on purpose: the last global batch of an epoch is padded
TOK_STEPS = 3
CROP = dict(crop_min_side=48, crop_min_short_side=112)


# ------------------------------------------------------------------------------------------------ assets
def make_assets(root: Path) -> dict:
    """Synthetic images, a one-entry mixture of 7 samples, fake codes, a saved tiny Qwen-VL."""
    from samtok.data.mixture import load_mixture_config
    from samtok.data.synth import SynthConfig, generate
    from samtok.mllm.models import TinyModelConfig, build_tiny, save_model_and_processor

    root.mkdir(parents=True, exist_ok=True)
    synth = root / "synth"
    generate(SynthConfig(out_dir=str(synth), num_images=12, seed=0, progress=False))
    mixture = root / "mixture.yaml"
    mixture.write_text(
        "seed: 0\n"
        "entries:\n"
        f"  - {{name: res, kind: synthetic, args: {{root: {synth}, split: train}}, tasks: [res],"
        f" split: train, max_samples: {NUM_SAMPLES}}}\n"
        f"conversation: {{crop_min_side: {CROP['crop_min_side']}, crop_min_short_side: {CROP['crop_min_short_side']}}}\n"
    )
    from llm_setup import write_fake_pretokenized

    pretok = write_fake_pretokenized(load_mixture_config(mixture), root / "pretok")
    model, proc = build_tiny(TinyModelConfig(), corpus=["Please segment the red blob in this image.",
                                                        "A small green circle on the left."])
    save_model_and_processor(model, proc, root / "model")
    return {"root": str(root), "synth": str(synth), "mixture": str(mixture), "pretok": str(pretok),
            "model": str(root / "model")}


# ------------------------------------------------------------------------------------------------ SFT
def _sft_module_class():
    from samtok.mllm.loss import causal_lm_loss
    from samtok.mllm.sequences import IGNORE_INDEX
    from samtok.mllm.sft import SFTLightningModule

    class RecordingSFT(SFTLightningModule):
        """Our module as shipped (``token_weighted=True``: the loss normalised by the tokens of ALL
        ranks) or transformers' per-rank mean (``token_weighted=False``, the "stock" recipe), recording
        what each rank computed at every step."""

        def __init__(self, *args, token_weighted: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.token_weighted = token_weighted
            self.records: list[dict] = []
            self._sum = 0.0

        def loss(self, logits, labels):
            loss_sum = causal_lm_loss(logits, labels, num_items_in_batch=1)
            self._sum = float(loss_sum.detach())
            if self.token_weighted:
                return super().loss(logits, labels)
            return loss_sum / max(1, int((labels[:, 1:] != IGNORE_INDEX).sum()))

        def training_step(self, batch, batch_idx):
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            loss = super().training_step(batch, batch_idx)
            self.records.append({"step": int(self.global_step), "epoch": int(self.current_epoch),
                                 "ids": [str(i) for i in batch["sample_id"]], "n": n, "sum": self._sum})
            return loss

    return RecordingSFT


def _recording_io():
    from lightning.fabric.plugins import TorchCheckpointIO

    class RecordingIO(TorchCheckpointIO):
        """Writes like Lightning's default and remembers every path this process wrote."""

        def __init__(self):
            super().__init__()
            self.saved: list[str] = []

        def save_checkpoint(self, checkpoint, path, storage_options=None):
            self.saved.append(str(path))
            super().save_checkpoint(checkpoint, path, storage_options)

    return RecordingIO()


def sft_run(assets: dict, out: Path, *, num_nodes: int, strategy: str, per_device_batch: int,
            token_weighted: bool, resume: str | None = None) -> dict:
    """Fit the SFT module for ``STEPS`` steps (or up to it from ``resume``); returns this rank's record."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    from samtok.core.runtime import seed_everything
    from samtok.core.trainer import TrainerConfig, build_trainer
    from samtok.data.datamodule import TRAINER_KWARGS, SFTDataModule
    from samtok.mllm.models import load_model_and_processor
    from samtok.mllm.sft import LoraSettings, OptimSettings, prepare_model_for_training

    seed_everything(0)
    model, processor = load_model_and_processor(assets["model"], dtype="float32")
    model = prepare_model_for_training(model, LoraSettings(enabled=False), freeze_vision=True)
    optim = OptimSettings(lr=1e-3, warmup_fraction=0.0)
    module = _sft_module_class()(model, processor.tokenizer, optim, total_steps=STEPS, token_weighted=token_weighted)
    dm = SFTDataModule(assets["mixture"], assets["pretok"], processor, max_length=4096, batch_size=per_device_batch,
                       seed=0, length_grouped=True, val_split=None, tokenizer="fake-fingerprint")
    tcfg = TrainerConfig(accelerator="cpu", devices="1", num_nodes=num_nodes, strategy=strategy, max_steps=STEPS,
                         checkpoint_every_n_steps=2, val_every_n_steps=0, log_every_n_steps=1, seed=0)
    class StepCheckpoints(ModelCheckpoint):  # keeps step2.ckpt next to build_trainer's last.ckpt
        @property
        def state_key(self) -> str:
            return "Step" + super().state_key

    io = _recording_io()
    keep = StepCheckpoints(dirpath=out / "steps", filename="step{step}", auto_insert_metric_name=False,
                           every_n_train_steps=2, save_top_k=-1)
    trainer = build_trainer(tcfg, out, per_device_batch=per_device_batch, callbacks=[keep], plugins=[io],
                            limit_val_batches=0, **TRAINER_KWARGS)
    trainer.fit(module, datamodule=dm, ckpt_path=resume, weights_only=True)
    from samtok.core.callbacks import GlobalBatchLogger

    gbl = next(c for c in trainer.callbacks if isinstance(c, GlobalBatchLogger))
    return {"rank": trainer.global_rank, "world": trainer.world_size, "records": module.records,
            "saved": io.saved, "global_step": trainer.global_step, "batch": gbl.values,
            "num_train": len(dm.train_set)}


def global_curve(per_rank: list[dict]) -> dict[int, float]:
    """Per-token mean loss of the whole global batch at each step (sum over ranks / tokens over ranks)."""
    steps: dict[int, list[float]] = {}
    for rank in per_rank:
        for r in rank["records"]:
            s = steps.setdefault(r["step"], [0.0, 0.0])
            s[0] += r["sum"]
            s[1] += r["n"]
    return {k: v[0] / v[1] for k, v in sorted(steps.items())}


def global_batches(per_rank: list[dict]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    for rank in per_rank:
        for r in rank["records"]:
            out.setdefault(r["step"], []).extend(r["ids"])
    return {k: sorted(v) for k, v in sorted(out.items())}


# ------------------------------------------------------------------------------------------------ tokenizer
def tokenizer_run(assets: dict, out: Path, num_nodes: int) -> dict:
    """The recipe's ``run_stage`` for ``TOK_STEPS`` steps; returns this rank's final state and data."""
    import samtok.tokenizer.lightning as tl
    from samtok.core.runtime import seed_everything
    from samtok.core.trainer import TrainerConfig
    from samtok.data.sources import SourceSpec, load_image_records
    from samtok.tokenizer.lightning import StageConfig
    from samtok.tokenizer.losses import MaskLossConfig
    from samtok.tokenizer.model import QuantizerConfig, SAMTokModel, TokenizerModelConfig
    from samtok.tokenizer.sam2_parts import SAM2Config
    from samtok.tokenizer.train import TokenizerDataConfig, TrainTokenizerConfig, run_stage

    seen: list[list[int]] = []
    restarted: list[float] = []
    original = tl.TokenizerLightningModule.training_step

    def recording_step(self, batch, batch_idx):  # instrumentation only: what each rank trained on
        seen.append([int(k) for k in batch["keys"]])
        loss = original(self, batch, batch_idx)
        m = self.trainer.callback_metrics
        restarted.append(sum(float(m.get(f"codebook/depth{d}/restarted", 0.0)) for d in range(2)))
        return loss

    tl.TokenizerLightningModule.training_step = recording_step
    try:
        seed_everything(0)
        micro = SAM2Config(size="t", image_size=128, trunk_embed_dim=16, trunk_num_heads=1,
                           trunk_stages=[1, 1, 2, 1], trunk_global_att_blocks=[3])
        mcfg = TokenizerModelConfig(sam2=micro, quantizer=QuantizerConfig(
            codebook_size=16, decay=0.5, dead_code_threshold=0.6, restart_source="buffer", buffer_size=64))
        model = SAMTokModel(mcfg)
        stage = StageConfig(name="samtok", max_steps=TOK_STEPS, lr=1e-3, batch_images=2, masks_per_image=2,
                            train_parts=["mask_encoder", "mask_decoder"], quantizer_bypass_steps=1,
                            kmeans_init=True, kmeans_samples=64, loss=MaskLossConfig(num_points=256))
        cfg = TrainTokenizerConfig(
            model=mcfg, stage1=stage, out_dir=str(out), resume="never", progress_bar=False,
            data=TokenizerDataConfig(val_max_images=2, val_max_masks_per_image=2),
            trainer=TrainerConfig(accelerator="cpu", devices="1", num_nodes=num_nodes, strategy="ddp",
                                  val_every_n_steps=0, checkpoint_every_n_steps=0, log_every_n_steps=1, seed=0),
        )
        train = load_image_records([SourceSpec("synthetic", {"root": assets["synth"], "split": "train"})])
        val = load_image_records([SourceSpec("synthetic", {"root": assets["synth"], "split": "val"})])
        results = run_stage(model, stage, cfg, train, val, out)
    finally:
        tl.TokenizerLightningModule.training_step = original
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"state": state, "seen": seen, "restarted": restarted, "results": results}


# ------------------------------------------------------------------------------------------------ worker
def worker_main(argv: list[str]) -> None:
    """The torchrun phase: tokenizer DDP, SFT (stock and token-weighted), resume of a 1-process checkpoint."""
    ap = argparse.ArgumentParser(description="torchrun worker of tests/test_distributed_training.py")
    ap.add_argument("--assets", required=True, help="JSON written by make_assets")
    ap.add_argument("--work", required=True, help="output folder")
    ap.add_argument("--resume-from", required=True, help="a checkpoint written by ONE process")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    assets = json.loads(Path(args.assets).read_text())
    work = Path(args.work)
    nodes = int(os.environ.get("WORLD_SIZE", "1")) // int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    rank = int(os.environ["RANK"])
    timings = {}
    t = time.time()
    tok = tokenizer_run(assets, work / "tok", nodes)
    timings["tokenizer"] = time.time() - t
    torch.save({k: tok[k] for k in ("state", "seen", "restarted")} | {"results": tok["results"]},
               work / f"tok_rank{rank}.pt")
    out = {}
    for name, weighted, resume in (("stock", False, None), ("weighted", True, None),
                                   ("resumed_from_1proc", True, args.resume_from)):
        t = time.time()
        out[name] = sft_run(assets, work / f"sft_{name}", num_nodes=nodes, strategy="ddp", per_device_batch=2,
                            token_weighted=weighted, resume=resume)
        timings[name] = time.time() - t
    out["timings"] = timings
    (work / f"sft_rank{rank}.json").write_text(json.dumps(out, indent=1))


# ------------------------------------------------------------------------------------------------ fixture
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_two_nodes(assets_json: Path, work: Path, resume_from: Path, timeout: float = 420) -> list[str]:
    """Two torchrun agents, one per emulated node, one process each (docs/distributed.md, multi-node)."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    procs, logs = [], []
    for node in range(2):
        log = open(work / f"node{node}.log", "w")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(HERE), "--assets", str(assets_json), "--work", str(work), "--resume-from", str(resume_from)]
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
        logs.append(log)
    deadline = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(1, deadline - time.time()))
    except subprocess.TimeoutExpired:
        for p in procs:
            os.killpg(p.pid, 9)
        raise
    finally:
        for log in logs:
            log.close()
    texts = [(work / f"node{n}.log").read_text() for n in range(2)]
    codes = [p.returncode for p in procs]
    assert codes == [0, 0], f"torchrun failed {codes}:\n" + "\n".join(t[-4000:] for t in texts)
    return texts


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("dist")
    assets = make_assets(root / "assets")
    assets_json = root / "assets.json"
    assets_json.write_text(json.dumps(assets))
    t = time.time()
    one = sft_run(assets, root / "sft_1proc", num_nodes=1, strategy="auto", per_device_batch=GLOBAL_BATCH,
                  token_weighted=False)
    work = root / "ddp"
    work.mkdir()
    t1 = time.time()
    logs = launch_two_nodes(assets_json, work, root / "sft_1proc" / "steps" / "step2.ckpt")
    t2 = time.time()
    resumed = sft_run(assets, root / "sft_resume_1proc", num_nodes=1, strategy="auto", per_device_batch=GLOBAL_BATCH,
                      token_weighted=False, resume=str(work / "sft_weighted" / "steps" / "step2.ckpt"))
    two = [json.loads((work / f"sft_rank{r}.json").read_text()) for r in range(2)]
    (root / "sft_1proc.json").write_text(json.dumps(one, indent=1))
    (root / "sft_resume_1proc.json").write_text(json.dumps(resumed, indent=1))
    toks = [torch.load(work / f"tok_rank{r}.pt", weights_only=False) for r in range(2)]
    timings = {"one_process": t1 - t, "torchrun": t2 - t1, "resume_one": time.time() - t2, **two[0]["timings"]}
    print("timings (s):", json.dumps({k: round(v, 1) for k, v in timings.items()}))
    return {"root": root, "work": work, "one": one, "resumed": resumed, "two": two, "tok": toks, "logs": logs}


# ------------------------------------------------------------------------------------------------ tests
def test_tokenizer_ddp_leaves_identical_codebooks_and_weights(runs):
    t0, t1 = runs["tok"]
    # the two ranks trained on different images (the stream is sharded by the trainer's global rank)
    keys = [{k for step in t["seen"] for k in step} for t in (t0, t1)]
    assert len(t0["seen"]) == len(t1["seen"]) == TOK_STEPS
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    # dead codes were restarted (from per-rank buffers) after the k-means init: the broadcast paths ran
    assert sum(t0["restarted"]) > 0 and t0["restarted"] == t1["restarted"]
    s0, s1 = t0["state"], t1["state"]
    assert s0.keys() == s1.keys()
    for k in s0:
        torch.testing.assert_close(s0[k], s1[k], rtol=0, atol=0, msg=f"{k} differs between ranks")
    # the codebooks are really the EMA result of both ranks' data: not the random init, all finite
    cb = s0["quantizer.codebooks.0.cluster_size_ema"]
    assert torch.isfinite(cb).all() and float(cb.sum()) > 0
    # validation after training ran on both ranks and agreed (torchmetrics synced)
    assert t0["results"]["val/rMaskIoU"] == t1["results"]["val/rMaskIoU"]


def test_sft_two_processes_follow_the_one_process_loss_curve(runs):
    one = global_curve([runs["one"]])
    # same data: the union of the two ranks' micro-batches is the one-process batch, step by step
    assert global_batches([runs["one"]]) == global_batches([r["stock"] for r in runs["two"]])
    assert sorted(one) == list(range(STEPS))
    # the loss of the global batch normalised by the GLOBAL token count: equal to float32 precision
    # (observed ~3e-8 relative; 1-process batches are padded differently from 2-process ones)
    weighted = global_curve([r["weighted"] for r in runs["two"]])
    for step in one:
        assert weighted[step] == pytest.approx(one[step], rel=1e-6), (step, weighted, one)
    # the stock module (mean over each rank's own tokens, gradients averaged over ranks) starts equal,
    # then drifts: each rank's mean weights its tokens by 1/(2 n_rank) instead of 1/N (observed 3e-5)
    stock = global_curve([r["stock"] for r in runs["two"]])
    assert stock[0] == pytest.approx(one[0], rel=1e-6)
    for step in one:
        assert stock[step] == pytest.approx(one[step], rel=1e-3), (step, stock, one)
    drift = lambda curve: max(abs(curve[k] - one[k]) / one[k] for k in one)  # noqa: E731
    assert drift(stock) > 10 * max(drift(weighted), 1e-7)
    tokens = [[r["n"] for r in rank["stock"]["records"]] for rank in runs["two"]]
    assert tokens[0] != tokens[1]  # the ranks really had different token counts


def test_epoch_coverage_with_an_odd_number_of_samples(runs):
    per_rank = [r["stock"]["records"] for r in runs["two"]]
    assert runs["two"][0]["stock"]["num_train"] == NUM_SAMPLES
    for epoch in (0, 1):
        ids = [i for recs in per_rank for r in recs if r["epoch"] == epoch for i in r["ids"]]
        # 7 samples, global batch 4: padded to 8 by repeating the epoch's first sample once
        assert len(ids) == 8 and len(set(ids)) == NUM_SAMPLES
        # every step, the two ranks hold different samples and the same number of them
        for step in {r["step"] for recs in per_rank for r in recs if r["epoch"] == epoch}:
            a, b = ([r["ids"] for r in recs if r["step"] == step][0] for recs in per_rank)
            assert len(a) == len(b) == 2
    # the order changes with the epoch (batch samplers get set_epoch from build_trainer's callback)
    order = [[tuple(r["ids"]) for r in per_rank[0] if r["epoch"] == e] for e in (0, 1)]
    assert order[0] != order[1]


def test_checkpoints_are_written_by_rank_zero_only(runs):
    for name in ("stock", "weighted", "resumed_from_1proc"):
        r0, r1 = (r[name] for r in runs["two"])
        assert r1["saved"] == []
        names = sorted(Path(p).name for p in r0["saved"])
        expected = ["last.ckpt", "step4.ckpt"] if name == "resumed_from_1proc" else ["last.ckpt", "last.ckpt",
                                                                                    "step2.ckpt", "step4.ckpt"]
        assert names == expected, (name, names)
        for p in set(r0["saved"]):
            assert Path(p).is_file()


def test_resume_at_another_world_size_continues_the_same_run(runs):
    one = global_curve([runs["one"]])
    # saved by 2 processes at step 2, resumed by 1 process: steps 3-4 as if never interrupted
    resumed_1 = global_curve([runs["resumed"]])
    assert sorted(resumed_1) == [2, 3] and runs["resumed"]["global_step"] == STEPS
    assert global_batches([runs["resumed"]]) == {k: v for k, v in global_batches([runs["one"]]).items() if k >= 2}
    for step in (2, 3):
        assert resumed_1[step] == pytest.approx(one[step], rel=1e-6), (step, resumed_1, one)
    # saved by 1 process at step 2, resumed by 2 processes
    resumed_2 = global_curve([r["resumed_from_1proc"] for r in runs["two"]])
    assert sorted(resumed_2) == [2, 3] and runs["two"][0]["resumed_from_1proc"]["global_step"] == STEPS
    assert global_batches([r["resumed_from_1proc"] for r in runs["two"]]) == {
        k: v for k, v in global_batches([runs["one"]]).items() if k >= 2}
    for step in (2, 3):
        assert resumed_2[step] == pytest.approx(one[step], rel=1e-6), (step, resumed_2, one)


def test_each_stage_logs_its_global_batch(runs):
    two = runs["two"][0]["stock"]["batch"]
    assert two["batch/world_size"] == 2 and two["batch/num_nodes"] == 2 and two["batch/per_device"] == 2
    assert two["batch/global"] == GLOBAL_BATCH == runs["one"]["batch"]["batch/global"]
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # the tokenizer recipe (run_stage): hparams.yaml and the TensorBoard scalar
    tb = runs["work"] / "tok" / "tb"
    hp = yaml.safe_load((tb / "hparams.yaml").read_text())
    assert hp["batch/global"] == 4 and hp["batch/world_size"] == 2  # 2 image visits per rank x 2 ranks
    acc = EventAccumulator(str(tb))
    acc.Reload()
    assert [e.value for e in acc.Scalars("trainer/global_batch_size")] == [4.0]
    assert "global batch 4 samples = 2 per device x 1 devices x 2 nodes x 1 accumulation" in runs["logs"][0]


if __name__ == "__main__":
    worker_main(sys.argv[1:])
