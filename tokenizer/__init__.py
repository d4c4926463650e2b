"""samtok.tokenizer"""
