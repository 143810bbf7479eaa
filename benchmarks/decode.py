"""Greedy decoding throughput, batch 1: dense torch.compile vs backend="wina".

A Llama-3-8B-shaped model (hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV
heads, vocab 128256) with random bf16 weights (no 8B weights can reach these machines),
transformers with a static KV cache, each decode step compiled with
mode="reduce-overhead" (CUDA graphs). Dense is Inductor; wina is the same model through
backend="wina" at each sparsity. Thresholds come from wina_fx.calibrate on random
prompts, so the measured sparsity is reported beside each result.

    python benchmarks/decode.py                      # on a CUDA machine
    python benchmarks/decode.py --tiny --tokens 8    # CPU smoke test of the plumbing

Writes decode_<gpu>.json and decode_<gpu>.png to $OUT if set, else benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# transformers probes for a package named "kernels"; this folder's kernels.py must not
# answer, so the script's own folder leaves the import path.
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402
import transformers  # noqa: E402

import wina_fx  # noqa: E402

LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
)
TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)


def build_model(shape: dict, device: str, dtype: torch.dtype, seed: int = 0):
    config = transformers.LlamaConfig(**shape)
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    model = model.to_empty(device=device).to(dtype).eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=generator)
    # buffers computed at construction (rotary inv_freq) were lost on the meta device
    model.model.rotary_emb = type(model.model.rotary_emb)(config).to(device)
    return model


@torch.no_grad()
def decode_tokens_per_s(model, step, prompt, new_tokens: int, warmup: int) -> float:
    """Prefill eagerly, then time ``new_tokens`` compiled decode steps (after ``warmup``)."""
    device = prompt.device
    cache = transformers.StaticCache(config=model.config, max_cache_len=prompt.shape[1] + warmup + new_tokens + 1)
    position = torch.arange(prompt.shape[1], device=device)
    logits = model(prompt, past_key_values=cache, cache_position=position, use_cache=True).logits
    token = logits[:, -1:].argmax(-1)
    position = position[-1:] + 1
    started = None
    for i in range(warmup + new_tokens):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        logits = step(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True).logits
        token = logits[:, -1:].argmax(-1)
        position = position + 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return new_tokens / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (checks the plumbing only)")
    parser.add_argument("--sparsities", default="0,0.25,0.4,0.5,0.65")
    parser.add_argument("--selection", default="threshold", choices=["threshold", "topk"])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--suffix", default="", help="appended to the result file names (split runs)")
    args = parser.parse_args()

    device = "cpu" if args.tiny else "cuda"
    dtype = torch.float32 if args.tiny else torch.bfloat16
    mode = None if args.tiny else "reduce-overhead"
    model = build_model(TINY if args.tiny else LLAMA3_8B, device, dtype)
    vocab = model.config.vocab_size
    generator = torch.Generator(device=device).manual_seed(1)
    prompt = torch.randint(0, vocab, (1, args.prompt_len), device=device, generator=generator)

    calibration = None
    if args.selection == "threshold":
        prompts = [torch.randint(0, vocab, (1, 64), device=device, generator=generator) for _ in range(4)]
        calibration = wina_fx.calibrate(model, prompts, method="wina", samples_per_linear=1 << 15)
        torch._dynamo.reset()

    records = []
    torch._dynamo.reset()
    step = torch.compile(model, mode=mode, fullgraph=True, dynamic=False)
    dense = decode_tokens_per_s(model, step, prompt, args.tokens, args.warmup)
    records.append({"impl": "dense", "sparsity": 0.0, "measured_sparsity": 0.0, "tokens_per_s": dense, "speedup_vs_dense": 1.0})
    print(f"dense: {dense:.1f} tokens/s", flush=True)
    for sparsity in [float(s) for s in args.sparsities.split(",")]:
        torch._dynamo.reset()
        options = {"sparsity": sparsity, "selection": args.selection, "calibration": calibration}
        wina_mode = {"mode": mode} if mode else {}
        step = torch.compile(model, backend="wina", options={**options, **wina_mode}, fullgraph=True, dynamic=False)
        rate = decode_tokens_per_s(model, step, prompt, args.tokens, args.warmup)
        # measured sparsity from a separate, eager run with counters (counters cost time)
        torch._dynamo.reset()
        probe = torch.compile(model, backend="wina", options={**options, "measure": True, "inductor": False})
        decode_tokens_per_s(model, probe, prompt, 4, 0)
        measured = [r.measured_sparsity for r in wina_fx.last_report().sparse_rows]
        records.append({
            "impl": "wina", "sparsity": sparsity, "measured_sparsity": sum(measured) / len(measured),
            "tokens_per_s": rate, "speedup_vs_dense": rate / dense,
        })
        print(f"wina {sparsity:.0%}: {rate:.1f} tokens/s, {rate / dense:.2f}x dense, "
              f"measured sparsity {records[-1]['measured_sparsity']:.3f}", flush=True)

    gpu = "cpu-tiny" if args.tiny else torch.cuda.get_device_name().replace(" ", "_")
    header = {
        "gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
        "triton": getattr(__import__("triton"), "__version__", None) if not args.tiny else None,
        "model": "tiny Llama" if args.tiny else "Llama-3-8B shape, random bf16 weights",
        "batch": 1, "selection": args.selection, "prompt_len": args.prompt_len, "tokens": args.tokens, "mode": mode,
    }
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"decode_{gpu}{args.suffix}.json"), "w") as f:
        json.dump({"header": header, "records": records}, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        wina = [r for r in records if r["impl"] == "wina"]
        plt.figure(figsize=(5, 3.5))
        plt.plot([r["sparsity"] for r in wina], [r["speedup_vs_dense"] for r in wina], "o-", label="wina / dense")
        plt.plot([0, 0.65], [1, 1], "k--", lw=0.8)
        plt.xlabel("sparsity")
        plt.ylabel("decode speedup vs dense")
        plt.title(f"{header['model']}, batch 1, {gpu}", fontsize=8)
        plt.legend()
        plt.tight_layout()
        plt.savefig(os.path.join(out_dir, f"decode_{gpu}{args.suffix}.png"), dpi=120)
    except ImportError:
        print("matplotlib missing: no plot")
    print(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
