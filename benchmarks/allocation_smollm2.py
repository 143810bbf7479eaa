"""SmolLM2-135M: WINA top-k perplexity with uniform vs greedy (TEAL) per-linear sparsity.

1. calibrate on wina_fx.data.text("calibration") (quantiles; not used by top-k, but the
   greedy allocation lives in the Calibration the backend reads);
2. wina_fx.allocation.greedy_allocation on the first --tokens tokens of that text, for the
   targets 0.25, 0.4, 0.5, 0.65 (one greedy path per block, step --step): timed;
3. perplexity on wina_fx.data.text("evaluation") (--windows x --window tokens) of dense and,
   at each --eval sparsity, backend="wina" with sparsity_allocation "uniform" and "greedy".

Writes benchmarks/results/allocation_smollm2.json (timings, perplexities, the size-weighted
mean of every allocation, mean sparsity per projection kind) and prints a table.
Usage: python benchmarks/allocation_smollm2.py [--tokens 128] [--step 0.05] [--eval 0.5]
       [--orthogonalize full] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

# Run as a script, this folder comes first on sys.path, and its kernels.py would shadow the
# "kernels" package that transformers probes for at import.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

import torch  # noqa: E402

import wina_fx  # noqa: E402
from wina_fx.allocation import DEFAULT_TARGETS, greedy_allocation  # noqa: E402
from wina_fx.data import text  # noqa: E402
from wina_fx.eval import perplexity, token_windows  # noqa: E402
from wina_fx.models import load_smollm2  # noqa: E402

RESULT = os.path.join(_HERE, "results", "allocation_smollm2.json")
KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def weighted_mean(allocation: dict[str, float], sizes: dict[str, int]) -> float:
    return sum(s * sizes[n] for n, s in allocation.items()) / sum(sizes[n] for n in allocation)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="calibration tokens of the greedy")
    parser.add_argument("--window", type=int, default=128, help="calibration window length")
    parser.add_argument("--step", type=float, default=0.05, help="TEAL's base step")
    parser.add_argument("--eval", default="0.5", help="comma-separated sparsities to evaluate")
    parser.add_argument("--windows", type=int, default=8, help="evaluation windows")
    parser.add_argument("--eval-window", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a shared 2-core box)")
    parser.add_argument("--orthogonalize", default=None, help="prepass variant (full, local, shared); default none")
    parser.add_argument("--out", default=RESULT)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.time()

    def log(message):
        print(f"[{time.time() - start:6.0f}s] {message}", flush=True)

    model, tokenizer = load_smollm2()
    params_before = {n: p.detach().clone() for n, p in model.named_parameters()}
    sizes = {n: m.weight.numel() for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    calib = token_windows(tokenizer, text("calibration"), args.window, max(1, args.tokens // args.window))
    evaluation = token_windows(tokenizer, text("evaluation"), args.eval_window, args.windows)
    log("model and texts loaded")

    t = time.time()
    orth = args.orthogonalize
    calibration = wina_fx.calibrate(model, calib, method="wina", progress=False, orthogonalize=orth or False)
    calibrate_seconds = time.time() - t
    t, cpu = time.time(), time.process_time()
    allocations = greedy_allocation(model, calib, "wina", DEFAULT_TARGETS, orth or False, args.step, progress=True)
    greedy_seconds, greedy_cpu_seconds = time.time() - t, time.process_time() - cpu
    calibration.allocations.update(allocations)
    log(f"greedy allocation for {list(allocations)}: {greedy_seconds:.0f} s")

    result = {
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1 dequantized to fp32)",
        "method": "wina top-k; q,k,v,o,gate,up,down of 30 layers; lm_head dense",
        "orthogonalize": orth,
        "calibration_data": f"wina_fx.data.text('calibration'): {len(calib)} window(s) of {args.window} tokens",
        "evaluation_data": f"wina_fx.data.text('evaluation'): {len(evaluation)} windows of {args.eval_window} tokens",
        "greedy": {
            "procedure": "TEAL block-wise greedy (wina_fx.allocation): one path per block to the largest target",
            "step": args.step,
            "targets": list(allocations),
            "tokens": sum(w.numel() for w in calib),
            "seconds": round(greedy_seconds, 1),
            "cpu_seconds": round(greedy_cpu_seconds, 1),
            "calibrate_quantiles_seconds": round(calibrate_seconds, 1),
        },
        "machine": f"{platform.machine()} CPU ({os.cpu_count()} cores, shared), torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s)",
        "allocations": {},
        "perplexity": {"dense": perplexity(model, evaluation)},
    }
    log(f"dense perplexity {result['perplexity']['dense']:.3f}")
    for target, allocation in allocations.items():
        kinds = {k: [s for n, s in allocation.items() if n.endswith(k)] for k in KINDS}
        result["allocations"][f"{target:g}"] = {
            "size_weighted_mean": weighted_mean(allocation, sizes),
            "mean_per_kind": {k: sum(v) / len(v) for k, v in kinds.items() if v},
            "per_linear": allocation,
        }

    for sparsity in [float(s) for s in args.eval.split(",")]:
        row = result["perplexity"][f"{sparsity:g}"] = {}
        for mode in ("uniform", "greedy"):
            options = {"method": "wina", "sparsity": sparsity, "sparsity_allocation": mode,
                       "calibration": calibration, "inductor": False, "orthogonalize": orth or False}
            torch._dynamo.reset()
            row[mode] = perplexity(torch.compile(model, backend="wina", options=options), evaluation)
            targets = [r.target_sparsity for r in wina_fx.last_report().sparse_rows]
            row[f"{mode}_rows"] = len(targets)
            log(f"{sparsity:g} {mode}: {row[mode]:.3f}")

    after = {n: p.detach() for n, p in model.named_parameters()}
    result["parameters_bit_identical"] = all(torch.equal(params_before[n], after[n]) for n in params_before)
    result["seconds"] = round(time.time() - start)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    orth_note = f", orthogonalize={orth}" if orth else ""
    print(f"\nSmolLM2-135M, WINA top-k{orth_note} perplexity ({result['evaluation_data']}); dense {result['perplexity']['dense']:.3f}")
    print(f"{'sparsity':>8} {'uniform':>9} {'greedy':>9}")
    for key, row in result["perplexity"].items():
        if key != "dense":
            print(f"{key:>8} {row['uniform']:>9.3f} {row['greedy']:>9.3f}")
    print(f"greedy: {result['greedy']['seconds']} s ({result['greedy']['cpu_seconds']} s of CPU) for {result['greedy']['tokens']} tokens, step {args.step}")
    for target, a in result["allocations"].items():
        kinds = " ".join(f"{k[:-5]}={v:.2f}" for k, v in a["mean_per_kind"].items())
        print(f"  target {target}: mean {a['size_weighted_mean']:.4f}  {kinds}")


if __name__ == "__main__":
    main()
