"""samtok.eval"""
