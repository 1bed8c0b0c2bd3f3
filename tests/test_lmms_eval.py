"""``lmms-eval --model tokencomp`` (tokencomp.integrations.lmms_eval), without the hub.

Checkpoints are folders written by :func:`tokencomp.testing.save_tiny_checkpoint` (tiny random
weights, the family's real processor, BPE tokenizer and chat template, saved as transformers 5
saves them), so the wrapper is constructed exactly as ``--model tokencomp --model_args
pretrained=DIR,...`` does: lmms-eval's own class loads the model and processor from disk.
"""

import json
import math
import subprocess
import sys

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (pip install 'tokencomp[eval]')")
pytest.importorskip("decord", reason="lmms-eval's LLaVA/Qwen model modules need decord (lmms-eval[video-legacy])")
try:
    import torchvision  # noqa: F401
except ImportError:
    pass  # fine: transformers falls back to its PIL image processors
except Exception as exc:  # PyPI's torchvision is a CUDA build: next to a CPU torch it fails to load
    pytest.skip(f"torchvision is installed but cannot load ({exc}); uninstall it on a CPU-only machine", allow_module_level=True)

import torch  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402
from PIL import Image  # noqa: E402

from tokencomp import testing as T  # noqa: E402

LAYERS = 6
RECIPE = """\
scorer: v2drop
schedule:
  stages:
    - {layer: 2, keep: 0.5}
    - {layer: 4, keep: 0.25}
"""
KEEP_ALL = """\
scorer: v2drop
schedule:
  stages:
    - {layer: 2, keep: 1.0}
"""


def _save_llava(path, template_file="jinja", family="llava"):
    # weights N(0, 0.2): answers depend on the image and the prompt
    return T.save_tiny_checkpoint(family, path, layers=LAYERS, template_file=template_file)


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return _save_llava(tmp_path_factory.mktemp("tiny-llava"))


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE)
    return str(path)


def _make(model_args: str, batch_size: int = 1):
    from lmms_eval.models import get_model

    # exactly what `lmms-eval --model tokencomp --model_args ... --batch_size N --device cpu` does
    return get_model("tokencomp").create_from_arg_string(model_args, {"batch_size": batch_size, "device": "cpu"})


def _docs(n):
    g = torch.Generator().manual_seed(0)
    docs = []
    for i in range(n):
        w, h = 100 + 17 * i, 90 + 11 * i  # different sizes; the processor resizes
        pixels = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
        docs.append({"image": Image.fromarray(pixels), "question": f"what is {i}?" + " more" * i})
    return docs


def _setup_task(lm, docs, task="toy"):
    lm.task_dict = {task: {"test": docs}}


def _gen_requests(docs, task="toy", max_new_tokens=4):
    return [
        Instance(
            request_type="generate_until",
            arguments=(d["question"], {"max_new_tokens": max_new_tokens, "until": ["\n\n"], "temperature": 0},
                       lambda doc: [doc["image"]], i, task, "test"),
            idx=0,
            metadata={"task": task, "doc_id": i, "repeats": 1},
        )
        for i, d in enumerate(docs)
    ]


def _ll_requests(docs, task="toy_ll"):
    return [
        Instance(
            request_type="loglikelihood",
            arguments=(d["question"], "yes it is", lambda doc: [doc["image"]], i, task, "test"),
            idx=0,
            metadata={"task": task, "doc_id": i, "repeats": 1},
        )
        for i, d in enumerate(docs)
    ]


# ------------------------------------------------------------------------------------------------


def test_import_tokencomp_does_not_import_lmms_eval():
    code = "import sys, tokencomp, tokencomp.integrations; tokencomp.apply; assert 'lmms_eval' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_entry_point_resolves_model_tokencomp():
    from importlib.metadata import entry_points

    from lmms_eval.models import MODEL_REGISTRY_V2, get_model

    from tokencomp.integrations import lmms_eval as integ

    eps = [ep for ep in entry_points(group="lmms_eval.models") if ep.name == "tokencomp"]
    assert len(eps) == 1 and eps[0].value == "tokencomp.integrations.lmms_eval:manifests"
    resolved = MODEL_REGISTRY_V2.resolve("tokencomp")
    assert resolved.class_path == "tokencomp.integrations.lmms_eval.Tokencomp"
    assert resolved.model_type == "simple"
    assert get_model("tokencomp") is integ.Tokencomp  # what `--model tokencomp` instantiates


def test_model_class_reuses_lmms_eval_classes():
    from lmms_eval.api.model import lmms
    from lmms_eval.models.simple.llava_hf import LlavaHf
    from lmms_eval.models.simple.qwen2_5_vl import Qwen2_5_VL
    from lmms_eval.models.simple.qwen2_vl import Qwen2_VL

    from tokencomp.integrations import lmms_eval as integ

    for base, parent in [("llava_hf", LlavaHf), ("qwen2_vl", Qwen2_VL), ("qwen2_5_vl", Qwen2_5_VL)]:
        cls = integ.model_class(base)
        assert issubclass(cls, parent) and issubclass(cls, lmms) and issubclass(cls, integ.TokencompModel)
        assert getattr(integ, cls.__name__) is cls
    assert integ.base_for("whatever", base="llava_onevision") == "llava_hf"
    with pytest.raises(ValueError, match="not supported"):
        integ.model_class("nope")


def test_generation_is_compressed_batched_and_matches_llava_hf(llava_dir, recipe_file, tmp_path):
    stats_path = tmp_path / "stats.json"
    lm = _make(f"pretrained={llava_dir},recipe={recipe_file},stats_path={stats_path}", batch_size=2)
    from lmms_eval.models.simple.llava_hf import LlavaHf

    from tokencomp.integrations.lmms_eval import TokencompModel

    assert isinstance(lm, LlavaHf) and isinstance(lm, TokencompModel)
    docs = _docs(5)
    _setup_task(lm, docs)
    out = lm.generate_until(_gen_requests(docs))
    assert len(out) == 5 and all(isinstance(o, str) for o in out)

    # compression active: fewer vision tokens in deep layers, FLOPs saved
    handle = lm.tokencomp_handle
    table = handle.stats.vision_tokens_per_layer  # last batch
    assert all(row[0] == 64 and row[2] == 32 and row[4] == 8 for row in table)
    summary = lm.tokencomp_summary()
    overall = summary["overall"]
    assert overall["samples"] == 5
    assert overall["vision_tokens_per_layer"] == [64, 64, 32, 32, 8, 8]
    assert overall["vision_tokens_avg"] == pytest.approx((64 * 2 + 32 * 2 + 8 * 2) / 6)
    assert 0 < overall["prefill_flops_ratio"] < 1
    assert set(summary["tasks"]) == {"toy"}

    # batch size 2 gives LlavaHf's own batch-size-1 answers (same prompts, same engine)
    lm.batch_size_per_gpu = 1
    single = lm.generate_until(_gen_requests(docs))
    assert single == out

    # end of run: statistics written, and handed to lmms-eval's results ("throughput")
    from lmms_eval.models.model_utils import gen_metrics

    gen_metrics.reset_logged_metrics()
    model = lm.model
    lm.clean()
    saved = json.loads(stats_path.read_text())
    assert saved["overall"]["samples"] == 10 and saved["recipe"] == recipe_file
    thr = gen_metrics.summarize_logged_metrics()
    assert thr["avg_tokencomp_vision_tokens"] == pytest.approx(overall["vision_tokens_avg"])
    # issue 7: real generation numbers, not zeros (10 answers of up to 4 tokens)
    assert 0 < thr["total_gen_tokens"] <= 10 * 4 and thr["total_elapsed_time"] > 0 and thr["avg_speed"] > 0
    assert saved["overall"]["generate_requests"] == 10 and saved["overall"]["generated_tokens"] == thr["total_gen_tokens"]
    assert not model._forward_hooks and not model._forward_pre_hooks  # recipe removed


def _hf_reference(folder, docs, max_new_tokens=4):
    """The same checkpoint through transformers alone: list-content chat prompt, one doc at a time."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    out = []
    for d in docs:
        conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": d["question"]}]}]
        prompt = processor.apply_chat_template(conv, add_generation_prompt=True)
        inputs = processor(images=d["image"], text=prompt, return_tensors="pt")
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out.append(processor.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0])
    return out


def test_vanilla_records_stats_and_untouched_outputs(llava_dir, recipe_file):
    docs = _docs(3)
    vanilla = _make(f"pretrained={llava_dir}", batch_size=3)
    _setup_task(vanilla, docs)
    out = vanilla.generate_until(_gen_requests(docs))
    assert vanilla.tokencomp_handle is None
    o = vanilla.tokencomp_summary()["overall"]
    assert o["samples"] == 3 and o["vision_tokens_avg"] == 64 and o["prefill_flops_ratio"] == 1.0
    # the same weights through transformers alone (processor + chat template) give the same answers
    assert _hf_reference(llava_dir, docs) == out


@pytest.mark.parametrize("family,template_file,expected", [
    ("llava", "jinja", "USER: <image>\nwhat is 0? ASSISTANT:"),
    ("llava", "json", "USER: <image>\nwhat is 0? ASSISTANT:"),
    ("llava_next", "jinja", "[INST] <image>\nwhat is 0? [/INST]"),
])
def test_prompts_through_the_processor_template(family, template_file, expected, tmp_path):
    """Issue 5: a transformers-5 checkpoint's list-content template is also on the tokenizer; LlavaHf's
    string-content prompt rendered 'USER: ASSISTANT:' (image token lost) at batch size 1 and > 1."""
    folder = _save_llava(tmp_path / "ckpt", template_file, family)
    docs = _docs(4)
    answers = {}
    for bs in (1, 4):
        lm = _make(f"pretrained={folder}", batch_size=bs)
        assert lm._llava_prompt(docs[0]["question"], 1) == expected
        assert lm._llava_prompt("<image>\n" + docs[0]["question"], 1) == expected  # a task's own marker
        _setup_task(lm, docs)
        answers[bs] = lm.generate_until(_gen_requests(docs))
        assert lm.tokencomp_summary()["overall"]["samples"] == 4
    assert answers[1] == answers[4]
    assert _hf_reference(folder, docs) == answers[1]
    # a string-content template (lmms-eval's Vicuna default, or chat_template=) keeps LlavaHf's prompt
    from lmms_eval.models.simple.llava_hf import VICUNA_CHAT_TEMPLATE

    lm.chat_template = VICUNA_CHAT_TEMPLATE
    prompt = lm._llava_prompt("what?", 1)
    assert prompt.endswith("USER: <image>\nwhat? ASSISTANT:") and prompt.startswith("A chat between")


def test_loglikelihood(llava_dir, recipe_file, tmp_path):
    docs = _docs(3)
    lm = _make(f"pretrained={llava_dir},recipe={recipe_file}")
    _setup_task(lm, docs, "toy_ll")
    res = lm.loglikelihood(_ll_requests(docs))
    assert len(res) == 3
    for loss, greedy in res:
        assert isinstance(loss, float) and math.isfinite(loss) and loss > 0 and isinstance(greedy, bool)
    assert lm.tokencomp_summary()["tasks"]["toy_ll"]["vision_tokens_per_layer"][-1] == 8

    # the loss computed here equals the model's own when nothing is dropped
    keep_all = tmp_path / "keep-all.yaml"
    keep_all.write_text(KEEP_ALL)
    a = _make(f"pretrained={llava_dir},recipe={keep_all}")
    b = _make(f"pretrained={llava_dir}")
    for m in (a, b):
        _setup_task(m, docs, "toy_ll")
    ra, rb = a.loglikelihood(_ll_requests(docs)), b.loglikelihood(_ll_requests(docs))
    for (la, ga), (lb, gb) in zip(ra, rb):
        assert la == pytest.approx(lb, rel=1e-4, abs=1e-5) and ga == gb


def test_bad_recipe_fails_before_loading(llava_dir, tmp_path):
    import tokencomp

    bad = tmp_path / "bad.yaml"
    bad.write_text("scorer: v2dorp\nschedule: {stages: [{layer: 2, keep: 0.5}]}\n")
    with pytest.raises(tokencomp.RecipeError, match="bad.yaml:1"):
        _make(f"pretrained={llava_dir},recipe={bad}")


# ------------------------------------------------------------------------------------------------
# through lmms-eval's evaluator, on a synthetic task (local JSON data, images made from a seed)

TASK_YAML = """\
task: tokencomp_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function toy_utils.doc_to_visual
doc_to_text: !function toy_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 3
  temperature: 0
process_results: !function toy_utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
"""

TASK_UTILS = """\
import numpy as np
from PIL import Image


def doc_to_visual(doc):
    rng = np.random.default_rng(doc["seed"])
    return [Image.fromarray(rng.integers(0, 256, (96, 120, 3), dtype=np.uint8))]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact": float(results[0].strip() == doc["answer"])}
"""


@pytest.fixture
def toy_task(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "tasks"
    folder.mkdir()
    data = folder / "toy.jsonl"
    data.write_text("".join(json.dumps({"seed": i, "question": f"what is {i}?", "answer": "x"}) + "\n" for i in range(4)))
    (folder / "tokencomp_toy.yaml").write_text(TASK_YAML.format(data=data))
    (folder / "toy_utils.py").write_text(TASK_UTILS)
    return str(folder)


def test_simple_evaluate_model_tokencomp(llava_dir, recipe_file, toy_task):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    res = simple_evaluate(
        model="tokencomp", model_args=f"pretrained={llava_dir},recipe={recipe_file}", tasks=["tokencomp_toy"],
        batch_size=2, device="cpu", task_manager=TaskManager(include_path=toy_task, include_defaults=False), log_samples=True,
    )
    assert res["results"]["tokencomp_toy"]["exact,none"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert len(res["samples"]["tokencomp_toy"]) == 4
    assert all(isinstance(s["resps"][0][0], str) for s in res["samples"]["tokencomp_toy"])
    thr = res["throughput"]  # tokencomp's statistics in lmms-eval's results
    assert thr["avg_tokencomp_samples"] == 4 and thr["avg_tokencomp_vision_tokens_in"] == 64
    assert thr["avg_tokencomp_vision_tokens"] == pytest.approx(34.667, abs=1e-3)
    assert thr["avg_tokencomp_prefill_flops_ratio"] < 1


def test_tokencomp_eval_table(llava_dir, recipe_file, toy_task, tmp_path, capsys):
    from tokencomp.cli import main

    out = tmp_path / "eval"
    argv = ["eval", "--model", llava_dir, "--recipes", recipe_file, "--tasks", "tokencomp_toy", "--out", str(out),
            "--batch-size", "2", "--device", "cpu", "--include-path", toy_task]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "[1/2] vanilla: evaluating" in text and "[2/2] tiny: evaluating" in text
    md = (out / "table.md").read_text()
    assert "tokencomp_toy (exact)" in md and "% of vanilla" in md
    rows = {r["run"]: r for r in __import__("csv").DictReader((out / "table.csv").open())}
    assert float(rows["vanilla"]["vision_tokens"]) == 64 and float(rows["vanilla"]["prefill_flops"]) == 1
    assert float(rows["tiny"]["vision_tokens"]) == pytest.approx(34.667, abs=1e-3)
    assert float(rows["tiny"]["prefill_flops"]) < 1
    vanilla = json.loads((out / "vanilla" / "result.json").read_text())
    assert vanilla["tasks"]["tokencomp_toy"]["metric"] == "exact"

    # resumable: finished runs are not evaluated again
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "[1/2] vanilla: done before" in text and "[2/2] tiny: done before" in text


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "llava_onevision"])
def test_statistics_on_other_families(family, recipe_file):
    """The hooks and statistics of the Qwen / OneVision classes, on a ragged padded batch.

    lmms-eval's ``Qwen2_VL.__init__`` needs a Qwen processor, which transformers cannot build
    without torchvision (absent on CPU-only machines), so the model is put in place by hand here
    instead of being loaded by the parent class.
    """
    import tokencomp
    from tokencomp.integrations import lmms_eval as integ

    cls = integ.model_class(integ.MODEL_TYPES[family])
    lm = cls.__new__(cls)
    lm._model = T.build_tiny(family, layers=LAYERS)
    lm.batch_size_per_gpu = 2
    lm._tokencomp_start(tokencomp.load_recipe(recipe_file), recipe_file, None)
    sizes = {"qwen2_vl": [(112, 224), (56, 112)], "qwen2_5_vl": [(112, 224), (56, 112)], "llava_onevision": [(56, 112), (112, 112)]}
    inputs = T.make_inputs(lm.model, batch=2, image_sizes=sizes[family], padding="left")
    n = torch.isin(inputs["input_ids"], torch.tensor(T.vision_token_ids(lm.model))).sum(1).tolist()
    assert n[0] != n[1]
    lm.tokencomp_session.task = "toy"
    lm.model.generate(**inputs, max_new_tokens=2, do_sample=False, suppress_tokens=T.suppress_ids(lm.model))
    o = lm.tokencomp_summary()["tasks"]["toy"]
    assert o["samples"] == 2 and o["vision_tokens_in"] == sum(n) / 2
    assert o["vision_tokens_per_layer"][2] == sum(k // 2 for k in n) / 2
    assert o["prefill_flops_ratio"] < 1
    model = lm.model
    lm.tokencomp_remove()
    assert not model._forward_hooks and not model._forward_pre_hooks


# ------------------------------------------------------------------------------------------------
# `lmms-eval --model tokencomp` end to end, as a command: a local task whose dataset is saved to
# disk with `datasets` (dataset_kwargs: {load_from_disk: true}), on a save_tiny_checkpoint folder

DISK_TASK_YAML = """\
task: tc_disk
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: test
output_type: generate_until
doc_to_visual: !function tc_disk_utils.doc_to_visual
doc_to_text: !function tc_disk_utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  temperature: 0
process_results: !function tc_disk_utils.process_results
metric_list:
  - metric: exact
    aggregation: mean
    higher_is_better: true
"""

DISK_TASK_UTILS = """\
def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact": float(results[0].strip() == doc["answer"])}
"""

N_DISK_DOCS = 6


@pytest.fixture(scope="module")
def disk_task(tmp_path_factory):
    import datasets
    import numpy as np

    folder = tmp_path_factory.mktemp("disk-task")
    rows = {"image": [], "question": [], "answer": []}
    for i in range(N_DISK_DOCS):  # different sizes and question lengths: batches are padded
        rng = np.random.default_rng(i)
        rows["image"].append(Image.fromarray(rng.integers(0, 256, (80 + 8 * i, 120 - 6 * i, 3), dtype=np.uint8)))
        rows["question"].append(f"What is shown in image {i}?" + " Describe it." * (i % 3))
        rows["answer"].append("yes")
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")})
    datasets.DatasetDict({"test": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(folder / "data"))
    (folder / "tc_disk.yaml").write_text(DISK_TASK_YAML.format(data=folder / "data"))
    (folder / "tc_disk_utils.py").write_text(DISK_TASK_UTILS)
    return str(folder)


def _cli(prefix, model_args, task_dir, out, batch_size, timeout=300):
    import os

    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    cmd = prefix + ["-m", "lmms_eval", "--model", "tokencomp", "--model_args", model_args, "--tasks", "tc_disk",
                    "--include_path", task_dir, "--batch_size", str(batch_size), "--device", "cpu",
                    "--output_path", str(out), "--log_samples"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    results = list(out.rglob("*_results.json"))
    samples = list(out.rglob("*_samples_tc_disk.jsonl"))
    assert len(results) == 1 and len(samples) == 1, list(out.rglob("*"))
    rows = [json.loads(line) for line in samples[0].read_text().splitlines() if line.strip()]
    def first(x):
        return first(x[0]) if isinstance(x, list) else x

    answers = {r["doc_id"]: first(r["filtered_resps"]) for r in rows}
    assert all(isinstance(a, str) for a in answers.values())
    return json.loads(results[0].read_text()), answers


def _disk_recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(RECIPE)
    return str(path)


def test_cli_end_to_end_vanilla_recipe_and_batch_sizes(llava_dir, disk_task, tmp_path):
    """`lmms-eval --model tokencomp` as a command: results JSON with tokencomp's statistics; the
    recipe changes the vision tokens, not the pipeline; batch size 1 and 4 give the same answers."""
    recipe = _disk_recipe(tmp_path)
    py = [sys.executable]
    vanilla, ans_vanilla = _cli(py, f"pretrained={llava_dir}", disk_task, tmp_path / "vanilla", 4)
    res1, ans1 = _cli(py, f"pretrained={llava_dir},recipe={recipe},stats_path={tmp_path}/s1.json", disk_task, tmp_path / "bs1", 1)
    res4, ans4 = _cli(py, f"pretrained={llava_dir},recipe={recipe}", disk_task, tmp_path / "bs4", 4)

    for res in (vanilla, res1, res4):
        assert "exact,none" in res["results"]["tc_disk"]
        assert res["throughput"]["avg_tokencomp_samples"] == N_DISK_DOCS
        assert res["throughput"]["avg_tokencomp_vision_tokens_in"] == 64
        assert res["throughput"]["total_gen_tokens"] > 0 and res["throughput"]["avg_speed"] > 0
    assert vanilla["throughput"]["avg_tokencomp_vision_tokens"] == 64
    assert vanilla["throughput"]["avg_tokencomp_prefill_flops_ratio"] == 1
    assert res1["throughput"]["avg_tokencomp_vision_tokens"] == pytest.approx((64 * 2 + 32 * 2 + 8 * 2) / 6)
    assert res1["throughput"]["avg_tokencomp_prefill_flops_ratio"] < 1
    assert len(ans1) == len(ans4) == len(ans_vanilla) == N_DISK_DOCS
    assert ans1 == ans4
    stats = json.loads((tmp_path / "s1.json").read_text())
    assert stats["overall"]["samples"] == N_DISK_DOCS and stats["samples_per_rank"] == [N_DISK_DOCS]


def test_cli_data_parallel_two_cpu_processes(llava_dir, disk_task, tmp_path, monkeypatch):
    """Data parallel over two CPU processes (``torchrun --nproc_per_node 2 -m lmms_eval --model tokencomp``):
    each rank takes half of the documents; results and tokencomp's statistics are gathered over both.

    Why torchrun and not ``accelerate launch --cpu --num_processes 2``: accelerate 1.15 starts a single
    process for ``--cpu`` (several CPU processes need ``--mpirun_hostfile`` and an MPI ``mpirun``, absent
    here), and its ``accelerate`` console script imports timm, which imports the torchvision that cannot
    load beside a CPU torch. lmms-eval's torchrun path and accelerate's state (``ACCELERATE_USE_CPU=1``,
    gloo) are what ``accelerate launch`` would set up with MPI.
    """
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    recipe = _disk_recipe(tmp_path)
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    stats_path = tmp_path / "dp.json"
    res, answers = _cli(launch, f"pretrained={llava_dir},recipe={recipe},stats_path={stats_path}", disk_task, tmp_path / "dp", 2)
    assert sorted(answers) == list(range(N_DISK_DOCS))
    stats = json.loads(stats_path.read_text())
    assert stats["samples_per_rank"] == [N_DISK_DOCS // 2, N_DISK_DOCS // 2]  # really split over two ranks
    assert stats["overall"]["samples"] == N_DISK_DOCS and stats["overall"]["generate_requests"] == N_DISK_DOCS
    thr = res["throughput"]
    assert thr["avg_tokencomp_samples"] == N_DISK_DOCS
    assert thr["avg_tokencomp_vision_tokens"] == pytest.approx((64 * 2 + 32 * 2 + 8 * 2) / 6)
    # same answers as one process
    _, single = _cli([sys.executable], f"pretrained={llava_dir},recipe={recipe}", disk_task, tmp_path / "one", 2)
    assert answers == single


@pytest.mark.parametrize("base", ["llava_hf", "qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_device_map_follows_device_for_every_base(base, monkeypatch):
    """Issue 6: lmms-eval's Qwen classes default to device_map="cuda" / "auto"; `--device cpu` (and a
    machine without CUDA) must load on the CPU for every base, not only llava_hf."""
    from tokencomp.integrations.lmms_eval.devices import map_device

    assert map_device(base, {"device": "cpu"}) == ({"device": "cpu", "device_map": "cpu"}, False)
    assert map_device(base, {"device": "cpu", "device_map": "auto"})[0]["device_map"] == "auto"  # explicit wins
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert map_device(base, {}) == ({"device": "cpu", "device_map": "cpu"}, False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    kwargs, _ = map_device(base, {"device": "cuda:1"})
    # GPUs: lmms-eval's own defaults, except LlavaHf's "" that transformers 5 rejects in one process
    assert kwargs.get("device_map") == ("cuda:1" if base == "llava_hf" else None)


# ------------------------------------------------------------------------------------------------
# the LlavaHf re-implementation's version guard, and the report's narrowed except


def test_llava_hf_batching_refuses_an_unknown_lmms_eval_version(monkeypatch):
    from tokencomp import UnsupportedModelError
    from tokencomp.integrations.lmms_eval import factory, llava_hf

    assert llava_hf.installed_version().startswith("0.7.")  # what this environment runs
    monkeypatch.delitem(factory._classes, "llava_hf", raising=False)  # built again below
    monkeypatch.setattr(llava_hf, "installed_version", lambda: "0.8.0")
    with pytest.raises(UnsupportedModelError, match=r"lmms-eval 0\.7\.x .*found lmms-eval 0\.8\.0") as err:
        factory.model_class("llava_hf")
    assert "\n" not in str(err.value)
    assert "llava_hf" not in factory._classes
    factory.model_class("qwen2_vl")  # the Qwen bases do not use it
    monkeypatch.setattr(llava_hf, "installed_version", lambda: "0.7.9.dev1")
    assert issubclass(factory.model_class("llava_hf"), llava_hf.LlavaHfBatching)


def _summary(generated=0):
    from tokencomp.integrations.lmms_eval.stats import RunStats, summary
    from tokencomp.flops import DecoderShape
    from tokencomp.stats import Stats

    run = RunStats(DecoderShape(8, 2, 2, 4, 16, 2))
    run.record("t", Stats(vision_tokens_per_layer=[[4, 2]], input_vision_tokens=[4], real_tokens=[6]))
    run.tasks["t"].add_generation(1, generated, 0.5)
    return summary(run.tasks, "r.yaml", "m", 2)


def test_report_skips_only_a_missing_gen_metrics(tmp_path, monkeypatch):
    """lmms-eval without ``gen_metrics``: the statistics still reach stats_path; any other failure is raised."""
    import types

    from lmms_eval.models.model_utils import gen_metrics

    from tokencomp.integrations.lmms_eval.mixin import report

    gen_metrics.reset_logged_metrics()
    monkeypatch.setitem(sys.modules, "lmms_eval.models.model_utils", None)  # ImportError on import
    report(_summary(generated=3), str(tmp_path / "a.json"))
    assert json.loads((tmp_path / "a.json").read_text())["overall"]["samples"] == 1
    broken = types.ModuleType("lmms_eval.models.model_utils")

    def fail(name):
        raise RuntimeError(f"broken lmms-eval: {name}")

    broken.__getattr__ = fail
    monkeypatch.setitem(sys.modules, "lmms_eval.models.model_utils", broken)
    with pytest.raises(RuntimeError, match="broken lmms-eval"):
        report(_summary(generated=3), None)
    monkeypatch.undo()
    report(_summary(generated=3), None)
    thr = gen_metrics.summarize_logged_metrics()
    assert thr["avg_tokencomp_samples"] == 1 and thr["total_gen_tokens"] == 3
