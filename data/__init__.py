"""samtok.data"""
