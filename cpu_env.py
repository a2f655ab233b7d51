"""The process environment the entry points (train.py, evaluate.py) set before torch loads MKL.

Bitwise-reproducible CPU math, so a resumed run ends with the same weights as an uninterrupted
one: MKL otherwise varies its thread count with machine load and picks code paths by memory
alignment, which changes summation order from run to run. Import this before torch.
"""
import os

os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
