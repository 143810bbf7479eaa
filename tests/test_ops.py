"""The wina custom ops against their torch reference, eagerly and under Inductor."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import wina_fx.ops  # noqa: F401
from wina_fx.kernels import reference

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _rel_err(out, ref):
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-12)).item()


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 5), min_size=0, max_size=2),
    k_in=st.integers(1, 40),
    n_out=st.integers(1, 24),
    keep_fraction=st.floats(0, 1),
    bias=st.booleans(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**31 - 1),
)
def test_topk_linear_keeps_exactly_k_and_matches_masked_dense(lead, k_in, n_out, keep_fraction, bias, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, k_in, generator=g).to(dtype)
    w = torch.randn(n_out, k_in, generator=g).to(dtype)
    b = torch.randn(n_out, generator=g).to(dtype) if bias else None
    score = torch.rand(k_in, generator=g) + 0.1
    k = round(keep_fraction * k_in)
    mask = reference.topk_mask(x, score, k)
    assert (mask.sum(-1) == k).all()
    # the kept channels are the ones of largest importance
    imp = reference.importance(x, score)
    if 0 < k < k_in:
        assert (imp.masked_fill(~mask, float("inf")).amin(-1) >= imp.masked_fill(mask, -float("inf")).amax(-1)).all()
    out = torch.ops.wina.topk_linear(x, w.t(), b, score, k)
    expected = torch.nn.functional.linear((x.double() * mask), w.double(), None if b is None else b.double())
    assert out.dtype == dtype and out.shape == (*lead, n_out)
    if expected.norm() > 0:
        assert _rel_err(out, expected) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_threshold_linear_matches_reference(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 7, 33, generator=g).to(dtype)
    w = torch.randn(17, 33, generator=g).to(dtype)
    score = torch.rand(33, generator=g) + 0.5
    threshold = 0.7
    out = torch.ops.wina.threshold_linear(x, w.t(), None, score, threshold)
    mask = (x.abs().float() * score) > threshold
    expected = (x.double() * mask) @ w.double().t()
    assert _rel_err(out, expected) < (1e-5 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("op", ["topk_linear", "threshold_linear"])
def test_opcheck(op):
    x, w_t, b, score = torch.randn(2, 5, 12), torch.randn(12, 6), torch.randn(6), torch.rand(12)
    rule = 7 if op == "topk_linear" else 0.3
    torch.library.opcheck(getattr(torch.ops.wina, op).default, (x, w_t, b, score, rule))


def test_ops_under_inductor_match_eager():
    g = torch.Generator().manual_seed(2)
    x, w, score = torch.randn(4, 9, 32, generator=g), torch.randn(20, 32, generator=g), torch.rand(32, generator=g)
    counts = torch.zeros(1, 2, dtype=torch.float64)

    def f(x, w, counts):
        y = torch.ops.wina.topk_linear(x, w.t(), None, score, 8)
        torch.ops.wina.count_kept(counts, 0, x, score, 8, 0.0)
        return torch.ops.wina.threshold_linear(torch.relu(y), w[:20, :20], None, score[:20], 0.5)

    eager_counts = torch.zeros(1, 2, dtype=torch.float64)
    expected = f(x, w, eager_counts)
    out = torch.compile(f, backend="inductor", fullgraph=True)(x, w, counts)
    assert _rel_err(out, expected) < 1e-5
    assert counts.tolist() == eager_counts.tolist() == [[4 * 9 * 8, 4 * 9 * 32]]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("N, sparsity, kernel", [(4096, 0.5, "_gemv_masked_kernel"), (14336, 0.65, "_gemv_kernel")])
def test_cuda_compiled_one_token_step_is_the_gemv_kernel_alone(N, sparsity, kernel):
    """Compiled at one token, a split-K sparse linear is its GEMV launch and nothing else:
    the partial sums meet through the tickets (and float32 sums) of the shared workspace,
    which the kernels leave zero (no zero-fill, copy or reduce kernel in Inductor's code),
    and repeated calls with fresh inputs stay right."""
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(4096, N, device="cuda", generator=g) / 64).half().t()  # W (N, 4096) stored as W^T, as the backend does
    score = w.float().norm(dim=0)
    x = torch.randn(1, 4096, device="cuda", generator=g).half()
    threshold = (x.abs().float() * score).quantile(sparsity).item()

    def f(x, w):
        return torch.ops.wina.threshold_linear(x, w.t(), None, score, threshold, sparsity)

    compiled = torch.compile(f, fullgraph=True)
    _, codes = run_and_get_code(compiled, x, w)
    code = "\n".join(codes)
    assert kernel in code
    # What runs is in call(); the kernels' own source (docstrings included) sits above it.
    launches = code[code.rindex("def call("):]
    for unwanted in ("_splitk_reduce_kernel", "triton_poi", "clone", "copy_", "fill"):
        assert unwanted not in launches, unwanted
    for _ in range(3):
        x = torch.randn(1, 4096, device="cuda", generator=g).half()
        mask = (x.abs().float() * score) > threshold
        expected = (x.double() * mask) @ w.double().t()
        assert _rel_err(compiled(x, w), expected) < 2e-2
        assert _rel_err(f(x, w), expected) < 2e-2


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9,
                    reason="needs a CUDA GPU of sm_90 or newer")
def test_cuda_compiled_with_programmatic_dependent_launch_stays_right():
    """With Inductor's programmatic dependent launch, the kernel after a GEMV may start
    while the GEMV runs (each GEMV program lets it launch first thing) and must wait for the
    GEMV's output before reading it: GEMV -> pointwise -> GEMV -> pointwise, fresh inputs
    each call, against the float64 reference."""
    import torch._inductor.config as inductor_config
    from torch._inductor.utils import run_and_get_code

    if not hasattr(inductor_config.triton, "enable_pdl"):
        pytest.skip(f"torch {torch.__version__}: Inductor has no programmatic dependent launch")
    torch._dynamo.reset()
    g = torch.Generator(device="cuda").manual_seed(0)
    w1 = (torch.randn(4096, 14336, device="cuda", generator=g) / 64).half()  # W^T of a (14336, 4096) linear
    w2 = (torch.randn(14336, 4096, device="cuda", generator=g) / 120).half()
    s1, s2 = w1.float().norm(dim=1), w2.float().norm(dim=1)
    x0 = torch.randn(1, 4096, device="cuda", generator=g).half()
    t1 = (x0.abs().float() * s1).quantile(0.5).item()
    h0 = torch.relu((x0.float() @ w1.float()) * 1.5 + 0.25)
    t2 = (h0.abs() * s2).quantile(0.65).item()

    def f(x):
        h = torch.relu(torch.ops.wina.threshold_linear(x, w1, None, s1, t1, 0.5) * 1.5 + 0.25)
        return torch.ops.wina.threshold_linear(h, w2, None, s2, t2, 0.65) * 2.0 - 1.0

    def reference(x):
        h = torch.relu(((x.double() * ((x.abs().float() * s1) > t1)) @ w1.double()).half() * 1.5 + 0.25)
        return ((h.double() * ((h.abs().float() * s2) > t2)) @ w2.double()) * 2.0 - 1.0

    with inductor_config.patch({"triton.enable_pdl": True}):
        compiled = torch.compile(f, fullgraph=True)
        _, codes = run_and_get_code(compiled, x0)
        assert "gdc_wait" in "\n".join(codes)
        for _ in range(20):
            x = torch.randn(1, 4096, device="cuda", generator=g).half()
            assert _rel_err(compiled(x), reference(x)) < 2e-2


def test_workspace_has_the_shape_of_its_fake_after_a_larger_call():
    """The shared workspace grows for a wide linear (over 2**16 int32: gate/up of a model
    with a 53248-wide MLP) and is then asked for by a narrower one: the op still returns
    exactly the shape its fake kernel promises, which Inductor asserts on every call."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    device = torch.device("cpu")
    for numel in (200_000, 10, 70_000, 1 << 16):
        real = torch.ops.wina.workspace(device, numel)
        with FakeTensorMode():
            fake = torch.ops.wina.workspace(device, numel)
        assert real.shape == fake.shape and real.dtype == fake.dtype == torch.int32, numel
        assert not real.any()
    torch.library.opcheck(torch.ops.wina.workspace.default, (device, 10))
