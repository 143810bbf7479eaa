"""One-token grouped-query attention under Inductor: K/V repeated per query head (as traced) or
packed (``passes/pack_gqa.py``), on each attention backend, timed per layer in a CUDA graph.

    python benchmarks/attention_decode.py [--lengths 169,1024,4096]

Llama-3-8B's attention (32 query heads over 8 K/V heads of 128, bf16, batch 1) with a boolean
mask shared by every head, as transformers' decode step has it.  Each variant is compiled by
Inductor with the sdpa backends it names enabled (the backend is chosen while Inductor traces
the graph), run over 32 layers' own Q/K/V in one CUDA graph (their caches together exceed
L2 from 1024 positions on), and reported in us per layer.  Writes
``attention_decode_<gpu>.json`` to $OUT (else benchmarks/results/).  Needs CUDA.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, KV_HEADS, DIM, LAYERS = 32, 8, 128, 32
GROUPS = HEADS // KV_HEADS
BACKENDS = {"default": None, "cudnn": [SDPBackend.CUDNN_ATTENTION], "efficient": [SDPBackend.EFFICIENT_ATTENTION],
            "math": [SDPBackend.MATH]}


def repeated(q, k, v, mask):
    k = k[:, :, None].expand(1, KV_HEADS, GROUPS, k.shape[2], DIM).reshape(1, HEADS, k.shape[2], DIM)
    v = v[:, :, None].expand(1, KV_HEADS, GROUPS, v.shape[2], DIM).reshape(1, HEADS, v.shape[2], DIM)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=DIM ** -0.5)


def packed(q, k, v, mask):
    out = torch.nn.functional.scaled_dot_product_attention(q.reshape(1, KV_HEADS, GROUPS, DIM), k, v, attn_mask=mask,
                                                           scale=DIM ** -0.5)
    return out.reshape(1, HEADS, 1, DIM)


def gqa_flag(q, k, v, mask):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=DIM ** -0.5,
                                                            enable_gqa=True)


FORMS = {"repeated": repeated, "packed": packed, "gqa_flag": gqa_flag}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", default="169,1024,4096", help="cache lengths (positions), comma-separated")
    parser.add_argument("--replays", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_decode.py needs CUDA")
    device = torch.device("cuda")
    records = []
    for length in (int(s) for s in args.lengths.split(",")):
        gen = torch.Generator(device=device).manual_seed(0)
        layers = [(torch.randn(1, HEADS, 1, DIM, device=device, generator=gen, dtype=torch.bfloat16),
                   torch.randn(1, KV_HEADS, length, DIM, device=device, generator=gen, dtype=torch.bfloat16),
                   torch.randn(1, KV_HEADS, length, DIM, device=device, generator=gen, dtype=torch.bfloat16))
                  for _ in range(LAYERS)]
        mask = (torch.arange(length, device=device) <= length - 3).view(1, 1, 1, length)  # the last two unused
        expected = [repeated(q.float(), k.float(), v.float(), mask) for q, k, v in layers]
        for form, fn in FORMS.items():
            for backend, enabled in BACKENDS.items():
                torch._dynamo.reset()
                compiled = torch.compile(fn, fullgraph=True, dynamic=False)

                def all_layers():
                    return [compiled(q, k, v, mask) for q, k, v in layers]

                try:
                    with sdpa_kernel(enabled) if enabled else contextlib.nullcontext():
                        outs = all_layers()  # Inductor traces here, with these backends enabled
                    torch.cuda.synchronize()
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph):
                        outs = all_layers()
                    graph.replay()
                    torch.cuda.synchronize()
                except Exception as error:  # a backend that does not take this form
                    print(f"L={length} {form:9s} {backend:9s}: not run ({type(error).__name__}: "
                          f"{str(error).splitlines()[0][:120]})", flush=True)
                    records.append({"length": length, "form": form, "backend": backend, "us_per_layer": None,
                                    "error": str(error).splitlines()[0][:300]})
                    continue
                err = max(((o.float() - e).norm() / e.norm()).item() for o, e in zip(outs, expected))
                assert err < 2e-2, (length, form, backend, err)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(args.replays):
                    graph.replay()
                end.record()
                torch.cuda.synchronize()
                us = start.elapsed_time(end) * 1e3 / args.replays / LAYERS
                records.append({"length": length, "form": form, "backend": backend, "us_per_layer": us,
                                "max_rel_err": err})
                print(f"L={length} {form:9s} {backend:9s}: {us:6.2f} us per layer (rel err {err:.1e})", flush=True)

    import triton
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    out_dir = os.environ.get("OUT") or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    os.makedirs(out_dir, exist_ok=True)
    header = {"gpu": gpu, "torch": torch.__version__, "triton": triton.__version__, "dtype": "bfloat16",
              "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": DIM, "layers": LAYERS, "replays": args.replays}
    with open(os.path.join(out_dir, f"attention_decode_{gpu}.json"), "w") as f:
        json.dump({"header": header, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
