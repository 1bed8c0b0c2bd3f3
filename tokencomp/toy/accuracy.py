"""Accuracy of the toy model under every scorer at three token budgets: ``python -m benchmarks.accuracy``
(or ``tokencomp analyze --accuracy``).

The paper's LLaVA-1.5-7B budgets (192 / 128 / 64 of 576 vision tokens on average over 32 layers,
stages at layers 3 / 17 / 22) are scaled to the toy model (256 vision tokens, 12 layers): the same
fractions of the vision tokens (85.3 / 56.9 / 28.4 of 256) and the same depth fractions (layers
1 / 6 / 8), with the ``budget`` schedule solving the keep ratios. "One-shot" drops once, at the first
stage layer, to the keep ratio that gives the same average.

Questions: the toy model only uses the image for some question kinds (the rest it answers from the
question's prior), so a calibration pass on mixed held-out questions measures, per kind, the
untouched accuracy and the accuracy with every vision token dropped at layer 1; kinds where the
image is worth >= 10 points are the *image-dependent* kinds, and the table is measured on held-out
questions of those kinds only (N stated). Answers are the greedy first token of one prefill
forward (what ``harness.evaluate`` generates first). Results go to a JSON file; the Markdown table
(``ACCURACY.md``) is generated from it alone (:func:`markdown`), with Wilson 95 % intervals.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

__all__ = ["PAPER_BUDGETS", "SCORERS", "ONE_SHOT", "BEFORE_LLM", "wilson", "budget_tokens", "one_shot_keep", "first_answers",
           "run", "markdown", "main"]

PAPER_BUDGETS = (192, 128, 64)
PAPER_VISION_TOKENS = 576
DEPTH = (3 / 32, 17 / 32, 22 / 32)
#: (label, recipe scorer) of every scorer that runs on LLaVA-1.5 shapes inside the LLM
SCORERS = (
    ("v2drop (L2)", {"name": "v2drop", "metric": "l2"}),
    ("v2drop (L1)", {"name": "v2drop", "metric": "l1"}),
    ("v2drop (cosine)", {"name": "v2drop", "metric": "cosine"}),
    ("fastv", "fastv"),
    ("pdrop", "pdrop"),
    ("sparsevlm", "sparsevlm"),
    ("mustdrop", "mustdrop"),
    ("dart", "dart"),
    ("prunevid_question", "prunevid_question"),
    ("cls_attention", "cls_attention"),
    ("keynorm", "keynorm"),
    ("random", "random"),
    ("uniform", "uniform"),
    ("none (truncation)", "none"),
)
ONE_SHOT = ("v2drop (L2)", "fastv", "random")
#: (label, input-stage keys) of the methods that reduce the tokens before the LLM (one input stage
#: keeping the budget, positions renumbered as those papers do); VisionZip's contextual tokens keep
#: its published share (10 of 64, 20 of 128, 30 of 192).
BEFORE_LLM = (
    ("fastervlm", {"scorer": "cls_attention"}),
    ("visionzip", {"scorer": "cls_attention", "merge": "contextual"}),
    ("divprune", {"scorer": "none", "selector": "divprune"}),
    ("random", {"scorer": "random"}),
)
MIN_GAIN = 0.10  # a kind is image-dependent when the image is worth at least this much accuracy


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score 95 % interval of a proportion k / n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def budget_tokens(paper_tokens: int, vision_tokens: int) -> float:
    """The paper's budget as the same fraction of this model's vision tokens."""
    return paper_tokens * vision_tokens / PAPER_VISION_TOKENS


def one_shot_keep(tokens: float, layer: int, num_layers: int, vision_tokens: int) -> float:
    """Keep ratio of a single stage at `layer` whose average over the layers is `tokens`."""
    return max(0.0, min(1.0, (num_layers * tokens / vision_tokens - layer) / (num_layers - layer)))


@torch.no_grad()
def first_answers(model, processor, encodings, recipe=None):
    """Greedy first answer token per question (one prefill forward per batch); and the mean
    average-vision-token count per question under `recipe` (None when untouched)."""
    import tokencomp

    words, avgs = [], []
    handle = tokencomp.apply(model, recipe) if recipe is not None else None
    try:
        for enc in encodings:
            logits = model(**enc, logits_to_keep=1).logits[:, -1]
            words += processor.tokenizer.convert_ids_to_tokens(logits.argmax(-1).tolist())
            if handle is not None:
                avgs += handle.stats.average_vision_tokens()
    finally:
        if handle is not None:
            handle.remove()
    return words, (sum(avgs) / len(avgs) if avgs else None)


def _encode(processor, questions, batch: int = 50):
    from .harness import encode

    return [encode(processor, questions[k : k + batch]) for k in range(0, len(questions), batch)]


def _row(method, schedule, budget, tokens, answers, questions, seconds, avg, base=None, **extra):
    right = sum(a == q.answer for a, q in zip(answers, questions))
    n = len(questions)
    lo, hi = wilson(right, n)
    row = {"method": method, "schedule": schedule, "budget": budget, "tokens": None if tokens is None else round(tokens, 2),
           "measured_tokens": None if avg is None else round(avg, 2), "right": right, "n": n,
           "accuracy": round(right / n, 4), "ci95": [round(lo, 4), round(hi, 4)], "seconds": round(seconds, 1)}
    if base is not None:
        row["pct_of_untouched"] = round(100 * right / base, 1) if base else None
    row.update(extra)
    return row


def run(model, processor, *, n: int = 200, calibration: int = 200, scorers=SCORERS, budgets=PAPER_BUDGETS,
        one_shot=ONE_SHOT, before_llm=BEFORE_LLM, log=print) -> dict:
    """Measure everything; return the JSON-ready result."""
    import tokencomp

    from . import scenes
    from ..schedules.depth_scaled import scale_layers

    t_start = time.perf_counter()
    L = model.config.get_text_config().num_hidden_layers
    V = model.config.image_seq_length
    layers = scale_layers(DEPTH, L)
    # calibration: which kinds use the image at all
    calib = scenes.make_questions("test", calibration, seed=2)
    enc = _encode(processor, calib)
    seen, _ = first_answers(model, processor, enc)
    blind_recipe = tokencomp.load_recipe({"schedule": {"stages": [{"layer": 1, "keep": 0.0}]}})
    blind, _ = first_answers(model, processor, enc, blind_recipe)
    per_kind = {}
    for kind in scenes.KINDS:
        idx = [i for i, q in enumerate(calib) if q.kind == kind]
        per_kind[kind] = {"n": len(idx), "untouched": round(sum(seen[i] == calib[i].answer for i in idx) / max(1, len(idx)), 4),
                          "blind": round(sum(blind[i] == calib[i].answer for i in idx) / max(1, len(idx)), 4)}
    kinds = [k for k, v in per_kind.items() if v["untouched"] - v["blind"] >= MIN_GAIN] or list(scenes.KINDS)
    log(f"calibration ({calibration} questions): " + ", ".join(f"{k} {v['untouched']:.2f}/{v['blind']:.2f}" for k, v in per_kind.items())
        + f" -> image-dependent kinds: {', '.join(kinds)}")
    size = n * len(scenes.KINDS) // len(kinds) + 50
    while True:  # some kinds are rarer than 1 in len(KINDS): grow the (prefix-stable) pool until n
        questions = [q for q in scenes.make_questions("test", size) if q.kind in kinds][:n]
        if len(questions) == n or size > 50 * n:
            break
        size *= 2
    enc = _encode(processor, questions)
    rows = []
    t0 = time.perf_counter()
    answers, _ = first_answers(model, processor, enc)
    rows.append(_row("untouched", "-", None, V, answers, questions, time.perf_counter() - t0, None))
    base = rows[0]["right"]
    t0 = time.perf_counter()
    answers, avg = first_answers(model, processor, enc, blind_recipe)
    rows.append(_row("no vision tokens (all dropped before layer 1)", "-", None, 1 / L * V, answers, questions,
                     time.perf_counter() - t0, avg, base))
    failures = {}
    for budget in budgets:
        tokens = budget_tokens(budget, V)
        configs = [(label, spec, "progressive", {"name": "budget", "tokens": tokens, "vision_tokens": V}) for label, spec in scorers]
        keep = one_shot_keep(tokens, layers[0], L, V)
        configs += [(label, spec, "one-shot", {"stages": [{"layer": layers[0], "keep": keep}]})
                    for label, spec in scorers if label in one_shot]
        for label, keys in before_llm:
            stage = {"phase": "input", "keep": round(tokens / V, 4), "renumber": True, **keys}
            if keys.get("merge") == "contextual":
                stage["merge"] = {"name": "contextual", "tokens": max(1, round(tokens * 10 / 64))}
            configs.append((label, "none", "before the LLM", {"stages": [stage]}))
        for label, spec, sched, schedule in configs:
            t0 = time.perf_counter()
            try:
                recipe = tokencomp.load_recipe({"scorer": spec, "schedule": schedule})
                answers, avg = first_answers(model, processor, enc, recipe)
            except Exception as exc:  # a scorer that cannot run on this model: reported, not fatal
                failures[label] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:200]
                log(f"  {budget}: {label} {sched}: FAILED {failures[label]}")
                continue
            rows.append(_row(label, sched, budget, tokens, answers, questions, time.perf_counter() - t0, avg, base))
            log(f"  {budget}: {label} {sched}: {rows[-1]['accuracy']:.3f} ({rows[-1]['seconds']:.0f}s)")
    return {
        "model": "tokencomp/toy/checkpoint",
        "decoder_layers": L,
        "vision_tokens": V,
        "stage_layers": layers,
        "one_shot_layer": layers[0],
        "paper": {"vision_tokens": PAPER_VISION_TOKENS, "layers": 32, "stage_layers": [3, 17, 22], "budgets": list(budgets)},
        "calibration": {"questions": calibration, "split": "test, seed 2", "per_kind": per_kind, "min_gain": MIN_GAIN},
        "kinds": kinds,
        "questions": {"n": len(questions), "split": "test, seed 0", "kinds": kinds},
        "answering": "greedy first token of one prefill forward",
        "threads": torch.get_num_threads(),
        "failures": failures,
        "rows": rows,
        "total_seconds": round(time.perf_counter() - t_start, 1),
    }


def _pct(x):
    return "–" if x is None else f"{100 * x:.1f}"


def _verdict(res: dict) -> str:
    """One sentence on how good the untouched model is, from the calibration pass."""
    per = res["calibration"]["per_kind"]
    n = sum(v["n"] for v in per.values())
    acc = sum(v["untouched"] * v["n"] for v in per.values()) / max(1, n)
    if acc >= 0.9:
        return f"Untouched it answers **{100 * acc:.1f}%** of {n} mixed held-out questions."
    return (f"**It is a weak model** ({100 * acc:.1f}% of {n} mixed held-out questions): only the image-dependent "
            "kinds can show what compression costs.")


def markdown(res: dict) -> str:
    """ACCURACY.md, generated from the result of :func:`run` only."""
    q = res["questions"]
    cal = res["calibration"]
    rows = res["rows"]
    base = rows[0]
    out = [
        "# Accuracy of the toy model under token compression",
        "",
        "<!-- generated by `python -m benchmarks.accuracy` from benchmarks/results/accuracy.json; do not edit -->",
        "",
        f"Model: the shipped toy LLaVA ({res['model']}: {res['decoder_layers']} decoder layers, "
        f"{res['vision_tokens']} vision tokens per image). " + _verdict(res) + " Differences between scorers "
        "smaller than the intervals are noise. These numbers say how the scorers behave on this toy model, not what "
        "they do on LLaVA-1.5-7B.",
        "",
        f"Calibration ({cal['questions']} mixed held-out questions, {cal['split']}): accuracy untouched / with every "
        "vision token dropped before layer 1, per kind:",
        "",
        "| kind | N | untouched | no vision tokens |",
        "|---|---:|---:|---:|",
    ]
    for kind, v in cal["per_kind"].items():
        out.append(f"| {kind} | {v['n']} | {_pct(v['untouched'])}% | {_pct(v['blind'])}% |")
    out += [
        "",
        f"Image-dependent kinds (the image is worth >= {100 * cal['min_gain']:.0f} points): **{', '.join(res['kinds'])}**. "
        f"The table below uses **N = {q['n']}** held-out questions of these kinds ({q['split']}); answers are the "
        f"{res['answering']}.",
        "",
        f"Budgets: the paper's {' / '.join(map(str, res['paper']['budgets']))} of {res['paper']['vision_tokens']} vision "
        f"tokens (on average over the layers; stages at layers {'/'.join(map(str, res['paper']['stage_layers']))} of "
        f"{res['paper']['layers']}) scaled to this model: the same fraction of its {res['vision_tokens']} tokens, stages at "
        f"layers {'/'.join(map(str, res['stage_layers']))} of {res['decoder_layers']} (`budget` schedule; the last stage "
        f"drops every remaining vision token). *One-shot*: a single stage at layer {res['one_shot_layer']} with the keep "
        "ratio giving the same average. *Before the LLM*: one input stage keeping the budget (every layer sees it; "
        "positions renumbered), for the methods that work on the vision encoder's output. *tokens*: the target average; *measured*: the average the run kept.",
        "",
        f"Untouched: **{_pct(base['accuracy'])}%** ({base['right']}/{base['n']}, 95% CI {_pct(base['ci95'][0])}–"
        f"{_pct(base['ci95'][1])}). No vision tokens at all: {_pct(rows[1]['accuracy'])}%.",
        "",
    ]
    budgets = sorted({r["budget"] for r in rows if r["budget"] is not None}, reverse=True)
    for b in budgets:
        sel = [r for r in rows if r["budget"] == b]
        tok = sel[0]["tokens"]
        out += [f"## {b} of {res['paper']['vision_tokens']} → {tok:.1f} of {res['vision_tokens']} tokens", "",
                "| method | schedule | measured tokens | accuracy | % of untouched | 95% CI (Wilson) | N |",
                "|---|---|---:|---:|---:|---|---:|"]
        for r in sorted(sel, key=lambda r: (-r["accuracy"], r["method"], r["schedule"])):
            mt = "–" if r["measured_tokens"] is None else f"{r['measured_tokens']:.1f}"
            out.append(f"| {r['method']} | {r['schedule']} | {mt} | {_pct(r['accuracy'])}% | {r['pct_of_untouched']}% | "
                       f"{_pct(r['ci95'][0])}–{_pct(r['ci95'][1])}% | {r['n']} |")
        out.append("")
    if res["failures"]:
        out += ["Scorers that did not run on this model (the error, first line):", ""]
        out += [f"- `{k}`: {v}" for k, v in sorted(res["failures"].items())]
        out.append("")
    out += [f"Run time: {res['total_seconds']:.0f} s on {res['threads']} CPU thread(s) (shared machine).", "",
            "The paper's two findings on this model (`tokencomp analyze --svg`, figures regenerated by that command; "
            "numbers in the README):", "", "![retention by position](docs/analyze-position.png)",
            "![variation maps](docs/analyze-variation.png)", ""]
    return "\n".join(out)


def _repo_root() -> Path:
    root = Path(__file__).resolve().parents[2]
    return root if (root / "benchmarks").is_dir() else Path.cwd()


def main(argv=None) -> int:
    root = _repo_root()
    ap = argparse.ArgumentParser(prog="python -m benchmarks.accuracy", description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=200, help="table questions (image-dependent kinds), default 200")
    ap.add_argument("--calibration", type=int, default=200, help="mixed questions of the calibration pass")
    ap.add_argument("--json", default=str(root / "benchmarks" / "results" / "accuracy.json"))
    ap.add_argument("--markdown", default=str(root / "ACCURACY.md"))
    ap.add_argument("--from-json", action="store_true", help="only regenerate the Markdown from the JSON file")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 questions, 3 scorers, one budget (writes *-quick files)")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    if args.quick and args.json.endswith("accuracy.json"):
        args.json = args.json[: -len(".json")] + "-quick.json"
        args.markdown = args.markdown[: -len(".md")] + "-quick.md"
    if not args.from_json:
        from . import harness

        threads = torch.get_num_threads()
        torch.set_num_threads(args.threads)
        try:
            model, processor = harness.load()
            kw = dict(n=20, calibration=50, scorers=SCORERS[:1] + SCORERS[3:4] + SCORERS[-3:-2], budgets=(192,)) if args.quick else {}
            res = run(model, processor, **({"n": args.n, "calibration": args.calibration} | kw))
        finally:
            torch.set_num_threads(threads)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
        print(f"wrote {args.json}")
    res = json.loads(Path(args.json).read_text())
    Path(args.markdown).write_text(markdown(res))
    print(f"wrote {args.markdown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
