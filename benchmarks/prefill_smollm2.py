"""SmolLM2-135M: perplexity of decoded continuations, prefill='dense' vs 'sparse' (CPU).

Each window of the evaluation text is served as a prompt (its first --prompt-len tokens,
one prefill step) and a continuation decoded one true token at a time through the KV
cache (wina_fx.eval.decode_perplexity), so the decode path is what is measured.

    python benchmarks/prefill_smollm2.py [--windows 4] [--window-len 256] [--prompt-len 128]

Writes benchmarks/results/prefill_smollm2.json.
"""
import argparse
import json
import os
import sys
import time

# transformers probes for a package named "kernels"; this folder's kernels.py must not answer
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

from wina_fx.data import text  # noqa: E402
from wina_fx.eval import decode_perplexity, token_windows  # noqa: E402
from wina_fx.models import load_smollm2  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--window-len", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--sparsities", default="0.5")
    parser.add_argument("--methods", default="wina,teal")
    args = parser.parse_args()
    model, tokenizer = load_smollm2()
    windows = token_windows(tokenizer, text("evaluation"), args.window_len, args.windows)
    records = [{"method": "dense", "ppl": decode_perplexity(model, windows, args.prompt_len)}]
    print(records[-1], flush=True)
    for method in args.methods.split(","):
        for sparsity in map(float, args.sparsities.split(",")):
            for prefill in ("sparse", "dense"):
                started = time.time()
                torch._dynamo.reset()
                options = {"method": method, "sparsity": sparsity, "prefill": prefill, "inductor": False}
                model.forward = torch.compile(type(model).forward.__get__(model), backend="wina", options=options)
                records.append({"method": method, "sparsity": sparsity, "prefill": prefill,
                                "ppl": decode_perplexity(model, windows, args.prompt_len),
                                "seconds": round(time.time() - started, 1)})
                del model.forward
                print(records[-1], flush=True)
    header = {"model": "SmolLM2-135M-Instruct (fp32, CPU)", "text": "wina_fx/data/evaluation.txt",
              "windows": args.windows, "window_len": args.window_len, "prompt_len": args.prompt_len,
              "selection": "topk", "torch": torch.__version__}
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "prefill_smollm2.json")
    with open(path, "w") as f:
        json.dump({"header": header, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
