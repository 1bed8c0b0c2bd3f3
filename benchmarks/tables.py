"""Render the tables of BENCHMARKS.md from the JSON files `tokencomp bench --json` wrote.

    python benchmarks/tables.py benchmarks/results/cpu                  # print the table
    python benchmarks/tables.py benchmarks/results/cpu --update BENCHMARKS.md
        # replace the text between <!-- table:cpu --> and <!-- /table:cpu --> with it
    python benchmarks/tables.py benchmarks/results/scaling --scaling --update BENCHMARKS.md
        # the scaling tables: ratios as vision tokens grow (batch 1) and as the batch grows
    python benchmarks/tables.py benchmarks/results/gpu --gpu --update BENCHMARKS.md
        # the GPU efficiency comparison (benchmarks/gpu.sh runs it)
    python benchmarks/tables.py benchmarks/results/cpu --reproduce benchmarks/results/rerun/cpu --tag reproduce-cpu \
        --update BENCHMARKS.md   # a rerun's ratios against the first run's intervals

The tag is the folder's name. Tables are generated from the result files only: never edit them by hand.
"""

import argparse
import json
import re
from pathlib import Path

from tokencomp.bench import MARKDOWN_HEADER, add_llm_latency, format_markdown_row, rerun_bounds


def load(folder: Path) -> list:
    reps = [rep for path in sorted(folder.glob("*.json")) for rep in read(path)]
    reps.sort(key=lambda r: (r["vision_tokens"], r.get("batch", 1), r["recipe"]))
    return reps


def read(path: Path) -> list:
    """The reports of one result file, with what newer versions derive from the per-round times
    (the LLM generation latency) added to files written before."""
    return [add_llm_latency(rep) for rep in json.loads(path.read_text())]


def _ratio(rep: dict, key: str, series: str):
    """``rep["ratios"][key][series]`` (a paired ratio with its interval), or None where absent."""
    return rep.get("ratios", {}).get(key, {}).get(series)


def preamble(reps: list) -> str:
    first = reps[0]
    models = ", ".join(sorted({r.get("model_spec", r["model"]) for r in reps}))
    rounds = sorted({r["repeat"] for r in reps})
    def levels(name: str, digits: int) -> str:
        """``"96% for 15 rounds, ..."``: the ``name`` level of the prefill ratio, per round count."""
        got = sorted({(r["repeat"], p[name]) for r in reps if (p := _ratio(r, "recipe/untouched", "prefill")) and p.get(name)})
        return ", ".join(f"{100 * c:.{digits}f}% for {n} rounds" for n, c in got)

    level = levels("ci_level", 0) or "see the result files"
    reruns = levels("rerun_level", 1)
    rerun = (f"; the interval a rerun's median should fall in ({reruns} for exchangeable rounds, widened by the run's "
             "drift) is wider: it is in the result files and the reproduction tables") if reruns else ""
    return (
        f"Device {first['device']}, {first['dtype']}, {first['attn']}, {first['threads']} threads; models: {models}; "
        f"{'/'.join(map(str, rounds))} timed rounds after a warm-up. Intervals are those of the median of the paired "
        f"per-round ratios ({level}){rerun}; a ratio is only known to within its interval."
    )


def table(folder: Path) -> str:
    reps = load(folder)
    if not reps:
        return "(no results)"
    lines = [preamble(reps), "", MARKDOWN_HEADER]
    lines += [format_markdown_row(r) for r in reps]
    warned = [(r, w) for r in reps for w in r.get("warnings", [])]
    if warned:
        lines += ["", "Noise warnings of these runs:", ""]
        lines += [f"* {r['recipe']} @ {r['vision_tokens']}×{r.get('batch', 1)}: {w}" for r, w in warned]
    return "\n".join(lines)


def _ci(entry, min_based: bool = False) -> str:
    if not entry:
        return "-"
    tail = f" min {entry['min_based']:.3f}" if min_based and "min_based" in entry else ""
    return f"{entry['median']:.3f} [{entry['ci'][0]:.3f}-{entry['ci'][1]:.3f}]{tail}"


SCALING_HEADER = (
    "| recipe | vision tokens | batch | FLOP ratio | prefill ratio [interval] min-based | limit ratio | tokencomp ÷ limit [interval] min-based "
    "| decode tok/s ratio [interval] | LLM generation latency ratio [interval] | KV-cache ratio | untouched prefill ms "
    "| prefill noise (untouched / recipe) |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def scaling_row(r: dict) -> str:
    ratios = r.get("ratios", {})
    dec = ratios.get("recipe/untouched", {}).get("decode")
    tps = {"median": 1 / dec["median"], "ci": [1 / dec["ci"][1], 1 / dec["ci"][0]]} if dec else None
    lim = r.get("limit") or {}
    v = r["variants"]
    return (
        f"| {r['recipe']} | {r['vision_tokens']} | {r['batch']} | {r['flop_ratio']:.3f} "
        f"| {_ci(ratios['recipe/untouched']['prefill'], True)} | {lim.get('prefill_ratio', float('nan')):.3f} "
        f"| {_ci(ratios.get('recipe/limit', {}).get('prefill'), True)} | {_ci(tps)} | {_ci(ratios['recipe/untouched'].get('llm'))} "
        f"| {r['metrics']['kv_cache_bytes']['ratio']:.3f} "
        f"| {1000 * v['untouched']['prefill_s']['median']:.0f} "
        f"| {v['untouched']['prefill_s']['noise']:.2f} / {v['recipe']['prefill_s']['noise']:.2f} |"
    )


def scaling(folder: Path) -> str:
    reps = load(folder)
    if not reps:
        return "(no results)"
    by_tokens = [r for r in reps if r["batch"] == 1]
    by_batch = sorted((r for r in reps if r["vision_tokens"] == min(x["vision_tokens"] for x in reps)), key=lambda r: r["batch"])
    lines = [preamble(reps)]
    # A section of one row scales nothing (a batch-only run has a single batch-1 row): it is left out.
    for title, rows in (("**As the vision tokens grow** (batch 1):", by_tokens),
                        (f"**As the batch grows** ({by_batch[0]['vision_tokens']} vision tokens):", by_batch)):
        if len(rows) > 1:
            lines += ["", title, "", SCALING_HEADER] + [scaling_row(r) for r in rows]
    return "\n".join(lines)


GPU_HEADER = (
    "| variant | avg vision tokens / layer | prefill ms [min-max] | prefill ratio [interval] | decode tok/s | decode ratio "
    "| LLM generation latency ratio [interval] | peak MiB above weights | KV-cache MiB |\n|---|---|---|---|---|---|---|---|---|"
)


def gpu_table(folder: Path) -> str:
    """The paper's efficiency comparison: untouched, V²Drop, FastV as its original code (full
    attention matrix: the ``peer`` variant) and FastV with tokencomp's probes, from the result files
    ``benchmarks/gpu.sh`` writes (every file has its own untouched run; the first is shown)."""
    reps = load(folder)
    if not reps:
        return "(no results)"
    rows = []

    def row(label, rep, name, avg):
        v = rep["variants"][name]
        p, d = v["prefill_s"], v["decode_s"]
        base = rep["variants"]["untouched"]
        ratio = rep["ratios"].get(f"{name}/untouched", {}).get("prefill") if name != "untouched" else None
        llm = rep["ratios"].get(f"{name}/untouched", {}).get("llm") if name != "untouched" else None
        tps = rep["batch"] * rep["new_tokens"] / d["median"] if d["n"] else float("nan")
        base_tps = rep["batch"] * rep["new_tokens"] / base["decode_s"]["median"]
        rows.append(
            f"| {label} | {avg:.1f} | {1000 * p['median']:.1f} [{1000 * p['min']:.1f}-{1000 * p['max']:.1f}] "
            f"| {_ci(ratio) if ratio else '1'} | {tps:.1f} | {tps / base_tps:.3f} | {_ci(llm) if llm else '1' if name == 'untouched' else '-'} "
            f"| {(v['peak_memory_bytes'] or 0) / 2**20:.0f} | {v['kv_cache_bytes'] / 2**20:.0f} |"
        )

    row("untouched", reps[0], "untouched", reps[0]["vision_tokens"])
    for rep in reps:
        avg = rep["average_vision_tokens"]
        if "peer" in rep["variants"]:
            row(f"{rep['recipe']} — original code (full attention matrix)", rep, "peer", avg)
            row(f"{rep['recipe']} — tokencomp (q/k probes)", rep, "recipe", avg)
        else:
            row(f"{rep['recipe']} — tokencomp", rep, "recipe", avg)
        if "limit" in rep["variants"]:
            row(f"{rep['recipe']} — physical limit (bare layers)", rep, "limit", avg)
    return "\n".join([preamble(reps), "", GPU_HEADER] + rows)


REPRO_RATIOS = (("recipe/untouched", "prefill", "prefill ratio"), ("recipe/untouched", "decode", "decode time ratio"),
                ("recipe/untouched", "llm", "LLM generation latency ratio"),
                ("limit/untouched", "prefill", "limit ratio"), ("recipe/limit", "prefill", "tokencomp ÷ limit"),
                ("peer/recipe", "prefill", "peer ÷ tokencomp"), ("hooks/untouched", "prefill", "keep=1 hooks ratio"))


def _stated(entry: dict) -> tuple:
    """The interval a result file states for a rerun's median, and its coverage: the rerun interval
    with its drift allowance (``tokencomp.bench.rerun_bounds``, from the per-round ratios the file
    holds), the stored one for files without rounds, or for files written before either existed
    the median's interval with its confidence."""
    if entry.get("rounds"):  # recomputed, so files written before the drift allowance state the same
        lo, hi, level, _ = rerun_bounds(entry["rounds"])
        return [lo, hi], level
    if "rerun" in entry:
        return entry["rerun"], entry["rerun_level"]
    return entry["ci"], entry.get("ci_level", 0.0)


def reproduction(first: Path, rerun: Path) -> str:
    """Each timed ratio of a rerun (same command, result files of the same names under ``rerun``)
    against the interval the first run stated for it: whether the rerun's median falls inside, and
    how many misses the stated coverages lead one to expect."""
    lines = [
        f"Rerun of the commands whose results are in `{first}` (results in `{rerun}`): is each rerun median inside "
        "the interval the first run stated for a rerun (its coverage for rounds exchangeable between the runs in brackets; "
        "the interval includes the first run's drift, see `tokencomp.bench.rerun_bounds`)?",
        "",
        "| result | ratio | first run: median [interval for a rerun] (coverage) | rerun: median | inside |",
        "|---|---|---|---|---|",
    ]
    inside = total = 0
    expected_misses = 0.0
    for path in sorted(first.glob("*.json")):
        other = rerun / path.name
        if not other.exists():
            continue
        a, b = read(path)[0], read(other)[0]
        for key, series, label in REPRO_RATIOS:
            ra, rb = _ratio(a, key, series), _ratio(b, key, series)
            if not ra or not rb:
                continue
            (lo, hi), level = _stated(ra)
            ok = lo <= rb["median"] <= hi
            inside += ok
            total += 1
            expected_misses += 1 - level
            lines.append(f"| {path.stem} | {label} | {ra['median']:.3f} [{lo:.3f}-{hi:.3f}] ({100 * level:.1f}%) "
                         f"| {rb['median']:.3f} | {'yes' if ok else '**no**'} |")
    if not total:
        return "(no result files in both folders)"
    lines += ["", f"{inside} of {total} rerun ratios fall inside the first run's interval for a rerun "
                  f"(the stated coverages expect {expected_misses:.2f} misses if the machine behaves the same in both runs)."]
    return "\n".join(lines)


def update(doc_path: Path, tag: str, text: str) -> None:
    doc = doc_path.read_text()
    pattern = re.compile(rf"(<!-- table:{tag} -->\n)(?:.*?\n)?(<!-- /table:{tag} -->)", re.S)
    if not pattern.search(doc):
        raise SystemExit(f"{doc_path} has no <!-- table:{tag} --> markers")
    doc_path.write_text(pattern.sub(lambda m: m.group(1) + text + "\n" + m.group(2), doc))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--update", type=Path)
    ap.add_argument("--scaling", action="store_true", help="render the scaling tables")
    ap.add_argument("--gpu", action="store_true", help="render the GPU efficiency comparison (benchmarks/gpu.sh)")
    ap.add_argument("--tag", help="marker name (default: the folder's name)")
    ap.add_argument("--reproduce", type=Path, metavar="RERUN",
                    help="compare the results in RERUN (same file names) with the folder's intervals")
    args = ap.parse_args()
    if args.reproduce:
        text = reproduction(args.folder, args.reproduce)
    else:
        text = scaling(args.folder) if args.scaling else gpu_table(args.folder) if args.gpu else table(args.folder)
    if not args.update:
        print(text)
        return
    update(args.update, args.tag or args.folder.name, text)


if __name__ == "__main__":
    main()
