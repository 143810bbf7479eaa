"""Options are validated up front: every bad one is a ValueError naming the option."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wina_fx
from wina_fx.config import MODES, SELECTIONS, WinaConfig
from wina_fx.methods import method_names

VALID_KEYS = ("method", "sparsity", "selection", "calibration", "measure", "inductor", "mode", "pdl")

bad_options = st.one_of(
    st.builds(lambda k: {k: 1}, st.text(min_size=1).filter(lambda k: k not in VALID_KEYS)),
    st.builds(lambda m: {"method": m}, st.one_of(st.text().filter(lambda m: m not in method_names()), st.integers(), st.none())),
    st.builds(
        lambda s: {"sparsity": s},
        st.one_of(
            st.floats(allow_nan=True).filter(lambda s: math.isnan(s) or not 0 <= s < 1),
            st.integers().filter(lambda s: s != 0),
            st.booleans(),
            st.text(),
        ),
    ),
    st.builds(lambda s: {"sparsity": {"*.mlp.*": s}}, st.floats().filter(lambda s: not 0 <= s < 1)),
    st.builds(lambda s: {"selection": s}, st.text().filter(lambda s: s not in SELECTIONS)),
    st.builds(lambda v: {"measure": v}, st.one_of(st.integers(), st.text(), st.none())),
    st.builds(lambda v: {"inductor": v}, st.one_of(st.integers(), st.text(), st.none())),
    st.builds(lambda v: {"pdl": v}, st.one_of(st.integers(), st.text(), st.none())),
    st.builds(lambda m: {"mode": m}, st.one_of(st.text().filter(lambda m: m not in MODES), st.integers(), st.none())),
    st.just({"selection": "threshold"}),  # threshold needs a calibration
    st.builds(lambda c: {"calibration": c}, st.one_of(st.integers(), st.lists(st.integers()))),
    st.just({"calibration": "/nonexistent/wina.cal"}),
)


def _named_option(message: str) -> bool:
    return any(f"'{key}'" in message for key in VALID_KEYS) or "unknown option" in message


@settings(max_examples=200, deadline=None)
@given(options=bad_options)
def test_bad_options_raise_value_error_naming_the_option(options):
    with pytest.raises(ValueError) as caught:
        WinaConfig.from_options(options)
    assert _named_option(str(caught.value)), str(caught.value)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=bad_options)
def test_bad_options_through_torch_compile_raise_before_any_pass_runs(options):
    torch._dynamo.reset()
    reports_before = len(wina_fx.reports())
    compiled = torch.compile(torch.nn.Linear(4, 3), backend="wina", options=options)
    with pytest.raises(ValueError) as caught:
        compiled(torch.randn(2, 4))
    assert _named_option(str(caught.value)), str(caught.value)
    assert len(wina_fx.reports()) == reports_before  # no pass ran, nothing was reported


def test_unknown_option_lists_valid_choices():
    with pytest.raises(ValueError, match="valid options are method, sparsity, selection"):
        WinaConfig.from_options({"sparsty": 0.5})


def test_orthogonalize_option_takes_a_flag_or_a_variant():
    assert WinaConfig.from_options({"orthogonalize": True}).orthogonalize == "full"
    assert WinaConfig.from_options({"orthogonalize": "local"}).orthogonalize == "local"
    assert WinaConfig.from_options({"orthogonalize": False}).orthogonalize is None
    with pytest.raises(ValueError, match="'orthogonalize' must be True, False or one of 'full', 'local', 'shared'"):
        WinaConfig.from_options({"orthogonalize": "rotate"})


def test_greedy_allocation_needs_a_calibration_with_that_target():
    with pytest.raises(ValueError, match="sparsity_allocation='greedy' needs option 'calibration'"):
        WinaConfig.from_options({"sparsity_allocation": "greedy"})
    with pytest.raises(ValueError, match="'sparsity_allocation' must be one of 'uniform', 'greedy'"):
        WinaConfig.from_options({"sparsity_allocation": "per-layer"})


@given(s=st.floats(0, 1, exclude_max=True))
def test_good_sparsity_is_kept(s):
    assert WinaConfig.from_options({"sparsity": s}).sparsity == s


def test_pattern_sparsity_first_match_wins():
    config = WinaConfig.from_options({"sparsity": {"*.mlp.down_proj": 0.2, "*.mlp.*": 0.6}})
    assert config.sparsity_for("model.layers.3.mlp.down_proj") == 0.2
    assert config.sparsity_for("model.layers.3.mlp.up_proj") == 0.6
    assert config.sparsity_for("model.layers.3.self_attn.q_proj") is None
