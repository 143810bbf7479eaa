"""Orthogonalization, step 4: what the pass did, for ``wina_fx.last_report()`` and for
the tests (which weights got orthogonal columns, which linears were left and why)."""
from __future__ import annotations

import dataclasses

from .analysis import _kind, _linear_name, _norm_name

@dataclasses.dataclass
class RotatedGroup:
    """The linears that read one stretch of the residual stream (through one norm)."""

    norm: str | None  # the RMSNorm whose output they read (None: they read the stream itself)
    readers: list[str]
    role: str  # "attention", "mlp", "head" or "other"
    basis: int  # index of the stretch it reads ("full", "shared": equal index, equal Q)
    source: str | None = None  # where its own Q came from, e.g. "model.layers.0.self_attn.k_proj"
    source_kind: str | None = None  # the source spec used, e.g. "k_proj" or "identity"
    # (linear, row0, row1) of the weights whose stacked rows have orthogonal columns after
    # the transform (the first part of the source spec); empty when not rotated by its own Q.
    source_rows: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class OrthogonalizeReport:
    """What ``orthogonalize`` did to one graph (or, with ``applied`` False, why it did nothing)."""

    variant: str
    sources: dict[str, str] = dataclasses.field(default_factory=dict)
    applied: bool = False
    reason: str | None = None  # why the graph was left unchanged
    hidden_size: int | None = None
    norms_folded: list[str] = dataclasses.field(default_factory=list)
    groups: list[RotatedGroup] = dataclasses.field(default_factory=list)
    writers: list[str] = dataclasses.field(default_factory=list)  # linears writing into the stream (Q^T W)
    # Linears whose input basis the pass leaves as it was, and why.
    untouched: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    # d x d rotations added to the run-time graph: on the residual path ("full") or on a
    # norm's output ("local"). They are dense einsums, not linears: no pass gates them.
    shortcut_rotations: int = 0
    input_rotations: int = 0
    rotation_parameters: int = 0
    rotation_flops_per_token: int = 0
    rotation_bytes_per_token: int = 0  # read once per decoded token at batch 1
    linear_weight_bytes: int = 0  # all linear weights of the graph, output head included
    untied_bytes: int = 0  # extra memory because tied weights (embedding / head) got separate copies
    tied: list[str] = dataclasses.field(default_factory=list)
    copied_bytes: int = 0  # all new constants (the user's parameters stay as they are)
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def rotations(self) -> int:
        return self.shortcut_rotations + self.input_rotations

    @property
    def rotation_bytes_ratio(self) -> float:
        """Bytes of the run-time rotations per decoded token relative to the linear weights'."""
        return self.rotation_bytes_per_token / self.linear_weight_bytes if self.linear_weight_bytes else 0.0

    def group(self, reader: str) -> RotatedGroup:
        for group in self.groups:
            if reader in group.readers:
                return group
        raise KeyError(f"no group reads the residual stream with linear {reader!r}")


def _describe(report, structure, chosen, roles, by_node, sites, variant, q_compute, input_rotations):
    local_rotated = {id(group) for group, _ in input_rotations}
    for group, role in zip(structure.groups, roles):
        names = [_linear_name(by_node, r) for r in group.readers]
        entry = RotatedGroup(_norm_name(group.norm) if group.norm else None, names, role, group.basis)
        own = group.basis in chosen and chosen[group.basis][0] is group
        if variant == "shared":
            if q_compute[group.basis] is not None:
                entry.source = "shared: eigenvectors of the summed, trace-normalised Gram matrices of the sources"
                entry.source_kind = "shared"
        elif own:
            pieces = chosen[group.basis][2]
            entry.source_kind = "+".join(kind for kind, _ in pieces)
            if pieces[0][0] == "identity":
                entry.source = "identity (not rotated)"
            elif variant == "full" or id(group) in local_rotated:
                described = []
                for kind, entries in pieces:
                    for node, name, r0, r1 in entries:
                        full = by_node[node].weight.shape[0]
                        described.append(name if (r0, r1) == (0, full) else f"{name}[{r0}:{r1}]")
                        if kind == pieces[0][0]:
                            entry.source_rows.append((name, r0, r1))
                joined = " + ".join(described)
                entry.source = f"stack({', '.join(described)})" if pieces[0][0] == "stack" else joined
        report.groups.append(entry)
    rotated_readers = {r for g in structure.groups for r in g.readers}
    writers = {a.writer for a in structure.adds}
    for site in sites:
        if site.node in rotated_readers:
            continue
        kind = _kind(site.name)
        if kind in ("o_proj", "dense", "out_proj") or "attn" in site.name or "attention" in site.name:
            why = ("its input is the attention output: it could only be rotated per head through v_proj, "
                   "which would change the values the graph returns in the KV cache")
        elif kind in ("down_proj", "fc2", "w2") or "mlp" in site.name:
            why = ("its input follows an elementwise product (act(gate) * up): only permutations and "
                   "diagonal scalings commute with it, and those leave WINA's choice unchanged")
        else:
            why = "it does not read the residual stream"
        if site.node in writers and variant != "local":
            why += "; as a writer into the stream it becomes Q^T W, which keeps W^T W (its column norms and angles)"
        report.untouched.append((site.name, why))


def _write_notes(report: OrthogonalizeReport) -> None:
    mib = 1 / 2**20
    own = [g for g in report.groups if g.source is not None]
    by_role: dict[str, set] = {}
    for g in own:
        by_role.setdefault(g.role, set()).add(g.source_kind)
    sources = "; ".join(f"{role}: {', '.join(sorted(kinds))}" for role, kinds in sorted(by_role.items()))
    rotated = [g for g in own if g.source_kind != "identity"]
    if report.variant == "local":
        report.notes.append(
            f"orthogonalize (local): rotated the inputs of {len(rotated)} groups of linears in place "
            f"(x Q after the norm, W Q; sources {sources}); residual stream, norms, embedding and head unchanged"
        )
    else:
        report.notes.append(
            f"orthogonalize ({report.variant}): folded {len(report.norms_folded)} RMSNorm scales; the residual stream "
            f"(width {report.hidden_size}) is rotated in {len(report.groups)} stretches ({len(rotated)} with their "
            f"own Q; sources {sources}); {len(report.writers)} writers, the embedding and the head rotated to match"
        )
    report.notes.append(
        f"orthogonalize: {report.rotations} run-time rotations ({report.shortcut_rotations} on the residual path, "
        f"{report.input_rotations} on norm outputs) add {report.rotation_parameters / 1e6:.2f}M parameters, "
        f"{report.rotation_flops_per_token / 1e6:.1f} MFLOP per token and {report.rotation_bytes_per_token * mib:.1f} MiB "
        f"read per decoded token ({100 * report.rotation_bytes_ratio:.1f}% of the linear weights' "
        f"{report.linear_weight_bytes * mib:.1f} MiB)"
    )
    if report.untied_bytes:
        report.notes.append(
            f"orthogonalize: untied {', '.join(report.tied)} (shared by the embedding and the head): each now reads "
            f"its own transformed copy, +{report.untied_bytes * mib:.1f} MiB"
        )
    report.notes.append(
        f"orthogonalize: transformed weights are new constants of the compiled graph ({report.copied_bytes * mib:.1f} MiB); "
        "the model's parameters are unchanged"
    )
    kinds: dict = {}
    for name, why in report.untouched:
        kinds[(_kind(name), why)] = kinds.get((_kind(name), why), 0) + 1
    for (kind, why), n in kinds.items():
        report.notes.append(f"orthogonalize: {n} x {kind}: input not rotated: {why}")

