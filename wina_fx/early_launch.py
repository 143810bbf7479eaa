"""Programmatic dependent launch (PDL) for the graphs the backend gives Inductor.

On an sm_90+ GPU a kernel launched with PDL may start while the kernel before it on the
stream still runs; it must wait (``griddepcontrol.wait``) before it touches what that kernel
writes.  Its blocks are then resident and waiting when the kernel before it ends, instead
of being launched only then.

* Inductor launches its own kernels that way under ``config.triton.enable_pdl``
  (``INDUCTOR_PATCHES``).
* It never launches a user-defined Triton kernel that way (torch 2.11-2.13: the
  ``triton_meta`` that ``define_user_defined_triton_kernel`` writes has no ``launch_pdl``),
  since it cannot know that the kernel waits.  The sparse GEMVs do wait
  (``sparse_linear_kernels.LAUNCHED_EARLY``), so while the backend compiles a graph,
  ``gemvs_launched_early`` adds ``'launch_pdl': True`` to the metadata Inductor writes for
  exactly those kernels (through a wrapper of Inductor's ``define_user_defined_triton_kernel``,
  installed once, that passes everything through outside that context).  Where Inductor
  writes that metadata differently, nothing is changed and a warning says so: the GEMVs
  then launch the usual way, and their wait returns at once.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import warnings

import torch

# Inductor's config patch that launches its own kernels early.
INDUCTOR_PATCHES = {"triton.enable_pdl": True}
# What Inductor writes into the generated module for a user kernel: the decorator's keyword.
_META = "triton_meta={"
_LAUNCH_EARLY = "'launch_pdl': True, "


def wanted(example_inputs) -> bool:
    """The graph runs on one sm_90+ GPU and this torch's Inductor can launch its kernels
    early (``triton.enable_pdl``)."""
    from torch._inductor import config as inductor_config

    devices = {x.device for x in example_inputs if isinstance(x, torch.Tensor)}
    if not hasattr(inductor_config.triton, "enable_pdl") or len(devices) != 1 or devices == {torch.device("cpu")}:
        return False
    from wina_fx.kernels.sparse_linear import hopper  # Triton is there wherever a GPU is

    return hopper(devices.pop())


def mark_launched_early(code: str) -> str:
    """The generated definition ``code`` of one user kernel with ``launch_pdl`` in its
    ``triton_meta``; unchanged, with a warning, if that keyword is not found exactly once."""
    if code.count(_META) != 1:
        warnings.warn("wina: this torch writes a user Triton kernel's triton_meta in a form the backend does not "
                      "recognize; the sparse GEMVs launch without programmatic dependent launch", stacklevel=2)
        return code
    return code.replace(_META, _META + _LAUNCH_EARLY)


@contextlib.contextmanager
def gemvs_launched_early():
    """Within (this thread or task): Inductor's wrapper codegen defines the kernels of
    ``LAUNCHED_EARLY`` with ``launch_pdl`` (see the module docstring); every other kernel,
    and every kernel outside, as before."""
    _install()
    token = _ACTIVE.set(True)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


# On only inside gemvs_launched_early, per thread, so that concurrent or nested compiles
# cannot leave it on (the wrapper below is installed once and otherwise passes through).
_ACTIVE = contextvars.ContextVar("wina_gemvs_launched_early", default=False)


def _install() -> None:
    """Wrap ``PythonWrapperCodegen.define_user_defined_triton_kernel``, once per process."""
    from torch._inductor.codegen.wrapper import PythonWrapperCodegen
    from wina_fx.kernels.sparse_linear_kernels import LAUNCHED_EARLY

    define_user_kernel = PythonWrapperCodegen.define_user_defined_triton_kernel
    if getattr(define_user_kernel, "wina_early_launch", False):
        return

    def define_early(self, kernel, *args, **kwargs):
        if not _ACTIVE.get() or not any(kernel is k for k in LAUNCHED_EARLY):
            return define_user_kernel(self, kernel, *args, **kwargs)
        own = vars(self).get("define_kernel")  # an instance's own define_kernel, if it has one
        define_kernel = self.define_kernel
        self.define_kernel = lambda name, code, *rest, **named: define_kernel(name, mark_launched_early(code),
                                                                              *rest, **named)
        try:
            return define_user_kernel(self, kernel, *args, **kwargs)
        finally:
            if own is None:
                del self.define_kernel  # the class's method again
            else:
                self.define_kernel = own

    define_early.wina_early_launch = True
    functools.update_wrapper(define_early, define_user_kernel)
    PythonWrapperCodegen.define_user_defined_triton_kernel = define_early
