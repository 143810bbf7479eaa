"""Activation-sparsity methods, one file each, registered by name.

    import wina_fx
    class MyMethod(wina_fx.Method): ...       # see README, "Adding a method"
    wina_fx.register_method(MyMethod())

The built-in ones register here, the same way.
"""
from __future__ import annotations

import torch

from .base import (Method, column_norms, get_method, method_names, register_method, registry, unit_scores,
                   unregister_method)
from .cats import Cats
from .dense import Dense
from .plan import Plan, keep_count
from .rsparse import RSparse
from .teal import Teal
from .wina import Wina

for _method in (Wina(), Teal(), Cats(), RSparse(), Dense()):
    register_method(_method, replace=True)


def channel_scores(method: str, weight: torch.Tensor) -> torch.Tensor:
    """The (K,) float32 score vector of the registered ``method`` for a weight (N, K)."""
    return get_method(method).score(weight)


__all__ = ["Method", "Plan", "register_method", "unregister_method", "get_method", "method_names", "registry", "channel_scores",
           "column_norms", "unit_scores", "keep_count", "Wina", "Teal", "Cats", "RSparse", "Dense"]
