"""What a compilation did to each linear: rewritten or left dense (and why)."""
from __future__ import annotations

import dataclasses
from collections import Counter

import torch


@dataclasses.dataclass
class ReportRow:
    name: str
    status: str  # "sparse" or "dense: <reason>"
    target_sparsity: float | None
    in_features: int | None
    out_features: int | None
    # Filled at run time when option measure=True: (kept, seen) channel counts.
    counts: torch.Tensor | None = dataclasses.field(default=None, repr=False)
    score: str | None = None  # what a sparse linear ranked its channels by

    @property
    def measured_sparsity(self) -> float | None:
        """Fraction of input channels skipped over every call so far (None if unmeasured)."""
        if self.counts is None:
            return None
        kept, seen = self.counts.tolist()
        return None if seen == 0 else 1.0 - kept / seen


class Report:
    """The report of one backend call (one dynamo graph)."""

    def __init__(self, rows: list[ReportRow], method: str, selection: str, notes: list[str] | None = None,
                 orthogonalize=None):
        self.rows = rows
        self.method = method
        self.selection = selection
        self.notes = notes or []
        # The OrthogonalizeReport of the prepass, when option orthogonalize asked for one.
        self.orthogonalize = orthogonalize

    def row(self, name: str) -> ReportRow:
        for row in self.rows:
            if row.name == name:
                return row
        raise KeyError(f"no linear named {name!r} in this report")

    @property
    def sparse_rows(self) -> list[ReportRow]:
        return [r for r in self.rows if r.status == "sparse"]

    def weighted_sparsity(self, measured: bool = False) -> float | None:
        """Sparsity over all linears, each weighted by its weight's size (dense ones count 0)."""
        total = skipped = 0.0
        for row in self.rows:
            if row.in_features is None:
                continue
            size = row.in_features * row.out_features
            total += size
            value = row.measured_sparsity if measured else row.target_sparsity
            if row.status == "sparse":
                if value is None:
                    return None
                skipped += size * value
        return skipped / total if total else None

    def summary(self) -> str:
        dense_reasons = Counter(r.status for r in self.rows if r.status != "sparse")
        lines = [
            f"wina-fx: method={self.method} selection={self.selection}: "
            f"{len(self.sparse_rows)} of {len(self.rows)} linears sparse"
        ]
        for reason, count in sorted(dense_reasons.items()):
            lines.append(f"  {count} x {reason}")
        sized = [r for r in self.rows if r.in_features is not None]
        total = sum(r.in_features * r.out_features for r in sized)
        if total:
            sparse = sum(r.in_features * r.out_features for r in sized if r.status == "sparse")
            lines.append(f"  sparse linears hold {sparse / total:.1%} of the weights read by matmuls "
                         f"({sparse:,} of {total:,} elements)")
        target = self.weighted_sparsity()
        if target is not None:
            lines.append(f"  size-weighted sparsity of all linears: target {target:.3f}")
        measured = self.weighted_sparsity(measured=True)
        if measured is not None and self.sparse_rows:
            lines.append(f"  size-weighted sparsity of all linears: measured {measured:.3f}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        def fmt(value):
            return "-" if value is None else f"{value:.3f}"

        width = max([len(r.name) for r in self.rows] + [6])
        lines = [f"{'linear':<{width}}  {'K x N':>13}  {'target':>6}  {'measured':>8}  status"]
        for r in self.rows:
            shape = "?" if r.in_features is None else f"{r.in_features} x {r.out_features}"
            lines.append(
                f"{r.name:<{width}}  {shape:>13}  {fmt(r.target_sparsity):>6}  "
                f"{fmt(r.measured_sparsity):>8}  {r.status}" + (f" ({r.score})" if r.score else "")
            )
        return "\n".join(lines + ["", self.summary()])

    def __repr__(self) -> str:
        return f"<wina_fx.Report: {len(self.sparse_rows)}/{len(self.rows)} linears sparse>"


_REPORTS: list[Report] = []


def record(report: Report) -> None:
    _REPORTS.append(report)
    del _REPORTS[:-64]  # keep the recent ones only


def last_report() -> Report:
    """The report of the most recent ``backend="wina"`` compilation (one dynamo graph)."""
    if not _REPORTS:
        raise RuntimeError("no wina-fx compilation has run yet: call a torch.compile(..., backend='wina') model first")
    return _REPORTS[-1]


def reports() -> list[Report]:
    """Reports of recent compilations, oldest first (a model with graph breaks makes several)."""
    return list(_REPORTS)
