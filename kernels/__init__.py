"""Kernels of wina-fx and their torch reference (installed as wina_fx.kernels)."""
