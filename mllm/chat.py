"""``samtok chat``: one prompt about one image, answered by a QwenVL-SAMTok model.

    samtok chat --model runs/sft/final --tokenizer runs/tokenizer/final --image cat.png \\
        "Please segment the cat in this image." --out overlay.png
    samtok chat ... --image street.jpg "Is <mask> taller than <mask>?" --mask a.png --mask b.png
    samtok chat --server http://localhost:8000 --tokenizer exported/mask_tokenizer --image cat.png "..."

With ``--server`` the model runs behind an OpenAI-compatible server (``transformers serve``, vLLM;
docs/serving.md) and only the mask tokenizer runs here (:mod:`samtok.mllm.openai_client`).

Prints the answer with each mask span shown as ``[mask k]``, then one line per decoded mask (label,
area in pixels and percent of the image, codes), then any parsing notes. ``--out`` writes the masks
over the image with their labels; ``--save-masks DIR`` writes each mask as a 0/255 PNG.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from samtok.core.errors import SamtokError


def build_parser(name: str, parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the user prompt; each <mask> is replaced by the span of the next --mask")
    parser.add_argument("--model", default=None, help="QwenVL-SAMTok model directory (ours or a hub snapshot); "
                        "not needed with --server")
    parser.add_argument("--server", default=None, metavar="URL",
                        help="ask an OpenAI-compatible server (e.g. http://localhost:8000) instead of loading --model")
    parser.add_argument("--server-model", default=None, metavar="NAME",
                        help="with --server: the model name to request (default: the server's first listed model)")
    parser.add_argument("--api-key", default=None, help="with --server: bearer token, if the server wants one")
    parser.add_argument("--tokenizer", required=True, help="SAMTok tokenizer directory")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--mask", action="append", default=[], metavar="FILE",
                        help="a binary mask image (image-sized) for the next <mask> of the prompt; repeat in order")
    parser.add_argument("--out", default=None, help="write an overlay PNG of the answer's masks with their labels")
    parser.add_argument("--save-masks", default=None, metavar="DIR", help="write each mask as DIR/mask_<k>.png")
    parser.add_argument("--system", default=None, help="a system prompt")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (with --sample)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass (with --sample)")
    parser.add_argument("--top-k", type=int, default=0, help="top-k (with --sample; 0 = off)")
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0, help="seed for sampling")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])


def describe_prediction(pred) -> str:
    """The text ``samtok chat`` prints for a :class:`~samtok.mllm.inference.Prediction`."""
    h, w = pred.image_size
    lines = [pred.readable_text, ""]
    if pred.num_masks == 0:
        lines.append("no mask in the answer")
    for k, (label, area, codes) in enumerate(zip(pred.labels, pred.areas(), pred.codes)):
        pct = 100.0 * area / max(1, h * w)
        name = repr(label) if label is not None else "(no label)"
        lines.append(f"[mask {k}] {name}  area {area} px ({pct:.2f}% of {w}x{h})  codes {codes[0]} {codes[1]}")
    for note in pred.notes:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def overlay_for(image, pred):
    """The answer's masks over the image, labelled ``k: label``."""
    from samtok.core.render import overlay_masks

    labels = [f"{k}: {label}" if label else str(k) for k, label in enumerate(pred.labels)]
    return overlay_masks(image, [m.numpy() for m in pred.masks], labels)


def run(name: str, args: argparse.Namespace) -> int:
    import torch

    from samtok.core.images import load_image, load_mask, save_mask_png
    from samtok.core.runtime import seed_everything
    from samtok.mllm.generation import SamplingConfig
    from samtok.mllm.inference import MASK_PLACEHOLDER, SamtokPredictor

    if not args.model and not args.server:
        raise SamtokError("give --model DIR (run the model here) or --server URL (ask a running server)")
    n_placeholders = args.prompt.count(MASK_PLACEHOLDER)
    if n_placeholders != len(args.mask):
        raise SamtokError(f"the prompt has {n_placeholders} {MASK_PLACEHOLDER} placeholder(s) but "
                          f"{len(args.mask)} --mask file(s) were given")
    image = load_image(args.image)
    masks = []
    for p in args.mask:
        m = load_mask(p)
        if m.shape != image.shape[:2]:
            raise SamtokError(f"{p}: mask is {m.shape[0]}x{m.shape[1]} but {args.image} is "
                              f"{image.shape[0]}x{image.shape[1]}")
        masks.append(m)
    try:
        sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, do_sample=args.sample,
                                  temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    except ValueError as exc:
        raise SamtokError(str(exc)) from exc
    seed_everything(args.seed)
    if args.server:
        from samtok.mllm.openai_client import ServerPredictor

        predictor = ServerPredictor.connect(args.server, args.tokenizer, device=args.device, model=args.server_model,
                                            api_key=args.api_key, batch_size=1, system_prompt=args.system)
    else:
        predictor = SamtokPredictor.from_pretrained(args.model, args.tokenizer, device=args.device, dtype=args.dtype,
                                                    batch_size=1, system_prompt=args.system)
    with torch.no_grad():
        [pred] = predictor.predict([image], [args.prompt], sampling, prompt_masks=[masks])
    print(describe_prediction(pred))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        overlay_for(image, pred).save(out)
        print(f"overlay written to {out}")
    if args.save_masks:
        folder = Path(args.save_masks)
        for k, m in enumerate(pred.masks):
            print(f"mask {k} written to {save_mask_png(m.numpy(), folder / f'mask_{k}.png')}")
    return 0
