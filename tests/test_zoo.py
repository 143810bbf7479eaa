"""A zoo of tiny random causal LMs from ``transformers``: every linear, in whatever form the
model writes it (nn.Linear, GPT-2's Conv1D, Falcon's x @ W.T, 3-D expert weights), gets a
report row; at 50 % everything but the output head and the routers is sparse; at 0 the
compiled model is the eager one."""
import pytest
import torch

import wina_fx
from zoo_models import ROUTERS, ZOO, build, linear_weights

@pytest.mark.parametrize("family", list(ZOO))
@torch.no_grad()
def test_zoo(family):
    model = build(family)
    ids = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(1))
    eager = model(ids).logits
    for sparsity in (0.0, 0.5):
        torch._dynamo.reset()
        out = torch.compile(model, backend="wina", options={"sparsity": sparsity, "inductor": False})(ids).logits
        report = wina_fx.last_report()
        if sparsity == 0:
            torch.testing.assert_close(out, eager, rtol=0, atol=0)
            continue
        rows = {r.name: r.status for r in report.rows}
        assert set(linear_weights(model)) <= set(rows), sorted(set(linear_weights(model)) - set(rows))
        dense = {n for n, status in rows.items() if not status.startswith("sparse")}
        routers = {n for n in rows for r in ROUTERS.get(family, ()) if n.endswith(r)}
        head = {n for n, status in rows.items() if "output head" in status}
        assert len(head) == 1 and dense == head | routers, {n: rows[n] for n in dense}
        assert all(rows[n].startswith("dense: router") for n in routers)
        assert torch.isfinite(out).all()
    torch._dynamo.reset()
