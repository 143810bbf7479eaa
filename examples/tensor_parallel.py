"""Sparse inference of a tensor-parallel model: backend="wina" on DTensor weights.

    torchrun --standalone --nproc-per-node 2 examples/tensor_parallel.py --device cpu --tiny
    torchrun --standalone --nproc-per-node 3 examples/tensor_parallel.py --device cpu --model smollm2
    torchrun --standalone --nproc-per-node 2 examples/tensor_parallel.py --device cuda   # decode benchmark

Every rank builds the same tiny random Llama, calibrates it (threshold selection), and
compiles it twice: whole, in one process, and sharded with ``parallelize_module``
(q/k/v, gate and up ColwiseParallel; o and down RowwiseParallel; the output head over the
vocabulary) over all ranks (gloo).
The last line printed compares the two models' logits:

    tp=2 vs one process: max relative error 3.1e-07

Threshold rules give the one-process masks exactly (wina_fx/sharded.py says why), so the
error is float summation order only.

``--model smollm2`` (SmolLM2-135M, 3 ranks: its 9 heads and 3 KV heads split in three):
perplexity on windows of the evaluation text, one process against tensor parallel, for
threshold (calibrated) and top-k.  Top-k on a row-parallel linear keeps k per rank's slice
of the channels, not the top k of all of them; the paired difference says what that costs.

``--device cuda`` (NCCL, one GPU a rank; ``--decode`` on the CPU with ``--tiny`` runs the same
code on gloo): greedy decoding of the Llama-3-8B shape with random bf16 weights and a static
cache under CUDA graphs, dense tensor parallel against wina at 0 / 50 / 65 %; writes
``benchmarks/results/decode_tp<ranks>_<gpu>.json`` and a PNG (``$OUT`` if set).  Each record
has the sparsity measured on the unsharded model with the same thresholds, and the host time
per step.  On CUDA the timed steps skip dynamo's guards, dense and wina alike
(``--no-skip-guard-eval`` evaluates them: the steps are then paced by the host, which checks
every DTensor weight's spec in Python at every call).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

import wina_fx

COLUMN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROW = ("self_attn.o_proj", "mlp.down_proj")


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config).eval()


def tensor_parallel(model, mesh):
    """q/k/v, gate and up split over their outputs, o and down over their inputs; the output
    head over the vocabulary, its logits gathered (as transformers' tp_plan does), unless the
    embedding shares its weight."""
    plan = {}
    for i in range(len(model.model.layers)):
        plan.update({f"model.layers.{i}.{name}": ColwiseParallel() for name in COLUMN})
        plan.update({f"model.layers.{i}.{name}": RowwiseParallel() for name in ROW})
    if model.lm_head.weight is not model.model.embed_tokens.weight:
        plan["lm_head"] = ColwiseParallel(output_layouts=Replicate())
    return parallelize_module(model, mesh, plan)


def collectives(sharded, ids, options) -> tuple[int, int]:
    """Collectives of one forward, op by op: the sharded model run eagerly (dense) and through
    the backend without Inductor.  Equal counts: every sparse op ran on its rank's shards,
    none needed a weight gathered."""
    from torch.distributed.tensor.debug import CommDebugMode

    counts = []
    with torch.no_grad():
        for step in (sharded, torch.compile(sharded, backend="wina", options={**options, "inductor": False})):
            torch._dynamo.reset()
            with CommDebugMode() as comm:
                step(ids)
            counts.append(comm.get_total_counts())
    return counts[0], counts[1]


def compare_perplexity(args) -> None:
    """Perplexity of a real model, one process vs tensor parallel, threshold and top-k."""
    from wina_fx.data import text
    from wina_fx.eval import calibration_windows, token_windows, window_losses
    from wina_fx.models import load_model
    from wina_fx.stats import paired_difference

    world, rank = dist.get_world_size(), dist.get_rank()
    model, tokenizer = load_model(args.model)
    windows = token_windows(tokenizer, text("evaluation"), 512, args.windows)
    calibration = wina_fx.calibrate(model, calibration_windows(tokenizer, 4), progress=False)
    sharded = tensor_parallel(copy.deepcopy(model), init_device_mesh("cpu", (world,)))
    rows = []
    for selection in ("threshold", "topk"):
        options = {"sparsity": args.sparsity, "selection": selection, "inductor": False,
                   **({"calibration": calibration} if selection == "threshold" else {})}
        losses = []
        for candidate in (model, sharded):
            torch._dynamo.reset()
            losses.append(window_losses(torch.compile(candidate, backend="wina", options=options), windows))
        (one, tokens), (tp, _) = losses
        diff = paired_difference(tp, one, tokens)
        ppl = [float(torch.tensor(sum(n) / sum(tokens)).exp()) for n in (one, tp)]
        rows.append(f"| {selection} | {ppl[0]:.2f} | {ppl[1]:.2f} | {diff['log_ppl_difference']:+.4f} "
                    f"[{diff['ci'][0]:+.4f}, {diff['ci'][1]:+.4f}] | {'yes' if diff['significant'] else 'no'} |")
    if rank == 0:
        print(f"{args.model}, {args.sparsity:.0%}, {len(windows)} windows of 512 tokens, tp={world} (gloo)\n")
        print("| selection | one process ppl | tp ppl | log ppl(tp) - log ppl(one) | significant |")
        print("|---|---|---|---|---|")
        print("\n".join(rows))
    dist.destroy_process_group()


def _decode_script():
    """benchmarks/decode.py, loaded by path: its model shapes, random-weight builder and timed
    decode loop serve this benchmark too."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks", "decode.py")
    spec = importlib.util.spec_from_file_location("wina_bench_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measured_sparsity(decode, model, prompt, options) -> float | None:
    """The sparsity measured on the unsharded model (``measure=True`` is refused on a
    tensor-parallel graph).  Threshold masks are the tensor-parallel masks (sharded.py); top-k
    per shard keeps its share of k by construction, so that one is not measured here (None)."""
    if options["selection"] != "threshold" or options["sparsity"] == 0:
        return None if options["sparsity"] else 0.0
    return decode.measured_sparsity(model, prompt, options)


def decode_benchmark(args) -> None:
    """Greedy decode, batch 1: dense tensor parallel (Inductor) against backend="wina" on the
    same sharded model at each sparsity (threshold, calibrated on the whole model first)."""
    import json

    world, rank = dist.get_world_size(), dist.get_rank()
    cuda = args.device == "cuda"
    device = f"cuda:{rank % torch.cuda.device_count()}" if cuda else "cpu"
    if cuda:
        torch.cuda.set_device(device)
    dtype = torch.bfloat16 if cuda else torch.float32
    decode = _decode_script()
    # every rank builds the same weights (same seed)
    shape = decode.TINY if args.tiny else decode.LLAMA3_8B
    model = decode.build_model(dict(shape, num_hidden_layers=args.layers or shape["num_hidden_layers"]), device, dtype)
    vocab = model.config.vocab_size
    generator = torch.Generator(device=device).manual_seed(1)
    prompts = [torch.randint(0, vocab, (1, 64), device=device, generator=generator) for _ in range(4)]
    calibration = wina_fx.calibrate(model, prompts, progress=False)
    prompt = torch.randint(0, vocab, (1, 32), device=device, generator=generator)
    sparsities = [float(s) for s in args.sparsities.split(",")]
    measured = {s: measured_sparsity(decode, model, prompt, {"sparsity": s, "selection": args.selection,
                                                             "calibration": calibration}) for s in sparsities}
    mesh = init_device_mesh(device.split(":")[0], (world,))
    sharded = tensor_parallel(model, mesh)
    if args.one_shot_all_reduce:  # Inductor lowers small all-reduces to one-shot over symmetric memory
        from torch._inductor import config as inductor_config
        from torch.distributed._symmetric_memory import enable_symm_mem_for_group

        enable_symm_mem_for_group(mesh.get_group().group_name)
        inductor_config._collective.auto_select = True
    # the static cache holds this rank's heads
    sharded.config.num_attention_heads //= world
    sharded.config.num_key_value_heads //= world
    mode = {"mode": "reduce-overhead"} if cuda else {}
    pdl = decode.same_launches(args.pdl, device)  # dense TP launches its kernels as wina TP does
    gpu = torch.cuda.get_device_name().replace(" ", "_") if cuda else "cpu-tiny"
    header = {"gpu": gpu, "ranks": world, "torch": torch.__version__, "transformers": transformers.__version__,
              "triton": getattr(__import__("triton"), "__version__", None) if cuda else None,
              "model": f"{'tiny Llama' if args.tiny else 'Llama-3-8B shape'}, {model.config.num_hidden_layers} layers, "
                       "random weights", "batch": 1, "tokens": args.tokens, "selection": args.selection,
              "backend": dist.get_backend(), "skip_guard_eval": args.skip_guard_eval,
              "one_shot_all_reduce": args.one_shot_all_reduce, "pdl": pdl,
              "output_head": "sharded over the vocabulary" if wina_fx.sharded.is_sharded(sharded.lm_head.weight)
              else "whole"}
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "..",
                                                     "benchmarks", "results")
    path = os.path.join(out_dir, f"decode_tp{world}_{gpu}{args.suffix}.json")
    records = []
    for sparsity in [None] + sparsities:
        torch._dynamo.reset()
        if sparsity is None:
            step = torch.compile(sharded, fullgraph=True, dynamic=False, **mode)
        else:
            options = {"sparsity": sparsity, "selection": args.selection, "calibration": calibration,
                       "pdl": pdl, **mode}
            step = torch.compile(sharded, backend="wina", options=options, fullgraph=True, dynamic=False)
        host = {}

        def start_clock():  # every rank starts together; warmed up, guards may be skipped
            dist.barrier()
            if args.skip_guard_eval:
                torch.compiler.set_stance("default", skip_guard_eval_unsafe=True)

        try:
            rate = decode.decode_tokens_per_s(sharded, step, prompt, args.tokens, args.warmup, sync=start_clock,
                                              host=host)
        finally:
            torch.compiler.set_stance("default")
        dense = records[0]["tokens_per_s"] if records else rate
        records.append({"impl": "dense_tp" if sparsity is None else "wina_tp", "sparsity": sparsity or 0.0,
                        "tokens_per_s": rate, "speedup_vs_dense": rate / dense, **host,
                        "measured_sparsity": measured.get(sparsity, 0.0), "calibrated_sparsity": sparsity or 0.0})
        if sparsity is not None:
            records[-1]["notes"] = wina_fx.last_report().notes
        if args.find_sync and cuda:  # every rank steps (the collectives need both); rank 0 prints
            synchronizing_calls(decode, sharded, step, prompt, rank)
        if args.cprofile:  # every rank steps (the collectives need both); rank 0 prints
            host_profile(decode, sharded, step, prompt, rank)
        if args.profile and cuda:  # every rank steps (the collectives need both); rank 0 keeps it
            records[-1]["profile"] = decode.kernel_profile(sharded, step, prompt)
            records[-1]["profile"].pop("all")
        if rank == 0:
            print(f"{records[-1]['impl']} {sparsity or 0:.0%}: {rate:.1f} tokens/s, {rate / dense:.2f}x dense tp, "
                  f"measured sparsity {records[-1]['measured_sparsity']} (host {host['host_us_per_step']:.0f} of "
                  f"{1e6 / rate:.0f} us a step)", flush=True)
            for row in records[-1].get("profile", {}).get("top", []):
                print(f"    {row['us_per_step']:8.1f} us x{row['calls_per_step']:g}  {row['kernel']}", flush=True)
            for row in records[-1].get("profile", {}).get("layer_timeline") or []:  # one layer, in order
                print(f"    {row['idle_before_us']:6.1f} idle, {row['us']:6.1f} us  {row['kernel']}", flush=True)
            os.makedirs(out_dir, exist_ok=True)
            with open(path, "w") as f:  # after every configuration: a run cut short keeps what it measured
                json.dump({"header": header, "records": records}, f, indent=1)
    if rank == 0:
        _plot(records, header, path.replace(".json", ".png"))
        print(f"wrote {path}")


def host_profile(decode, model, step, prompt, rank: int, steps: int = 32) -> None:
    """cProfile of ``steps`` decode steps; rank 0 prints the functions with the most time of
    their own (time no Python function accounts for, such as dynamo's guard evaluation in
    C++, lands in the frame that calls the compiled code)."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()

    def start():  # every rank starts together, the profiler with the clock
        dist.barrier()
        profiler.enable()

    decode.decode_tokens_per_s(model, step, prompt, steps, 2, sync=start)
    profiler.disable()
    if rank == 0:
        print(f"cProfile of {steps} decode steps, rank 0:")
        pstats.Stats(profiler).sort_stats("tottime").print_stats(16)


def synchronizing_calls(decode, model, step, prompt, rank: int, steps: int = 4) -> None:
    """Decode ``steps`` warmed-up steps under ``torch.cuda.set_sync_debug_mode("warn")``; rank 0
    prints each distinct host-device synchronization with the Python stack that made it. A
    step that waits for the GPU keeps the host from queueing the next one, so its wall time is
    host plus GPU instead of the larger of the two."""
    import traceback
    import warnings

    seen = {}

    def record(message, category, filename, lineno, file=None, line=None):
        if "synchroniz" in str(message):
            stack = "".join(traceback.format_stack(limit=14)[:-1])
            seen[stack] = seen.get(stack, 0) + 1

    def start():
        dist.barrier()
        torch.cuda.set_sync_debug_mode("warn")

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = record
        try:
            decode.decode_tokens_per_s(model, step, prompt, steps, 2, sync=start)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    if rank == 0:
        print(f"synchronizing CUDA calls in {steps} decode steps, rank 0: {sum(seen.values())}")
        for stack, count in sorted(seen.items(), key=lambda kv: -kv[1]):
            print(f"  x{count} from:\n{stack}")


def _plot(records, header, path) -> None:
    try:
        import matplotlib
    except ImportError:
        print(f"matplotlib is not installed: no {os.path.basename(path)}")
        return

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    labels = [f"{r['impl']} {r['sparsity']:.0%}" for r in records]
    ax.bar(labels, [r["tokens_per_s"] for r in records], color=["grey"] + ["tab:blue"] * (len(records) - 1))
    for i, r in enumerate(records):
        ax.text(i, r["tokens_per_s"], f"{r['speedup_vs_dense']:.2f}x", ha="center", va="bottom")
    ax.set_ylabel("tokens/s (batch 1)")
    ax.set_title(f"{header['model']}, tp={header['ranks']}, {header['gpu']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cpu: gloo; cuda: NCCL, one GPU a rank")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama")
    parser.add_argument("--model", choices=["smollm2"], help="a real model: perplexity, one process vs tp")
    parser.add_argument("--decode", action="store_true",
                        help="decode tokens/s, dense tp vs wina tp (default on cuda; the Llama-3-8B shape unless --tiny)")
    parser.add_argument("--sparsities", default="0,0.5,0.65", help="--decode: wina sparsities")
    parser.add_argument("--tokens", type=int, default=64, help="--decode: timed tokens")
    parser.add_argument("--warmup", type=int, default=4, help="--decode: untimed tokens first")
    parser.add_argument("--windows", type=int, default=8, help="--model: evaluation windows of 512 tokens")
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--selection", choices=["threshold", "topk"], default="threshold",
                        help="--decode: the wina selection (topk: per shard)")
    parser.add_argument("--layers", type=int, default=None, help="--decode: decoder layers (default: the shape's)")
    parser.add_argument("--profile", action="store_true", help="--decode on cuda: GPU time per step by kernel")
    parser.add_argument("--suffix", default="", help="--decode: appended to the result file name")
    parser.add_argument("--skip-guard-eval", action=argparse.BooleanOptionalAction, default=None,
                        help="--decode: time the warmed-up steps under torch.compiler.set_stance(skip_guard_eval_unsafe="
                             "True), dense and wina alike: dynamo's guards check every DTensor weight in Python at "
                             "every call, and nothing they check changes between decode steps (default: on for cuda)")
    parser.add_argument("--cprofile", action="store_true", help="--decode: rank 0's host time by Python function")
    parser.add_argument("--find-sync", action="store_true",
                        help="--decode on cuda: where a decode step makes the host wait for the GPU (rank 0)")
    parser.add_argument("--pdl", action=argparse.BooleanOptionalAction, default=True,
                        help="--decode: programmatic dependent launch on sm_90+, dense and wina alike (the backend's "
                             "option pdl; Inductor's triton.enable_pdl for dense)")
    parser.add_argument("--one-shot-all-reduce", action="store_true",
                        help="--decode on cuda: Inductor's one-shot all-reduce over symmetric memory, dense and wina "
                             "alike (torch 2.11: fails under CUDA graphs)")
    args = parser.parse_args()
    args.decode = args.decode or args.device == "cuda"
    if args.skip_guard_eval is None:
        args.skip_guard_eval = args.device == "cuda"
    if not (args.tiny or args.model or args.decode) or (args.model and (args.tiny or args.decode)):
        sys.exit("tensor_parallel.py: give --tiny, --model or --decode (see --help)")
    if args.one_shot_all_reduce and not (args.decode and args.device == "cuda"):
        sys.exit("tensor_parallel.py: --one-shot-all-reduce needs --decode --device cuda (symmetric memory over NCCL)")
    if args.device == "cuda":  # NVLink multicast stays off, also for what NCCL starts
        os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
        os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    if args.model:
        return compare_perplexity(args)
    if args.decode:
        decode_benchmark(args)
        # the CUDA graphs captured NCCL work: release them, and let every rank finish its
        # last step, before the process group goes (session 9: the exit hung on two H200s)
        torch._dynamo.reset()
        if args.device == "cuda":
            torch.cuda.synchronize()
        dist.barrier()
        return dist.destroy_process_group()
    world, rank = dist.get_world_size(), dist.get_rank()
    torch.set_num_threads(1)

    model = tiny_llama()
    generator = torch.Generator().manual_seed(1)
    calibration_ids = torch.randint(0, 128, (4, 32), generator=generator)
    ids = torch.randint(0, 128, (2, 16), generator=generator)
    calibration = wina_fx.calibrate(model, [calibration_ids], progress=False)
    options = {"sparsity": args.sparsity, "selection": "threshold", "calibration": calibration}

    sharded = tensor_parallel(copy.deepcopy(model), init_device_mesh("cpu", (world,)))
    with torch.no_grad():
        expected = torch.compile(model, backend="wina", options=options)(ids).logits
        torch._dynamo.reset()
        got = torch.compile(sharded, backend="wina", options=options)(ids).logits
    report = wina_fx.last_report()
    dense_comm, sparse_comm = collectives(sharded, ids, options)
    error = ((got - expected).abs().max() / expected.abs().max()).item()
    if rank == 0:
        print(report)
        print(f"collectives per forward: dense tp {dense_comm}, wina tp {sparse_comm}")
        print(f"tp={world} vs one process: max relative error {error:.2g}")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
