"""Greedy decoding throughput, batch 1: dense torch.compile vs backend="wina".

A Llama-3-8B-shaped model (hidden 4096, intermediate 14336, 32 layers, 32 heads, 8 KV
heads, vocab 128256) with random bf16 weights (no 8B weights can reach these machines),
transformers with a static KV cache, each decode step compiled with
mode="reduce-overhead" (CUDA graphs). Dense is Inductor; wina is the same model through
backend="wina" at each sparsity. Thresholds come from wina_fx.calibrate on random
prompts, so the measured sparsity is reported beside each result.

    python benchmarks/decode.py                      # on a CUDA machine
    python benchmarks/decode.py --tiny --tokens 8    # CPU smoke test of the plumbing
    python benchmarks/decode.py --model llama3-8b-rank-of-2   # what one of 2 tensor-parallel
                                                              # ranks computes, without the all-reduces

Writes decode_<gpu>.json and decode_<gpu>.png to $OUT if set, else benchmarks/results/.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
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
from wina_fx import early_launch  # noqa: E402

LLAMA3_8B = dict(
    hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
    num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
)
TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
# Mixtral-8x7B's layer shapes (8 experts of 4096 x 14336, top-2, vocab 32000), 8 of its 32 layers
MIXTRAL_8L = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=8, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32000, max_position_embeddings=8192, rope_theta=1e6,
                  num_local_experts=8, num_experts_per_tok=2)
TINY_MOE = dict(TINY, num_local_experts=4, num_experts_per_tok=2)
# what one of 2 tensor-parallel ranks holds of Llama-3-8B (half the heads, the MLP's width and the
# vocabulary), run alone: a rank's compute without the all-reduces (examples/tensor_parallel.py)
LLAMA3_8B_RANK_OF_2 = dict(LLAMA3_8B, intermediate_size=7168, num_attention_heads=16, num_key_value_heads=4,
                           head_dim=128, vocab_size=64128)
TINY_RANK_OF_2 = dict(TINY, intermediate_size=192, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                      vocab_size=256)
MODELS = {  # --model: (GPU shape, --tiny shape, config and model classes, description)
    "llama3-8b": (LLAMA3_8B, TINY, "LlamaConfig", "LlamaForCausalLM", "Llama-3-8B shape"),
    "llama3-8b-rank-of-2": (LLAMA3_8B_RANK_OF_2, TINY_RANK_OF_2, "LlamaConfig", "LlamaForCausalLM",
                            "one rank's shards of Llama-3-8B over 2 GPUs, no all-reduces"),
    "mixtral-8l": (MIXTRAL_8L, TINY_MOE, "MixtralConfig", "MixtralForCausalLM", "Mixtral-8x7B shape, 8 of 32 layers"),
}


def build_model(shape: dict, device: str, dtype: torch.dtype, seed: int = 0, model: str = "llama3-8b"):
    config = getattr(transformers, MODELS[model][2])(**shape)
    with torch.device("meta"):
        model = getattr(transformers, MODELS[model][3])(config)
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


def same_launches(pdl: bool, device: str) -> bool:
    """Let dense Inductor launch its kernels as the backend's option ``pdl`` does (on sm_90+,
    each kernel may start before the one it waits on ends), so that a ratio against dense
    compares kernels, not launch settings.  Returns whether launches are early on ``device``
    (never on the CPU, an older GPU, or a torch whose Inductor lacks ``triton.enable_pdl``);
    pass it on as the option."""
    import torch._inductor.config as inductor_config

    if not hasattr(inductor_config.triton, "enable_pdl"):
        return False
    inductor_config.triton.enable_pdl = pdl
    if not (pdl and device.startswith("cuda")):
        return False
    from wina_fx.kernels.sparse_linear import hopper  # the backend's own sm_90+ test

    return hopper(torch.device(device))


@torch.no_grad()
def decode_tokens_per_s(model, step, prompt, new_tokens: int, warmup: int, sync=None, host=None) -> float:
    """Prefill eagerly, then time ``new_tokens`` compiled decode steps (after ``warmup``).
    ``sync``, when given, is called just before the clock starts (ranks of a tensor-parallel
    run: ``torch.distributed.barrier``).  ``host``, a dict, receives ``host_us_per_step``: the
    time spent inside the step calls (guards, argument handling, graph launch); when it is
    close to the wall time per step, the host, not the GPU, sets the pace."""
    device = prompt.device
    cache = transformers.StaticCache(config=model.config, max_cache_len=prompt.shape[1] + warmup + new_tokens + 1)
    position = torch.arange(prompt.shape[1], device=device)
    logits = model(prompt, past_key_values=cache, cache_position=position, use_cache=True).logits
    token = logits[:, -1:].argmax(-1)
    position = position[-1:] + 1
    started, inside = None, 0.0
    for i in range(warmup + new_tokens):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            if sync is not None:
                sync()
            started = time.perf_counter()
        called = time.perf_counter()
        logits = step(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True).logits
        if started is not None:
            inside += time.perf_counter() - called
        token = logits[:, -1:].argmax(-1)
        position = position + 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    if host is not None:
        host["host_us_per_step"] = inside / new_tokens * 1e6
    return new_tokens / (time.perf_counter() - started)


@torch.no_grad()
def kernel_profile(model, step, prompt, steps: int = 4, top: int = 14) -> dict:
    """GPU time per decode step by kernel name (torch.profiler; kernels inside CUDA graphs too)."""
    from torch.profiler import ProfilerActivity, profile

    cache = transformers.StaticCache(config=model.config, max_cache_len=prompt.shape[1] + steps + 2)
    position = torch.arange(prompt.shape[1], device=prompt.device)
    token = model(prompt, past_key_values=cache, cache_position=position, use_cache=True).logits[:, -1:].argmax(-1)
    position = position[-1:] + 1
    step(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True)  # warm
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            position = position + 1
            step(input_ids=token, past_key_values=cache, cache_position=position, use_cache=True)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None) or getattr(e, "cuda_time_total", 0)
        if us > 0 and e.count > 0:
            rows.append({"kernel": e.key[:90], "calls_per_step": e.count / steps, "us_per_step": us / steps})
    rows.sort(key=lambda r: -r["us_per_step"])
    total = sum(r["us_per_step"] for r in rows)
    return {"gpu_us_per_step": total, "launches_per_step": sum(r["calls_per_step"] for r in rows), "top": rows[:top],
            "all": rows, "layer_timeline": layer_timeline(prof)}


def layer_timeline(prof, anchor: str = "sdpa", layer: int = 10) -> list[dict] | None:
    """The kernels of one decoder layer in launch order, from one attention kernel (``anchor``
    in its name) to the next: each kernel's GPU time and the idle time before it.  Without
    PDL these are the kernels' true durations; with PDL a kernel launched early counts its wait."""
    from torch.autograd import DeviceType

    kernels = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA), key=lambda e: e.time_range.start)
    marks = [i for i, e in enumerate(kernels) if anchor in e.name]
    if len(marks) <= layer + 1:
        return None
    first, last = marks[layer], marks[layer + 1]
    return [{"kernel": e.name[:60], "us": e.time_range.elapsed_us(),
             "idle_before_us": e.time_range.start - kernels[i - 1].time_range.end}
            for i, e in enumerate(kernels[first:last], first)]


def measured_sparsity(model, prompt, options: dict, steps: int = 4) -> float:
    """Mean share of input channels dropped per sparse linear over ``steps`` decode steps of
    ``model`` through backend="wina" with ``options``, run op by op with counters (counters
    cost time: never the timed run).  An expert no probe token was routed to measured nothing
    and is left out."""
    torch._dynamo.reset()
    probe = torch.compile(model, backend="wina", options={**options, "measure": True, "inductor": False},
                          fullgraph=True, dynamic=False)
    decode_tokens_per_s(model, probe, prompt, steps, 0)
    rows = [r.measured_sparsity for r in wina_fx.last_report().sparse_rows if r.measured_sparsity is not None]
    torch._dynamo.reset()
    return sum(rows) / len(rows)


def dump_memory_history(path: str) -> None:
    """Every allocation and free since the history was switched on, with stacks, for
    torch.cuda.memory's viewer (https://pytorch.org/memory_viz): the peak's live blocks."""
    torch.cuda.memory._dump_snapshot(path)
    print(f"  memory history: {path}")


def print_live_blocks(min_bytes: int = 64 << 20, frames: int = 12) -> None:
    """The live CUDA blocks of at least ``min_bytes``, largest first, each with the Python
    frames that allocated it (needs torch.cuda.memory._record_memory_history on)."""
    blocks = [b for seg in torch.cuda.memory._snapshot()["segments"] for b in seg["blocks"]
              if b["state"] == "active_allocated" and b["size"] >= min_bytes]
    print(f"  {len(blocks)} live blocks >= {min_bytes >> 20} MiB, {sum(b['size'] for b in blocks) / 2**30:.2f} GiB")
    seen = set()
    for b in sorted(blocks, key=lambda b: -b["size"]):
        stack = tuple(f"{os.path.basename(f['filename'])}:{f['line']} {f['name']}" for f in b.get("frames", [])
                      if f["filename"].endswith(".py"))[:frames]
        if stack not in seen:
            seen.add(stack)
            print(f"  {b['size'] >> 20} MiB:\n    " + "\n    ".join(stack))


SPARSE_KERNELS = ("_gemv", "_splitk_reduce", "_prep_kernel")  # the wina launches


def breakdown(prof: dict, tokens_per_s: float) -> dict:
    """GPU time per step in the sparse linears' kernels and in everything else, and the
    time between kernels (wall time per step minus GPU time)."""
    sparse = sum(r["us_per_step"] for r in prof["all"] if any(k in r["kernel"] for k in SPARSE_KERNELS))
    wall = 1e6 / tokens_per_s
    return {"wall_us": wall, "sparse_linears_us": sparse, "dense_parts_us": prof["gpu_us_per_step"] - sparse,
            "gaps_us": wall - prof["gpu_us_per_step"]}


def profiled(model, step, prompt, tokens_per_s):
    try:
        prof = kernel_profile(model, step, prompt)
        prof["breakdown"] = breakdown(prof, tokens_per_s)
        prof.pop("all")
    except Exception as e:  # the profile is an extra; never lose the timing for it
        print(f"profile failed: {type(e).__name__}: {e}")
        return None
    print(f"  GPU {prof['gpu_us_per_step']:.0f} us/step in {prof['launches_per_step']:.0f} kernels; top: " +
          "; ".join(f"{r['kernel'][:50]} x{r['calls_per_step']:.0f} {r['us_per_step']:.0f} us" for r in prof["top"][:8]),
          flush=True)
    b = prof["breakdown"]
    print(f"  per step: wall {b['wall_us']:.0f} us = sparse linears {b['sparse_linears_us']:.0f} + dense parts "
          f"{b['dense_parts_us']:.0f} + gaps {b['gaps_us']:.0f}", flush=True)
    for row in prof["layer_timeline"] or []:
        print(f"    {row['idle_before_us']:6.1f} idle, {row['us']:6.1f} us  {row['kernel']}")
    return prof


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (checks the plumbing only)")
    parser.add_argument("--model", choices=list(MODELS), default="llama3-8b",
                        help="mixtral-8l: mixture of experts (experts gated through passes/experts.py)")
    parser.add_argument("--sparsities", default="0,0.25,0.4,0.5,0.65")
    parser.add_argument("--selection", default="threshold", choices=["threshold", "topk"])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--batches", default="1",
                        help="comma-separated batch sizes; 1: the full batch-1 run (profile, measured sparsity, "
                             "variants); each above 1 times dense and wina at every sparsity (tokens/s "
                             "counts every sequence's tokens)")
    parser.add_argument("--suffix", default="", help="appended to the result file names (split runs)")
    parser.add_argument("--profile", action="store_true", help="also record GPU time per step by kernel")
    parser.add_argument("--separate", action="store_true",
                        help="also time option group=False (one launch per linear) at each sparsity")
    parser.add_argument("--repeated-kv", action="store_true",
                        help="also time option sdpa_gqa=False (attention over K/V repeated per query head, as "
                             "traced) at each sparsity")
    parser.add_argument("--tiles", help='also time M=1 kernel tile overrides, JSON {name: {...}}, e.g. '
                                        '\'{"w1024": {"BLOCK_N": 1024, "num_warps": 4}}\' (tuning runs)')
    parser.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True,
                        help="Inductor's programmatic dependent launch (sm_90+), dense and wina alike: the backend's "
                             "option pdl, and Inductor's triton.enable_pdl for the dense baseline")
    parser.add_argument("--early-gemvs", action=argparse.BooleanOptionalAction, default=True,
                        help="with --pdl: the sparse GEMVs launched early too (wina_fx/early_launch.py); "
                             "--no-early-gemvs times Inductor's kernels alone launched early (an A/B of that patch)")
    parser.add_argument("--snapshot", action="store_true",
                        help="after each configuration, print the largest live CUDA blocks and where they "
                             "were allocated (finds a second copy of the weights)")
    args = parser.parse_args()

    device = "cpu" if args.tiny else "cuda"
    args.pdl = same_launches(args.pdl, device)
    if not args.early_gemvs:
        early_launch.gemvs_launched_early = contextlib.nullcontext
    if args.snapshot and device == "cuda":
        torch.cuda.memory._record_memory_history(max_entries=200000)
    dtype = torch.float32 if args.tiny else torch.bfloat16
    mode = None if args.tiny else "reduce-overhead"
    gpu_shape, tiny_shape, _, _, description = MODELS[args.model]
    model = build_model(tiny_shape if args.tiny else gpu_shape, device, dtype, model=args.model)
    vocab = model.config.vocab_size
    generator = torch.Generator(device=device).manual_seed(1)
    prompt = torch.randint(0, vocab, (1, args.prompt_len), device=device, generator=generator)

    calibration = None
    if args.selection == "threshold":
        prompts = [torch.randint(0, vocab, (1, 64), device=device, generator=generator) for _ in range(4)]
        calibration = wina_fx.calibrate(model, prompts, method="wina", samples_per_linear=1 << 15)
        torch._dynamo.reset()

    records = []
    gpu = "cpu-tiny" if args.tiny else torch.cuda.get_device_name().replace(" ", "_")
    header = {
        "gpu": gpu, "torch": torch.__version__, "transformers": transformers.__version__,
        "triton": getattr(__import__("triton"), "__version__", None) if not args.tiny else None,
        "model": f"tiny {args.model}" if args.tiny else f"{description}, random bf16 weights",
        "batch": 1, "selection": args.selection, "prompt_len": args.prompt_len, "tokens": args.tokens, "mode": mode,
        "pdl": args.pdl, "early_gemvs": args.pdl and args.early_gemvs,
    }
    def fresh():  # no compiled graph, cache or pool of an earlier configuration stays alive
        torch._dynamo.reset()
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak(label: str) -> dict:  # what the configuration held at most: weights, caches, graphs, pools
        if device != "cuda":
            return {"peak_memory_bytes": 0}
        if args.snapshot:
            print_live_blocks()
            dump_memory_history(os.path.join(out_dir, f"memory_{gpu}{args.suffix}_{label}.pickle"))
        return {"peak_memory_bytes": torch.cuda.max_memory_allocated(),
                "resident_bytes": torch.cuda.memory_allocated()}

    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(__file__), "results")
    os.makedirs(out_dir, exist_ok=True)

    def save():  # after every configuration, so a run cut short keeps what it measured
        with open(os.path.join(out_dir, f"decode_{gpu}{args.suffix}.json"), "w") as f:
            json.dump({"header": header, "records": records}, f, indent=1)

    def compiled_step(sparsity=None, **extra):
        """The decode step as timed: dense Inductor (sparsity None) or backend="wina", CUDA graphs."""
        if sparsity is None:
            return torch.compile(model, mode=mode, fullgraph=True, dynamic=False)
        options = {"sparsity": sparsity, "selection": args.selection, "calibration": calibration, "pdl": args.pdl,
                   **({"mode": mode} if mode else {}), **extra}
        return torch.compile(model, backend="wina", options=options, fullgraph=True, dynamic=False)

    def dense_run(impl):
        fresh()
        step = compiled_step()
        host = {}
        rate = decode_tokens_per_s(model, step, prompt, args.tokens, args.warmup, host=host)
        records.append({"impl": impl, "sparsity": 0.0, "measured_sparsity": 0.0, "tokens_per_s": rate,
                        "speedup_vs_dense": rate / records[0]["tokens_per_s"] if records else 1.0, **host,
                        **peak(impl)})
        print(f"{impl}: {rate:.1f} tokens/s, peak {records[-1]['peak_memory_bytes'] / 2**30:.2f} GiB", flush=True)
        if args.profile:
            records[-1]["profile"] = profiled(model, step, prompt, rate)
        save()
        return rate

    weights_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    header["weights_bytes"] = weights_bytes
    batches = [int(b) for b in args.batches.split(",")]
    if 1 in batches:
        dense = dense_run("dense")
        for sparsity in [float(s) for s in args.sparsities.split(",")]:
            fresh()
            step = compiled_step(sparsity)
            host = {}
            rate = decode_tokens_per_s(model, step, prompt, args.tokens, args.warmup, host=host)
            memory = peak(f"wina{sparsity:g}")
            notes = wina_fx.last_report().notes
            prof = profiled(model, step, prompt, rate) if args.profile else None
            # at sparsity 0 the calibrated threshold is -inf, which keeps every channel by definition
            measured = 0.0 if sparsity == 0 else measured_sparsity(
                model, prompt, {"sparsity": sparsity, "selection": args.selection, "calibration": calibration})
            records.append({
                "impl": "wina", "sparsity": sparsity, "measured_sparsity": measured,
                "tokens_per_s": rate, "speedup_vs_dense": rate / dense, "notes": notes, **host, **memory,
                "peak_memory_vs_dense": memory["peak_memory_bytes"] / max(records[0]["peak_memory_bytes"], 1),
            })
            if prof:
                records[-1]["profile"] = prof
            save()
            print(f"wina {sparsity:.0%}: {rate:.1f} tokens/s, {rate / dense:.2f}x dense, "
                  f"measured sparsity {records[-1]['measured_sparsity']:.3f}, peak memory "
                  f"{records[-1]['peak_memory_vs_dense']:.3f}x dense", flush=True)
            variants = {"separate": ({"group": False}, None)} if args.separate else {}
            if args.repeated_kv:
                variants["repeated_kv"] = ({"sdpa_gqa": False}, None)
            variants.update({name: ({}, tiles) for name, tiles in json.loads(args.tiles or "{}").items()})
            for name, (extra, tiles) in variants.items():  # the same sparsity, another option or kernel tiles
                torch._dynamo.reset()
                with _tiles_override(tiles):
                    step = compiled_step(sparsity, **extra)
                    rate = decode_tokens_per_s(model, step, prompt, args.tokens, args.warmup)
                records.append({"impl": f"wina_{name}", "sparsity": sparsity, "options": extra, "tiles": tiles,
                                "measured_sparsity": records[-1]["measured_sparsity"],
                                "tokens_per_s": rate, "speedup_vs_dense": rate / dense})
                save()
                print(f"wina {sparsity:.0%}, {name}: {rate:.1f} tokens/s, {rate / dense:.2f}x dense", flush=True)


    for batch in [b for b in batches if b > 1]:
        batch_prompt = torch.randint(0, vocab, (batch, args.prompt_len), device=device, generator=generator)
        base = base_memory = None
        for sparsity in [None] + [float(s) for s in args.sparsities.split(",")]:
            fresh()
            step = compiled_step(sparsity)
            rate = batch * decode_tokens_per_s(model, step, batch_prompt, args.tokens, args.warmup)
            base = base or rate
            memory = peak(f"batch{batch}_{'dense' if sparsity is None else f'wina{sparsity:g}'}")
            base_memory = base_memory if sparsity is not None else memory["peak_memory_bytes"]
            records.append({"impl": "dense" if sparsity is None else "wina", "batch": batch,
                            "sparsity": sparsity or 0.0, "measured_sparsity": None, "tokens_per_s": rate,
                            "speedup_vs_dense": rate / base, **memory,
                            "peak_memory_vs_dense": memory["peak_memory_bytes"] / max(base_memory, 1)})
            if args.profile:  # wall time per step: one step decodes a token of every sequence
                records[-1]["profile"] = profiled(model, step, batch_prompt, rate / batch)
            save()
            print(f"batch {batch}, {records[-1]['impl']} {sparsity or 0:.0%}: {rate:.1f} tokens/s, "
                  f"{rate / base:.2f}x dense", flush=True)

    if not args.tiny and 1 in batches and any(r["impl"] == "wina" for r in records):
        dense_run("dense_after_relayout")  # the same dense compile, weights now stored as W^T
    save()
    plot(records, header, os.path.join(out_dir, f"decode_{gpu}{args.suffix}.png"))
    print(json.dumps([{k: v for k, v in r.items() if k != "profile"} for r in records], indent=1))


@contextlib.contextmanager
def _tiles_override(tiles: dict | None):
    """The one-token dispatch's config (``_gemv_choice``: either GEMV, every shape) updated
    with ``tiles`` while a variant compiles and runs, e.g. {"REDUCE": 2}.

    Inductor's caches are off meanwhile: they may key the graph before the triton_op is
    traced into kernels, and a cached compile of the same graph would bring back the
    default tiles.  (Run 17, with the caches on: STAGES=1 left decode unchanged, 1.78x vs
    1.77x, although the kernel benchmark showed it 1.2-1.4x slower per layer.)"""
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    from wina_fx.kernels import sparse_linear as sl

    if not tiles:
        yield
        return
    saved = sl._gemv_choice

    def choice(*args, **kwargs):
        path, config = saved(*args, **kwargs)
        return path, {**config, **tiles}

    sl._gemv_choice = choice
    try:
        with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
            yield
    finally:
        sl._gemv_choice = saved


def plot(records, header, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no plot")
        return
    batched = sorted((r for r in records if r["impl"] == "wina" and r.get("batch", 1) > 1),
                     key=lambda r: (r["sparsity"], r["batch"]))
    fig, axes = plt.subplots(1, 2 if batched else 1, figsize=(9 if batched else 5, 3.5), squeeze=False)
    ax = axes[0][0]
    for impl, label in [("wina", "wina / dense"), ("wina_separate", "wina, one launch per linear / dense")]:
        rows = sorted((r for r in records if r["impl"] == impl and r.get("batch", 1) == 1), key=lambda r: r["sparsity"])
        if rows:
            ax.plot([r["sparsity"] for r in rows], [r["speedup_vs_dense"] for r in rows], "o-", label=label)
    ax.plot([0.5, 0.65], [1.85, 2.3], "r*", label="issue targets")
    ax.plot([0, 0.65], [1, 1], "k--", lw=0.8)
    ax.set_xlabel("sparsity")
    ax.set_ylabel("decode speedup vs dense")
    ax.set_title(f"{header['model']}, batch 1, {header['gpu']}", fontsize=8)
    ax.legend(fontsize=7)
    if batched:
        ax = axes[0][1]
        names = [os.path.splitext(n)[0].split("_")[-1] for n in header.get("merged_from", [])]
        for run, sparsity in sorted({(r.get("run", 0), r["sparsity"]) for r in batched}):
            rows = [r for r in batched if r["sparsity"] == sparsity and r.get("run", 0) == run]
            label = f"wina {sparsity:.0%}" + (f", run {names[run]}" if names else "")
            ax.plot([r["batch"] for r in rows], [r["speedup_vs_dense"] for r in rows], "o-", label=label)
        ax.axhline(0.97, color="r", ls=":", lw=0.8, label="issue floor 0.97")
        ax.axhline(1.0, color="k", ls="--", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequences decoding together")
        ax.set_ylabel("tokens/s vs dense at that batch")
        ax.set_ylim(min(0.9, min(r["speedup_vs_dense"] for r in batched) - 0.02),
                    max(1.1, max(r["speedup_vs_dense"] for r in batched) + 0.02))
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def merge(paths, out):
    """One result file from split runs (each wina record keeps the ratio to its own run's dense)."""
    runs = [json.load(open(p)) for p in paths]
    header = dict(runs[0]["header"], merged_from=[os.path.basename(p) for p in paths])
    records = [dict(r, run=i) for i, run in enumerate(runs) for r in run["records"]]
    with open(out, "w") as f:
        json.dump({"header": header, "records": records}, f, indent=1)
    plot(records, header, out.replace(".json", ".png"))


def table(path):
    """Markdown table of a result file: speed, measured sparsity, memory, per-step breakdown."""
    data = json.load(open(path))
    h = data["header"]
    run_names = [os.path.splitext(n)[0].split("_")[-1] for n in h.get("merged_from", ["-"])]
    print(f"{h['model']}, batch {h['batch']}, {h['gpu']}, torch {h['torch']}, Triton {h['triton']}, "
          f"transformers {h['transformers']}, {h['mode']}\n")
    print("| run | impl | batch | target sparsity | measured | tokens/s | vs dense | peak memory vs dense | resident GiB | "
          "us/step: wall = sparse linears + dense parts + gaps | kernels/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in data["records"]:
        b = (r.get("profile") or {}).get("breakdown")
        split = (f"{b['wall_us']:.0f} = {b['sparse_linears_us']:.0f} + {b['dense_parts_us']:.0f} + "
                 f"{b['gaps_us']:.0f}") if b else "-"
        peak = r.get("peak_memory_vs_dense")
        measured = "-" if r["measured_sparsity"] is None else f"{r['measured_sparsity']:.3f}"
        launches = (r.get("profile") or {}).get("launches_per_step")
        print(f"| {run_names[r.get('run', 0)]} | {r['impl']} | {r.get('batch', 1)} | {r['sparsity']:.0%} | {measured} | {r['tokens_per_s']:.1f} | "
              f"{r['speedup_vs_dense']:.2f} | {f'{peak:.3f}' if peak else '1 (reference)' if r['impl'] == 'dense' else '-'} | "
              f"{r.get('resident_bytes', 0) / 2**30:.2f} | {split} | "
              f"{'-' if launches is None else f'{launches:.0f}'} |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--merge"]:  # decode.py --merge OUT.json IN.json ...
        merge(sys.argv[3:], sys.argv[2])
    elif sys.argv[1:2] == ["--table"]:  # decode.py --table decode_NVIDIA_H200.json
        table(sys.argv[2])
    else:
        main()
