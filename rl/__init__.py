"""samtok.rl"""
