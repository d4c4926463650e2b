"""SFT: what trains under LoRA, that the plumbing reproduces answers, and that export round-trips."""

import numpy as np
import pytest
import torch

from samtok.mllm.generation import SamplingConfig, generate
from samtok.mllm.models import TinyModelConfig, build_tiny, load_model_and_processor
from samtok.mllm.sequences import build_prompt_example, build_training_example, generation_collator, training_collator
from samtok.mllm.validation import exact_span_match
from samtok.mllm.sft import LoraSettings, OptimSettings, SFTLightningModule, parameter_group, prepare_model_for_training
from samtok.tokenizer.codec import MaskCodec

CODEC = MaskCodec()
EXPRESSIONS = ["the red star", "the blue ring", "the green bar", "the small circle", "the large square", "the triangle"]


def dataset(n=6, seed=0):
    """Referring conversations whose answers are mask spans, on random images."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        image = (rng.random((56, 56, 3)) * 255).astype(np.uint8)
        span = CODEC.format(int(rng.integers(256)), int(rng.integers(256)))
        answer = '```json\n[{"mask_2d": "' + span + '", "label": "' + EXPRESSIONS[k] + '"}]\n```'
        conv = [{"role": "user", "content": f"<image>\nPlease segment {EXPRESSIONS[k]} in this image."},
                {"role": "assistant", "content": answer}]
        out.append((conv, [image], answer))
    return out


def tiny_model(family="qwen2_5_vl"):
    corpus = [c[0]["content"] + c[1]["content"] for c, _, _ in dataset()]
    torch.manual_seed(0)
    return build_tiny(TinyModelConfig(family=family, hidden_size=64, num_hidden_layers=2), corpus=corpus)


def test_one_lora_step_trains_lora_embeddings_and_head_but_not_vision():
    model, proc = tiny_model()
    model = prepare_model_for_training(model, LoraSettings(r=8, alpha=16, dropout=0.0), freeze_vision=True)
    groups = {parameter_group(n) for n, p in model.named_parameters() if p.requires_grad}
    assert {"lora", "embeddings"} <= groups and "vision" not in groups and "language" not in groups
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    module = SFTLightningModule(model, proc.tokenizer, OptimSettings(lr=1e-2), total_steps=10)
    opt = module.configure_optimizers()["optimizer"]
    batch = training_collator(proc)([build_training_example(proc, c, i) for c, i, _ in dataset()])
    out = module(batch)
    module.loss(out.logits, batch["labels"]).backward()
    opt.step()
    changed = {parameter_group(n) for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert "lora" in changed and "embeddings" in changed  # tied lm_head = embed_tokens in this config
    assert "vision" not in changed and "language" not in changed
    # LoRA B starts at zero: the first step moves A's partners; every LoRA pair received gradient
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)


def test_module_loss_equals_transformers_loss():
    model, proc = tiny_model("qwen3_vl")
    module = SFTLightningModule(model, proc.tokenizer, OptimSettings(), total_steps=1)
    batch = training_collator(proc)([build_training_example(proc, c, i) for c, i, _ in dataset()])
    from samtok.mllm.sequences import model_inputs

    ref = model(**model_inputs(batch, with_labels=True)).loss
    torch.testing.assert_close(module.loss(module(batch).logits, batch["labels"]), ref)


@pytest.mark.slow
def test_exact_span_match_of_an_untrained_model_is_low():
    data = dataset()
    model, proc = tiny_model()
    result = exact_span_match(model, proc, [(c[:1], i, a) for c, i, a in data], batch_size=4, max_new_tokens=24)
    assert result["examples"] == 6.0 and result["spans_in_order_exact"] == 0.0
    assert result["first_codes_in_order_exact"] <= 1 / 6


@pytest.mark.slow
def test_overfit_then_export_reproduces_every_answer(tmp_path):
    """Plumbing: labels, masking, trainable mask rows and generation agree — six answers learned by
    heart come back exactly by greedy decoding, before and after the LoRA-merged export."""
    from samtok.mllm.export import export_model, save_trained_model
    from samtok.tokenizer.api import SAMTokenizer
    from samtok.tokenizer.model import SAMTokModel, TokenizerModelConfig
    from samtok.tokenizer.sam2_parts import SAM2Config

    data = dataset()
    model, proc = tiny_model()
    model = prepare_model_for_training(model, LoraSettings(r=16, alpha=32, dropout=0.0), freeze_vision=True)
    module = SFTLightningModule(model, proc.tokenizer, OptimSettings(lr=3e-3, weight_decay=0.0, warmup_fraction=0.0), total_steps=400)
    opt = module.configure_optimizers()["optimizer"]
    batch = training_collator(proc)([build_training_example(proc, c, i) for c, i, _ in data])
    for _ in range(400):
        loss = module.loss(module(batch).logits, batch["labels"])
        if loss.item() < 0.01:  # every answer token is then the argmax by a wide margin
            break
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    prompts = generation_collator(proc)([build_prompt_example(proc, c[:1], i) for c, i, _ in data])
    texts = generate(model, proc, prompts, SamplingConfig(max_new_tokens=48)).texts
    assert texts == [a for _, _, a in data]
    # the check `samtok sft` runs with generation_val.train_examples agrees, also in smaller batches
    assert exact_span_match(model, proc, [(c[:1], i, a) for c, i, a in data], batch_size=4) == \
        {"examples": 6.0, "spans_in_order_exact": 1.0, "first_codes_in_order_exact": 1.0}
    assert [CODEC.parse_codes(t) for t in texts] == [CODEC.parse_codes(a) for _, _, a in data]

    tok = SAMTokenizer(SAMTokModel(TokenizerModelConfig(sam2=SAM2Config(
        size="t", image_size=128, hidden_dim=128, decoder_mlp_dim=256, trunk_embed_dim=16, trunk_num_heads=1,
        trunk_stages=[1, 1, 2, 1], trunk_global_att_blocks=[3]))))
    tok.save_pretrained(tmp_path / "tok")
    save_trained_model(model, proc, tmp_path / "final", tmp_path / "tok", {"stage": "sft"})
    export_model(tmp_path / "final", tmp_path / "exported")
    from transformers import AutoModelForImageTextToText

    plain = AutoModelForImageTextToText.from_pretrained(tmp_path / "exported", local_files_only=True)
    assert not any("lora" in n for n, _ in plain.named_parameters())
    reloaded, proc2 = load_model_and_processor(tmp_path / "exported")
    again = generate(reloaded, proc2, prompts, SamplingConfig(max_new_tokens=48)).texts
    assert again == texts
    assert (tmp_path / "exported" / "mask_tokenizer" / "model.safetensors").is_file()
    assert "How it was trained" in (tmp_path / "exported" / "README.md").read_text()


def test_baseline_table_puts_each_metric_next_to_its_baselines_and_chance():
    from samtok.mllm.validation import baseline_table

    generation = {"res/cIoU": 0.2, "baseline/majority_span/res/cIoU": 0.3, "baseline/no_target/res/cIoU": 0.0,
                  "res/right_object": 0.4, "res/right_object_chance": 0.3}
    lines = {line.split("  ")[0].strip(): line.split()[-4:] for line in baseline_table(generation).splitlines()[1:]}
    assert lines["RES cIoU"] == ["0.200", "0.300", "0.000", "-"]
    assert lines["RES ... the referred one"] == ["0.400", "-", "-", "0.300"]
    assert "RES answers on an object" not in lines  # rows without a value are left out
