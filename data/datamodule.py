"""Datasets, samplers and Lightning datamodules for SFT, RL and evaluation — one data layer.

Every stage reads the same things: a mixture (:mod:`samtok.data.mixture`), the pre-tokenized codes
(:mod:`samtok.data.pretokenize`) and the conversation builder (:mod:`samtok.data.conversations`).

* :class:`SFTDataModule` — training examples (``input_ids``, ``labels`` on assistant answers only,
  images) built by :func:`samtok.mllm.sequences.build_training_example`; length-grouped batches
  (:class:`LengthGroupedBatchSampler`), rank-aware, deterministic for a seed.
* :class:`RLDataModule` / :class:`RLPromptDataset` — prompt-only examples with ``ground_truth``
  (the reference answer text) and the target ann ids, for GRPO.
* :class:`EvalDataset` — prompt-only examples (one per assistant turn: multi-round history is
  teacher-forced with ground-truth spans) with the ground-truth ann ids and the image record, so
  metrics look the masks up (:meth:`EvalItem.gt_masks`).

Determinism: the conversation of item ``i`` uses a generator seeded by ``(seed, stage, i)`` only,
so it does not depend on workers, ranks or the order items are read in; samplers are seeded by
``(seed, epoch)``.

Distributed training: the samplers here give each rank its own share, so the Lightning Trainer
must not inject a ``DistributedSampler``: build it with ``use_distributed_sampler=False``
(:data:`TRAINER_KWARGS`); the datamodules refuse to run under DDP otherwise.

Packing (several samples in one row) is not offered: with Qwen-VL's 3-D M-RoPE positions, packed
rows only stay separated with flash-attention's variable-length path (positions restarting per
sample), which cannot run or be tested on CPU; with SDPA/eager the samples would attend to each
other. Length-grouped batching removes most of the padding instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from samtok.core.config import ConfigError
from samtok.core.errors import SamtokError
from samtok.core.runtime import get_logger
from samtok.data.conversations import (
    ChatExample,
    ConversationConfig,
    build_example,
    example_images,
    prompt_only,
    prompts_per_turn,
)
from samtok.data.mixture import MixtureConfig, MixtureData, load_mixture, load_mixture_config, sample_rng, stable_seed
from samtok.data.pretokenize import CodeTable, load_code_table
from samtok.data.records import ImageRecord, TaskSample

log = get_logger("samtok.data.datamodule")

TRAINER_KWARGS = {"use_distributed_sampler": False}  # the samplers here are rank-aware themselves


# ------------------------------------------------------------------------------------------------
# samplers


def _rank_world(trainer: Any, rank: Optional[int], world_size: Optional[int]) -> tuple[int, int]:
    if rank is not None and world_size is not None:
        return rank, world_size
    if trainer is not None:
        return int(trainer.global_rank), int(trainer.world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _padded(order: np.ndarray, multiple: int, drop_last: bool) -> np.ndarray:
    """``order`` cut (drop_last) or wrapped around to a multiple of ``multiple``."""
    n = len(order)
    if n == 0:
        return order
    if drop_last:
        return order[: n // multiple * multiple]
    total = math.ceil(n / multiple) * multiple
    reps = math.ceil(total / n)
    return np.concatenate([order] * reps)[:total]


class LengthGroupedBatchSampler(Sampler[list[int]]):
    """Batches of similar lengths, shuffled, deterministic for ``(seed, epoch)``, rank-aware.

    Per epoch: a seeded permutation (wrapped to a multiple of ``batch_size × world_size`` unless
    ``drop_last``) is cut into mega-batches of ``mega_batch_mult`` global batches; each mega-batch
    is sorted by length (longest first) and cut into global batches; global batches are shuffled
    (the one holding the longest sample goes first, to hit out-of-memory at once, as HF's
    ``LengthGroupedSampler`` does); rank ``r`` takes items ``r, r + W, ...`` of each global batch,
    so every rank gets a batch of similar lengths at every step.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 mega_batch_mult: int = 50, drop_last: bool = False, longest_first: bool = True):
        if batch_size < 1 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"bad batch_size/rank/world_size: {batch_size}/{rank}/{world_size}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.mega_batch_mult = max(1, mega_batch_mult)
        self.drop_last, self.longest_first = drop_last, longest_first
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def global_batches(self) -> list[np.ndarray]:
        """The epoch's global batches (each sorted longest first), before the per-rank split."""
        g = np.random.default_rng(stable_seed(self.seed, "length-grouped", self.epoch))
        gbs = self.batch_size * self.world_size
        order = _padded(g.permutation(len(self.lengths)), gbs, self.drop_last)
        mega = gbs * self.mega_batch_mult
        batches: list[np.ndarray] = []
        for start in range(0, len(order), mega):
            chunk = order[start:start + mega]
            chunk = chunk[np.argsort(-self.lengths[chunk], kind="stable")]
            batches += [chunk[i:i + gbs] for i in range(0, len(chunk), gbs)]
        if not batches:
            return []
        perm = g.permutation(len(batches))
        batches = [batches[int(i)] for i in perm]
        if self.longest_first:
            top = int(np.argmax([self.lengths[b].max() for b in batches]))
            batches.insert(0, batches.pop(top))
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        for b in self.global_batches():
            yield [int(i) for i in b[self.rank::self.world_size]]

    def __len__(self) -> int:
        n, gbs = len(self.lengths), self.batch_size * self.world_size
        return n // gbs if self.drop_last else math.ceil(n / gbs)


class RankBatchSampler(Sampler[list[int]]):
    """Plain batches of this rank's share: shuffled per ``(seed, epoch)`` or in order; wrapped to an
    equal number of batches on every rank (unless ``drop_last``, or ``pad=False`` for evaluation)."""

    def __init__(self, n: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True, drop_last: bool = False, pad: bool = True):
        self.n, self.batch_size, self.seed, self.rank, self.world_size = n, batch_size, seed, rank, world_size
        self.shuffle, self.drop_last, self.pad = shuffle, drop_last, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def indices(self) -> np.ndarray:
        order = (np.random.default_rng(stable_seed(self.seed, "shuffle", self.epoch)).permutation(self.n)
                 if self.shuffle else np.arange(self.n))
        if self.pad or self.drop_last:
            order = _padded(order, self.batch_size * self.world_size, self.drop_last)
        return order[self.rank::self.world_size]

    def __iter__(self) -> Iterator[list[int]]:
        mine = self.indices()
        for i in range(0, len(mine), self.batch_size):
            yield [int(j) for j in mine[i:i + self.batch_size]]

    def __len__(self) -> int:
        return math.ceil(len(self.indices()) / self.batch_size)


# ------------------------------------------------------------------------------------------------
# lengths


def image_token_count(processor, size: tuple[int, int]) -> int:
    """``<|image_pad|>`` tokens the processor inserts for an image of ``size = (H, W)``."""
    ip = processor.image_processor
    patches = ip.get_number_of_image_patches(int(size[0]), int(size[1]), {})
    return int(patches) // int(ip.merge_size) ** 2


def conversation_length(processor, messages: Sequence[dict], images: Sequence[Any],
                        add_generation_prompt: bool = False) -> int:
    """Exact token count of a conversation, images expanded, without reading any pixel.

    ``images`` are :class:`~samtok.data.conversations.ImageRef` with known sizes.
    """
    from samtok.mllm.sequences import render_conversation, with_image_placeholders

    conv = with_image_placeholders(messages, len(images))
    text = render_conversation(processor, conv, add_generation_prompt=add_generation_prompt)
    tok = getattr(processor, "tokenizer", processor)
    n_text = len(tok(text, add_special_tokens=False)["input_ids"])
    return n_text + sum(image_token_count(processor, ref.output_size()) - 1 for ref in images)


# ------------------------------------------------------------------------------------------------
# datasets


@dataclass
class _Source:
    """What every dataset here builds from."""

    items: list[tuple[str, TaskSample]]  # (entry name, sample), repeats applied
    records: dict[tuple[str, str], ImageRecord]
    codes: CodeTable
    conversation: ConversationConfig
    seed: int
    stage: str  # seeds: "sft", "rl", "eval"

    def record(self, sample: TaskSample) -> ImageRecord:
        key = (sample.source, sample.image_id)
        if key in self.records:
            return self.records[key]
        if not sample.image_id:  # a text-only ready-made conversation
            return ImageRecord(source=sample.source, image_id="", file_name="", height=0, width=0)
        raise SamtokError(f"{type(sample).__name__} {sample.sample_id}: image {key} is not in the mixture")

    def example(self, i: int) -> Optional[ChatExample]:
        entry, sample = self.items[i]
        rng = sample_rng(self.seed, self.stage, i)
        return build_example(sample, self.record(sample), self.codes, self.conversation, rng)


def _open(mixture: MixtureConfig | MixtureData | str | Path, splits: Sequence[str]) -> MixtureData:
    if isinstance(mixture, MixtureData):
        return mixture
    cfg = load_mixture_config(mixture) if isinstance(mixture, (str, Path)) else mixture
    return load_mixture(cfg, splits=list(splits))


def _codes(codes: CodeTable | str | Path, tokenizer: Any, conversation: ConversationConfig) -> CodeTable:
    table = codes if isinstance(codes, CodeTable) else load_code_table(codes, tokenizer=tokenizer,
                                                                       codebook_size=conversation.codebook_size)
    if tokenizer is not None and isinstance(codes, CodeTable):
        table.check_tokenizer(tokenizer)
    return table


class SFTDataset(Dataset):
    """Training examples of a list of samples; samples the builder drops (repeated spans) or that
    exceed ``max_length`` are left out when the dataset is made (their count is in ``dropped``).

    ``lengths[j]`` is the exact token count of item ``j`` (for length grouping).
    """

    def __init__(self, source: _Source, processor, max_length: Optional[int] = None):
        self.source, self.processor, self.max_length = source, processor, max_length
        self.index: list[int] = []
        self.lengths: list[int] = []
        self.dropped = {"span_repeats": 0, "too_long": 0}
        for i in range(len(source.items)):
            ex = source.example(i)
            if ex is None:
                self.dropped["span_repeats"] += 1
                continue
            n = conversation_length(processor, ex.messages, ex.images)
            if max_length is not None and n > max_length:
                self.dropped["too_long"] += 1
                continue
            self.index.append(i)
            self.lengths.append(n)

    def __len__(self) -> int:
        return len(self.index)

    def chat_example(self, j: int) -> ChatExample:
        ex = self.source.example(self.index[j])
        assert ex is not None
        return ex

    def __getitem__(self, j: int) -> dict[str, Any]:
        from samtok.mllm.sequences import build_training_example

        ex = self.chat_example(j)
        out = build_training_example(self.processor, ex.messages, example_images(ex), max_length=self.max_length)
        out["task"] = ex.task
        out["sample_id"] = ex.sample_id
        return out


class RLPromptDataset(Dataset):
    """Prompt-only examples for GRPO. Each item::

        {"prompt": messages without the answer, "images": [PIL], "ground_truth": reference answer text,
         "targets": ann ids of the answer's masks, "task", "sample_id", "source", "image_id", "meta",
         + the prompt's model inputs (input_ids, attention_mask, mm_token_type_ids, pixel_values,
           image_grid_thw) when a processor is given}
    """

    def __init__(self, source: _Source, processor=None, max_prompt_length: Optional[int] = None):
        self.source, self.processor, self.max_prompt_length = source, processor, max_prompt_length
        self.index: list[int] = []
        self.dropped = {"span_repeats": 0, "too_long": 0}
        for i in range(len(source.items)):
            ex = source.example(i)
            if ex is None:
                self.dropped["span_repeats"] += 1
                continue
            if processor is not None and max_prompt_length is not None:
                p = prompt_only(ex)
                if conversation_length(processor, p.messages, p.images, add_generation_prompt=True) > max_prompt_length:
                    self.dropped["too_long"] += 1
                    continue
            self.index.append(i)

    def __len__(self) -> int:
        return len(self.index)

    def chat_example(self, j: int) -> ChatExample:
        ex = self.source.example(self.index[j])
        assert ex is not None
        return prompt_only(ex)

    def __getitem__(self, j: int) -> dict[str, Any]:
        ex = self.chat_example(j)
        images = example_images(ex)
        item: dict[str, Any] = {
            "prompt": ex.messages, "images": images, "ground_truth": ex.answer, "targets": ex.targets[-1],
            "task": ex.task, "sample_id": ex.sample_id, "source": ex.source, "image_id": ex.image_id, "meta": ex.meta,
        }
        if self.processor is not None:
            from samtok.mllm.sequences import build_prompt_example

            item.update(build_prompt_example(self.processor, ex.messages, images))
        return item


@dataclass
class EvalItem:
    """One evaluation prompt: the prompt-only example, its image record and ground-truth masks' ids."""

    example: ChatExample
    record: ImageRecord
    gt_ann_ids: list[str]
    turn: int = 0

    @property
    def ground_truth(self) -> str:
        return self.example.answer

    def images(self) -> list:
        return example_images(self.example)

    def gt_masks(self) -> np.ndarray:
        """``(N, H, W)`` bool ground-truth masks in answer order (``N = 0``: no target)."""
        h, w = self.record.height, self.record.width
        if not self.gt_ann_ids:
            return np.zeros((0, h, w), dtype=bool)
        return np.stack([self.record.mask(a) for a in self.gt_ann_ids])


class EvalDataset(Dataset):
    """Evaluation prompts of the ``split`` entries (no repeats), built with the evaluation zoom-in
    threshold (``ConversationConfig.for_eval``). ``per_turn``: one item per assistant turn (history
    teacher-forced with ground truth); otherwise only the last turn is asked.

    Args:
        mixture: a mixture config / YAML path / loaded :class:`MixtureData`.
        codes: a :class:`CodeTable` or a pre-tokenized folder.
        split: which entries (``test`` by default).
        tasks: keep only these tasks (None: all).
        tokenizer: refuse a table made by another tokenizer (directory, SAMTokenizer or fingerprint).
        seed: seeds the prompt templates.
    """

    def __init__(self, mixture: MixtureConfig | MixtureData | str | Path, codes: CodeTable | str | Path,
                 split: str = "test", tasks: Optional[Sequence[str]] = None, per_turn: bool = True,
                 tokenizer: Any = None, seed: Optional[int] = None):
        data = _open(mixture, [split])
        conv = data.config.conversation.for_eval()
        source = _Source(data.items([split], repeat=False), data.records, _codes(codes, tokenizer, conv), conv,
                         data.config.seed if seed is None else seed, "eval")
        self.items: list[EvalItem] = []
        self.dropped = 0
        for i, (_, sample) in enumerate(source.items):
            ex = source.example(i)
            if ex is None:
                self.dropped += 1
                continue
            if tasks is not None and ex.task not in tasks:
                continue
            prompts = prompts_per_turn(ex) if per_turn else [prompt_only(ex)]
            for p in prompts:
                self.items.append(EvalItem(p, source.record(sample), list(p.targets[-1]), p.meta.get("turn", 0)))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> EvalItem:
        return self.items[i]

    def shard(self, rank: int, world_size: int) -> list[EvalItem]:
        """This rank's disjoint share (``items[rank::world_size]``)."""
        return self.items[rank::world_size]


# ------------------------------------------------------------------------------------------------
# datamodules


def _check_trainer(trainer: Any, world: int) -> None:
    conn = getattr(trainer, "_accelerator_connector", None)
    if world > 1 and conn is not None and getattr(conn, "use_distributed_sampler", False):
        raise ConfigError("the samtok datamodules shard batches by rank themselves: build the Trainer with "
                          "use_distributed_sampler=False (samtok.data.datamodule.TRAINER_KWARGS)")


def _holdout(items: list[tuple[str, TaskSample]], fraction: float, seed: int) -> tuple[list, list]:
    """Split by image (no image in both): an image goes to validation with probability ``fraction``."""
    train, val = [], []
    for item in items:
        s = item[1]
        u = (stable_seed(seed, "holdout", s.source, s.image_id) % 1_000_000) / 1_000_000
        (val if u < fraction else train).append(item)
    return train, val


class SFTDataModule(L.LightningDataModule):
    """Supervised fine-tuning data: the mixture's ``train`` entries (repeats applied) and a
    validation set (the ``val_split`` entries, or a ``val_fraction`` of the training images).

    Args:
        mixture: a :class:`MixtureConfig`, a mixture YAML path, or a loaded :class:`MixtureData`.
        pretok_dir: the pre-tokenized folder (or a :class:`CodeTable`).
        processor: the Qwen-VL processor (``samtok.mllm.processor``).
        max_length: longest sequence in tokens; longer examples are left out at setup.
        batch_size: per device; ``val_batch_size`` defaults to it.
        num_workers: DataLoader workers (building conversations, reading images, processing).
        seed: seeds templates, repeats, shuffling and hold-out.
        length_grouped: batches of similar lengths (:class:`LengthGroupedBatchSampler`); else plain shuffling.
        packing: not supported (see the module docstring); ``True`` raises ``ConfigError``.
        val_fraction: > 0 holds out this fraction of the training images for validation.
        val_split: otherwise, the entries of this split are the validation set ("" or None: none).
        tokenizer: the tokenizer directory the stage uses: a table made by another one is refused.
        rank, world_size: override what the Trainer says (tests, custom launchers).
    """

    def __init__(self, mixture: MixtureConfig | MixtureData | str | Path, pretok_dir: CodeTable | str | Path, processor,
                 max_length: Optional[int] = 8192, batch_size: int = 4, num_workers: int = 0, seed: int = 0,
                 length_grouped: bool = True, packing: bool = False, val_fraction: float = 0.0,
                 val_split: Optional[str] = "val", tokenizer: Any = None, val_batch_size: Optional[int] = None,
                 mega_batch_mult: int = 50, pad_to_multiple_of: Optional[int] = None,
                 rank: Optional[int] = None, world_size: Optional[int] = None):
        super().__init__()
        if packing:
            raise ConfigError("packing is not supported: with Qwen-VL's M-RoPE, packed samples only stay apart with "
                              "flash-attention's variable-length kernels (not on CPU); use length_grouped=true")
        if not 0.0 <= val_fraction < 1.0:
            raise ConfigError(f"val_fraction must lie in [0, 1), got {val_fraction}")
        self.mixture, self.pretok_dir, self.processor = mixture, pretok_dir, processor
        self.max_length, self.batch_size, self.num_workers, self.seed = max_length, batch_size, num_workers, seed
        self.length_grouped, self.val_fraction, self.val_split = length_grouped, val_fraction, val_split
        self.tokenizer, self.val_batch_size = tokenizer, val_batch_size or batch_size
        self.mega_batch_mult, self.pad_to_multiple_of = mega_batch_mult, pad_to_multiple_of
        self._rank, self._world = rank, world_size
        self.train_set: Optional[SFTDataset] = None
        self.val_set: Optional[SFTDataset] = None

    @property
    def rank_world(self) -> tuple[int, int]:
        return _rank_world(self._trainer_or_none(), self._rank, self._world)

    def _trainer_or_none(self):
        return getattr(self, "trainer", None)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        splits = ["train"] + ([self.val_split] if self.val_split and not self.val_fraction else [])
        data = _open(self.mixture, splits)
        conv = data.config.conversation
        codes = _codes(self.pretok_dir, self.tokenizer, conv)
        train_items = data.items(["train"])
        if self.val_fraction > 0:
            train_items, val_items = _holdout(train_items, self.val_fraction, self.seed)
        else:
            val_items = data.items([self.val_split], repeat=False) if self.val_split else []
        self.train_set = SFTDataset(_Source(train_items, data.records, codes, conv, self.seed, "sft"),
                                    self.processor, self.max_length)
        self.val_set = (SFTDataset(_Source(val_items, data.records, codes, conv, self.seed, "sft-val"),
                                   self.processor, self.max_length) if val_items else None)
        log.info("SFT data: %d training examples (dropped %s), %d validation examples",
                 len(self.train_set), self.train_set.dropped, len(self.val_set) if self.val_set else 0)
        if len(self.train_set) == 0:
            raise SamtokError("the SFT mixture has no training example left (check entries, tasks and max_length)")

    def train_batch_sampler(self) -> Sampler:
        rank, world = self.rank_world
        assert self.train_set is not None
        if self.length_grouped:
            return LengthGroupedBatchSampler(self.train_set.lengths, self.batch_size, self.seed, rank, world,
                                             self.mega_batch_mult)
        return RankBatchSampler(len(self.train_set), self.batch_size, self.seed, rank, world, shuffle=True)

    def _loader(self, dataset: Dataset, batch_sampler: Sampler) -> DataLoader:
        from samtok.mllm.sequences import training_collator

        return DataLoader(dataset, batch_sampler=batch_sampler, num_workers=self.num_workers,
                          collate_fn=training_collator(self.processor, self.pad_to_multiple_of),
                          persistent_workers=False)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        _check_trainer(self._trainer_or_none(), self.rank_world[1])
        return self._loader(self.train_set, self.train_batch_sampler())

    def val_dataloader(self) -> list | DataLoader:
        self.setup()
        if self.val_set is None or len(self.val_set) == 0:
            return []
        rank, world = self.rank_world
        _check_trainer(self._trainer_or_none(), world)
        # pad=False: every validation sample is counted once (ranks may then see one batch fewer;
        # validation metrics are reduced at epoch end, so that is safe)
        return self._loader(self.val_set, RankBatchSampler(len(self.val_set), self.val_batch_size, self.seed, rank,
                                                           world, shuffle=False, pad=False))


@dataclass
class RLCollator:
    """Left-pads the prompts' model inputs (when present) and lists everything else."""

    pad_token_id: Optional[int] = None

    def __call__(self, items: Sequence[dict]) -> dict[str, Any]:
        from samtok.mllm.sequences import VLCollator

        model_keys = ("input_ids", "attention_mask", "mm_token_type_ids", "pixel_values", "image_grid_thw")
        batch: dict[str, Any] = {}
        if self.pad_token_id is not None and "input_ids" in items[0]:
            batch.update(VLCollator(self.pad_token_id, "left")([{k: it[k] for k in model_keys if k in it} for it in items]))
        for key in items[0]:
            if key not in model_keys:
                batch[key] = [it[key] for it in items]
        return batch


class RLDataModule(L.LightningDataModule):
    """GRPO prompts: the mixture's entries of ``split`` (repeats applied), optionally only ``tasks``.

    Batches are dicts of lists (``prompt``, ``images``, ``ground_truth``, ``targets``, ``task``,
    ``meta``...) plus left-padded prompt tensors when a processor is given. Rank-aware shuffling,
    deterministic for ``(seed, epoch)``.
    """

    def __init__(self, mixture: MixtureConfig | MixtureData | str | Path, pretok_dir: CodeTable | str | Path,
                 processor=None, batch_size: int = 8, num_workers: int = 0, seed: int = 0,
                 tasks: Optional[Sequence[str]] = None, split: str = "train", tokenizer: Any = None,
                 max_prompt_length: Optional[int] = None, rank: Optional[int] = None, world_size: Optional[int] = None):
        super().__init__()
        self.mixture, self.pretok_dir, self.processor = mixture, pretok_dir, processor
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.tasks, self.split, self.tokenizer, self.max_prompt_length = tasks, split, tokenizer, max_prompt_length
        self._rank, self._world = rank, world_size
        self.train_set: Optional[RLPromptDataset] = None

    @property
    def rank_world(self) -> tuple[int, int]:
        return _rank_world(getattr(self, "trainer", None), self._rank, self._world)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        data = _open(self.mixture, [self.split])
        conv = data.config.conversation
        grouped = [e.name for e in data.config.entries_of([self.split]) if e.turns_per_image > 1]
        if grouped:
            raise ConfigError(f"RL asks one request per prompt: set turns_per_image: 1 for mixture entries {grouped}")
        items = data.items([self.split])
        if self.tasks is not None:
            from samtok.data.conversations import sample_task

            items = [it for it in items if sample_task(it[1]) in self.tasks]
        source = _Source(items, data.records, _codes(self.pretok_dir, self.tokenizer, conv), conv, self.seed, "rl")
        self.train_set = RLPromptDataset(source, self.processor, self.max_prompt_length)
        log.info("RL prompts: %d (dropped %s)", len(self.train_set), self.train_set.dropped)

    def collator(self) -> RLCollator:
        if self.processor is None:
            return RLCollator(None)
        from samtok.mllm.sequences import generation_collator

        return RLCollator(generation_collator(self.processor).pad_token_id)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        rank, world = self.rank_world
        _check_trainer(getattr(self, "trainer", None), world)
        sampler = RankBatchSampler(len(self.train_set), self.batch_size, self.seed, rank, world, shuffle=True)
        return DataLoader(self.train_set, batch_sampler=sampler, num_workers=self.num_workers,
                          collate_fn=self.collator(), persistent_workers=False)
