"""The command line with bad input: one-line errors, exit 2, before any model work; Ctrl-C in bench."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import tokencomp.bench
import tokencomp.runner
import tokencomp.synthetic
from tokencomp.cli import main

TINY = "qwen2-vl-7b:layers=4,hidden=64,heads=4,kv_heads=2,intermediate=128"
RECIPE = "scorer: fastv\nschedule:\n  stages:\n    - {layer: 2, keep: 0.5}\n"


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE)
    return str(path)


@pytest.fixture
def no_model_work(monkeypatch):
    """Any attempt to build or load a model fails the test: the errors must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was built before the arguments were checked")

    for name in ("_load_real", "_build_synthetic", "_generate_real"):
        monkeypatch.setattr(tokencomp.runner, name, forbidden)
    monkeypatch.setattr(tokencomp.synthetic, "build_demo_model", forbidden)


# Small sizes everywhere: were a check missing, the command would run quickly and fail the test.
SMALL = ["--vision-tokens", "8", "--text-tokens", "2", "--new-tokens", "1", "--repeat", "1"]


def _usage_exit(argv, capsys) -> str:
    """Run ``main(argv)``, expect argparse's exit 2, return the last stderr line."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def _main(argv) -> int:
    """``main(argv)``; a KeyboardInterrupt escaping it fails the test instead of ending the session."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main()")


def _error_exit(argv, capsys, code=2) -> str:
    """Run ``main(argv)``, expect ``code`` and exactly one stderr line; return it."""
    assert _main(argv) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ------------------------------------------------------------------------------------------------
# numeric arguments
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "option, value, expected",
    [
        ("--vision-tokens", "0", "must be >= 1, got 0"),
        ("--vision-tokens", "-5", "must be >= 1, got -5"),
        ("--batch", "0", "must be >= 1, got 0"),
        ("--repeat", "0", "must be >= 1, got 0"),
        ("--new-tokens", "-1", "must be >= 0, got -1"),
        ("--text-tokens", "-1", "must be >= 0, got -1"),
        ("--text-tokens", "1.5", "expected an integer, got '1.5'"),
    ],
)
def test_bench_rejects_bad_numbers(recipe, capsys, option, value, expected):
    line = _usage_exit(["bench", recipe, "--synthetic", TINY, option, value], capsys)
    assert line == f"tokencomp bench: error: argument {option}: {expected}"


def test_bench_rejects_one_bad_count_among_several(recipe, capsys):
    line = _usage_exit(["bench", recipe, "--synthetic", TINY, "--vision-tokens", "16", "-5"], capsys)
    assert line.endswith("argument --vision-tokens: must be >= 1, got -5")


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("qwen2-vl-7b:layers=2,hidden=64,heads=0,kv_heads=2", "heads must be >= 1, got 0"),
        ("qwen2-vl-7b:layers=2,hidden=64,heads=4,kv_heads=0", "kv_heads must be >= 1, got 0"),
        ("llava-1.5-7b:layers=0,hidden=64,heads=4,intermediate=8", "layers must be >= 1, got 0"),
        ("llava-1.5-7b:layers=2,hidden=0,heads=4,intermediate=8", "hidden must be >= 1, got 0"),
        ("llava-1.5-7b:layers=2,hidden=64,heads=4,kv_heads=4,intermediate=0", "intermediate must be >= 1, got 0"),
        ("llava-1.5-7b:layers=-2,hidden=64,heads=4,intermediate=8", "bad synthetic option 'layers=-2'"),
        ("llava-1.5-7b:layers=2,hidden=12,heads=4,kv_heads=2,intermediate=8", "the head dimension must be even"),
        ("llava-1.5-7b:layers=2,hidden=64,heads=3,kv_heads=3,intermediate=8", "hidden must divide by heads"),
        ("llava-1.5-7b:depth=4", "bad synthetic option 'depth=4'"),
        ("gpt-9", "unknown synthetic model 'gpt-9'"),
    ],
)
def test_bench_rejects_bad_synthetic_specs(recipe, capsys, spec, expected):
    line = _usage_exit(["bench", recipe, "--synthetic", spec, *SMALL], capsys)
    assert line.startswith("tokencomp bench: error: argument --synthetic: ") and expected in line, line


@pytest.mark.parametrize("value", ["0", "-3"])
def test_validate_rejects_non_positive_layers(capsys, value):
    line = _usage_exit(["validate", "v2drop/llava-1.5-7b-192", "--layers", value], capsys)
    assert line == f"tokencomp validate: error: argument --layers: must be >= 1, got {value}"


def test_run_rejects_non_positive_max_new_tokens(recipe, capsys):
    line = _usage_exit(["run", recipe, "--model", "x", "--prompt", "p", "--max-new-tokens", "0"], capsys)
    assert line == "tokencomp run: error: argument --max-new-tokens: must be >= 1, got 0"


# ------------------------------------------------------------------------------------------------
# paths, device, model: checked before any model work
# ------------------------------------------------------------------------------------------------


def test_bench_json_into_missing_directory(recipe, tmp_path, capsys, no_model_work):
    out = tmp_path / "nope" / "b.json"
    line = _error_exit(["bench", recipe, "--synthetic", TINY, *SMALL, "--json", str(out)], capsys)
    assert line == f"error: --json {out}: directory {out.parent} does not exist"


def test_bench_json_onto_a_directory_or_under_a_file(recipe, tmp_path, capsys, no_model_work):
    line = _error_exit(["bench", recipe, "--synthetic", TINY, *SMALL, "--json", str(tmp_path)], capsys)
    assert line == f"error: --json {tmp_path}: is a directory"
    afile = tmp_path / "file.txt"
    afile.write_text("x")
    line = _error_exit(["bench", recipe, "--synthetic", TINY, *SMALL, "--json", str(afile / "b.json")], capsys)
    assert line == f"error: --json {afile / 'b.json'}: {afile} is not a directory"


def test_bench_output_check_leaves_no_file(recipe, tmp_path, capsys, no_model_work):
    """The writability probe must not leave an empty file behind when the run fails later."""
    out = tmp_path / "b.json"
    line = _error_exit(["bench", recipe, "--synthetic", TINY, *SMALL, "--json", str(out), "--device", "no-such-device"], capsys)
    assert "--device 'no-such-device': not a device name" in line
    assert not out.exists()


def test_bench_cuda_without_cuda(recipe, monkeypatch, capsys, no_model_work):
    monkeypatch.setattr(tokencomp.runner.torch.cuda, "is_available", lambda: False)
    line = _error_exit(["bench", recipe, "--synthetic", TINY, *SMALL, "--device", "cuda"], capsys)
    assert line.startswith("error: --device cuda: CUDA is not available")


@pytest.mark.parametrize("command", ["bench", "run", "demo"])
def test_missing_model_path(recipe, tmp_path, capsys, no_model_work, command):
    missing = tmp_path / "no-such-checkpoint"
    argv = {"bench": ["bench", recipe], "run": ["run", recipe, "--prompt", "p"], "demo": ["demo"]}[command]
    line = _error_exit(argv + ["--model", str(missing)], capsys)
    assert line == f"error: --model {missing}: no such directory"


def test_model_that_is_not_a_checkpoint(recipe, tmp_path, capsys, no_model_work):
    line = _error_exit(["bench", recipe, "--model", str(tmp_path)], capsys)
    assert line == f"error: --model {tmp_path}: no config.json in this folder, not a Hugging Face checkpoint"
    afile = tmp_path / "weights.bin"
    afile.write_bytes(b"\0")
    line = _error_exit(["bench", recipe, "--model", str(afile)], capsys)
    assert line.startswith(f"error: --model {afile}: not a directory")


def test_model_that_is_not_a_vlm(recipe, tmp_path, capsys, no_model_work):
    import transformers

    transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2).save_pretrained(tmp_path)
    line = _error_exit(["run", recipe, "--model", str(tmp_path), "--prompt", "p"], capsys)
    assert line == f"error: --model {tmp_path}: model_type 'gpt2' is not a vision-language (image-text-to-text) model"


def test_model_that_is_an_unsupported_vlm(recipe, tmp_path, capsys, no_model_work):
    import transformers

    transformers.PaliGemmaConfig().save_pretrained(tmp_path)
    line = _error_exit(["bench", recipe, "--model", str(tmp_path)], capsys)
    assert line.startswith(f"error: --model {tmp_path}: PaliGemmaForConditionalGeneration is not supported by tokencomp")
    assert "LlavaForConditionalGeneration" in line


def test_run_missing_and_undecodable_images(recipe, tmp_path, capsys, no_model_work):
    missing = tmp_path / "missing.png"
    line = _error_exit(["run", recipe, "--model", "m", "--prompt", "p", "--image", str(missing)], capsys)
    assert line == f"error: --image {missing}: no such file"
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"this is not a PNG")
    line = _error_exit(["run", recipe, "--model", "m", "--prompt", "p", "--image", str(broken)], capsys)
    assert line.startswith(f"error: --image {broken}: cannot decode the image: ")
    line = _error_exit(["demo", "--model", "m", "--image", str(broken)], capsys)
    assert line.startswith(f"error: --image {broken}: cannot decode the image: ")


def test_run_bad_video_folders(recipe, tmp_path, capsys, no_model_work):
    base = ["run", recipe, "--model", "m", "--prompt", "p", "--video"]
    line = _error_exit(base + [str(tmp_path / "none")], capsys)
    assert line == f"error: --video {tmp_path / 'none'}: no such folder (expected a folder of frame images)"
    line = _error_exit(base + [str(tmp_path)], capsys)
    assert line == f"error: --video {tmp_path}: no .png/.jpg frames in this folder"
    (tmp_path / "0001.png").write_bytes(b"garbage")
    line = _error_exit(base + [str(tmp_path)], capsys)
    assert line.startswith(f"error: --video {tmp_path / '0001.png'}: cannot decode the image")


def test_run_heatmap_into_missing_directory(recipe, tmp_path, capsys, no_model_work):
    out = tmp_path / "nope" / "h.png"
    line = _error_exit(["run", recipe, "--model", "m", "--prompt", "p", "--heatmap", str(out)], capsys)
    assert line == f"error: --heatmap {out}: directory {out.parent} does not exist"


def test_demo_out_unwritable(tmp_path, capsys, no_model_work):
    out = tmp_path / "nope" / "demo.png"
    line = _error_exit(["demo", "--out", str(out)], capsys)
    assert line == f"error: --out {out}: directory {out.parent} does not exist"
    afile = tmp_path / "file"
    afile.write_text("x")
    line = _error_exit(["demo", "--out", str(afile / "demo.png")], capsys)
    assert line == f"error: --out {afile / 'demo.png'}: {afile} is not a directory"


# ------------------------------------------------------------------------------------------------
# main(): --debug, TOKENCOMP_DEBUG, interrupts outside bench
# ------------------------------------------------------------------------------------------------


def test_debug_flag_and_env_show_the_exception(recipe, tmp_path, monkeypatch, capsys, no_model_work):
    from tokencomp.errors import UsageError

    argv = ["bench", recipe, "--model", str(tmp_path / "missing")]
    with pytest.raises(UsageError, match="no such directory"):
        main(["--debug"] + argv)
    monkeypatch.setenv("TOKENCOMP_DEBUG", "1")
    with pytest.raises(UsageError, match="no such directory"):
        main(argv)
    monkeypatch.setenv("TOKENCOMP_DEBUG", "0")
    assert main(argv) == 2


def test_usage_errors_from_commands_exit_2(monkeypatch, capsys):
    """Every TokencompError (not just RecipeError) is a user error: exit 2, one line."""
    import tokencomp.cli
    from tokencomp.errors import PluginError

    def broken(args):
        raise PluginError("plugin 'x' returned scores of the wrong shape\n(expected 16)")

    monkeypatch.setattr(tokencomp.cli, "_cmd_recipes", broken)
    assert _error_exit(["recipes"], capsys) == "error: plugin 'x' returned scores of the wrong shape (expected 16)"


def test_ctrl_c_outside_bench_exits_130(monkeypatch, capsys):
    import tokencomp.cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(tokencomp.cli, "_cmd_recipes", interrupted)
    assert _error_exit(["recipes"], capsys, code=130) == "interrupted"


# ------------------------------------------------------------------------------------------------
# Ctrl-C during bench: partial results kept
# ------------------------------------------------------------------------------------------------


def _interrupt_at(monkeypatch, call: int):
    """Raise KeyboardInterrupt inside the measurement loop at the ``call``-th variant run (1-based)."""
    real = tokencomp.bench._run
    calls = {"n": 0}

    def run(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == call:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(tokencomp.bench, "_run", run)


def _bench_argv(recipe, out, *counts, repeat=3):
    return ["bench", recipe, "--synthetic", TINY, "--vision-tokens", *map(str, counts), "--text-tokens", "4",
            "--new-tokens", "1", "--repeat", str(repeat), "--json", str(out), "--markdown"]


def test_ctrl_c_in_bench_keeps_measured_rounds(recipe, tmp_path, monkeypatch, capsys):
    # 3 variants a round; call 7 is the first run of round 2: round 1 (of 3) is complete.
    _interrupt_at(monkeypatch, 7)
    out = tmp_path / "b.json"
    assert _main(_bench_argv(recipe, out, 16)) == 130
    captured = capsys.readouterr()
    assert "PARTIAL: interrupted after 1 of 3 rounds" in captured.out
    assert "| recipe |" in captured.out  # --markdown rows of what was measured
    assert "Traceback" not in captured.err
    assert captured.err.strip().splitlines()[-1] == (
        f"interrupted; vision tokens 16: 1 of 3 rounds (partial); results so far written to {out}"
    )
    (rep,) = json.loads(out.read_text())
    assert rep["partial"] is True and rep["repeat"] == 1 and rep["repeat_requested"] == 3
    assert rep["vision_tokens_per_layer"] == [16, 16, 8, 8]
    assert rep["metrics"]["prefill_s"]["baseline"] > 0 and rep["metrics"]["prefill_s"]["compressed"] > 0


def test_ctrl_c_in_second_count_keeps_the_first(recipe, tmp_path, monkeypatch, capsys):
    # repeat=1: 6 runs per count; call 8 is in the warm-up of the second count (32), call 11 would be
    # its measured round. Interrupting at 8 keeps count 16 whole and reports 32 as not measured.
    _interrupt_at(monkeypatch, 8)
    out = tmp_path / "b.json"
    assert _main(_bench_argv(recipe, out, 16, 32, repeat=1)) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == f"interrupted; not measured: vision tokens 32; results so far written to {out}"
    (rep,) = json.loads(out.read_text())
    assert rep["vision_tokens"] == 16 and rep["partial"] is False and rep["repeat"] == 1


def test_ctrl_c_in_warm_up_writes_nothing(recipe, tmp_path, monkeypatch, capsys):
    _interrupt_at(monkeypatch, 2)
    out = tmp_path / "b.json"
    assert _main(_bench_argv(recipe, out, 16)) == 130
    captured = capsys.readouterr()
    assert captured.err.strip().splitlines()[-1] == "interrupted; not measured: vision tokens 16"
    assert "Traceback" not in captured.err
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# a real process: no traceback
# ------------------------------------------------------------------------------------------------


def test_no_traceback_in_a_real_process(recipe, tmp_path):
    image = tmp_path / "cat.jpg"
    image.write_bytes(b"\xff\xd8 truncated")
    env = dict(os.environ)
    env.pop("TOKENCOMP_DEBUG", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tokencomp.cli", "run", recipe, "--model", "m", "--prompt", "p", "--image", str(image)],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: --image {image}: cannot decode the image")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
