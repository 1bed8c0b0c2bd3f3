"""``tokencomp eval``: vanilla + each recipe through lmms-eval's Python API, then a paper-style table.

Each run (``vanilla`` and one per recipe) is ``lmms_eval.evaluator.simple_evaluate`` with
``--model tokencomp``; its scores and tokencomp statistics go to ``OUT/<run>/result.json``. A run
whose file exists is skipped (resumable; delete ``OUT/<run>`` to evaluate it again). The table
(per-task score, average vision tokens over the decoder layers, prefill FLOPs ratio, and the mean
over tasks of score / vanilla score) is printed and written as ``OUT/table.md`` and
``OUT/table.csv``. lmms-eval is imported only when the command runs.
"""

from __future__ import annotations

import csv
import io
import json
import re
import sys
from pathlib import Path
from typing import Optional


def add_eval_command(sub) -> None:
    p = sub.add_parser("eval", help="accuracy of vanilla vs recipes through lmms-eval; paper-style table (needs tokencomp[eval])")
    p.add_argument("--model", required=True, help="checkpoint id or path (pretrained=)")
    p.add_argument("--recipes", nargs="+", default=[], metavar="RECIPE", help="shipped names or paths")
    p.add_argument("--tasks", required=True, help="lmms-eval tasks, comma separated")
    p.add_argument("--out", default="tokencomp-eval", help="folder for per-run results and the table")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--limit", type=float, default=None, help="examples per task (for quick checks)")
    p.add_argument("--model-args", default="", help="extra lmms-eval model args, k=v,... (e.g. attn_implementation=sdpa)")
    p.add_argument("--include-path", default=None, help="folder of extra lmms-eval task YAMLs")
    p.add_argument("--metrics", default="", help="task=metric,... for the table (default: each task's first metric)")
    p.add_argument("--no-vanilla", action="store_true", help="skip the untouched run (no %% of vanilla column)")
    p.set_defaults(func=cmd_eval)


def run_name(recipe: Optional[str]) -> str:
    if recipe is None:
        return "vanilla"
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(recipe).stem if recipe.endswith((".yaml", ".yml")) else recipe)


def _primary(task_results: dict, wanted: Optional[str] = None) -> tuple[Optional[str], Optional[float]]:
    """The metric ``wanted``, or else the first numeric, non-stderr metric, of a task's lmms-eval results."""
    for key, value in task_results.items():
        metric = key.split(",")[0]
        if wanted is not None and metric != wanted:
            continue
        if "stderr" in metric or metric == "alias" or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        return metric, float(value)
    return None, None


def _wanted(args) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in args.metrics.split(",") if kv)


def _run(args, recipe: Optional[str], path: Path) -> dict:
    import torch
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    path.parent.mkdir(parents=True, exist_ok=True)
    stats_path = path.parent / "tokencomp_stats.json"
    model_args = f"pretrained={args.model},stats_path={stats_path}"
    if recipe is not None:
        model_args += f",recipe={recipe}"
    if args.model_args:
        model_args += "," + args.model_args
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    res = simple_evaluate(
        model="tokencomp",
        model_args=model_args,
        tasks=args.tasks.split(","),
        batch_size=args.batch_size,
        device=device,
        limit=int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit,
        log_samples=False,
        task_manager=TaskManager(include_path=args.include_path) if args.include_path else None,
    )
    if res is None:  # non-zero rank under a distributed launch
        return {}
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    wanted = _wanted(args)
    record = {
        "model": args.model,
        "recipe": recipe,
        "tasks": {t: dict(zip(("metric", "score"), _primary(r, wanted.get(t)))) for t, r in res["results"].items()},
        "results": res["results"],
        "tokencomp": stats,
    }
    path.write_text(json.dumps(record, indent=2, default=str))
    return record


def build_table(records: dict[str, dict], tasks: list[str]) -> list[dict]:
    """Rows of the table, one per run, in the order given."""
    vanilla = records.get("vanilla")
    rows = []
    for name, rec in records.items():
        o = rec.get("tokencomp", {}).get("overall", {})
        row = {"run": name, "recipe": rec.get("recipe") or "-"}
        ratios = []
        for t in tasks:
            score = rec["tasks"].get(t, {}).get("score")
            row[t] = score
            base = vanilla["tasks"].get(t, {}).get("score") if vanilla else None
            if score is not None and base:
                ratios.append(score / base)
        row["vision_tokens"] = o.get("vision_tokens_avg")
        row["prefill_flops"] = o.get("prefill_flops_ratio")
        row["pct_of_vanilla"] = 100 * sum(ratios) / len(ratios) if vanilla and ratios and len(ratios) == len(tasks) else None
        rows.append(row)
    return rows


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)


def format_markdown(rows: list[dict], tasks: list[str], metrics: dict[str, str]) -> str:
    cols = ["run"] + tasks + ["vision_tokens", "prefill_flops", "pct_of_vanilla"]
    heads = ["run"] + [f"{t} ({metrics.get(t) or '?'})" for t in tasks] + ["avg vision tokens", "prefill FLOPs", "% of vanilla"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def format_csv(rows: list[dict], tasks: list[str]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=["run", "recipe"] + tasks + ["vision_tokens", "prefill_flops", "pct_of_vanilla"])
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue()


def cmd_eval(args) -> int:
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        print("error: tokencomp eval needs lmms-eval: pip install 'tokencomp[eval]'", file=sys.stderr)
        return 1
    import tokencomp

    for r in args.recipes:  # bad recipes fail before any model is loaded
        tokencomp.load_recipe(r)
    out = Path(args.out)
    runs = ([] if args.no_vanilla else [None]) + list(args.recipes)
    tasks = args.tasks.split(",")
    records: dict[str, dict] = {}
    for i, recipe in enumerate(runs, 1):
        name = run_name(recipe)
        path = out / name / "result.json"
        if path.exists():
            print(f"[{i}/{len(runs)}] {name}: done before ({path}), skipped", flush=True)
            records[name] = json.loads(path.read_text())
            continue
        print(f"[{i}/{len(runs)}] {name}: evaluating {args.model} on {args.tasks}", flush=True)
        rec = _run(args, recipe, path)
        if not rec:
            return 0  # not the main process
        records[name] = rec
    wanted = _wanted(args)
    for rec in records.values():  # the metric is chosen now, so --metrics applies to finished runs too
        rec["tasks"] = {t: dict(zip(("metric", "score"), _primary(r, wanted.get(t)))) for t, r in rec["results"].items()}
    metrics = {t: next((r["tasks"][t]["metric"] for r in records.values() if r["tasks"].get(t, {}).get("metric")), None) for t in tasks}
    rows = build_table(records, tasks)
    md = format_markdown(rows, tasks, metrics)
    (out / "table.md").write_text(md)
    (out / "table.csv").write_text(format_csv(rows, tasks))
    print(md, end="")
    print(f"written: {out / 'table.md'}, {out / 'table.csv'}")
    return 0
