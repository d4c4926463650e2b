"""Scale-out configuration, checked against the libraries that consume it (no second process needed).

* every training stage's config has the ``trainer.*`` keys (strategy, devices, nodes, precision,
  accumulation, ZeRO stage / offload) and every shipped YAML's trainer section builds;
* the DeepSpeed config generated for ZeRO-2/3, with and without offload, bf16/fp16/fp32, clipping
  and accumulation is accepted by DeepSpeed's own ``DeepSpeedConfig`` with the values we meant
  (train batch = micro × accumulation × world size), and — in a subprocess — by a real
  ``deepspeed.initialize`` + optimiser steps on CPU (ZeRO-2/3, fp32/bf16, CPU offload);
* Lightning's ``DeepSpeedStrategy`` built by ``build_trainer`` hands DeepSpeed exactly that config;
* batch arithmetic, the global-batch logger, batch-sampler epochs under a real Lightning fit;
* rank-aware samplers at world size 2 with an odd number of samples: what is padded, dropped or
  seen once (the rule is documented in docs/distributed.md).

Multi-process training itself is in ``test_distributed_training.py``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from samtok.core.trainer import (
    TrainerConfig,
    build_strategy,
    deepspeed_config,
    distributed_token_mean,
    global_batch_size,
    lightning_deepspeed_config,
    offloads_optimizer,
    resume_checkpoint,
    world_size_of,
)

REPO = Path(__file__).resolve().parents[1]
ZERO_CASES = [  # (stage, offload_optimizer, offload_parameters)
    (2, False, False), (2, True, False), (3, False, False), (3, True, False), (3, True, True),
]
PRECISIONS = ["bf16-mixed", "16-mixed", "32-true"]
SCALE_OUT_OVERRIDES = [
    "trainer.strategy=deepspeed", "trainer.accelerator=gpu", "trainer.devices=8", "trainer.num_nodes=4",
    "trainer.precision=bf16-mixed", "trainer.accumulate_grad_batches=2", "trainer.zero_stage=3",
    "trainer.offload_optimizer=true", "trainer.offload_parameters=true", "trainer.gradient_clip_val=1.0",
]


def ds_config_object(config: dict, world: int, monkeypatch):
    """DeepSpeed's own parsed config for ``config`` at data-parallel world size ``world`` (no process group)."""
    import deepspeed.runtime.config as dsc

    monkeypatch.setattr(dsc.dist, "get_rank", lambda *a, **k: 0)
    mpu = SimpleNamespace(get_data_parallel_world_size=lambda: world)
    return dsc.DeepSpeedConfig(dict(config), mpu=mpu)


# ------------------------------------------------------------------------------------------------ config keys
def _stage_schemas() -> dict[str, type]:
    from samtok.mllm.train_sft import SFTConfig
    from samtok.tokenizer.train import TrainTokenizerConfig

    return {"tokenizer": TrainTokenizerConfig, "sft": SFTConfig}


def _rl_schemas() -> list[type]:
    """Dataclasses of ``samtok.rl`` with a ``trainer: TrainerConfig`` field (the RL recipe's config)."""
    import typing

    import samtok.rl as rl

    found = []
    for info in pkgutil.iter_modules(rl.__path__):
        mod = importlib.import_module(f"samtok.rl.{info.name}")
        for obj in vars(mod).values():
            if dataclasses.is_dataclass(obj) and isinstance(obj, type) and obj.__module__ == mod.__name__:
                if any(f.name == "trainer" for f in dataclasses.fields(obj)):
                    if typing.get_type_hints(obj).get("trainer") is TrainerConfig:
                        found.append(obj)
    return found


# GRPO optimises manually: no Lightning accumulation (micro-batches instead) and no ZeRO-3 (generation)
RL_OVERRIDES = [o for o in SCALE_OUT_OVERRIDES if not o.startswith(("trainer.accumulate", "trainer.zero_stage",
                                                                      "trainer.offload_parameters"))]


@pytest.mark.parametrize("stage", ["tokenizer", "sft", "rl"])
def test_every_stage_takes_the_scale_out_keys(stage):
    from samtok.core.config import load_config

    if stage == "rl":
        schemas = _rl_schemas()
        if not schemas:
            pytest.skip("samtok.rl has no training config with a `trainer: TrainerConfig` field yet")
    else:
        schemas = [_stage_schemas()[stage]]
    for schema in schemas:
        if stage == "rl":
            from samtok.rl.config import check_grpo_config

            t = load_config(schema, None, RL_OVERRIDES).trainer
            check_grpo_config(load_config(schema, None, RL_OVERRIDES))
            assert (t.accumulate_grad_batches, t.zero_stage, t.offload_optimizer) == (1, 2, True)
            accum = 1
        else:
            t = load_config(schema, None, SCALE_OUT_OVERRIDES).trainer
            assert (t.accumulate_grad_batches, t.zero_stage, t.offload_parameters) == (2, 3, True)
            accum = 2
        assert isinstance(t, TrainerConfig)
        assert (t.strategy, t.devices, t.num_nodes, t.precision, t.offload_optimizer) == (
            "deepspeed", "8", 4, "bf16-mixed", True)
        assert world_size_of(t) == 32 and global_batch_size(t, 4) == 4 * 32 * accum


def test_shipped_yamls_build_their_strategy(monkeypatch):
    from samtok.core.config import load_config

    schemas = _stage_schemas()
    folders = [("tokenizer", schemas["tokenizer"]), ("sft", schemas["sft"])]
    folders += [("rl", schema) for schema in _rl_schemas()]
    built = 0
    for folder, schema in folders:
        for path in sorted((REPO / "configs" / folder).glob("*.yaml")):
            t = load_config(schema, path).trainer
            if t.strategy == "deepspeed":
                obj = ds_config_object(deepspeed_config(t, 4), 8, monkeypatch)
                assert obj.zero_optimization_stage == t.zero_stage
                assert obj.bfloat16_config.enabled == t.precision.startswith("bf16")
                built += 1
            else:
                assert isinstance(build_strategy(t, 4), str) or t.strategy in ("ddp", "ddp_spawn")
    assert built >= 1  # the release SFT presets run on DeepSpeed


# ------------------------------------------------------------------------------------------------ DeepSpeed
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("stage,offload_opt,offload_param", ZERO_CASES)
def test_deepspeed_accepts_the_generated_config(stage, offload_opt, offload_param, precision, monkeypatch):
    for clip in (1.0, 0.0):
        for accum in (1, 4):
            cfg = TrainerConfig(strategy="deepspeed", accelerator="gpu", devices="4", num_nodes=2, precision=precision,
                                zero_stage=stage, offload_optimizer=offload_opt, offload_parameters=offload_param,
                                gradient_clip_val=clip, accumulate_grad_batches=accum)
            ds = deepspeed_config(cfg, 3)
            json.dumps(ds)  # a plain JSON document
            d = ds_config_object(ds, world_size_of(cfg), monkeypatch)
            assert d.zero_enabled and d.zero_optimization_stage == stage
            assert d.train_micro_batch_size_per_gpu == 3 and d.gradient_accumulation_steps == accum
            assert d.train_batch_size == global_batch_size(cfg, 3) == 3 * 8 * accum
            assert d.gradient_clipping == clip
            assert d.bfloat16_config.enabled == (precision == "bf16-mixed")
            assert d.float16_config.enabled == (precision == "16-mixed")
            if precision == "16-mixed":
                assert d.float16_config.loss_scale == 0  # dynamic loss scaling
            zc = d.zero_config
            assert (zc.offload_optimizer is not None and zc.offload_optimizer.device == "cpu") == offload_opt
            assert (zc.offload_param is not None and zc.offload_param.device == "cpu") == offload_param
            # the stages' torch AdamW is allowed with offload (DeepSpeed refuses it otherwise)
            assert d.zero_force_ds_cpu_optimizer == (not offload_opt)
            assert d.zero_allow_untested_optimizer
            if stage == 3:
                assert zc.gather_16bit_weights_on_model_save  # full weights in saved checkpoints


def test_impossible_zero_settings_are_refused():
    with pytest.raises(ValueError, match="zero_stage=3"):
        deepspeed_config(TrainerConfig(zero_stage=2, offload_parameters=True), 1)
    with pytest.raises(ValueError, match="0..3"):
        deepspeed_config(TrainerConfig(zero_stage=4), 1)
    with pytest.raises(ValueError, match="zero_stage >= 1"):
        deepspeed_config(TrainerConfig(zero_stage=0, offload_optimizer=True), 1)


@pytest.mark.parametrize("stage,offload_opt,offload_param,precision,clip,accum", [
    (2, False, False, "bf16-mixed", 1.0, 4),
    (3, True, True, "16-mixed", 0.0, 1),
    (3, False, False, "32-true", 0.5, 2),
])
def test_lightning_deepspeed_strategy_hands_deepspeed_our_config(stage, offload_opt, offload_param, precision, clip,
                                                                 accum, tmp_path, monkeypatch):
    import lightning as L
    from lightning.pytorch.strategies import DeepSpeedStrategy
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from samtok.core.trainer import build_trainer

    cfg = TrainerConfig(accelerator="cpu", devices="1", strategy="deepspeed", zero_stage=stage, precision=precision,
                        offload_optimizer=offload_opt, offload_parameters=offload_param, gradient_clip_val=clip,
                        accumulate_grad_batches=accum)
    trainer = build_trainer(cfg, tmp_path, per_device_batch=2)
    strategy = trainer.strategy
    assert isinstance(strategy, DeepSpeedStrategy)
    assert strategy.config == lightning_deepspeed_config(cfg, 2)
    assert strategy.precision_plugin.precision == precision
    assert trainer.accumulate_grad_batches == accum and trainer.gradient_clip_val is None  # DeepSpeed clips
    # what Lightning does at setup (on GPU) before deepspeed.initialize: the result is our full config
    module = L.LightningModule()
    module._trainer = trainer
    strategy._lightning_module = module
    strategy._format_config()
    assert strategy.config == deepspeed_config(cfg, 2)
    ds_config_object(strategy.config, 1, monkeypatch)
    # a config that already holds the accumulation is refused by Lightning: why the strategy gets the other one
    stale = DeepSpeedStrategy(config=deepspeed_config(cfg, 2))
    stale._lightning_module = module
    with pytest.raises(MisconfigurationException, match="gradient_accumulation_steps"):
        stale._format_config()


def _formatted(trainer, automatic: bool) -> dict:
    import lightning as L

    module = L.LightningModule()
    module.automatic_optimization = automatic
    module._trainer = trainer
    trainer.strategy._lightning_module = module
    trainer.strategy._format_config()
    return trainer.strategy.config


def test_manual_optimisation_keeps_the_engine_accumulation(tmp_path, monkeypatch):
    """GRPO: Trainer(accumulate_grad_batches=1) (manual optimisation), the engine accumulates micro-batches."""
    from dataclasses import replace

    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from samtok.core.trainer import build_trainer

    cfg = TrainerConfig(accelerator="cpu", devices="1", strategy="deepspeed", zero_stage=2, precision="bf16-mixed")
    strategy = build_strategy(replace(cfg, accumulate_grad_batches=4), 8)
    trainer = build_trainer(cfg, tmp_path / "a", per_device_batch=8, strategy=strategy, accumulate_grad_batches=1)
    config = _formatted(trainer, automatic=False)
    assert config["gradient_accumulation_steps"] == 4
    assert ds_config_object(config, 2, monkeypatch).train_batch_size == 8 * 4 * 2
    # automatic optimisation with an engine accumulation the Trainer does not know: refused
    strategy = build_strategy(replace(cfg, accumulate_grad_batches=4), 8)
    trainer = build_trainer(cfg, tmp_path / "b", per_device_batch=8, strategy=strategy, accumulate_grad_batches=1)
    with pytest.raises(MisconfigurationException, match="accumulate"):
        _formatted(trainer, automatic=True)


def test_the_rl_recipe_strategy_accumulates_its_micro_batches(tmp_path, monkeypatch):
    """The GRPO recipe's contract with core: DeepSpeed accumulation = micro-batches per optimiser step."""
    train_rl = pytest.importorskip("samtok.rl.train_rl")
    from samtok.core.config import load_config
    from samtok.core.trainer import build_trainer
    from samtok.rl.config import GRPOConfig

    cfg = load_config(GRPOConfig, None, ["trainer.strategy=deepspeed", "trainer.accelerator=cpu", "trainer.devices=1",
                                         "grpo.prompts_per_step=4", "loss.num_generations=8",
                                         "grpo.micro_batch_size=8"])
    trainer = build_trainer(cfg.trainer, tmp_path, per_device_batch=8, strategy=train_rl.build_strategy(cfg),
                            accumulate_grad_batches=1, gradient_clip_val=None)
    config = _formatted(trainer, automatic=False)
    assert config["gradient_accumulation_steps"] == train_rl.micro_batches_per_step(cfg) == 4
    assert config["train_micro_batch_size_per_gpu"] == 8 and config["gradient_clipping"] == 1.0


DEEPSPEED_ENGINE_SCRIPT = r"""
import json, os, sys, torch
torch.set_num_threads(1)
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[1], RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
import deepspeed
# the CPU accelerator JIT-compiles a shared-memory collective (~90 s) that one process never needs
deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
deepspeed.init_distributed(dist_backend="gloo")
from samtok.core.trainer import TrainerConfig, deepspeed_config
out = []
for stage, off, offp, prec in json.loads(sys.argv[2]):
    cfg = TrainerConfig(strategy="deepspeed", zero_stage=stage, precision=prec, accumulate_grad_batches=2,
                        gradient_clip_val=1.0, offload_optimizer=off, offload_parameters=offp)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
    before = [p.detach().clone() for p in model.parameters()]
    engine, opt, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                             config=deepspeed_config(cfg, 2), dist_init_required=False)
    dtype = next(engine.parameters()).dtype
    for _ in range(4):  # 4 micro-batches of 2 = 2 optimiser steps
        loss = engine(torch.randn(2, 8).to(dtype)).float().pow(2).mean()
        engine.backward(loss)
        engine.step()
    out.append({"case": [stage, off, offp, prec], "steps": engine.global_steps, "train_batch": engine.train_batch_size(),
                "accum": engine.gradient_accumulation_steps(), "clip": engine.gradient_clipping(),
                "optimizer": type(engine.optimizer).__name__, "dtype": str(dtype)})
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_a_real_deepspeed_engine_trains_with_the_generated_config():
    """ZeRO-2/3, fp32/bf16, optimizer and parameter offload: deepspeed.initialize + 2 optimiser steps on CPU.
    (fp16 needs a GPU: DeepSpeed's CPU accelerator refuses it; DeepSpeedConfig checks it above.)"""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cases = [[2, False, False, "32-true"], [2, False, False, "bf16-mixed"], [2, True, False, "32-true"],
             [3, False, False, "bf16-mixed"], [3, True, True, "32-true"]]
    proc = subprocess.run([sys.executable, "-c", DEEPSPEED_ENGINE_SCRIPT, str(port), json.dumps(cases)],
                          capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                             "OMP_NUM_THREADS": "1"})
    lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(lines[0][len("RESULT "):])
    for r in results:
        stage, off, offp, prec = r["case"]
        assert r["steps"] == 2 and r["accum"] == 2 and r["train_batch"] == 4 and r["clip"] == 1.0
        assert r["optimizer"] == ("DeepSpeedZeroOptimizer_Stage3" if stage == 3 else "DeepSpeedZeroOptimizer")
        assert r["dtype"] == ("torch.bfloat16" if prec == "bf16-mixed" else "torch.float32")


# ------------------------------------------------------------------------------------------------ DDP & batch
def test_ddp_strategies_and_passthrough():
    from lightning.pytorch.strategies import DDPStrategy

    ddp = build_strategy(TrainerConfig(strategy="ddp"), 4)
    spawn = build_strategy(TrainerConfig(strategy="ddp_spawn"), 4)
    assert isinstance(ddp, DDPStrategy) and ddp._start_method == "popen"
    assert isinstance(spawn, DDPStrategy) and spawn._start_method == "spawn"
    assert build_strategy(TrainerConfig(strategy="auto"), 4) == "auto"
    assert build_strategy(TrainerConfig(strategy="fsdp"), 4) == "fsdp"


@pytest.mark.parametrize("devices,nodes,accum,world", [
    ("4", 1, 1, 4), ("8", 2, 4, 16), ("0,1,2", 1, 2, 3), ("[0, 3]", 3, 1, 6), ("1", 1, 8, 1),
])
def test_global_batch_arithmetic(devices, nodes, accum, world):
    cfg = TrainerConfig(accelerator="gpu", devices=devices, num_nodes=nodes, accumulate_grad_batches=accum)
    assert world_size_of(cfg) == world
    assert global_batch_size(cfg, 4) == 4 * world * accum


def test_global_batch_logger_uses_the_live_trainer():
    from samtok.core.callbacks import GlobalBatchLogger

    trainer = SimpleNamespace(world_size=16, num_nodes=2, accumulate_grad_batches=4, strategy=object(),
                              precision="bf16-mixed")
    cfg = TrainerConfig(strategy="deepspeed", zero_stage=3, offload_optimizer=True)
    v = GlobalBatchLogger(16, unit="masks", config=cfg).batch_values(trainer)
    assert v["batch/global"] == 16 * 16 * 4 == 1024  # the release tokenizer: 16 masks/GPU, 64 GPUs
    assert v["batch/devices_per_node"] == 8 and v["batch/num_nodes"] == 2 and v["batch/unit"] == "masks"
    assert v["trainer/zero_stage"] == 3 and v["trainer/offload_optimizer"] is True


def test_offload_detection_and_token_mean_without_a_process_group():
    assert not offloads_optimizer(SimpleNamespace(strategy=SimpleNamespace(config=None)))
    ds = SimpleNamespace(config=deepspeed_config(TrainerConfig(zero_stage=2, offload_optimizer=True), 1))
    assert offloads_optimizer(SimpleNamespace(strategy=ds))
    ds = SimpleNamespace(config=deepspeed_config(TrainerConfig(zero_stage=2), 1))
    assert not offloads_optimizer(SimpleNamespace(strategy=ds))
    loss_sum = torch.tensor(12.0, requires_grad=True)
    assert float(distributed_token_mean(loss_sum, 4)) == 3.0
    assert float(distributed_token_mean(loss_sum, torch.tensor(0))) == 12.0  # an empty batch: no division by 0


def test_resume_finds_file_and_directory_checkpoints(tmp_path):
    assert resume_checkpoint(tmp_path, "auto") is None
    (tmp_path / "checkpoints" / "last.ckpt").mkdir(parents=True)  # DeepSpeed: a directory of shards
    assert resume_checkpoint(tmp_path, "auto") == str(tmp_path / "checkpoints" / "last.ckpt")
    assert resume_checkpoint(tmp_path, str(tmp_path / "checkpoints" / "last.ckpt")).endswith("last.ckpt")
    assert resume_checkpoint(tmp_path, "never") is None


# ------------------------------------------------------------------------------------------------ epochs
def _fit_orders(tmp_path, use_build_trainer: bool) -> list[list[int]]:
    import lightning as L
    from torch.utils.data import DataLoader

    from samtok.core.trainer import build_trainer
    from samtok.data.datamodule import RankBatchSampler

    seen: list[tuple[int, list[int]]] = []

    class Tiny(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            seen.append((self.current_epoch, [int(i) for i in batch]))
            return self.layer(batch.float()[:, None]).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = DataLoader(list(range(6)), batch_sampler=RankBatchSampler(6, 2, seed=0, shuffle=True))
    kw = dict(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False)
    if use_build_trainer:
        cfg = TrainerConfig(accelerator="cpu", devices="1", max_steps=-1, max_epochs=2, checkpoint_every_n_steps=0,
                            val_every_n_steps=0)
        trainer = build_trainer(cfg, tmp_path, per_device_batch=2)
    else:
        trainer = L.Trainer(accelerator="cpu", devices=1, **kw)
    trainer.fit(Tiny(), train_dataloaders=loader)
    return [[i for e, b in seen if e == epoch for i in b] for epoch in (0, 1)]


def test_batch_samplers_get_a_new_epoch_only_through_build_trainer(tmp_path):
    from samtok.data.datamodule import RankBatchSampler

    expected = []
    for epoch in (0, 1):
        s = RankBatchSampler(6, 2, seed=0, shuffle=True)
        s.set_epoch(epoch)
        expected.append([i for b in s for i in b])
    assert expected[0] != expected[1]
    assert _fit_orders(tmp_path / "a", use_build_trainer=True) == expected
    # plain Lightning calls set_epoch on loader.sampler / batch_sampler.sampler only: epoch 0 twice
    assert _fit_orders(tmp_path / "b", use_build_trainer=False) == [expected[0], expected[0]]


# ------------------------------------------------------------------------------------------------ samplers
@pytest.mark.parametrize("n,batch", [(7, 2), (13, 3), (9, 4)])
@pytest.mark.parametrize("kind", ["length_grouped", "rank"])
def test_samplers_at_world_size_two_with_an_odd_number_of_samples(n, batch, kind):
    from samtok.data.datamodule import LengthGroupedBatchSampler, RankBatchSampler
    from samtok.data.mixture import stable_seed

    world, gbs, seed = 2, 2 * batch, 3
    lengths = np.random.default_rng(n).integers(5, 500, n)

    def epoch(drop_last: bool = False) -> list[list[list[int]]]:
        out = []
        for rank in range(world):
            if kind == "length_grouped":
                s = LengthGroupedBatchSampler(lengths, batch, seed=seed, rank=rank, world_size=world,
                                              mega_batch_mult=2, drop_last=drop_last)
            else:
                s = RankBatchSampler(n, batch, seed=seed, rank=rank, world_size=world, shuffle=True,
                                     drop_last=drop_last)
            s.set_epoch(0)
            out.append(list(s))
        return out

    # training (default): wrapped to whole global batches; every rank the same number of full batches
    ranks = epoch()
    assert len(ranks[0]) == len(ranks[1]) == -(-n // gbs)
    assert all(len(b) == batch for r in ranks for b in r)
    seen = [i for r in ranks for b in r for i in b]
    assert sorted(set(seen)) == list(range(n))  # nothing dropped
    pad = -(-n // gbs) * gbs - n
    counts = np.bincount(seen, minlength=n)
    assert counts.sum() == n + pad and counts.max() <= 2
    # the repeated samples are the first `pad` of the epoch's permutation (seeded by seed and epoch)
    perm = np.random.default_rng(stable_seed(seed, "length-grouped" if kind == "length_grouped" else "shuffle",
                                             0)).permutation(n)
    assert set(np.flatnonzero(counts == 2).tolist()) == set(perm[:pad].tolist())
    # drop_last: no sample twice, the (n mod global batch) remainder left out of this epoch
    ranks = epoch(drop_last=True)
    seen = [i for r in ranks for b in r for i in b]
    assert len(seen) == len(set(seen)) == n // gbs * gbs
    assert len(ranks[0]) == len(ranks[1])


def test_evaluation_shards_see_every_sample_exactly_once():
    from samtok.data.datamodule import RankBatchSampler

    for n in (7, 13):
        ranks = [list(RankBatchSampler(n, 2, rank=r, world_size=2, shuffle=False, pad=False)) for r in range(2)]
        seen = [i for r in ranks for b in r for i in b]
        assert sorted(seen) == list(range(n))  # no padding, no drop: ranks differ by one sample
        assert abs(sum(map(len, ranks[0])) - sum(map(len, ranks[1]))) == 1
