"""``wina-fx`` command line.

    wina-fx generate [--model smollm2] [--method wina] [--sparsity 0.5] [--prefill sparse|dense]
                     [--new-tokens 40] [--no-inductor] "prompt"

Answers one prompt with model.generate() (KV cache), dense and under backend="wina", and
prints both answers side by side with their tokens/s.

    wina-fx eval [--model smollm2] [--methods dense,wina,teal] [--sparsities 0.25,0.4,0.5,0.65]
                 [--selection topk] [--allocation uniform[,greedy]] [--orthogonalize false[,true]]
                 [--recipes default[,paper]]
                 [--tasks wordnet_gloss,quiz_facts | all | none] [--limit 100] [--seed 0]
                 [--windows 8] [--window-len 512] [--calibration-windows 8] [--json PATH] [--inductor]

Evaluates a real pretrained model (``wina_fx.models``) on the shipped held-out data, dense
and under backend="wina" for every method x orthogonalize x allocation x sparsity:
perplexity on ``wina_fx/data/evaluation.txt`` and zero-shot multiple-choice accuracy
(acc, acc_norm) on ``wina_fx/data/tasks``. Prints a table and, with --json, writes the
records. Configurations that need a calibration (threshold selection, greedy allocation,
R-Sparse's search) get one from ``wina_fx/data/calibration.txt``, a different text.
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time

import torch


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    for v in values:
        if not 0.0 <= v < 1.0:
            raise argparse.ArgumentTypeError(f"every sparsity must be in [0, 1), got {v:g}")
    return values


def _choices(valid, allow_all: bool = False, allow_none: bool = False):
    def parse(text: str) -> list[str]:
        if allow_all and text == "all":
            return list(valid)
        if allow_none and text in ("none", ""):
            return []
        values = [v.strip() for v in text.split(",") if v.strip()]
        bad = [v for v in values if v not in valid]
        if bad or not values:
            extra = (" or 'all'" if allow_all else "") + (" or 'none'" if allow_none else "")
            raise argparse.ArgumentTypeError(
                f"invalid choice {', '.join(map(repr, bad)) or repr(text)}: "
                f"give a comma-separated list of {', '.join(map(repr, valid))}{extra}"
            )
        return list(dict.fromkeys(values))

    return parse


def _orthogonalize(text: str) -> list:
    from .options import ORTHOGONALIZE

    named = {"false": False, "no": False, "true": "full", "yes": "full", **{v: v for v in ORTHOGONALIZE}}
    values = _choices(tuple(named))(text.lower())
    return list(dict.fromkeys(named[v] for v in values))


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def grid(methods, sparsities, selection="topk", allocations=("uniform",), orthogonalize=(False,), inductor=False,
         recipes=("default",)):
    """The EvalConfigs of a grid: dense once (if asked for), then every method x recipe (those
    the method has) x orthogonalize x allocation x sparsity. A sparsity of 0 adds nothing:
    dense is that row; a recipe with its own transform is not combined with orthogonalize."""
    from .eval import EvalConfig
    from .methods import get_method

    configs = [EvalConfig("dense", 0.0, inductor=inductor)] if "dense" in methods else []
    for method in methods:
        if method == "dense":
            continue
        for recipe in [r for r in recipes if r in get_method(method).recipes]:
            own_transform = get_method(method).recipes[recipe].transform is not None
            for orth in ([False] if own_transform else orthogonalize):
                for allocation in allocations:
                    for sparsity in sparsities:
                        if sparsity > 0:
                            configs.append(EvalConfig(method, sparsity, selection, allocation, orth, inductor, recipe))
    return configs


def _sparsity(text: str) -> float:
    values = _floats(text)
    if len(values) != 1:
        raise argparse.ArgumentTypeError(f"expected one number in [0, 1), got {text!r}")
    return values[0]


def build_parser() -> argparse.ArgumentParser:
    from .methods import get_method, method_names
    from .options import ALLOCATIONS, PREFILLS, SELECTIONS

    methods = method_names()
    from .models import MODELS
    from .tasks import TASKS

    parser = argparse.ArgumentParser(prog="wina-fx", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    ev = sub.add_parser("eval", help="perplexity and task accuracy for methods x sparsities",
                        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ev.add_argument("--model", default="smollm2", choices=list(MODELS))
    ev.add_argument("--methods", type=_choices(methods), default="dense,wina,teal",
                    help=f"comma-separated, of {', '.join(methods)} (default: dense,wina,teal)")
    ev.add_argument("--sparsities", type=_floats, default="0.25,0.4,0.5,0.65", help="comma-separated, each in [0, 1)")
    ev.add_argument("--selection", choices=SELECTIONS, default="topk")
    ev.add_argument("--allocation", type=_choices(ALLOCATIONS), default="uniform",
                    help=f"comma-separated, of {', '.join(ALLOCATIONS)} (option sparsity_allocation)")
    ev.add_argument("--recipes", type=_choices(("default", "paper")), default="default",
                    help="comma-separated, of default, paper (option recipe; paper: wina and teal as the WINA "
                         "paper's code ran them; methods without it run default only)")
    ev.add_argument("--orthogonalize", type=_orthogonalize, default="false",
                    help="comma-separated, of false, true, full, local, shared (the prepass; true = full)")
    ev.add_argument("--tasks", type=_choices(TASKS, allow_all=True, allow_none=True), default="none",
                    help=f"comma-separated, of {', '.join(TASKS)}, or 'all', or 'none' (default: none)")
    ev.add_argument("--limit", type=_positive, default=None,
                    help="items per task: the first N after a shuffle with --seed (default: all)")
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--scorer", choices=["builtin", "harness"], default="builtin",
                    help="who scores the tasks: wina_fx.tasks, or lm-evaluation-harness (acc with its stderr; "
                         "the first --limit items in file order)")
    ev.add_argument("--windows", type=int, default=64,
                    help="perplexity windows of --window-len tokens (default 64 x 512: the 32.8k tokens of the text; 0: none)")
    ev.add_argument("--window-len", type=_positive, default=512)
    ev.add_argument("--calibration-windows", type=_positive, default=8,
                    help="windows of calibration.txt (of --window-len tokens) for the configurations that need them")
    ev.add_argument("--batch-size", type=_positive, default=16, help="sequences per forward pass in task scoring")
    ev.add_argument("--json", help="write the header and records here as JSON")
    ev.add_argument("--inductor", action=argparse.BooleanOptionalAction, default=False,
                    help="compile the rewritten graph with Inductor (same numbers; default: op by op, no compile time)")

    gen = sub.add_parser("generate", help="answer one prompt dense and sparse, side by side, with tokens/s")
    gen.add_argument("prompt")
    gen.add_argument("--model", default="smollm2", choices=list(MODELS))
    gen.add_argument("--method", default="wina", choices=[m for m in methods if get_method(m).calibrated and not get_method(m).keeps_input_rows],
                     help="top-k selection; rsparse needs a calibration (use wina-fx eval)")
    gen.add_argument("--sparsity", type=_sparsity, default=0.5, help="in [0, 1)")
    gen.add_argument("--prefill", choices=PREFILLS, default="sparse")
    gen.add_argument("--new-tokens", type=_positive, default=40)
    gen.add_argument("--inductor", action=argparse.BooleanOptionalAction, default=True,
                     help="compile with Inductor (default) or run the rewritten graph op by op")
    return parser


def parse_args(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "eval":
        return args
    if args.windows < 0:
        parser.error(f"argument --windows: must be >= 0, got {args.windows}")
    if args.windows == 0 and not args.tasks:
        parser.error("nothing to evaluate: --windows 0 and --tasks none")
    if args.limit is not None and not args.tasks:
        parser.error("argument --limit: needs --tasks (it limits the items of each task)")
    return args


def run_eval(args) -> tuple[dict, list[dict]]:
    from .eval import EvalData, calibrate_for, calibration_kind, calibration_windows, evaluate
    from .models import DESCRIPTIONS, load_model

    configs = grid(args.methods, args.sparsities, args.selection, args.allocation, args.orthogonalize, args.inductor,
                   args.recipes)
    model, tokenizer = load_model(args.model)
    data = EvalData.build(tokenizer, args.tasks, args.limit, args.windows, args.window_len, args.seed, args.scorer)
    header = header_for(args.model, DESCRIPTIONS[args.model], data, seed=args.seed)
    calibrations, records = {}, []
    targets = sorted({c.sparsity for c in configs})
    for config in configs:
        started = time.time()
        calibration = None
        if config.needs_calibration:
            kind = calibration_kind(config)
            if kind not in calibrations:
                inputs = calibration_windows(tokenizer, args.calibration_windows, args.window_len)
                calibrations[kind] = calibrate_for(model, inputs, config, targets)
            calibration = calibrations[kind]
        record = evaluate(model, tokenizer, config, data, calibration, batch_size=args.batch_size)
        record["seconds"] = round(time.time() - started, 1)
        records.append(record)
        print(f"{config.label}: {summarize(record)} ({record['seconds']:.0f} s)", flush=True)
    return header, records


def header_for(model: str, description: str, data, **extra) -> dict:
    return {
        "model": model,
        "description": description,
        **data.describe(),
        **extra,
        "torch": torch.__version__,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
    }


def summarize(record: dict) -> str:
    parts = []
    if "ppl" in record:
        ci = record.get("ppl_ci")
        parts.append(f"ppl {record['ppl']:.2f}" + (f" [{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""))
    if record.get("tasks"):
        parts.append(f"acc {record['acc_mean']:.3f} acc_norm {record['acc_norm_mean']:.3f}")
    if record.get("measured_sparsity") is not None:
        parts.append(f"measured sparsity {record['measured_sparsity']:.3f}")
    return ", ".join(parts)


def run_generate(args) -> list[dict]:
    """Load, compile and answer: dense (Inductor) then backend="wina"; a progress bar over
    the slow part (loading, and each configuration's compilation on its first answer)."""
    import textwrap

    from tqdm import tqdm

    from .models import chat_prompt_ids, load_model

    stages = tqdm(total=3, desc="loading the model", unit="step", leave=False)
    model, tokenizer = load_model(args.model)
    stages.update()
    ids = chat_prompt_ids(tokenizer, args.prompt)
    options = {"method": args.method, "sparsity": args.sparsity, "prefill": args.prefill, "inductor": args.inductor}
    runs = [("dense", "inductor", None),
            (f"{args.method} {args.sparsity:.0%}, prefill {args.prefill}", "wina", options)]
    results = []
    for label, backend, opts in runs:
        stages.set_description(f"compiling {label}")
        torch._dynamo.reset()
        model.forward = torch.compile(type(model).forward.__get__(model), backend=backend, options=opts, dynamic=True)

        def answer():
            with torch.no_grad():
                started = time.perf_counter()
                out = model.generate(ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                     do_sample=False, pad_token_id=tokenizer.eos_token_id)
                return out, time.perf_counter() - started

        answer()  # compiles
        stages.update()
        out, seconds = answer()
        new = out.shape[1] - ids.shape[1]
        results.append({"label": label, "answer": tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True),
                        "tokens_per_s": new / seconds})
    stages.close()
    del model.forward
    width = 44
    columns = [[r["label"], "-" * width, *textwrap.wrap(r["answer"].strip() or "(empty)", width), "",
                f"{r['tokens_per_s']:.1f} tokens/s"] for r in results]
    for left, right in itertools.zip_longest(*columns, fillvalue=""):
        print(f"{left:<{width}} | {right}")
    return results


def main(argv=None) -> None:
    from .eval import comparison_table, comparisons, markdown_table

    args = parse_args(argv)
    if args.command == "generate":
        run_generate(args)
        return
    header, records = run_eval(args)
    print()
    print(markdown_table(records, "ppl" if args.windows else "acc_mean"))
    if args.tasks and args.windows:
        print()
        print(markdown_table(records, "acc_mean"))
    if comparisons(records):
        print()
        print(comparison_table(records))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
