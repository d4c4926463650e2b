"""samtok.mllm"""
