"""``tokencomp eval`` end to end with a fake lmms-eval: when finished runs are reused, run names,
argument checks and damaged output folders (no lmms-eval, no model needed)."""

import json
import sys
import types
from pathlib import Path

import pytest

from tokencomp import evaltable
from tokencomp.cli import main

RECIPE = "scorer: v2drop\nschedule:\n  stages:\n    - {layer: 2, keep: 0.5}\n"


@pytest.fixture
def lmms(monkeypatch):
    """A fake ``lmms_eval`` package; returns the list of ``simple_evaluate`` calls (parsed model args)."""
    calls = []

    def simple_evaluate(*, model, model_args, tasks, batch_size, device, limit, log_samples, task_manager):
        assert model == "tokencomp"
        margs = dict(kv.split("=", 1) for kv in model_args.split(","))
        calls.append({**margs, "tasks": list(tasks), "limit": limit, "batch_size": batch_size, "device": device})
        recipe = margs.get("recipe")
        with open(margs["stats_path"], "w") as f:
            json.dump({"overall": {"vision_tokens_avg": 100.0 if recipe else 576.0, "prefill_flops_ratio": 0.5 if recipe else 1.0}}, f)
        score = (0.5 if recipe else 0.8) + (0.1 if limit else 0.0) + (0.05 if margs["pretrained"] == "other" else 0.0)
        return {"results": {t: {"alias": t, "acc,none": score, "acc_stderr,none": 0.01} for t in tasks}}

    pkg = types.ModuleType("lmms_eval")
    pkg.evaluator = types.ModuleType("lmms_eval.evaluator")
    pkg.evaluator.simple_evaluate = simple_evaluate
    pkg.tasks = types.ModuleType("lmms_eval.tasks")
    pkg.tasks.TaskManager = lambda include_path=None: ("task-manager", include_path)
    for name, mod in (("lmms_eval", pkg), ("lmms_eval.evaluator", pkg.evaluator), ("lmms_eval.tasks", pkg.tasks)):
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(evaltable, "_versions", lambda: {"tokencomp": "1", "lmms_eval": "0.7.3", "transformers": "5"})
    return calls


def _recipe(path, text=RECIPE):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def _eval(out, *extra, model="m", tasks="a"):
    return main(["eval", "--model", model, "--tasks", tasks, "--out", str(out), "--device", "cpu", *extra])


def _rows(out):
    import csv

    return {r["run"]: r for r in csv.DictReader((out / "table.csv").open())}


def test_limit_change_reruns_and_same_args_reuse(lmms, tmp_path, capsys):
    out, r = tmp_path / "out", _recipe(tmp_path / "r.yaml")
    assert _eval(out, "--recipes", r, "--limit", "90") == 0
    assert [c["limit"] for c in lmms] == [90, 90]
    prov = json.loads((out / "r" / "provenance.json").read_text())  # written next to result.json
    assert prov["limit"] == 90 and prov["model"] == "m" and prov["tasks"] == ["a"]
    assert json.loads((out / "r" / "result.json").read_text())["tasks"] == {"a": {"metric": "acc", "score": 0.6}}
    capsys.readouterr()
    assert _eval(out, "--recipes", r) == 0
    err = capsys.readouterr().err
    assert "re-running vanilla: limit changed 90 -> None" in err and "re-running r: limit changed 90 -> None" in err
    assert [c["limit"] for c in lmms] == [90, 90, None, None]
    assert float(_rows(out)["vanilla"]["a"]) == pytest.approx(0.8)  # the full run's score, not the limited one
    assert _eval(out, "--recipes", r) == 0
    assert len(lmms) == 4 and "[2/2] r: done before" in capsys.readouterr().out


def test_other_model_or_added_task_reruns(lmms, tmp_path, capsys):
    out = tmp_path / "out"
    assert _eval(out) == 0
    assert _eval(out, model="other") == 0
    assert "re-running vanilla: model changed m -> other" in capsys.readouterr().err
    assert float(_rows(out)["vanilla"]["a"]) == pytest.approx(0.85)
    assert _eval(out, model="other", tasks="a,b") == 0
    assert "tasks changed a -> a,b" in capsys.readouterr().err
    assert [c["tasks"] for c in lmms] == [["a"], ["a"], ["a", "b"]]
    assert float(_rows(out)["vanilla"]["b"]) == pytest.approx(0.85)


@pytest.mark.parametrize("flag,old,new,what", [
    ("--batch-size", "1", "4", "batch_size changed 1 -> 4"),
    ("--model-args", "attn_implementation=eager", "attn_implementation=sdpa", "model_args changed"),
    ("--device", "cpu", "cuda:1", "device changed cpu -> cuda"),
    ("--include-path", "tasks1", "tasks2", "include_path changed"),
])
def test_other_settings_rerun(lmms, tmp_path, capsys, monkeypatch, flag, old, new, what):
    out = tmp_path / "out"
    monkeypatch.chdir(tmp_path)
    assert _eval(out, flag, old) == 0
    assert _eval(out, flag, new) == 0
    assert what in capsys.readouterr().err and len(lmms) == 2


def test_gpu_index_or_model_args_order_do_not_rerun(lmms, tmp_path):
    out = tmp_path / "out"
    assert _eval(out, "--device", "cuda:0", "--model-args", "a=1,b=2") == 0
    assert _eval(out, "--device", "cuda:1", "--model-args", "b=2,a=1") == 0
    assert len(lmms) == 1


def test_version_change_reruns(lmms, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    assert _eval(out) == 0
    monkeypatch.setattr(evaltable, "_versions", lambda: {"tokencomp": "1", "lmms_eval": "0.7.3", "transformers": "6"})
    assert _eval(out) == 0
    assert "re-running vanilla: transformers changed 5 -> 6" in capsys.readouterr().err and len(lmms) == 2


def test_recipe_content_not_path_decides(lmms, tmp_path, capsys):
    out, r = tmp_path / "out", tmp_path / "r.yaml"
    _recipe(r)
    assert _eval(out, "--no-vanilla", "--recipes", str(r)) == 0
    _recipe(r, "# a comment and other spacing\n" + RECIPE.replace("{layer: 2, keep: 0.5}", "{layer: 2,   keep: 0.50}"))
    assert _eval(out, "--no-vanilla", "--recipes", str(r)) == 0
    assert len(lmms) == 1  # same canonical recipe: reused
    _recipe(r, RECIPE.replace("0.5", "0.25"))
    assert _eval(out, "--no-vanilla", "--recipes", str(r)) == 0
    assert "re-running r: recipe changed" in capsys.readouterr().err and len(lmms) == 2


def test_same_stem_in_two_folders_gives_two_rows(lmms, tmp_path):
    out = tmp_path / "out"
    r1, r2 = _recipe(tmp_path / "exp1" / "r.yaml"), _recipe(tmp_path / "exp2" / "r.yaml", RECIPE.replace("0.5", "0.25"))
    assert _eval(out, "--recipes", r1, r2) == 0
    rows = _rows(out)
    assert list(rows) == ["vanilla", "exp1-r", "exp2-r"]
    assert [c.get("recipe") for c in lmms] == [None, str(Path(r1).resolve()), str(Path(r2).resolve())]
    assert json.loads((out / "exp2-r" / "provenance.json").read_text())["recipe_arg"] == r2


def test_run_names_are_unique_and_never_vanilla(tmp_path):
    assert evaltable.run_name("VANILLA") == "recipe-VANILLA" and evaltable.run_name(None) == "vanilla"
    assert evaltable.run_names(["x/vanilla.yaml", "x/table.md.yaml"]) == ["recipe-vanilla", "recipe-table.md"]
    assert evaltable.run_names(["a/r.yaml", "b/R.yml"]) == ["a-r", "b-R"]  # case-insensitive file systems
    names = evaltable.run_names(["p/a/r.yaml", "q/a/r.yaml"])  # same parent folder name too: a hash suffix
    assert len(set(names)) == 2 and all(n.startswith("a-r-") for n in names)
    assert names == evaltable.run_names(["p/a/r.yaml", "q/a/r.yaml"])  # deterministic
    assert evaltable.run_names(["..yaml", ".hidden.yaml"]) == ["recipe", "hidden"]


def test_recipe_named_vanilla_is_evaluated(lmms, tmp_path):
    out, r = tmp_path / "out", _recipe(tmp_path / "vanilla.yaml")
    assert _eval(out, "--recipes", r) == 0
    assert [c.get("recipe") for c in lmms] == [None, str(Path(r).resolve())]
    rows = _rows(out)
    assert float(rows["vanilla"]["a"]) == pytest.approx(0.8) and float(rows["recipe-vanilla"]["a"]) == pytest.approx(0.5)


def test_recipe_given_twice_is_an_error(lmms, tmp_path, capsys):
    r = _recipe(tmp_path / "r.yaml")
    assert _eval(tmp_path / "out", "--recipes", r, str(tmp_path / "." / "r.yaml")) != 0
    assert "given twice" in capsys.readouterr().err and not lmms


def test_legacy_result_without_provenance_reruns(lmms, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "vanilla").mkdir(parents=True)
    (out / "vanilla" / "result.json").write_text(json.dumps({"model": "m", "recipe": None, "tasks": {}, "results": {"a": {"acc,none": 0.1}}}))
    assert _eval(out) == 0
    assert "re-running vanilla: no provenance.json" in capsys.readouterr().err and len(lmms) == 1


@pytest.mark.parametrize("text", ['{"model": "m", "resu', "", "[1, 2]", '{"results": {"a": 3}}'])
def test_damaged_result_json_is_rerun(lmms, tmp_path, capsys, text):
    out = tmp_path / "out"
    assert _eval(out) == 0
    (out / "vanilla" / "result.json").write_text(text)
    assert _eval(out) == 0
    err = capsys.readouterr().err
    assert "re-running vanilla:" in err and "result.json" in err and "Traceback" not in err
    assert len(lmms) == 2 and json.loads((out / "vanilla" / "result.json").read_text())["results"]["a"]


def test_damaged_provenance_is_rerun(lmms, tmp_path, capsys):
    out = tmp_path / "out"
    assert _eval(out) == 0
    (out / "vanilla" / "provenance.json").write_text("{")
    assert _eval(out) == 0
    assert "re-running vanilla:" in capsys.readouterr().err and len(lmms) == 2


def test_stale_stats_are_not_reused(lmms, tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert _eval(out, "--limit", "3") == 0
    real = sys.modules["lmms_eval.evaluator"].simple_evaluate

    def no_stats(**kw):  # this time lmms-eval writes no statistics file
        res = real(**kw)
        (out / "vanilla" / "tokencomp_stats.json").unlink()
        return res

    monkeypatch.setattr(sys.modules["lmms_eval.evaluator"], "simple_evaluate", no_stats)
    assert _eval(out) == 0
    assert json.loads((out / "vanilla" / "result.json").read_text())["tokencomp"] == {}


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for n in needles:
        assert n in err, err


def test_out_is_a_file(lmms, tmp_path, capsys):
    f = tmp_path / "out.txt"
    f.write_text("x")
    assert _eval(f) != 0
    _one_line_error(capsys, str(f), "not a folder")
    assert not lmms


def test_run_folder_is_a_file(lmms, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "vanilla").write_text("x")
    assert _eval(out) != 0
    _one_line_error(capsys, str(out / "vanilla"), "not a folder")
    assert not lmms


@pytest.mark.parametrize("args,needle", [
    (["--batch-size", "0"], "--batch-size"),
    (["--limit", "-1"], "--limit"),
    (["--limit", "0"], "--limit"),
    (["--limit", "nan"], "--limit"),
    (["--tasks", ","], "--tasks"),
    (["--metrics", "a"], "--metrics"),
    (["--model-args", "recipe=x"], "recipe"),
    (["--model-args", "novalue"], "--model-args"),
])
def test_bad_arguments_fail_before_any_work(lmms, tmp_path, capsys, args, needle):
    out = tmp_path / "out"
    assert _eval(out, *args) != 0
    _one_line_error(capsys, needle)
    assert not lmms and not out.exists()


def test_bad_arguments_are_reported_even_without_lmms_eval(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "lmms_eval", None)  # import fails
    assert _eval(tmp_path / "out", "--batch-size", "0") != 0
    _one_line_error(capsys, "--batch-size")


def test_comma_in_a_path_is_rejected(lmms, tmp_path, capsys):
    assert _eval(tmp_path / "a,b") != 0  # it would split lmms-eval's model_args
    _one_line_error(capsys, "a,b")
    assert not lmms


def test_every_recipe_loads_before_the_first_run(lmms, tmp_path, capsys):
    good1, good2 = _recipe(tmp_path / "good1.yaml"), _recipe(tmp_path / "good2.yaml")
    bad = _recipe(tmp_path / "bad.yaml", RECIPE.replace("keep", "kepe"))
    assert _eval(tmp_path / "out", "--recipes", good1, good2, bad) == 2
    assert "bad.yaml:4:" in capsys.readouterr().err and not lmms


def test_other_ranks_take_part_in_every_run(lmms, tmp_path, monkeypatch):
    real = sys.modules["lmms_eval.evaluator"].simple_evaluate

    def other_rank(**kw):  # lmms-eval returns None on ranks other than 0
        real(**kw)
        return None

    monkeypatch.setattr(sys.modules["lmms_eval.evaluator"], "simple_evaluate", other_rank)
    out = tmp_path / "out"
    assert _eval(out, "--recipes", _recipe(tmp_path / "r.yaml")) == 0
    assert len(lmms) == 2  # not only the first: rank 0 would wait for this rank forever
    assert not (out / "table.md").exists() and not (out / "r" / "result.json").exists()
