"""Datamodules on the shared data layer: labels on answers only, exact lengths, length grouping,
rank-aware deterministic sampling, workers, RL prompts with ground truth, evaluation items."""

import numpy as np
import pytest
import torch

from samtok.core.config import ConfigError
from samtok.data.conversations import box_area_ratio
from samtok.data.datamodule import (
    TRAINER_KWARGS,
    EvalDataset,
    LengthGroupedBatchSampler,
    RankBatchSampler,
    RLDataModule,
    SFTDataModule,
    _check_trainer,
)
from samtok.data.mixture import MixtureConfig, MixtureEntry
from samtok.data.pretokenize import PretokenizedMismatchError
from samtok.mllm.sequences import IGNORE_INDEX

CROP = dict(crop_min_side=48, crop_min_short_side=112)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    from samtok.data.synth import SynthConfig, generate

    out = tmp_path_factory.mktemp("synth")
    generate(SynthConfig(out_dir=str(out), num_images=12, seed=0, progress=False))
    return out


@pytest.fixture(scope="module")
def mixture(synth):
    root = str(synth)
    cfg = MixtureConfig(entries=[
        MixtureEntry(name="train", kind="synthetic", args={"root": root, "split": "train"}),
        MixtureEntry(name="ov", kind="coco", args={"instances": f"{root}/instances_train.json", "source": "synth"},
                     tasks=["ov_seg"]),
        MixtureEntry(name="val", kind="synthetic", args={"root": root, "split": "val"}, split="val"),
        MixtureEntry(name="test", kind="synthetic", args={"root": root, "split": "test"}, split="test"),
    ])
    cfg.conversation.crop_min_side, cfg.conversation.crop_min_short_side = CROP["crop_min_side"], CROP["crop_min_short_side"]
    return cfg.validate()


@pytest.fixture(scope="module")
def pretok(mixture, tmp_path_factory):
    """A pre-tokenized folder with made-up codes for every key the mixture needs (the datamodules
    do not care where codes come from; test_pretokenize checks the real encoder)."""
    from llm_setup import write_fake_pretokenized

    return write_fake_pretokenized(mixture, tmp_path_factory.mktemp("pretok"))


@pytest.fixture(scope="module")
def processor():
    from samtok.mllm.models import TinyModelConfig, build_tiny

    torch.set_num_threads(1)
    _, proc = build_tiny(TinyModelConfig(), corpus=["Please segment the red blob in this image.",
                                                    "A small green circle on the left."])
    return proc


@pytest.fixture(scope="module")
def dm(mixture, pretok, processor):
    d = SFTDataModule(mixture, pretok, processor, max_length=4096, batch_size=4, seed=0, tokenizer="fake-fingerprint")
    d.setup("fit")
    return d


def batches(loader, n=3):
    out = []
    for k, b in enumerate(loader):
        if k == n:
            break
        out.append(b)
    return out


# ------------------------------------------------------------------------------------------------ samplers


def test_length_grouped_sampler_groups_covers_and_is_deterministic():
    rng = np.random.default_rng(0)
    lengths = rng.integers(10, 2000, 403)
    s = LengthGroupedBatchSampler(lengths, batch_size=8, seed=1, mega_batch_mult=10)
    got = list(s)
    assert len(got) == len(s) == 51
    flat = [i for b in got for i in b]
    assert set(flat) == set(range(403)) and len(flat) == 51 * 8  # wrapped to whole batches
    spread = np.mean([np.ptp(lengths[b]) for b in got])
    random_spread = np.mean([np.ptp(lengths[rng.permutation(403)[:8]]) for _ in range(200)])
    assert spread < 0.2 * random_spread
    assert max(lengths[got[0]]) == lengths.max()  # longest batch first
    assert got == list(LengthGroupedBatchSampler(lengths, 8, seed=1, mega_batch_mult=10))
    assert got != list(LengthGroupedBatchSampler(lengths, 8, seed=2, mega_batch_mult=10))
    s.set_epoch(1)
    assert list(s) != got


def test_length_grouped_sampler_is_rank_aware():
    lengths = np.random.default_rng(1).integers(1, 500, 96)
    ranks = [list(LengthGroupedBatchSampler(lengths, 4, seed=0, rank=r, world_size=3, mega_batch_mult=2))
             for r in range(3)]
    assert len({len(r) for r in ranks}) == 1  # same number of steps on every rank
    for step in zip(*ranks):
        ids = [i for b in step for i in b]
        assert len(ids) == len(set(ids)) == 12  # a global batch split without overlap
        means = [np.mean(lengths[b]) for b in step]
        assert np.ptp(means) <= np.ptp(lengths[ids]) / 2  # ranks get similar lengths at each step
    assert sorted(i for r in ranks for b in r for i in b) == list(range(96))
    # not a multiple of the global batch: wrapped, every rank still gets full batches
    padded = [list(LengthGroupedBatchSampler(lengths[:91], 4, seed=0, rank=r, world_size=3)) for r in range(3)]
    assert all(len(b) == 4 for r in padded for b in r) and {i for r in padded for b in r for i in b} == set(range(91))


def test_rank_batch_sampler():
    parts = [list(RankBatchSampler(10, 2, seed=0, rank=r, world_size=2, shuffle=False, pad=False)) for r in range(2)]
    assert parts == [[[0, 2], [4, 6], [8]], [[1, 3], [5, 7], [9]]]
    a = list(RankBatchSampler(10, 3, seed=0, rank=0, world_size=2))
    b = list(RankBatchSampler(10, 3, seed=0, rank=1, world_size=2))
    assert len(a) == len(b) and {i for x in a + b for i in x} == set(range(10))


# ------------------------------------------------------------------------------------------------ SFT


def test_labels_cover_only_the_assistant_answers(dm, processor):
    tok = processor.tokenizer
    tasks = set()
    for j in range(0, len(dm.train_set), 7):
        ex = dm.train_set.chat_example(j)
        item = dm.train_set[j]
        learned = item["input_ids"][item["labels"] != IGNORE_INDEX]
        answers = [m["content"] for m in ex.messages if m["role"] == "assistant"]
        assert tok.decode(learned) == "".join(a + "<|im_end|>" for a in answers)
        assert (item["labels"][item["input_ids"] == processor.image_token_id] == IGNORE_INDEX).all()
        tasks.add(ex.task)
    assert {"res", "gres", "gcg", "region_caption", "mr_seg", "scene_graph", "ov_seg"} <= tasks


def test_lengths_are_exact_and_too_long_examples_are_left_out(dm, mixture, pretok, processor):
    for j in range(0, len(dm.train_set), 5):
        assert dm.train_set[j]["input_ids"].shape[0] == dm.train_set.lengths[j]
    cap = int(np.median(dm.train_set.lengths))
    short = SFTDataModule(mixture, pretok, processor, max_length=cap, batch_size=4, val_split=None)
    short.setup()
    assert max(short.train_set.lengths) <= cap and short.train_set.dropped["too_long"] > 0
    assert len(short.train_set) + short.train_set.dropped["too_long"] == len(dm.train_set)


def test_length_grouping_reduces_padding(mixture, pretok, processor, dm):
    def padding(module):
        pad = total = 0
        for b in module.train_dataloader():
            pad += int((b["attention_mask"] == 0).sum())
            total += b["attention_mask"].numel()
        return pad / total

    plain = SFTDataModule(mixture, pretok, processor, max_length=4096, batch_size=4, length_grouped=False, val_split=None)
    plain.setup()
    assert padding(dm) < 0.5 * padding(plain)


def test_same_seed_same_batches_other_seed_other_order(mixture, pretok, processor, dm):
    again = SFTDataModule(mixture, pretok, processor, max_length=4096, batch_size=4, seed=0)
    other = SFTDataModule(mixture, pretok, processor, max_length=4096, batch_size=4, seed=1)
    first = batches(dm.train_dataloader())
    second = batches(again.train_dataloader())
    assert [b["sample_id"] for b in first] == [b["sample_id"] for b in second]
    assert all(torch.equal(x["input_ids"], y["input_ids"]) and torch.equal(x["pixel_values"], y["pixel_values"])
               for x, y in zip(first, second))
    assert [b["sample_id"] for b in batches(other.train_dataloader())] != [b["sample_id"] for b in first]


def test_workers_give_the_same_batches(mixture, pretok, processor, dm):
    with_workers = SFTDataModule(mixture, pretok, processor, max_length=4096, batch_size=4, num_workers=2)
    a, b = batches(dm.train_dataloader(), 2), batches(with_workers.train_dataloader(), 2)
    assert [x["sample_id"] for x in a] == [x["sample_id"] for x in b]
    assert all(torch.equal(x["labels"], y["labels"]) for x, y in zip(a, b))


def test_ranks_get_disjoint_batches(mixture, pretok, processor):
    ranks = [SFTDataModule(mixture, pretok, processor, max_length=4096, batch_size=2, rank=r, world_size=2)
             for r in range(2)]
    loaders = [r.train_dataloader() for r in ranks]
    assert len(loaders[0]) == len(loaders[1])
    for b0, b1 in zip(batches(loaders[0], 4), batches(loaders[1], 4)):
        assert len(b0["sample_id"]) == len(b1["sample_id"]) == 2
        assert not set(b0["sample_id"]) & set(b1["sample_id"])  # each rank its own samples at every step
    steps = [sum(1 for _ in r.train_batch_sampler()) for r in ranks]
    ids = [[i for b in r.train_batch_sampler() for i in b] for r in ranks]
    assert steps[0] == steps[1] and set(ids[0]) | set(ids[1]) == set(range(len(ranks[0].train_set)))


def test_validation_from_val_entries_or_a_held_out_fraction(dm, mixture, pretok, processor):
    assert dm.val_set is not None and len(dm.val_set) > 0
    assert {dm.val_set.source.items[i][0] for i in dm.val_set.index} == {"val"}
    held = SFTDataModule(mixture, pretok, processor, max_length=4096, batch_size=4, val_fraction=0.3)
    held.setup()
    train_images = {(s.source, s.image_id) for _, s in held.train_set.source.items}
    val_images = {(s.source, s.image_id) for _, s in held.val_set.source.items}
    assert val_images and train_images and not train_images & val_images
    assert len(batches(held.val_dataloader(), 1)) == 1


def test_packing_distributed_sampler_and_fingerprint_are_checked(mixture, pretok, processor):
    with pytest.raises(ConfigError, match="packing"):
        SFTDataModule(mixture, pretok, processor, packing=True)

    class Conn:
        use_distributed_sampler = True

    class FakeTrainer:
        _accelerator_connector = Conn()

    with pytest.raises(ConfigError, match="use_distributed_sampler=False"):
        _check_trainer(FakeTrainer(), 2)
    _check_trainer(FakeTrainer(), 1)
    assert TRAINER_KWARGS == {"use_distributed_sampler": False}
    with pytest.raises(PretokenizedMismatchError):
        SFTDataModule(mixture, pretok, processor, tokenizer="another-fingerprint").setup()


# ------------------------------------------------------------------------------------------------ RL and eval


def test_rl_prompts_carry_the_ground_truth(mixture, pretok, processor, dm):
    rl = RLDataModule(mixture, pretok, processor, batch_size=3, seed=0, tasks=["gres", "gcg"])
    rl.setup()
    assert len(rl.train_set) > 0
    batch = next(iter(rl.train_dataloader()))
    assert batch["input_ids"].shape[0] == 3 and (batch["attention_mask"][:, -1] == 1).all()  # left padded
    for prompt, gt, task, targets in zip(batch["prompt"], batch["ground_truth"], batch["task"], batch["targets"]):
        assert task in ("gres", "gcg") and prompt[-1]["role"] == "user"
        assert all(m["role"] != "assistant" for m in prompt)
        assert gt == "No target." or "<|mt_start|>" in gt
        assert (gt == "No target.") == (not targets)
    plain = RLDataModule(mixture, pretok, None, batch_size=2, seed=0)
    plain.setup()
    item = plain.train_set[0]
    assert "input_ids" not in item and item["images"] and isinstance(item["ground_truth"], str)
    full = plain.train_set.source.example(plain.train_set.index[0])
    assert item["ground_truth"] == full.answer and item["targets"] == full.targets[-1]


def test_eval_items_have_ground_truth_masks_and_per_turn_prompts(mixture, pretok):
    ev = EvalDataset(mixture, pretok, split="test", tokenizer="fake-fingerprint")
    assert len(ev) > 0
    mr = [it for it in ev if it.example.task == "mr_seg"]
    assert mr and {it.turn for it in mr} >= {0, 1}
    for it in ev:
        assert it.example.messages[-1]["role"] == "user"
        masks = it.gt_masks()
        assert masks.shape == (len(it.gt_ann_ids), it.record.height, it.record.width)
        for m, a in zip(masks, it.gt_ann_ids):
            assert np.array_equal(m, it.record.mask(a))
        if it.example.task in ("region_caption", "region_vqa"):
            ratio = box_area_ratio(it.record.box(it.example.meta["region"]), it.record.width, it.record.height)
            assert it.example.meta["zoom"] == (ratio < 0.3) and len(it.example.images) == 1 + (ratio < 0.3)
    shards = [ev.shard(r, 3) for r in range(3)]
    assert sum(len(s) for s in shards) == len(ev)


def test_a_lightning_fit_runs_on_the_sft_datamodule(mixture, pretok):
    import lightning as L

    from samtok.mllm.models import TinyModelConfig, build_tiny
    from samtok.mllm.sequences import model_inputs

    model, proc = build_tiny(TinyModelConfig(), corpus=["Please segment the red blob in this image."])

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = model
            self.seen = []

        def training_step(self, batch, batch_idx):
            self.seen.append(list(batch["sample_id"]))
            return self.model(**model_inputs(batch)).loss

        def validation_step(self, batch, batch_idx):
            self.log("val/loss", self.model(**model_inputs(batch)).loss, batch_size=batch["input_ids"].shape[0])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    module = Module()
    dm = SFTDataModule(mixture, pretok, proc, max_length=4096, batch_size=2, val_split=None)
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, **TRAINER_KWARGS)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 2 and len(module.seen) == 2
    first = next(iter(LengthGroupedBatchSampler(dm.train_set.lengths, 2, seed=0)))
    assert module.seen[0] == [dm.train_set.chat_example(j).sample_id for j in first]
    assert trainer.validate(module, datamodule=dm, verbose=False) == []  # no validation set: nothing to run
    with_val = SFTDataModule(mixture, pretok, proc, max_length=4096, batch_size=2)
    (metrics,) = trainer.validate(module, datamodule=with_val, verbose=False)
    assert np.isfinite(metrics["val/loss"])
