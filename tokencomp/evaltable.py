"""``tokencomp eval``: vanilla + each recipe through lmms-eval's Python API, then a paper-style table.

Each run is ``lmms_eval.evaluator.simple_evaluate`` with ``--model tokencomp``. Its scores and
statistics go to ``OUT/<run>/result.json``, and what they depend on to ``OUT/<run>/provenance.json``
(model, canonical recipe hash, tasks, limit, model args, batch size, device type, include path,
tokencomp / lmms-eval / transformers versions). A finished run is reused only if its provenance
matches the current arguments; otherwise it runs again and stderr says why. An unreadable
``result.json`` or ``provenance.json`` counts as missing (re-run, with a note). The table (score
per task, average vision tokens, prefill FLOPs ratio, mean of score / vanilla score over tasks) is
printed and written to ``OUT/table.md`` and ``OUT/table.csv``. lmms-eval is imported only when the
command runs.

Run names: the recipe file's stem, or the shipped name. Names that clash get the parent folder as a
prefix (``exp1-r``), then a hash suffix. A recipe is never named ``vanilla`` (it becomes
``recipe-vanilla``). Names depend on the whole set of recipes, so adding a clashing recipe later
renames, and re-runs, the first one.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from .errors import UsageError


def add_eval_command(sub) -> None:
    p = sub.add_parser("eval", help="accuracy of vanilla vs recipes through lmms-eval; paper-style table (needs tokencomp[eval])")
    p.add_argument("--model", required=True, help="checkpoint id or path (pretrained=)")
    p.add_argument("--recipes", nargs="+", default=[], metavar="RECIPE", help="shipped names or paths")
    p.add_argument("--tasks", required=True, help="lmms-eval tasks, comma separated")
    p.add_argument("--out", default="tokencomp-eval",
                   help="folder for the table and one folder per run (result.json, provenance.json); a run whose "
                        "provenance matches these arguments is reused, any other is run again")
    p.add_argument("--batch-size", type=int, default=1, help="lmms-eval batch size (>= 1)")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--limit", type=float, default=None, help="examples per task, or a fraction below 1 (for quick checks)")
    p.add_argument("--model-args", default="", help="extra lmms-eval model args, k=v,... (e.g. attn_implementation=sdpa)")
    p.add_argument("--include-path", default=None, help="folder of extra lmms-eval task YAMLs")
    p.add_argument("--metrics", default="", help="task=metric,... for the table (default: each task's first metric)")
    p.add_argument("--no-vanilla", action="store_true", help="skip the untouched run (no %% of vanilla column)")
    p.set_defaults(func=cmd_eval)


VANILLA = "vanilla"  # the untouched run; run_name never gives this name to a recipe
# Names a recipe must not take: the untouched run and the table files in OUT (compared casefolded,
# as folders on macOS / Windows are).
_RESERVED = {VANILLA, "table.md", "table.csv"}
# What decides whether a finished run can be reused (keys of provenance.json, in message order).
COMPARED = ("model", "recipe", "tasks", "limit", "model_args", "batch_size", "device", "include_path",
            "tokencomp", "lmms_eval", "transformers")


def _clean(text: str) -> str:
    # Leading dots would make hidden folders, "." or "..".
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).lstrip(".")


def run_name(recipe: Optional[str]) -> str:
    """Folder and row name of one run: ``vanilla`` for None, else the recipe's stem or shipped name."""
    if recipe is None:
        return VANILLA
    name = _clean(Path(recipe).stem if recipe.endswith((".yaml", ".yml")) else recipe) or "recipe"
    return f"recipe-{name}" if name.casefold() in _RESERVED else name


def _recipe_key(recipe: str) -> str:
    """What identifies a recipe argument: its resolved path for a file, else the (shipped) name."""
    return str(Path(recipe).resolve()) if Path(recipe).is_file() else recipe


def run_names(recipes: list[str]) -> list[str]:
    """Distinct run names for ``recipes`` (deterministic; case-insensitively distinct)."""
    names = [run_name(r) for r in recipes]

    def widen(rename):
        counts = Counter(n.casefold() for n in names)
        return [rename(r, n) if counts[n.casefold()] > 1 else n for r, n in zip(recipes, names)]

    def with_parent(r, n):
        parent = _clean(Path(_recipe_key(r)).parent.name) if Path(r).is_file() or r.endswith((".yaml", ".yml")) else ""
        return f"{parent}-{n}" if parent else n

    names = widen(with_parent)
    names = widen(lambda r, n: f"{n}-{hashlib.sha256(_recipe_key(r).encode()).hexdigest()[:8]}")
    if len({n.casefold() for n in names}) < len(names):  # only for names crafted to clash
        raise UsageError(f"cannot give the recipes distinct run names: {', '.join(names)}; rename the files")
    return names


def _canonical(obj: Any) -> Any:
    """JSON-able content of a recipe part: plugin names and parameters, no source, lines or names."""
    from .recipe import Recipe

    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        skip = ("source", "name", "description") if isinstance(obj, Recipe) else ()
        fields = {f.name: _canonical(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.compare and f.name not in skip}
        plugin = getattr(type(obj), "name", None)
        return {"plugin": plugin if isinstance(plugin, str) else type(obj).__qualname__, **fields}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in obj.items()}
    return obj if isinstance(obj, (str, int, float, bool, type(None))) else repr(obj)


def recipe_hash(recipe) -> str:
    """sha256 of a loaded recipe's canonical content (comments, spacing and file path do not count)."""
    text = json.dumps(_canonical(recipe), sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()


def _versions() -> dict[str, Optional[str]]:
    from importlib import metadata

    out = {}
    for key, dist in (("tokencomp", "tokencomp"), ("lmms_eval", "lmms_eval"), ("transformers", "transformers")):
        try:
            out[key] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[key] = None
    return out


def _check_args(args) -> dict:
    """Validate eval's arguments (UsageError); return the parsed ones: tasks, limit, model args, metrics."""
    if args.batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, got {args.batch_size}")
    limit = args.limit
    if limit is not None:
        if not math.isfinite(limit) or limit <= 0:
            raise UsageError(f"--limit must be a positive number (examples per task, or a fraction below 1), got {limit}")
        limit = int(limit) if limit >= 1 else limit  # lmms-eval reads a value below 1 as a fraction
    tasks = list(dict.fromkeys(t.strip() for t in args.tasks.split(",") if t.strip()))
    if not tasks:
        raise UsageError(f"--tasks names no task: {args.tasks!r}")
    model_args = {}
    for kv in filter(None, (x.strip() for x in args.model_args.split(","))):
        key, eq, value = kv.partition("=")
        if not eq or not key.strip():
            raise UsageError(f"--model-args takes k=v,...; got {kv!r}")
        if key.strip() in ("pretrained", "recipe", "stats_path"):
            raise UsageError(f"--model-args may not set {key.strip()}= (tokencomp eval sets it: use --model / --recipes)")
        model_args[key.strip()] = value.strip()
    metrics = {}
    for kv in filter(None, (x.strip() for x in args.metrics.split(","))):
        task, eq, metric = kv.partition("=")
        if not eq or not task.strip() or not metric.strip():
            raise UsageError(f"--metrics takes task=metric,...; got {kv!r}")
        metrics[task.strip()] = metric.strip()
    # These travel inside lmms-eval's model_args string, which is split at commas.
    for what, value in [("--model", args.model), ("--out", args.out)] + [("recipe", r) for r in args.recipes]:
        if "," in value:
            raise UsageError(f"{what} {value!r} contains a comma, which lmms-eval's model_args cannot carry")
    if args.no_vanilla and not args.recipes:
        raise UsageError("nothing to evaluate: --no-vanilla and no --recipes")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder")
    keys = [_recipe_key(r) for r in args.recipes]
    for i, k in enumerate(keys):
        if k in keys[:i]:
            raise UsageError(f"recipe {args.recipes[i]!r} given twice (same as {args.recipes[keys.index(k)]!r})")
    return {"tasks": tasks, "limit": limit, "model_args": model_args, "metrics": metrics}


def provenance(args, parsed: dict, recipe: Optional[str], loaded, device: str) -> dict:
    """What a run's results depend on (the keys in COMPARED), plus ``recipe_arg`` for people."""
    model = str(Path(args.model).resolve()) if Path(args.model).exists() else args.model
    return {
        "model": model,
        "recipe": None if loaded is None else recipe_hash(loaded),
        "recipe_arg": recipe,
        "tasks": sorted(parsed["tasks"]),  # order does not change a task's score
        "limit": parsed["limit"],
        "model_args": dict(sorted(parsed["model_args"].items())),
        "batch_size": args.batch_size,
        "device": device.split(":")[0],  # cuda:0 and cuda:1 give the same numbers; cpu and cuda do not
        "include_path": str(Path(args.include_path).resolve()) if args.include_path else None,
        **_versions(),
    }


def _show(key: str, value: Any) -> str:
    if key == "recipe" and isinstance(value, str):
        return value[:12]
    if isinstance(value, list):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items()) or "(none)"
    return str(value)


def _differences(old: dict, new: dict) -> list[str]:
    return [f"{k} changed {_show(k, old.get(k))} -> {_show(k, new.get(k))}" for k in COMPARED if old.get(k) != new.get(k)]


def _read_json(path: Path) -> tuple[Any, Optional[str]]:
    """(content, None), or (None, why it cannot be used)."""
    if not path.exists():
        return None, f"no {path.name}"
    if not path.is_file():
        raise UsageError(f"{path}: exists and is not a file")
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        return None, f"{path} is unreadable ({exc})"


def _reusable(folder: Path, prov: dict) -> tuple[Optional[dict], Optional[str]]:
    """The finished run's record if its provenance matches ``prov``, else (None, why not)."""
    record, why = _read_json(folder / "result.json")
    if why is not None:
        return None, None if why == "no result.json" else why
    results = record.get("results") if isinstance(record, dict) else None
    if not isinstance(results, dict) or not all(isinstance(r, dict) for r in results.values()):
        return None, f"{folder / 'result.json'} is not a result of tokencomp eval"
    old, why = _read_json(folder / "provenance.json")
    if why is not None:
        return None, why + (" (made by an older tokencomp)" if why == "no provenance.json" else "")
    if not isinstance(old, dict):
        return None, f"{folder / 'provenance.json'} is not a provenance record"
    diffs = _differences(old, prov)
    return (record, None) if not diffs else (None, "; ".join(diffs))


def _write(path: Path, data: Any) -> None:
    # Write then rename: an interrupted run never leaves a truncated file behind.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str), encoding="utf-8")
    os.replace(tmp, path)


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


def _run(args, parsed: dict, recipe: Optional[str], folder: Path, device: str) -> dict:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    stats_path = folder / "tokencomp_stats.json"
    stats_path.unlink(missing_ok=True)  # an earlier run's statistics must not pass for this run's
    margs = {"pretrained": args.model, "stats_path": str(stats_path)}
    if recipe is not None:
        # The resolved path: independent of the working directory, and a file named "none" or
        # "vanilla" is not mistaken by the integration for "no recipe".
        margs["recipe"] = _recipe_key(recipe)
    margs.update(parsed["model_args"])
    res = simple_evaluate(
        model="tokencomp",
        model_args=",".join(f"{k}={v}" for k, v in margs.items()),
        tasks=parsed["tasks"],
        batch_size=args.batch_size,
        device=device,
        limit=parsed["limit"],
        log_samples=False,
        task_manager=TaskManager(include_path=args.include_path) if args.include_path else None,
    )
    if res is None:  # non-zero rank under a distributed launch
        return {}
    stats = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    wanted = parsed["metrics"]
    return {
        "model": args.model,
        "recipe": recipe,
        "tasks": {t: dict(zip(("metric", "score"), _primary(r, wanted.get(t)))) for t, r in res["results"].items()},
        "results": res["results"],
        "tokencomp": stats,
    }


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
    parsed = _check_args(args)  # cheap checks first: no lmms-eval, torch or model needed
    try:
        import lmms_eval  # noqa: F401
    except ImportError:
        print("error: tokencomp eval needs lmms-eval: pip install 'tokencomp[eval]'", file=sys.stderr)
        return 1
    import tokencomp

    loaded = [tokencomp.load_recipe(r) for r in args.recipes]  # a bad recipe fails before the first run
    names = run_names(args.recipes)
    out = Path(args.out)
    runs = ([] if args.no_vanilla else [(VANILLA, None, None)]) + list(zip(names, args.recipes, loaded))
    for name, _, _ in runs:
        if (out / name).exists() and not (out / name).is_dir():
            raise UsageError(f"{out / name}: exists and is not a folder (it is where run {name} goes)")
    if args.device:
        device = args.device
    else:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    tasks = parsed["tasks"]
    records: dict[str, dict] = {}
    main_process = True
    for i, (name, recipe, recipe_obj) in enumerate(runs, 1):
        folder = out / name
        prov = provenance(args, parsed, recipe, recipe_obj, device)
        record, why = _reusable(folder, prov)
        if record is not None:
            print(f"[{i}/{len(runs)}] {name}: done before ({folder / 'result.json'}), skipped", flush=True)
            records[name] = record
            continue
        if why:
            print(f"re-running {name}: {why}", file=sys.stderr, flush=True)
        print(f"[{i}/{len(runs)}] {name}: evaluating {args.model} on {','.join(tasks)}", flush=True)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot create {folder}: {exc.strerror or exc}") from None
        # Until the new result is written, no provenance may vouch for the old one.
        (folder / "provenance.json").unlink(missing_ok=True)
        rec = _run(args, parsed, recipe, folder, device)
        if not rec:  # another rank of a distributed launch: it must take part in every run, writes nothing
            main_process = False
            continue
        _write(folder / "result.json", rec)
        _write(folder / "provenance.json", prov)
        records[name] = rec
    if not main_process:
        return 0
    wanted = parsed["metrics"]
    for rec in records.values():  # the metric is chosen now, so --metrics applies to finished runs too
        rec["tasks"] = {t: dict(zip(("metric", "score"), _primary(r, wanted.get(t)))) for t, r in rec["results"].items()}
    metrics = {t: next((r["tasks"][t]["metric"] for r in records.values() if r["tasks"].get(t, {}).get("metric")), None) for t in tasks}
    rows = build_table(records, tasks)
    md = format_markdown(rows, tasks, metrics)
    try:
        (out / "table.md").write_text(md)
        (out / "table.csv").write_text(format_csv(rows, tasks))
    except OSError as exc:
        raise UsageError(f"cannot write the table into {out}: {exc.strerror or exc}") from None
    print(md, end="")
    print(f"written: {out / 'table.md'}, {out / 'table.csv'}")
    return 0
