"""SmolLM2-135M: WINA top-k perplexity without and with the orthogonalization prepass.

Composes the passes in a custom backend (orthogonalize, then the gating of
wina_fx.backend: find_linears -> plan_gates -> gate_linears) and runs the rewritten FX
graph op by op. Measures, on wina_fx.data.text("evaluation") (8 windows of 512 tokens):

- perplexity of WINA top-k at 25/40/50/65% for: no transform, and each variant;
- the choice of source weight per group (attention: k/q/v/k+q/stack; MLP: gate/up/stack)
  at 50% and 65% with the full variant;
- dense equivalence: logits of the transformed graph against eager (relative and max error);
- column orthogonality of every gated weight kind (||W^T W - diag||_F / ||W^T W||_F, mean
  over layers) before and after;
- decode cost of the shortcut rotations: bytes per token against the linear weights'.

Writes benchmarks/results/orthogonalize_smollm2.json and prints tables.
Usage: python benchmarks/orthogonalize_smollm2.py [--windows 8] [--quick] [--configs local,full]
(--configs recomputes only those configurations and updates them in the existing JSON.)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

# Run as a script, this folder comes first on sys.path, and its kernels.py would shadow the
# "kernels" package that transformers probes for at import.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import torch  # noqa: E402

from wina_fx.backend import plan_gates  # noqa: E402
from wina_fx.config import WinaConfig  # noqa: E402
from wina_fx.data import text  # noqa: E402
from wina_fx.eval import perplexity, token_windows  # noqa: E402
from wina_fx.models import load_smollm2  # noqa: E402
from wina_fx.passes.find_linears import find_linears  # noqa: E402
from wina_fx.passes.gate import gate_linears  # noqa: E402
from wina_fx.passes.orthogonalize import DEFAULT_SOURCES, REFERENCE_SOURCES, orthogonalize  # noqa: E402

SPARSITIES = (0.25, 0.40, 0.50, 0.65)
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
I = "identity"
# name -> (variant, sources); None: no transform
CONFIGS = {
    "none": (None, None),
    # mathematically the same WINA choices as "none" (folding g into W leaves |x_i| * ||W_i||
    # unchanged): its distance to "none" is the rounding noise of top-k perplexity
    "fold-only": ("full", {"attention": I, "mlp": I}),
    "full-reference": ("full", REFERENCE_SOURCES),  # microsoft/wina: k_proj / gate_proj
    "full": ("full", None),  # DEFAULT_SOURCES
    "local": ("local", None),
    "shared": ("shared", None),
}
# Source of Q per role, full variant (the other role at its default)
SOURCE_CHOICES = [
    ("attention", "k_proj"),
    ("attention", "q_proj"),
    ("attention", "v_proj"),
    ("attention", "stack"),
    ("attention", "k_proj+v_proj+q_proj"),
    ("attention", "v_proj+q_proj"),
    ("attention", "v_proj+k_proj+q_proj"),
    ("mlp", "gate_proj"),
    ("mlp", "up_proj"),
    ("mlp", "stack"),
]
RESULT = os.path.join(_HERE, "results", "orthogonalize_smollm2.json")


def compile_model(model, variant, sparsity, sources=None, log=None):
    """torch.compile with a backend that runs orthogonalize (variant None: not), then WINA
    top-k at ``sparsity`` (None: no gating), as wina_fx.backend does, op by op."""

    def backend(gm, example_inputs, **_):
        report = orthogonalize(gm, example_inputs, variant, sources=sources) if variant else None
        sites = find_linears(gm, example_inputs)
        if sparsity is not None:
            gates, _ = plan_gates(WinaConfig(method="wina", sparsity=sparsity, inductor=False), sites)
            gate_linears(gm, gates, sites)
        if log is not None:
            log.append((report, gm, example_inputs, sites))
        return gm.forward

    torch._dynamo.reset()
    return torch.compile(model, backend=backend)


_KEEP: dict = {}


def keep_alive(key, graphs):
    """Hold the last graph of a configuration: its transformed weights stay cached for the
    next compilation of the same configuration (another sparsity), instead of recomputed."""
    if graphs:
        _KEEP[key] = graphs[-1][1]


def offdiag_ratio(weight: torch.Tensor) -> float:
    w = weight.detach().double()
    gram = w.mT @ w
    return float((gram - torch.diag(gram.diagonal())).norm() / gram.norm())


def orthogonality(sites) -> dict[str, float]:
    """Mean over layers of the off-diagonal share of W^T W, per gated kind."""
    values: dict[str, list[float]] = {}
    for site in sites:
        kind = site.name.rsplit(".", 1)[-1]
        if kind in KINDS and site.weight is not None:
            values.setdefault(kind, []).append(offdiag_ratio(site.weight))
    return {kind: sum(v) / len(v) for kind, v in values.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--choice-windows", type=int, default=4, help="windows for the source comparison")
    parser.add_argument("--quick", action="store_true", help="skip the per-group source comparison")
    parser.add_argument("--configs", help="comma-separated subset of " + ",".join(CONFIGS) + " to recompute")
    args = parser.parse_args()
    only = args.configs.split(",") if args.configs else list(CONFIGS)
    unknown = sorted(set(only) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configs {unknown}; valid: {', '.join(CONFIGS)}")
    configs = {name: CONFIGS[name] for name in only}
    torch.manual_seed(0)
    start = time.time()
    model, tokenizer = load_smollm2()
    windows = token_windows(tokenizer, text("evaluation"), args.window, args.windows)
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)",
        "data": f"wina_fx.data.text('evaluation'): {len(windows)} windows of {args.window} tokens",
        "method": "wina top-k, one sparsity for q,k,v,o,gate,up,down (each linear its own top-k); lm_head dense",
        "machine": f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} threads",
        "default_sources": DEFAULT_SOURCES,
        "reference_sources": REFERENCE_SOURCES,
        "configs": {k: {"variant": v, "sources": src} for k, (v, src) in CONFIGS.items()},
    }

    def log(message):
        print(f"[{time.time() - start:6.0f}s] {message}", flush=True)

    # Dense equivalence, cost and column orthogonality of each configuration.
    ids = windows[0]
    with torch.no_grad():
        eager = model(ids, use_cache=False).logits.double()
    result["dense_perplexity"] = perplexity(model, windows)
    equivalence, costs, ortho = {}, {}, {}
    for name, (variant, sources) in configs.items():
        graphs = []
        with torch.no_grad():
            out = compile_model(model, variant, None, sources, graphs)(ids, use_cache=False).logits.double()
        report, _, _, sites = graphs[-1]
        ortho[name] = orthogonality(sites)
        if report is None:
            continue
        assert report.applied, report.reason
        equivalence[name] = {
            "relative_error": float((out - eager).norm() / eager.norm()),
            "max_abs_error": float((out - eager).abs().max()),
            "max_abs_logit": float(eager.abs().max()),
            "dense_perplexity": perplexity(compile_model(model, variant, None, sources), windows),
        }
        costs[name] = {
            "shortcut_rotations": report.shortcut_rotations,
            "input_rotations": report.input_rotations,
            "rotation_parameters": report.rotation_parameters,
            "rotation_flops_per_token": report.rotation_flops_per_token,
            "rotation_bytes_per_token": report.rotation_bytes_per_token,
            "linear_weight_bytes": report.linear_weight_bytes,
            "rotation_bytes_ratio": report.rotation_bytes_ratio,
            "untied_bytes": report.untied_bytes,
            "copied_bytes": report.copied_bytes,
            "norms_folded": len(report.norms_folded),
            "notes": report.notes,
        }
        log(f"{name}: dense relative error {equivalence[name]['relative_error']:.2e}")
    result["dense_equivalence"] = equivalence
    result["cost"] = costs
    result["orthogonality_offdiag_share"] = ortho

    # WINA top-k perplexity.
    table = {}
    for name, (variant, sources) in configs.items():
        table[name] = {}
        for sparsity in SPARSITIES:
            graphs = []
            table[name][f"{sparsity:.2f}"] = perplexity(compile_model(model, variant, sparsity, sources, graphs), windows)
            keep_alive(name, graphs)
            log(f"{name} {sparsity:.2f}: {table[name][f'{sparsity:.2f}']:.3f}")
        _KEEP.clear()
    result["perplexity_topk"] = table

    # Which weight gives Q, per group (full variant, the other group at its default).
    if not args.quick and args.configs is None:
        few = windows[: args.choice_windows]
        choices = {"windows": len(few), "none": {}, "fold-only": {}}
        for sparsity in (0.50, 0.65):
            for name in ("none", "fold-only"):
                variant, sources = CONFIGS[name]
                choices[name][f"{sparsity:.2f}"] = perplexity(compile_model(model, variant, sparsity, sources), few)
        for role, kind in SOURCE_CHOICES:
            key = f"{role}={kind}"
            row = choices[key] = {}
            for sparsity in (0.50, 0.65):
                graphs = []
                row[f"{sparsity:.2f}"] = perplexity(compile_model(model, "full", sparsity, {role: kind}, graphs), few)
                keep_alive(key, graphs)
            graphs = []
            with torch.no_grad():
                compile_model(model, "full", None, {role: kind}, graphs)(ids[:, :8], use_cache=False)
            row["orthogonality"] = orthogonality(graphs[-1][3])
            _KEEP.clear()
            log(f"{key}: {row['0.50']:.3f} / {row['0.65']:.3f}")
        result["source_choice_full_variant"] = choices

    after = {n: p.detach() for n, p in model.named_parameters()}
    result["parameters_bit_identical"] = all(torch.equal(params_before[n], after[n]) for n in params_before)
    result["seconds"] = round(time.time() - start)
    if args.configs is not None and os.path.exists(RESULT):  # update the chosen configs in place
        with open(RESULT) as f:
            previous = json.load(f)
        for key in ("dense_equivalence", "cost", "orthogonality_offdiag_share", "perplexity_topk"):
            previous.setdefault(key, {}).update(result[key])
        previous["seconds_" + "_".join(only)] = result["seconds"]
        previous["parameters_bit_identical"] &= result["parameters_bit_identical"]
        result = previous
    os.makedirs(os.path.dirname(RESULT), exist_ok=True)
    with open(RESULT, "w") as f:
        json.dump(result, f, indent=2)
    print_tables(result)


def print_tables(result):
    print(f"\nSmolLM2-135M perplexity, WINA top-k ({result['data']}); dense {result['dense_perplexity']:.3f}")
    sparsities = list(next(iter(result["perplexity_topk"].values())))
    print(f"{'config':<16}" + "".join(f"{s:>9}" for s in sparsities))
    for name, row in result["perplexity_topk"].items():
        print(f"{name:<16}" + "".join(f"{row[s]:>9.3f}" for s in sparsities))
    print(f"\n{'config':<16} {'rel.err':>9} {'dense ppl':>10} {'rotations':>9} {'MiB/token':>10} {'vs linears':>10} {'untied MiB':>10}")
    for name, eq in result["dense_equivalence"].items():
        c = result["cost"][name]
        print(
            f"{name:<16} {eq['relative_error']:>9.2e} {eq['dense_perplexity']:>10.3f} "
            f"{c['shortcut_rotations'] + c['input_rotations']:>9} {c['rotation_bytes_per_token'] / 2**20:>10.1f} "
            f"{100 * c['rotation_bytes_ratio']:>9.1f}% {c['untied_bytes'] / 2**20:>10.1f}"
        )
    print("\noff-diagonal share of W^T W, ||W^T W - diag|| / ||W^T W|| (mean over layers)")
    print(f"{'':<16}" + "".join(f"{k:>10}" for k in KINDS))
    for name, row in result["orthogonality_offdiag_share"].items():
        print(f"{name:<16}" + "".join(f"{row.get(k, math.nan):>10.3f}" for k in KINDS))
    if "source_choice_full_variant" in result:
        choices = result["source_choice_full_variant"]
        print(f"\nsource of Q (full variant; {choices['windows']} windows): perplexity at 50% / 65%")
        for key, row in choices.items():
            if key == "windows":
                continue
            o = row.get("orthogonality")
            extra = "   offdiag " + " ".join(f"{k[:-5]}={o[k]:.3f}" for k in KINDS) if o else ""
            print(f"{key:<32} {row['0.50']:>8.3f} {row['0.65']:>8.3f}{extra}")


if __name__ == "__main__":
    main()
