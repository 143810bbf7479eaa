"""Gradients through the sparse ops: the masked function's, with the mask held constant.

y = (x * m) @ W^T + b  ->  dx = m * (g @ W),  dW = g^T (x * m),  db = sum g.
"""
import pytest
import torch

import wina_fx
import wina_fx.ops  # noqa: F401  (registers torch.ops.wina)
from tiny_models import masked_input_hooks, tiny_model
from wina_fx.kernels import reference
from wina_fx.passes import weight_layout


def _inputs(bias, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 12, dtype=torch.float64, generator=g, requires_grad=True)
    weight_t = torch.randn(12, 7, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True) if bias else None
    return x, weight_t, b


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rule", ["topk", "threshold", "group"])
def test_gradcheck(rule, bias):
    x, weight_t, b = _inputs(bias)
    score = torch.rand(12) + 0.5
    ops = {
        "topk": lambda x, w, b: torch.ops.wina.topk_linear(x, w, b, score, 5),
        "threshold": lambda x, w, b: torch.ops.wina.threshold_linear(x, w, b, score, 0.4, 0.5),
        "group": lambda x, w, b: torch.ops.wina.threshold_linear_group(
            x, w, b, torch.stack([score, score.flip(0)]), [0.3, 0.9], [4, 3], 0.2),
    }
    assert torch.autograd.gradcheck(ops[rule], (x, weight_t, b))


def test_gradients_are_those_of_the_masked_linear():
    """Against autograd of the reference x * mask -> F.linear (the mask a constant)."""
    x, weight_t, b = _inputs(True, seed=1)
    score = torch.rand(12) + 0.5
    y = torch.ops.wina.topk_linear(x, weight_t, b, score, 4)
    grad = torch.randn_like(y)
    mine = torch.autograd.grad(y, (x, weight_t, b), grad)
    mask = reference.topk_mask(x.detach(), score, 4)
    y_ref = torch.nn.functional.linear(x * mask, weight_t.t(), b)
    theirs = torch.autograd.grad(y_ref, (x, weight_t, b), grad)
    for a, e in zip(mine, theirs):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


@pytest.mark.parametrize("device", ["cpu", "cpu-as-cuda", CUDA])
@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_training_through_the_backend_matches_themasked_input_hooks(family, device, monkeypatch):
    """A few SGD steps through backend="wina" (grad enabled, the default state of a model):
    the loss and the parameters follow the eager model whose linears mask their inputs.
    On CUDA the forward runs the sparse ops on the weights as stored (a training graph is
    neither grouped nor re-laid out) and the backward the masked torch ops.  "cpu-as-cuda"
    takes the backend's CUDA decisions on the CPU (``kernels_read_rows`` patched)."""
    if device == "cpu-as-cuda":
        monkeypatch.setattr(weight_layout, "kernels_read_rows", lambda weight: True)
        device = "cpu"
    model, ids = tiny_model(family, seed=11)
    twin, _ = tiny_model(family, seed=11)
    twin.load_state_dict(model.state_dict())
    model, twin, ids = model.to(device), twin.to(device), ids.to(device)
    hooks = masked_input_hooks(twin, 0.5)
    compiled = torch.compile(model, backend="wina", options={"sparsity": 0.5, "inductor": device == "cuda"})
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (model, twin)]
    losses = []
    for _ in range(4):
        step = []
        for m, opt in zip((compiled, twin), optimizers):
            opt.zero_grad()
            loss = m(ids, labels=ids).loss
            loss.backward()
            opt.step()
            step.append(loss.item())
        losses.append(step)
    for h in hooks:
        h.remove()
    torch._dynamo.reset()
    mine, theirs = zip(*losses)
    print("losses (compiled, hooked):", [(round(a, 5), round(b, 5)) for a, b in losses])
    tol = 1e-5 if device == "cpu" else 1e-3  # Triton's float32 sums run in another order
    torch.testing.assert_close(torch.tensor(mine), torch.tensor(theirs), rtol=tol, atol=tol)
    assert mine[-1] < mine[0]  # it learns
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=10 * tol, atol=tol, msg=name)
        assert p.is_contiguous(), f"{name} was re-laid out by a training graph"


def test_inductor_backward_and_counts_with_grad_enabled():
    """Inductor compiles forward and backward (AOT autograd) of a sparse MLP with measure=True;
    the gradients equal the eager masked reference's, and no_grad / inference_mode agree."""
    torch.manual_seed(3)
    mlp = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.SiLU(), torch.nn.Linear(64, 32))
    x = torch.randn(5, 32)
    compiled = torch.compile(mlp, backend="wina", options={"sparsity": 0.5, "measure": True})
    compiled(x).square().sum().backward()
    mine = [p.grad.clone() for p in mlp.parameters()]
    assert all(0.45 < r.measured_sparsity < 0.55 for r in wina_fx.last_report().sparse_rows)
    mlp.zero_grad()
    hooks = masked_input_hooks(mlp, 0.5)
    mlp(x).square().sum().backward()
    for h in hooks:
        h.remove()
    for a, p in zip(mine, mlp.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        plain = compiled(x)
    with torch.inference_mode():
        torch.testing.assert_close(compiled(x), plain)
    torch._dynamo.reset()


def test_linears_reading_each_others_outputs():
    """A linear whose input is another sparse linear's output (a stack of linears with
    no activation between): each reads the sparse op that replaced the one before."""
    torch.manual_seed(5)
    stack = torch.nn.Sequential(*[torch.nn.Linear(16, 16) for _ in range(3)])
    x = torch.randn(2, 4, 16)
    out = torch.compile(stack, backend="wina", options={"sparsity": 0.5, "inductor": False})(x)
    hooks = masked_input_hooks(stack, 0.5)
    expected = stack(x)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    torch._dynamo.reset()
