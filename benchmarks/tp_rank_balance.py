"""How evenly two tensor-parallel ranks share a row-parallel sparse linear's kept channels (issue 14).

A row-parallel linear (o_proj, down_proj) is split over its input channels: rank r holds
channels [r K / n, (r + 1) K / n) and skips the ones its threshold mask drops, with no
communication.  If one rank's shard keeps more channels at a token, its GEMV runs longer and
the other rank waits in the all-reduce that follows.  This measures the gap on the model of
the tensor-parallel decode benchmark (Llama-3-8B shape, random bf16 weights, a few of its
layers), calibrated as the example calibrates it, on the CPU: for every token and linear,
the largest difference between two ranks' kept shares.

    python benchmarks/tp_rank_balance.py                   # 2 layers, 2 ranks, 50 %; ~3 CPU-minutes

Writes ``benchmarks/results/tp_rank_balance_cpu.json``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys

# transformers looks for a package named "kernels", which benchmarks/kernels.py would answer
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != os.path.dirname(os.path.abspath(__file__))]

import torch  # noqa: E402

import wina_fx  # noqa: E402

ROW_PARALLEL = ("o_proj", "down_proj")


def _decode_script():
    """benchmarks/decode.py, loaded by path: its model shapes and random-weight builder."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "decode.py")
    spec = importlib.util.spec_from_file_location("wina_bench_decode", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rank_gaps(x: torch.Tensor, weight: torch.Tensor, threshold: float, ranks: int) -> torch.Tensor:
    """Per token (row of x), the largest minus the smallest share of its shard's channels that
    a rank keeps under WINA's threshold rule |x_i| * ||W[:, i]|| >= threshold."""
    keep = (x.abs() * weight.float().norm(dim=0)) >= threshold
    shares = keep.float().reshape(x.shape[0], ranks, -1).mean(-1)
    return shares.max(-1).values - shares.min(-1).values


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--tokens", type=int, default=48)
    args = parser.parse_args()

    decode = _decode_script()
    model = decode.build_model(dict(decode.LLAMA3_8B, num_hidden_layers=args.layers), "cpu", torch.bfloat16)
    vocab = model.config.vocab_size
    generator = torch.Generator().manual_seed(1)  # the prompts of examples/tensor_parallel.py
    prompts = [torch.randint(0, vocab, (1, 64), generator=generator) for _ in range(4)]
    calibration = wina_fx.calibrate(model, prompts, progress=False)

    inputs: dict[str, torch.Tensor] = {}
    names = [n for n, _ in model.named_modules() if n.endswith(ROW_PARALLEL)]
    for name in names:
        def keep_input(module, args, name=name):
            inputs[name] = args[0].detach().float().reshape(-1, args[0].shape[-1])
        model.get_submodule(name).register_forward_pre_hook(keep_input)
    with torch.no_grad():
        model(torch.randint(0, vocab, (1, args.tokens), generator=generator))

    records = []
    for name in names:
        gaps = rank_gaps(inputs[name], model.get_submodule(name).weight,
                         calibration.threshold(name, args.sparsity), args.ranks)
        records.append({"linear": name, "in_features": inputs[name].shape[1], "mean_gap": gaps.mean().item(),
                        "max_gap": gaps.max().item()})
        print(f"{name:36s} per token, kept share of the fullest rank minus the emptiest: "
              f"mean {gaps.mean():.4f}, max {gaps.max():.4f}")
    header = {"model": f"Llama-3-8B shape, {args.layers} layers, random bf16 weights", "ranks": args.ranks,
              "sparsity": args.sparsity, "tokens": args.tokens, "torch": torch.__version__, "device": "cpu"}
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tp_rank_balance_cpu.json")
    with open(out, "w") as f:
        json.dump({"header": header, "records": records}, f, indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
