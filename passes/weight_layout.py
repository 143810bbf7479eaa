"""Store each sparse weight the way the CUDA kernels read it, in place: one copy of the weights.

A sparse linear skips the columns W[:, i] of the input channels it drops.  The kernels
read W^T (K, N), whose row i is that column, so a dropped channel is one skipped
contiguous row; ``torch.nn.Linear`` stores W (N, K) row-major, where column i is strided.
Keeping a transposed copy beside the user's parameter doubles the memory of the
model, so instead the parameter's storage is changed in place: its values stay
bit-identical, the tensor becomes a transposed view (W.t() contiguous, strides (1, ld)),
and linears that read the same input (q/k/v, gate/up) are stored side by side in one
buffer, so that one launch reads them all (``passes/group.py``).  Dense code using the
module keeps working as before: cuBLAS reads the transposed layout directly.

Changing a parameter's strides changes what dynamo guards on, so the backend cannot
do it while it compiles: ``RelayoutFirst`` does it on the first call and runs that call
as traced; dynamo then retraces once and the backend compiles against the new layout.
"""
from __future__ import annotations

import warnings

import torch
import torch.fx as fx

from wina_fx import sharded

from .find_linears import LinearSite

MAX_SIDE_BY_SIDE = 3  # what one grouped launch takes (q/k/v)


def kernels_read_rows(weight: torch.Tensor) -> bool:
    """True where the sparse ops run the Triton kernels, which need W^T rows contiguous (for
    a DTensor: its local shard's)."""
    return weight.is_cuda


def has_row_layout(weight: torch.Tensor) -> bool:
    """W (N, K) is stored as W^T with unit column stride: input channel i is a contiguous row."""
    weight = sharded.local(weight)
    n, k = weight.shape
    wt = weight.t()
    return (wt.stride(1) == 1 or n == 1) and (wt.stride(0) >= n or k == 1)


def has_expert_row_layout(stacked: torch.Tensor, transposed: bool) -> bool:
    """A 3-D expert weight (E, N, K) is stored so that each W_e^T (K, N) has unit column
    stride (``transposed``: it is stored (E, K, N) already, W_e^T itself)."""
    wt = stacked if transposed else stacked.transpose(1, 2)
    return wt.stride(2) == 1 and wt.stride(1) >= wt.shape[2]


def expert_pending(sites: list[LinearSite], gated: set[int]) -> list[list[torch.Tensor]]:
    """The 3-D expert weights of gated experts that the kernels will read and that are not
    yet stored with W_e^T rows contiguous, each once and as a set of its own."""
    todo, seen = [], set()
    for i in sorted(gated):
        site = sites[i]
        w = site.stacked
        if w is None or id(w) in seen or not kernels_read_rows(w) or trains(w):
            continue
        seen.add(id(w))
        if not has_expert_row_layout(w, site.weight_is_transposed):
            todo.append([w])
    return todo


def needs_transposed_copy(site: LinearSite) -> bool:
    """The kernels will read this linear's weight, and it is not stored as W^T: the gate
    pass then reads a transposed copy (the backend re-lays weights out first, so only a
    caller of the passes alone gets here).  Never for a weight being trained: a copy would
    go stale at the first optimizer step and cut the gradient; it is read through a view
    (the launcher copies it per one-token call; batched steps run cuBLAS on the view)."""
    return (not site.weight_is_transposed and kernels_read_rows(site.weight) and not has_row_layout(site.weight)
            and not trains(site.weight) and not sharded.is_sharded(site.weight))


def trains(weight: torch.Tensor) -> bool:
    """The graph being traced backpropagates into this weight."""
    return torch.is_grad_enabled() and weight.requires_grad


def side_by_side(weights_t: list[torch.Tensor]) -> torch.Tensor | None:
    """The (K, sum N_g) view holding the W_g^T given, when they are adjacent column ranges
    of one buffer in this order; None otherwise."""
    first = weights_t[0]
    ld, offset, cols = first.stride(0), first.storage_offset(), 0
    for wt in weights_t:
        same_buffer = wt.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        if not same_buffer or wt.dtype != first.dtype or wt.shape[0] != first.shape[0] or wt.stride() != (ld, 1):
            return None
        if wt.storage_offset() != offset + cols:
            return None
        cols += wt.shape[1]
    if cols > ld:
        return None
    return first.as_strided((first.shape[0], cols), (ld, 1), offset)


def sibling_sets(sites: list[LinearSite], grouped: set[int], alone: set[int]) -> list[list[int]]:
    """Indices of ``sites`` whose weights share one buffer: linears of ``grouped`` reading
    the same input, in graph order, up to MAX_SIDE_BY_SIDE at a time (what the group pass
    merges); every index of ``alone`` on its own."""
    by_input: dict[fx.Node, list[int]] = {}
    for index in sorted(grouped):
        by_input.setdefault(sharded.wrapped_local(sites[index].input), []).append(index)
    sets = [[i] for i in sorted(alone - grouped)]
    for members in by_input.values():
        for start in range(0, len(members), MAX_SIDE_BY_SIDE):
            chunk = members[start:start + MAX_SIDE_BY_SIDE]
            same_k = {(sites[i].in_features, sites[i].weight.dtype, sites[i].weight.device) for i in chunk}
            sets.extend([chunk] if len(same_k) == 1 else [[i] for i in chunk])
    return sets


def pending(sites: list[LinearSite], sets: list[list[int]]) -> list[list[torch.Tensor]]:
    """The weights of the sets not yet stored as the kernels read them (each weight once)."""
    todo, seen = [], set()
    for indices in sets:
        weights = []
        for i in indices:
            w = sites[i].weight
            if id(w) not in seen and not sites[i].weight_is_transposed:
                seen.add(id(w))
                weights.append(w)
        if not weights or not kernels_read_rows(weights[0]):
            continue
        if all(has_row_layout(w) for w in weights) and (
                len(weights) == 1 or side_by_side([sharded.local(w).t() for w in weights]) is not None):
            continue
        todo.append(weights)
    return todo


def relayout(sets: list[list[torch.Tensor]]) -> int:
    """Store each set's weights side by side as W^T in one new buffer, in place (``.data``),
    one set at a time (the old storage is freed as soon as nothing else holds it); a 3-D
    expert weight (a set of its own) is stored with each expert's W_e^T contiguous, in its
    own storage where nothing else holds that (``_transpose_experts_in_place``).  Values
    are copied bit for bit.  Returns the bytes re-laid out."""
    moved = 0
    with torch.no_grad():
        for weights in sets:
            if weights[0].dim() == 3:  # an expert weight (E, N, K): each W_e^T contiguous
                w = weights[0]
                if not _transpose_experts_in_place(w):
                    w.data = w.data.transpose(1, 2).contiguous().transpose(1, 2)
                moved += w.numel() * w.element_size()
                continue
            local = [sharded.local(w) for w in weights]  # DTensors: their local shards side by side
            buffer = torch.empty(local[0].shape[1], sum(w.shape[0] for w in local), dtype=local[0].dtype,
                                 device=local[0].device)
            col = 0
            for outer, w in zip(weights, local):
                n = w.shape[0]
                buffer[:, col:col + n].copy_(w.t())
                w.data = buffer[:, col:col + n].t()
                if outer is not w:
                    _match_local(outer)
                col += n
            moved += buffer.numel() * buffer.element_size()
    return moved


def _transpose_experts_in_place(weight: torch.Tensor) -> bool:
    """Store a contiguous (E, N, K) expert weight as E blocks W_e^T (K, N) in the same
    storage, one expert at a time through a staging tile of one expert: the peak grows by
    1/E of the weight instead of a whole second copy (a Mixtral-8x7B layer's gate/up weight
    is 1.75 GiB).  Expert e's block takes exactly the bytes W_e held, so each block is read
    whole before it is overwritten.  Done only where nothing but ``weight`` holds the
    storage (a view or a state_dict taken earlier would see its values change) and it is
    not a DTensor; returns False, changing nothing, otherwise."""
    if sharded.is_sharded(weight) or not weight.is_contiguous() or _storage_users(weight) > 1:
        return False
    stacked = weight.data
    experts, n, k = stacked.shape
    base = stacked.storage_offset()
    staging = torch.empty(k, n, dtype=stacked.dtype, device=stacked.device)
    for e in range(experts):
        staging.copy_(stacked[e].t())
        stacked.as_strided((k, n), (n, 1), base + e * n * k).copy_(staging)
    weight.data = stacked.as_strided((experts, n, k), (n * k, 1, n), base)
    return True


def _storage_users(tensor: torch.Tensor) -> int:
    """How many tensors (views included) share ``tensor``'s storage, itself counted."""
    return torch._C._storage_Use_Count(tensor.untyped_storage()._cdata) - 1  # less the storage object asked


def _match_local(weight) -> None:
    """Give a DTensor the storage offset and strides of its re-laid-out local shard (the
    same object, its values unchanged): dynamo cannot make a fake DTensor whose local
    tensor starts at another offset than its own (pytorch/pytorch#119071)."""
    local = weight._local_tensor
    weight.data = type(weight).from_local(local, weight.device_mesh, weight.placements, run_check=False,
                                          shape=weight.shape, stride=local.stride())
    weight._local_tensor = local  # the shard object the sites and graphs already hold (torch 2.13 keeps it)


class RelayoutFirst:
    """The callable the backend returns when the model's weights must be re-laid out first.

    First call: re-lay the weights out in place (saying so once), rewrite the graph into
    its sparse ops (``rewrite``) and run it op by op: the first result is already the
    sparse model's.  The weights' strides no longer match dynamo's guards, so the next
    call retraces and the backend compiles against the new layout.  Should dynamo not
    retrace (weights it does not guard), the second call compiles the rewritten graph here.
    """

    def __init__(self, sets: list[list[torch.Tensor]], rewrite, gm: fx.GraphModule, compile_graph):
        self.sets, self.rewrite, self.gm, self.compile_graph = sets, rewrite, gm, compile_graph
        self.compiled = None

    def __call__(self, *args):
        if self.sets is not None:
            moved = relayout(self.sets)
            experts = sum(w[0].dim() == 3 for w in self.sets)
            what = f"{sum(map(len, self.sets)) - experts} sparse linears" + (f" and {experts} expert weights"
                                                                            if experts else "")
            warnings.warn(
                f"wina: stored the weights of {what} transposed, in place "
                f"({moved / 2**20:.0f} MiB; values unchanged, q/k/v and gate/up side by side) so that the "
                "compiled model holds one copy of them; dense use of the module is unaffected, but the "
                "tensors are no longer contiguous (call .contiguous() before saving with safetensors). "
                "This call runs op by op; dynamo recompiles at the next one.",
                stacklevel=2)
            self.sets = None
            self.rewrite()
            return self.gm(*args)
        if self.compiled is None:
            self.compiled = self.compile_graph()
        return self.compiled(*args)
