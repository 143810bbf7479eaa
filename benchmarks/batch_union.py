"""How much of the weights a batch of decoding sequences can leave unread (issue 10, batches).

One token's sparse linear skips the weight rows of the channels its mask drops; a batch of B
sequences decoding together can skip only the rows that none of its B tokens keeps: the
union of their masks.  This measures that union on a real model and real text, with the
calibrated threshold masks the backend uses: for each linear, the share of input channels
kept by at least one of B tokens taken from B different sequences at the same position, and,
weighted by each weight's size, the share of the linears' bytes a kernel reading the union
would still read.  Its inverse bounds what any batched sparse kernel can gain on the linears.

    python benchmarks/batch_union.py            # SmolLM2-135M, ~2 CPU-minutes
    python benchmarks/batch_union.py --table    # the table from the saved file

Writes ``benchmarks/results/batch_union_<model>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

# transformers looks for a package named "kernels", which benchmarks/kernels.py would answer
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

import wina_fx  # noqa: E402
from wina_fx.data import text  # noqa: E402
from wina_fx.eval import calibration_windows, token_windows  # noqa: E402
from wina_fx.methods import get_method  # noqa: E402
from wina_fx.models import load_model  # noqa: E402

BATCHES = (1, 2, 4, 8, 16)
RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def union_kept(importance: torch.Tensor, threshold: float, batches=BATCHES) -> dict[int, float]:
    """importance (S, T, K) = |x| * score of S sequences of T tokens.  Share of channels kept
    (importance > threshold) by at least one token of each group of B sequences at one
    position, averaged over positions and groups, for each B dividing S."""
    keep = importance > threshold
    sequences, tokens, channels = keep.shape
    return {b: keep.reshape(sequences // b, b, tokens, channels).any(dim=1).float().mean().item()
            for b in batches if sequences % b == 0}


def measure(model, tokenizer, method: str, sparsities, sequences: int, tokens: int) -> list[dict]:
    """Rows (method, sparsity, linear, weight bytes, kept share per batch size)."""
    calibration = wina_fx.calibrate(model, calibration_windows(tokenizer, 8), method=method, progress=False)
    ids = torch.cat(token_windows(tokenizer, text("evaluation"), tokens, sequences))  # (S, T), one per window
    modules = dict(model.named_modules())
    scorer = get_method(method)
    rows, hooks = [], []

    def hook_for(name, weight):
        score = scorer.score(weight.detach()).float()

        def hook(module, args):
            importance = args[0].detach().float().abs() * score  # once for every sparsity
            for sparsity in sparsities:
                rows.append({"method": method, "sparsity": sparsity, "linear": name,
                             "weight_bytes": weight.numel() * weight.element_size(),
                             "kept": union_kept(importance, calibration.threshold(name, sparsity))})
        return hook

    for name in calibration.names:
        module = modules.get(name)
        if isinstance(module, torch.nn.Linear):
            hooks.append(module.register_forward_pre_hook(hook_for(name, module.weight)))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in hooks:
            handle.remove()
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Per (method, sparsity, B): the size-weighted share of the linears' bytes a union kernel reads."""
    out = {}
    for row in rows:
        for b, kept in row["kept"].items():
            key = (row["method"], row["sparsity"], int(b))
            read, total = out.get(key, (0.0, 0))
            out[key] = (read + kept * row["weight_bytes"], total + row["weight_bytes"])
    return [{"method": m, "sparsity": s, "batch": b, "bytes_read": read / total, "bound_speedup": total / read}
            for (m, s, b), (read, total) in sorted(out.items())]


def table(results: dict) -> str:
    lines = [f"{results['header']['model']}, {results['header']['sequences']} sequences x "
             f"{results['header']['tokens']} tokens of the evaluation text, threshold masks (calibrated); "
             "share of the linears' weight bytes a kernel reading the union of B tokens' masks reads "
             "(its inverse: the most a batched sparse kernel can gain on the linears)", "",
             "| method | sparsity | " + " | ".join(f"B={b}" for b in BATCHES) + " |",
             "|---|---|" + "---|" * len(BATCHES)]
    by_config: dict = {}
    for row in results["summary"]:
        by_config.setdefault((row["method"], row["sparsity"]), {})[row["batch"]] = row
    for (method, sparsity), cells in by_config.items():
        lines.append(f"| {method} | {sparsity:.0%} | " + " | ".join(
            f"{cells[b]['bytes_read']:.3f} ({cells[b]['bound_speedup']:.2f}x)" if b in cells else "-"
            for b in BATCHES) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--methods", default="wina,teal")
    parser.add_argument("--sparsities", default="0.5,0.65")
    parser.add_argument("--sequences", type=int, default=16, help="sequences (a multiple of every batch size)")
    parser.add_argument("--tokens", type=int, default=256, help="positions per sequence")
    parser.add_argument("--table", action="store_true", help="print the table from the saved file and exit")
    args = parser.parse_args()
    path = os.path.join(RESULTS, f"batch_union_{args.model}.json")
    if args.table:
        with open(path) as f:
            return print(table(json.load(f)))
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    rows = []
    for method in args.methods.split(","):
        rows += measure(model, tokenizer, method, sparsities, args.sequences, args.tokens)
    results = {"header": {"model": args.model, "sequences": args.sequences, "tokens": args.tokens,
                          "selection": "threshold", "torch": torch.__version__},
               "summary": summary(rows), "linears": rows}
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(table(results))


if __name__ == "__main__":
    main()
