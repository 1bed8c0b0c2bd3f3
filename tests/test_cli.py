"""The ``tokencomp`` command line: ``plugins``, ``validate`` and ``--help`` everywhere."""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from tokencomp.cli import build_parser, main
from tokencomp.recipe import shipped_recipes

SHIPPED = "v2drop/llava-1.5-7b-192"
REPO = Path(__file__).resolve().parents[1]
BUILTINS = {"scorer": "v2drop", "selector": "topk", "merger": "nearest", "schedule": "explicit", "model_adapter": "llava"}


def _run(*args, executable=None):
    cmd = [executable] if executable else [sys.executable, "-m", "tokencomp.cli"]
    # The session's TOKENCOMP_DISABLE_PLUGIN_AUTOLOAD=1 (conftest) is inherited: built-ins only.
    return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=120, env=dict(os.environ))


def _console_script() -> str:
    """The `tokencomp` command that [project.scripts] installs next to this interpreter."""
    script = Path(sysconfig.get_path("scripts")) / ("tokencomp.exe" if os.name == "nt" else "tokencomp")
    assert script.exists(), f"{script} missing: is tokencomp installed in this environment?"
    return str(script)


def test_plugins_json_lists_builtins_of_every_kind():
    """Through the installed `tokencomp` command: every kind, each from distribution tokencomp."""
    proc = _run("plugins", "--json", executable=_console_script())
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["errors"] == []
    version = importlib.metadata.version("tokencomp")
    kinds = {row["kind"] for row in data["plugins"]}
    assert kinds == set(BUILTINS)
    for row in data["plugins"]:
        assert set(row) == {"kind", "name", "plugin", "distribution", "version", "summary"}
        assert (row["distribution"], row["version"]) == ("tokencomp", version)
        assert row["plugin"].startswith("tokencomp.") and row["summary"]
    for kind, name in BUILTINS.items():
        assert any(r["kind"] == kind and r["name"] == name for r in data["plugins"]), (kind, name)


def test_plugins_text_groups_by_kind(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    headers = [line for line in out.splitlines() if not line.startswith(" ")]
    assert headers == ["scorers:", "selectors:", "mergers:", "schedules:", "model adapters:"]
    assert "  v2drop" in out and "tokencomp.scorers.v2drop" in out


def test_validate_accepts_shipped_names_and_files(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text((REPO / "schedules" / f"{SHIPPED}.yaml").read_text(encoding="utf-8"))
    assert main(["validate", SHIPPED, str(path)]) == 0
    assert capsys.readouterr().out == f"{SHIPPED}: ok\n{path}: ok\n"
    assert main(["validate", *shipped_recipes()]) == 0


def test_validate_with_layers_describes_stages(capsys):
    assert main(["validate", SHIPPED, "--layers", "32"]) == 0
    out = capsys.readouterr().out
    assert "layer   3: keep 0.5 of the vision tokens, scorer v2drop, selector topk" in out
    assert "layer  22: keep 0 of the vision tokens" in out


def test_validate_rejects_layers_beyond_depth(capsys):
    lines = (REPO / "schedules" / f"{SHIPPED}.yaml").read_text(encoding="utf-8").splitlines()
    line = next(i for i, text in enumerate(lines, 1) if "layer: 22" in text)
    assert main(["validate", SHIPPED, "--layers", "20"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"{SHIPPED}.yaml:{line}: stage layer 22 does not exist: the model's decoder has 20 layers")


@pytest.mark.parametrize(
    "text, line, reason",
    [
        ("scorer: v2dorp\nschedule: {stages: [{layer: 3, keep: 0.5}]}\n", 1, "unknown scorer 'v2dorp' (did you mean 'v2drop'?)"),
        ("schedule:\n  stages:\n    - {layer: 3, keep: 1.5}\n", 3, "keep must be in [0, 1]"),
        ("schedule:\n  stages:\n    - {layer: 3, keep: 0.5}\n    - {layer: 2, keep: 0.5}\n", 4, "strictly increasing"),
        ("scorer: v2drop\nscorer: fastv\n", 2, "duplicate key 'scorer'"),
        ("scorer: v2drop\n  selector: topk\n", 2, "YAML syntax error"),
        ("", 1, "the recipe is empty"),
        ("schedule: {name: budget, tokens: -5}\n", 1, "invalid schedule 'budget'"),
    ],
    ids=["unknown-name", "keep-range", "layer-order", "duplicate-key", "syntax", "empty", "schedule-param"],
)
def test_validate_malformed_file_exits_2_with_location(tmp_path, capsys, text, line, reason):
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    assert main(["validate", SHIPPED, str(bad)]) == 2
    captured = capsys.readouterr()
    assert captured.out == f"{SHIPPED}: ok\n"  # the other recipes are still checked
    assert captured.err.startswith(f"{bad}:{line}: ") and reason in captured.err, captured.err


def test_validate_malformed_file_in_a_subprocess(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("schedule:\n  stages:\n    - {layer: 0, keep: 0.5}\n")
    proc = _run("validate", str(bad))
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"{bad}:3: layer must be >= 1, got 0")
    assert "Traceback" not in proc.stderr


def _subcommands() -> list[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return sorted(sub.choices)


def test_core_subcommands_exist():
    assert {"plugins", "recipes", "validate"} <= set(_subcommands())


@pytest.mark.parametrize("command", [[]] + [[c] for c in _subcommands()], ids=lambda c: " ".join(c) or "tokencomp")
def test_help_everywhere(command, capsys):
    with pytest.raises(SystemExit) as info:
        main(command + ["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: tokencomp" + "".join(f" {c}" for c in command))


def test_help_as_a_module():
    proc = _run("--help")
    assert proc.returncode == 0 and "plugins" in proc.stdout and "validate" in proc.stdout


def test_missing_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    assert info.value.code == 2 and "usage: tokencomp" in capsys.readouterr().err
