"""A tiny on-disk setup for the LLM recipes' end-to-end tests (`samtok sft`, `samtok rl`).

Synthetic data in a tmp dir, a micro mask tokenizer (random weights), a mixture config and a
pre-tokenized table under that tokenizer's fingerprint whose codes are made up (stable hashes):
everything the recipes read, built in seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence


def build_llm_setup(root: Path, train_tasks: Sequence[str], val_tasks: Sequence[str], train_images: int = 6,
                    val_images: int = 3) -> dict:
    """``{"root", "synth", "tok", "mixture", "pretok"}`` paths under ``root``."""
    from samtok.data.mixture import load_mixture_config
    from samtok.data.pretokenize import tokenizer_fingerprint
    from samtok.data.synth import SplitSizes, SynthConfig, generate
    from samtok.tokenizer.checkpoints import save_tokenizer_dir
    from samtok.tokenizer.model import SAMTokModel, TokenizerModelConfig
    from samtok.tokenizer.sam2_parts import SAM2Config

    synth = root / "synth"
    generate(SynthConfig(out_dir=str(synth), seed=0, splits=SplitSizes(train=train_images, val=val_images, test=0),
                         progress=False), splits=["train", "val"])
    micro = SAM2Config(size="t", image_size=128, trunk_embed_dim=16, trunk_num_heads=1, trunk_stages=[1, 1, 2, 1],
                       trunk_global_att_blocks=[3])
    save_tokenizer_dir(SAMTokModel(TokenizerModelConfig(sam2=micro)), root / "tok")
    entries = [f'  - {{name: {t}, kind: synthetic, args: {{root: "{synth}", split: train}}, tasks: [{t}], split: train}}'
               for t in train_tasks]
    entries += [f'  - {{name: val_{t}, kind: synthetic, args: {{root: "{synth}", split: val}}, tasks: [{t}], split: val}}'
                for t in val_tasks]
    mixture = root / "mixture.yaml"
    mixture.write_text("entries:\n" + "\n".join(entries)
                       + "\nconversation: {crop_min_side: 48, crop_min_short_side: 112}\n")
    fingerprint = tokenizer_fingerprint(root / "tok")[0]
    write_fake_pretokenized(load_mixture_config(mixture), root / "pretok", fingerprint, str(root / "tok"),
                            splits=["train", "val"])
    return {"root": root, "synth": synth, "tok": root / "tok", "mixture": mixture, "pretok": root / "pretok"}


def write_fake_pretokenized(mixture, out: Path, fingerprint: str = "fake-fingerprint", tokenizer: str = "tok",
                            splits=None) -> Path:
    """A pre-tokenized folder with made-up codes (stable hashes) for every mask and crop the
    ``mixture`` (a loaded ``MixtureConfig``) needs: the datamodules and recipes do not care where
    codes come from (tests/test_pretokenize.py checks the real encoder)."""
    from samtok.data.mixture import crop_requests, load_mixture, stable_seed
    from samtok.data.pretokenize import finalize, plan_units, write_shard

    data = load_mixture(mixture, splits) if splits is not None else load_mixture(mixture)
    units = plan_units(data.images(), crop_requests(data), mixture.conversation.crop_spec())
    rows = {c: [] for c in ("source", "image_id", "ann_id", "c0", "c1")}
    for u in units:
        for k, _ in u.masks:
            h = stable_seed(u.source, u.image_id, k)
            for col, v in zip(rows, (u.source, u.image_id, k, h % 256, (h >> 8) % 256)):
                rows[col].append(v)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_shard(out, "part-0.arrow", rows, fingerprint, mixture.conversation.crop_spec())
    finalize(out, units, fingerprint, mixture.conversation.crop_spec(), tokenizer, "test")
    return out
