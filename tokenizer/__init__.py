"""The SAMTok mask tokenizer: mask ↔ two codes (spec §1), and the codec for their text form (§2).

``from samtok.tokenizer import SAMTokenizer, MaskCodec`` — heavy modules are imported lazily, so the
codec can be used without loading torch or sam2.
"""

from samtok.tokenizer.codec import MT_END, MT_START, MaskCodec, MaskSpan

__all__ = ["MaskCodec", "MaskSpan", "MT_START", "MT_END", "SAMTokenizer", "SAMTokModel", "TokenizerModelConfig"]


def __getattr__(name):
    if name == "SAMTokenizer":
        from samtok.tokenizer.api import SAMTokenizer

        return SAMTokenizer
    if name in ("SAMTokModel", "TokenizerModelConfig"):
        from samtok.tokenizer import model

        return getattr(model, name)
    raise AttributeError(name)
