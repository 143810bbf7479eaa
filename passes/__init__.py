"""FX graph passes of wina-fx, each a function on a GraphModule (installed as wina_fx.passes)."""
from .find_linears import LinearSite, find_linears
from .gate import Gate, gate_linears
from .keep_rule import KeepRule
from .group import group_sibling_linears
from .orthogonalize import OrthogonalizeReport, orthogonalize
from .sdpa_gqa import attend_grouped_heads

__all__ = ["LinearSite", "find_linears", "Gate", "KeepRule", "gate_linears", "group_sibling_linears", "OrthogonalizeReport",
           "orthogonalize", "attend_grouped_heads"]
