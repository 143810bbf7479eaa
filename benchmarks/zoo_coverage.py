"""Per architecture of the test zoo: the share of linear weight bytes sparse at 50 %, and
what stays dense (CPU, tiny random models; no download).

    python benchmarks/zoo_coverage.py          # markdown table
"""
from __future__ import annotations

import collections
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# this folder off the path (its kernels.py would shadow the package's), the test zoo on it
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import torch  # noqa: E402

import wina_fx  # noqa: E402
from zoo_models import ZOO, build, linear_weights  # noqa: E402


def coverage(family: str) -> tuple[float, str]:
    model = build(family)
    ids = torch.randint(0, 128, (1, 6), generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(model, backend="wina", options={"sparsity": 0.5, "inductor": False})(ids)
    rows = {r.name: r.status for r in wina_fx.last_report().rows}
    weights = linear_weights(model)
    sparse = sum(n for name, n in weights.items() if rows.get(name, "").startswith("sparse"))
    dense = collections.Counter("not in the report" if name not in rows else
                                rows[name].removeprefix("dense: ").split(" (")[0]
                                for name in weights if not rows.get(name, "").startswith("sparse"))
    return sparse / sum(weights.values()), ", ".join(f"{n} x {reason}" for reason, n in dense.items())


def main() -> None:
    print("| architecture | linear weights sparse at 50 % | dense |")
    print("|---|---|---|")
    for family in ZOO:
        share, dense = coverage(family)
        print(f"| {family} | {share:.1%} | {dense} |", flush=True)


if __name__ == "__main__":
    main()
