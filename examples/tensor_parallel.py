"""Sparse inference of a tensor-parallel model: backend="wina" on DTensor weights.

    torchrun --standalone --nproc-per-node 2 examples/tensor_parallel.py --device cpu --tiny
    torchrun --standalone --nproc-per-node 3 examples/tensor_parallel.py --device cpu --model smollm2

Every rank builds the same tiny random Llama, calibrates it (threshold selection), and
compiles it twice: whole, in one process, and sharded with ``parallelize_module``
(q/k/v, gate and up ColwiseParallel; o and down RowwiseParallel) over all ranks (gloo).
The last line printed compares the two models' logits:

    tp=2 vs one process: max relative error 3.1e-07

Threshold rules give the one-process masks exactly (wina_fx/sharded.py says why), so the
error is float summation order only.

``--model smollm2`` (SmolLM2-135M, 3 ranks: its 9 heads and 3 KV heads split in three):
perplexity on windows of the evaluation text, one process against tensor parallel, for
threshold (calibrated) and top-k.  Top-k on a row-parallel linear keeps k per rank's slice
of the channels, not the top k of all of them; the paired difference says what that costs.
"""
from __future__ import annotations

import argparse
import copy
import sys

import torch
import torch.distributed as dist
import transformers
from torch.distributed.device_mesh import init_device_mesh
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
    """q/k/v, gate and up split over their outputs, o and down over their inputs."""
    plan = {}
    for i in range(len(model.model.layers)):
        plan.update({f"model.layers.{i}.{name}": ColwiseParallel() for name in COLUMN})
        plan.update({f"model.layers.{i}.{name}": RowwiseParallel() for name in ROW})
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu"], default="cpu",
                        help="cpu: gloo (the CUDA decode benchmark is not built yet)")
    parser.add_argument("--tiny", action="store_true", help="a tiny random Llama")
    parser.add_argument("--model", choices=["smollm2"], help="a real model: perplexity, one process vs tp")
    parser.add_argument("--windows", type=int, default=8, help="--model: evaluation windows of 512 tokens")
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args()
    if args.tiny == bool(args.model):
        sys.exit("tensor_parallel.py: give --tiny or --model")
    dist.init_process_group("gloo")
    if args.model:
        return compare_perplexity(args)
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
