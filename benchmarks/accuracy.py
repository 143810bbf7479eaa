"""Quality of every method at 25/40/50/65% sparsity on real models and real data.

The grid: dense, then wina, teal, wina + orthogonalize, rsparse and cats, top-k, with a
uniform sparsity and (where the calibration supports it) TEAL's greedy per-matrix
allocation, at each sparsity. Each configuration is one ``wina_fx.eval.evaluate`` call:
perplexity on the evaluation text and acc / acc_norm on the multiple-choice tasks, with a
per-task item limit (the first N after a seeded shuffle) so that a grid fits on a CPU.

    python benchmarks/accuracy.py --model smollm2                 # run (resumes), then plot
    python benchmarks/accuracy.py --model smollm2 --table         # markdown tables from the JSON
    python benchmarks/accuracy.py --model smollm2 --plot          # only the PNG
    python benchmarks/accuracy.py --model smollm2 --search --only wina+prefix --sparsities 0.5,0.65
                                    # WINA recipes beyond both papers' (search_recipes())

Writes ``benchmarks/results/accuracy_<model>.json`` after every configuration (records
already there are skipped, so an interrupted run resumes; a run with other data settings
refuses to mix with it) and ``accuracy_<model>.png``. Configurations the backend or the
calibration refuses are listed under "skipped" with the reason, and tried again next run.
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

from wina_fx.cli import header_for, summarize  # noqa: E402
from wina_fx.eval import (  # noqa: E402
    EvalConfig, EvalData, accuracy_comparison_table, accuracy_comparisons, calibrate_for, calibration_kind,
    calibration_windows, comparison_table, comparisons, evaluate, markdown_table, record_key, variant,
    verdict_table,
)

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
SPARSITIES = (0.5, 0.65, 0.4, 0.25)  # run order: the most telling first
# (method, orthogonalize, recipe) in run order
VARIANTS = (("wina", False, "default"), ("teal", False, "default"), ("wina", False, "paper"), ("teal", False, "paper"),
            ("wina", "full", "default"), ("rsparse", False, "default"), ("cats", False, "default"))
TASKS = ("wordnet_gloss", "wordnet_example", "quiz_facts", "mmlu_cloze")


def search_recipes() -> dict:
    """Issue 13, part 4: WINA configurations beyond both papers' recipes, the paper's pieces
    taken one at a time (option ``--search`` registers them as recipes of method "wina")."""
    from wina_fx.methods.base import Recipe
    from wina_fx.methods.wina import PAPER

    return {
        "prefix": Recipe("prefix", dense_prefix=PAPER.dense_prefix),  # default + the 1 % dense prefix
        "kgate": Recipe("kgate", scored_kinds=PAPER.scored_kinds),  # the paper's score choice, no transform
        "paper-allnorms": Recipe("paper-allnorms", transform=PAPER.transform,  # the paper's transform,
                                 dense_prefix=PAPER.dense_prefix),          # column norms everywhere
        "shared": Recipe("shared", shared_gate_up=True),  # up keeps the gate's channels
        # TEAL's paper recipe (1 % dense prefix, gate and up sharing a mask) with WINA's score
        "prefix-shared": Recipe("prefix-shared", dense_prefix=PAPER.dense_prefix, shared_gate_up=True),
        # between TEAL (|x|) and WINA (|x| * ||W[:, i]||): the column norm's square root
        "sqrtnorms": Recipe("sqrtnorms", score_power=0.5),
    }


def register_search_recipes() -> list[tuple]:
    """Replace method "wina" by one that also has ``search_recipes()``; the grid variants
    they add."""
    from wina_fx.methods import Wina, register_method

    extra = search_recipes()

    class WinaSearch(Wina):
        recipes = {**Wina.recipes, **extra}

    register_method(WinaSearch(), replace=True)
    return [("wina", False, name) for name in extra]


def grid(allocations, extra_variants=()) -> list[EvalConfig]:
    configs = [EvalConfig("dense")]
    for allocation in allocations:
        for sparsity in SPARSITIES:
            for method, orth, recipe in VARIANTS + tuple(extra_variants):
                configs.append(EvalConfig(method, sparsity, "topk", allocation, orth, recipe=recipe))
    return configs


def load(path: str) -> dict | None:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def save(path: str, results: dict) -> None:
    """Write ``results``, first taking in the records another run added to the file since
    (two runs over different configurations may share a file; a lock orders their writes)."""
    import fcntl

    with open(path + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        merge(results, load(path))
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, path)


def merge(results: dict, other: dict | None) -> int:
    """Add to ``results`` the records of ``other`` (same data settings) it lacks; returns how many."""
    if not other:
        return 0
    if any(results["header"].get(k) != other["header"].get(k) for k in SAME_DATA):
        raise ValueError(f"cannot merge results on other data: { {k: other['header'].get(k) for k in SAME_DATA} }")
    have = {record_key(r) for r in results["records"]}
    new = [r for r in other["records"] if record_key(r) not in have]
    results["records"].extend(new)
    return len(new)


SAME_DATA = ("model", "ppl_tokens", "ppl_window_len", "task_items", "seed", "calibration_windows", "device")


def run(args) -> None:
    from wina_fx.models import DESCRIPTIONS, load_model

    torch.set_num_threads(args.threads)
    path = os.path.join(args.out, f"accuracy_{args.model}{args.suffix}.json")
    started = time.time()
    model, tokenizer = load_model(args.model)
    model = model.to(args.device)
    load_s = time.time() - started
    device = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "cpu"
    data = EvalData.build(tokenizer, args.tasks, args.limit, args.windows, args.window_len, args.seed, args.scorer)
    header = header_for(args.model, DESCRIPTIONS[args.model], data, seed=args.seed,
                        calibration_windows=args.calibration_windows, calibration_text="wina_fx/data/calibration.txt",
                        item_limit=args.limit, cpu=_cpu_name(), device=device, pad_multiple=args.pad_multiple,
                        load_s=round(load_s, 1))
    results = load(path) or {"header": header, "records": [], "skipped": []}
    old = results["header"]
    old.setdefault("device", "cpu")  # files written before the header named it ran on the CPU
    if any(old.get(k) != header.get(k) for k in SAME_DATA):
        sys.exit(f"{path} holds results on other data ({ {k: old.get(k) for k in SAME_DATA} }); "
                 f"use --out elsewhere or delete it")
    done = {record_key(r) for r in results["records"]}
    allocations = ["uniform"] if args.no_greedy else ["uniform", "greedy"]
    if args.no_greedy:
        notes = set(results["header"].get("notes", [])) | {"greedy allocation not run (--no-greedy)"}
        results["header"]["notes"] = sorted(notes)
    targets = sorted(args.sparsities or SPARSITIES)  # the greedy calibration serves every target at once
    calibrations: dict = {}
    results["skipped"] = []
    unchanged = next((f"the orthogonalization prepass left every graph of this model unchanged ({'; '.join(r['notes'])})"
                      for r in results["records"] if r["orthogonalize"] and r.get("orthogonalized_graphs") == 0), None)
    for config in grid(allocations, register_search_recipes() if args.search else ()):
        if config.key() in done or (args.only and variant(_as_record(config)) not in args.only):
            continue
        if args.sparsities and config.sparsity not in args.sparsities and config.method != "dense":
            continue
        if config.orthogonalize and unchanged:  # the prepass refused this model: wina+orth would be wina again
            results["skipped"].append({**_as_record(config), "reason": unchanged})
            continue
        if args.deadline and time.time() - started > args.deadline:
            print(f"deadline of {args.deadline} s passed: stopping before {config.label}", flush=True)
            break
        t0 = time.time()
        try:
            calibration, calibration_s = None, 0.0
            if config.needs_calibration:
                kind = calibration_kind(config)
                if kind not in calibrations:
                    inputs = [w.to(args.device) for w in
                              calibration_windows(tokenizer, args.calibration_windows, args.window_len)]
                    calibrations[kind] = (calibrate_for(model, inputs, config, targets), round(time.time() - t0, 1))
                calibration, calibration_s = calibrations[kind]
            record = evaluate(model, tokenizer, config, data, calibration, args.batch_size, args.pad_multiple)
        except Exception as err:  # recorded, not fatal: the rest of the grid still runs
            reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:400]
            results["skipped"].append({**_as_record(config), "reason": reason})
            print(f"{config.label}: skipped ({reason})", flush=True)
            calibrations.pop(calibration_kind(config), None)
            save(path, results)
            continue
        record["calibration_s"] = calibration_s
        record["seconds"] = round(time.time() - t0, 1)
        results["records"].append(record)
        if config.orthogonalize and record.get("orthogonalized_graphs") == 0:
            unchanged = ("the orthogonalization prepass left every graph of this model unchanged "
                         f"({'; '.join(record['notes'])})")
        save(path, results)
        print(f"{config.label}: {summarize(record)} ({record['seconds']:.0f} s)", flush=True)
    plot(results, os.path.join(args.out, f"accuracy_{args.model}{args.suffix}.png"))


def _as_record(config: EvalConfig) -> dict:
    return {"method": config.method, "orthogonalize": config.orthogonalize, "allocation": config.allocation,
            "selection": config.selection, "sparsity": config.sparsity, "recipe": config.recipe}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def plot(results: dict, path: str) -> None:
    """Perplexity (log scale) and mean accuracy vs sparsity, one line per method variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # wina+orth records where the prepass refused the model are wina again: not drawn
    records = [r for r in results["records"] if not (r["orthogonalize"] and r.get("orthogonalized_graphs") == 0)]
    dense = next((r for r in records if r["method"] == "dense"), None)
    metrics = [("ppl", "perplexity (log scale)"), ("acc_mean", "mean acc over tasks")]
    metrics = [m for m in metrics if any(m[0] in r for r in records)]
    if not metrics:
        return
    fig, axes = plt.subplots(1, len(metrics), figsize=(6.5 * len(metrics), 4.5), squeeze=False)
    for ax, (metric, label) in zip(axes[0], metrics):
        for name in dict.fromkeys(variant(r) for r in records if r["method"] != "dense"):
            rs = sorted((r for r in records if variant(r) == name and metric in r), key=lambda r: r["measured_sparsity"])
            if dense is not None and metric in dense:
                rs = [dense] + rs
            style = "--" if "greedy" in name else "-"
            # x: the sparsity measured over every linear but the head (cats leaves attention,
            # gate and up dense, so its points sit far left of its targets)
            xs, ys = [100 * r["measured_sparsity"] for r in rs], [r[metric] for r in rs]
            line, = ax.plot(xs, ys, style, marker="o", label=name)
            if metric == "ppl" and all(r.get("ppl_ci") for r in rs):  # 95 % bootstrap interval over windows
                ax.fill_between(xs, [r["ppl_ci"][0] for r in rs], [r["ppl_ci"][1] for r in rs],
                                color=line.get_color(), alpha=0.15, lw=0)
        if metric == "ppl":
            ax.set_yscale("log")
        ax.set_xlabel("measured sparsity, size-weighted over all linears but the head (%)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    h = results["header"]
    items = ", ".join(f"{k} {v}" for k, v in h.get("task_items", {}).items())
    fig.suptitle(f"{h['model']}: {h.get('ppl_tokens')} tokens of evaluation text; items: {items}", fontsize=9)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def tables(results: dict) -> str:
    h = results["header"]
    out = [f"{h['description']}; perplexity on {h['ppl_tokens']} tokens of {h['ppl_text']}; "
           f"tasks (items): {', '.join(f'{k} ({v})' for k, v in h['task_items'].items())}; top-k; "
           f"measured on {h['machine']}, torch {h['torch']}.", ""]
    records = results["records"]
    out += ["Rows are target sparsities; cats gates only the down projection's input (attention, gate and up "
            "stay dense), so its real sparsity over all linears is far lower: see the last table.", ""]
    out += ["Perplexity (lower is better; [95% bootstrap interval over windows] where recorded):", "",
            markdown_table(records, "ppl"), ""]
    if comparisons(records):
        out += ["WINA against each rival (log ppl(WINA) - log ppl(rival), 95% paired interval; who is ahead "
                "where it excludes 0):", "", verdict_table(records), ""]
        out += ["Paired differences on the same windows (negative: a predicts the text better; significant: "
                "the 95% paired-bootstrap interval excludes 0):", "", comparison_table(records), ""]
    if any("acc_mean" in r for r in records):
        out += ["Mean accuracy over the tasks (acc; higher is better):", "", markdown_table(records, "acc_mean"), ""]
        out += ["Mean length-normalised accuracy (acc_norm):", "", markdown_table(records, "acc_norm_mean"), ""]
        for task in h["task_items"]:
            out += [f"acc on {task}:", "", markdown_table(records, f"acc_{task}"), ""]
        if accuracy_comparisons(records):
            out += ["Paired accuracy differences on the same items, all tasks together (positive: a answers "
                    "more right; significant: the 95% paired-bootstrap interval excludes 0):", "",
                    accuracy_comparison_table(records), ""]
    out += ["Measured sparsity (size-weighted over all linears but the head):", "",
            markdown_table(records, "measured_sparsity"), ""]
    if results.get("skipped"):
        out += ["Not run:", ""] + [f"- {s['method']} orth={s['orthogonalize']} {s['allocation']} {s['sparsity']:.0%}: "
                                    f"{s['reason']}" for s in results["skipped"]]
    return "\n".join(out)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--limit", type=int, default=100, help="items per task (first N after a seeded shuffle)")
    parser.add_argument("--windows", type=int, default=64, help="perplexity windows (64 x 512: the whole text)")
    parser.add_argument("--window-len", type=int, default=512)
    parser.add_argument("--calibration-windows", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scorer", choices=["builtin", "harness"], default="builtin",
                        help="who scores the tasks (harness: lm-evaluation-harness, acc with its stderr)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-greedy", action="store_true", help="uniform allocation only")
    parser.add_argument("--only", help="comma-separated variants to run, e.g. 'wina,teal,wina+orth' (default: all)")
    parser.add_argument("--pad-multiple", type=int, default=16, help="task sequences are padded to a multiple of this")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--deadline", type=float, default=0, help="start no configuration after this many seconds")
    parser.add_argument("--suffix", default="", help="results file accuracy_<model><suffix>.json")
    parser.add_argument("--out", default=RESULTS)
    parser.add_argument("--sparsities", help=f"comma-separated targets to run (default: all of {SPARSITIES})")
    parser.add_argument("--search", action="store_true",
                        help="also run the WINA recipes of search_recipes() (beyond both papers' recipes)")
    parser.add_argument("--table", action="store_true", help="print markdown tables from the JSON and exit")
    parser.add_argument("--plot", action="store_true", help="only redraw the PNG from the JSON")
    parser.add_argument("--merge-from", metavar="JSON",
                        help="add the records of another results file on the same data (e.g. a run written "
                             "with another --suffix) to this model's file, then exit")
    args = parser.parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    args.only = set(args.only.split(",")) if args.only else None
    args.sparsities = {float(s) for s in args.sparsities.split(",")} if args.sparsities else None
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"accuracy_{args.model}{args.suffix}.json")
    if args.merge_from:
        results, other = load(path), load(args.merge_from)
        if results is None or other is None:
            sys.exit(f"--merge-from: both {path} and {args.merge_from} must exist")
        added = merge(results, other)
        save(path, results)
        print(f"added {added} records of {args.merge_from} to {path}")
        return
    if args.table or args.plot:
        results = load(path)
        if results is None:
            sys.exit(f"no results at {path}: run without --table first")
        if args.table:
            print(tables(results))
        if args.plot:
            plot(results, os.path.join(args.out, f"accuracy_{args.model}{args.suffix}.png"))
        return
    run(args)


if __name__ == "__main__":
    main()
