"""The sparse GEMVs are launched early (PDL) by the code Inductor generates, and nothing else is.

Runs Inductor's own wrapper codegen for user kernels (``define_user_defined_triton_kernel``)
in a fresh process against a CUDA target (no GPU needed: the codegen only asks the driver
for its target), then reads the ``triton_meta`` back out of the generated module the way
Python would.  ``test_backend.py`` checks the same on a GPU through torch.compile.
"""
import warnings

import pytest
from test_kernel_effects import _run_compiled_triton

from wina_fx.early_launch import mark_launched_early

pytest.importorskip("triton")

SCRIPT = r'''
import ast, json, threading, torch, torch.fx as fx
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

class CudaTarget:
    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

driver.set_active(CudaTarget())
from torch._inductor import ir
from torch._inductor.codegen.wrapper import PythonWrapperCodegen
from torch._inductor.graph import GraphLowering
from torch._inductor.runtime.hints import DeviceProperties
from torch._inductor.virtualized import V
from wina_fx.early_launch import gemvs_launched_early
from wina_fx.kernels import sparse_linear_kernels as kern

class Recording(PythonWrapperCodegen):
    def define_kernel(self, name, code, *rest, **named):
        self.written.append(code)

CONSTANTS = dict(SPLIT_K=1, MODE=0, HAS_BIAS=False, REDUCE=1, BLOCK_N=32, BLOCK_R=16, BLOCK_KS=64, BLOCK_K=32,
                 STAGES=1, GROUPS=1, ENDS_ALIGNED=True, EXPERTS=False, ROW_SUM=False, PDL=True, SPLIT_P2=1)

def written_meta(kernel):
    """The triton_meta of ``kernel`` in the module Inductor's wrapper writes for one launch."""
    graph = GraphLowering(fx.symbolic_trace(lambda x: x), example_inputs=[torch.zeros(1)])
    with V.set_graph_handler(graph):
        graph.current_device = torch.device("cpu")
        kwargs = {}
        for name in kernel.arg_names:
            if name.endswith("_ptr"):
                layout = ir.FixedLayout(torch.device("cpu"), torch.float16, [64])
                kwargs[name] = graph.graph_inputs[name] = ir.InputBuffer(name=name, layout=layout)
            else:
                kwargs[name] = CONSTANTS.get(name, 64)
        wrapper = Recording()
        wrapper.written = []
        wrapper.define_user_defined_triton_kernel(kernel, [], kwargs, [], [], [[1, 1, 1]], None)
    (code,) = wrapper.written
    source = ast.parse(code).body[0].value.args[1].value  # async_compile.triton(name, source, ...)
    functions = [node for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)]
    (meta,) = [k.value for f in functions for d in f.decorator_list if isinstance(d, ast.Call) for k in d.keywords
               if k.arg == "triton_meta"]
    return eval(compile(ast.Expression(meta), "triton_meta", "eval"), {"DeviceProperties": DeviceProperties})

names = ("_gemv_kernel", "_gemv_masked_kernel", "_splitk_reduce_kernel")
result = {"usual": {n: written_meta(getattr(kern, n)).get("launch_pdl") for n in names}}
with gemvs_launched_early():
    result["early"] = {n: written_meta(getattr(kern, n)).get("launch_pdl") for n in names}
    other = []  # a compile in another thread meanwhile is not patched
    thread = threading.Thread(target=lambda: other.append(written_meta(kern._gemv_kernel).get("launch_pdl")))
    thread.start(); thread.join()
    result["other thread"] = other
result["after"] = written_meta(kern._gemv_kernel).get("launch_pdl")
print(json.dumps(result))
'''


def test_inductor_writes_launch_pdl_for_the_gemvs_only_inside_the_patch():
    """Inside ``gemvs_launched_early`` (and only in its thread) both GEMVs carry
    ``launch_pdl``; the split-K reduce kernel, which does not wait, never does."""
    result = _run_compiled_triton(SCRIPT)
    assert result["usual"] == {"_gemv_kernel": None, "_gemv_masked_kernel": None, "_splitk_reduce_kernel": None}
    assert result["early"] == {"_gemv_kernel": True, "_gemv_masked_kernel": True, "_splitk_reduce_kernel": None}
    assert result["after"] is None
    assert result["other thread"] == [None]


def test_an_unrecognized_definition_is_left_as_it_is_with_a_warning():
    code = "@triton_heuristics.user_autotune(configs=[], meta={'signature': {}})"
    with pytest.warns(UserWarning, match="without programmatic dependent launch"):
        assert mark_launched_early(code) == code
    twice = "triton_meta={'a': 1}, triton_meta={'b': 2}"
    with pytest.warns(UserWarning):
        assert mark_launched_early(twice) == twice
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert mark_launched_early("triton_meta={'a': 1}") == "triton_meta={'launch_pdl': True, 'a': 1}"
