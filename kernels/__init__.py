"""Triton kernels of the fused ops, installed as ``any2point_fast.kernels``.

Imports nothing from the library above :mod:`any2point_fast.ops`'s shared layout types.
"""
