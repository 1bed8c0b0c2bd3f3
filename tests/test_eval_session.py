"""The lmms-eval integration's parts that need no lmms-eval: per-run statistics, the Session, the
LlavaHf version guard; and the engine's per-prefill callback and prefill test they build on."""

import subprocess
import sys

import pytest
import torch

import tokencomp
from tokencomp import testing as T
from tokencomp.engine import prompt_vision_mask
from tokencomp.flops import DecoderShape, prefill_flops_compared
from tokencomp.integrations.lmms_eval import llava_hf
from tokencomp.integrations.lmms_eval.session import Session
from tokencomp.integrations.lmms_eval.stats import RunStats, Totals, describe, new_tokens, summary
from tokencomp.stats import Stats

RECIPE = "scorer: v2drop\nschedule: {stages: [{layer: 2, keep: 0.5}]}\n"
KEEP_ALL = "scorer: v2drop\nschedule: {stages: [{layer: 2, keep: 1.0}]}\n"
SHAPE = DecoderShape(hidden=8, heads=2, kv_heads=2, head_dim=4, intermediate=16, layers=3)


def test_modules_import_without_lmms_eval():
    code = (
        "import sys\n"
        "for name in ('lmms_eval', 'accelerate', 'loguru'): sys.modules[name] = None  # importing them fails\n"
        "from tokencomp.integrations.lmms_eval import Session, TokencompModel, stats, session, mixin, devices, llava_hf\n"
        "from tokencomp.integrations import lmms_eval as pkg\n"
        "assert not hasattr(pkg, '__wrapped__') and 'Session' in dir(pkg)\n"
        "try:\n"
        "    pkg.Tokencomp\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise AssertionError('Tokencomp needs lmms-eval')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------
# statistics


def test_totals_count_tokens_and_flops():
    run = RunStats(SHAPE)
    run.record("a", Stats(vision_tokens_per_layer=[[4, 2, 2], [6, 6, 3]], input_vision_tokens=[4, 6], real_tokens=[10, 9]))
    run.record("b", Stats(vision_tokens_per_layer=[[4, 4]], input_vision_tokens=[4], real_tokens=[5]))
    run.tasks["a"].add_generation(2, 7, 1.5)
    a = run.tasks["a"].summary()
    assert a["samples"] == 2 and a["vision_tokens_in"] == 5 and a["vision_tokens_per_layer"] == [5, 4, 2.5]
    assert a["vision_tokens_avg"] == pytest.approx((8 / 3 + 5) / 2)
    (v0, c0), (v1, c1) = prefill_flops_compared(SHAPE, 10, 4, [4, 2, 2]), prefill_flops_compared(SHAPE, 9, 6, [6, 6, 3])
    assert a["prefill_flops_ratio"] == pytest.approx((c0 + c1) / (v0 + v1)) and a["prefill_flops_ratio"] < 1
    assert (a["generate_requests"], a["generated_tokens"], a["generate_seconds"]) == (2, 7, 1.5)

    s = summary(run.tasks, "r.yaml", "ckpt", SHAPE.layers)
    assert list(s["tasks"]) == ["a", "b"] and s["overall"]["samples"] == 3
    assert s["overall"]["vision_tokens_per_layer"] == [14 / 3, 4, 5 / 3]  # rows of different depth merge
    assert describe(s).startswith("tokencomp [r.yaml]: 3 prefills")
    assert describe(summary({}, None, None, 3)).startswith("tokencomp [vanilla]: 0 prefills")
    assert Totals().summary()["prefill_flops_ratio"] == 1.0
    tasks, per_rank = run.gathered(world_size=4)  # torch.distributed not initialised: this process only
    assert per_rank == [3] and set(tasks) == {"a", "b"}


def test_new_tokens_counts_up_to_the_first_eos():
    prompt = torch.zeros(2, 3, dtype=torch.long)
    seqs = torch.tensor([[0, 0, 0, 5, 2, 9, 9], [0, 0, 0, 5, 6, 7, 8]])  # row 0 ends at its EOS (2)
    assert new_tokens(seqs, prompt, 2) == 2 + 4
    assert new_tokens(seqs, prompt, [2, 7]) == 2 + 3
    assert new_tokens(seqs, prompt, None) == 8

    class Out:
        sequences = seqs

    assert new_tokens(Out(), prompt, 2) == 6
    assert new_tokens({"no": "sequences"}, prompt, 2) == 0  # an output it does not know: nothing counted


# ------------------------------------------------------------------------------------------------
# the session on a tiny model


@pytest.fixture(scope="module")
def llava():
    return T.build_tiny("llava", layers=4)


def _vision_counts(model, inputs):
    return torch.isin(inputs["input_ids"], torch.tensor(T.vision_token_ids(model))).sum(1).tolist()


@pytest.mark.parametrize("recipe", [None, RECIPE])
def test_session_records_each_prefill_per_task(llava, recipe):
    inputs = T.make_inputs(llava, batch=2)
    n = _vision_counts(llava, inputs)
    session = Session(llava, tokencomp.load_recipe(recipe) if recipe else None, name="mine", pretrained="tiny")

    class Req:
        def __init__(self, task):
            self.task_name = task

    def answer(reqs):  # one generate call per group of requests, as lmms-eval's classes do
        out = llava.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=T.suppress_ids(llava))
        return [out.shape[1]] * len(reqs)

    try:
        res = session.by_task(answer, [Req("x"), Req("y"), Req("x")], timed=True)
        assert len(res) == 3 and session.task == "unknown"
        s = session.summary()
        assert s["recipe"] == ("mine" if recipe else None) and s["model"] == "tiny" and s["decoder_layers"] == 4
        for task in ("x", "y"):
            t = s["tasks"][task]
            assert t["samples"] == 2 and t["vision_tokens_in"] == sum(n) / 2  # one prefill of 2 prompts per group
            assert t["generate_requests"] == (2 if task == "x" else 1) and 0 < t["generated_tokens"] <= 2 * 3
            expect = [sum(n) / 2] * 2 + ([sum(k // 2 for k in n) / 2] * 2 if recipe else [sum(n) / 2] * 2)
            assert t["vision_tokens_per_layer"] == expect
            assert (t["prefill_flops_ratio"] < 1) == bool(recipe)
        final = session.finish()
        assert final["samples_per_rank"] == [4] and session.finish() is final
    finally:
        session.remove()
    assert not llava._forward_hooks and not llava._forward_pre_hooks and "generate" not in vars(llava)
    assert session.handle is None and session.summary()["overall"]["samples"] == 4  # still readable


def test_session_scores_labels_on_compacted_logits(llava):
    """The engine refuses ``labels``; under a session they are scored on the logits put back in place."""
    inputs = T.make_inputs(llava, batch=2)
    labels = torch.full_like(inputs["input_ids"], -100)
    labels[:, -3:] = inputs["input_ids"][:, -3:]
    with torch.no_grad():
        ref = llava(**inputs, labels=labels).loss
        vanilla = Session(llava)
        assert llava(**inputs, labels=labels).loss.item() == pytest.approx(ref.item())  # the model's own
        vanilla.remove()
        for recipe in (KEEP_ALL, RECIPE):
            session = Session(llava, tokencomp.load_recipe(recipe))
            out = llava(**inputs, labels=labels)
            session.remove()
            assert out.logits.shape[:2] == labels.shape and torch.isfinite(out.loss)
            if recipe == KEEP_ALL:
                assert out.loss.item() == pytest.approx(ref.item(), rel=1e-5)
            assert session.summary()["overall"]["samples"] == 2


# ------------------------------------------------------------------------------------------------
# the engine's per-prefill callback and prefill test


def test_on_prefill_is_called_once_per_compressed_prefill(llava):
    inputs = T.make_inputs(llava, batch=2)
    order = []
    with tokencomp.apply(llava, RECIPE) as handle:
        hook = llava.register_forward_hook(lambda *a: order.append("hook"))
        unregister = handle.on_prefill(lambda stats: order.append(stats))
        llava.generate(**inputs, max_new_tokens=3, do_sample=False, suppress_tokens=T.suppress_ids(llava))
        assert len(order) == 2 + 2 and order[0] is handle.stats and order[1:] == ["hook"] * 3  # then 2 decode steps
        unregister()
        unregister()  # twice is harmless
        with torch.no_grad():
            llava(**inputs)
        hook.remove()
    assert len(order) == 5 and order[-1] == "hook"


def test_prompt_vision_mask(llava):
    from transformers import DynamicCache

    inputs = T.make_inputs(llava, batch=2)
    ids = torch.tensor(T.vision_token_ids(llava))
    mask = prompt_vision_mask((), inputs, ids)
    assert mask.sum(1).tolist() == _vision_counts(llava, inputs)
    assert torch.equal(prompt_vision_mask((inputs["input_ids"],), {}, ids), mask)  # positional input_ids
    assert prompt_vision_mask((), {**inputs, "past_key_values": DynamicCache()}, ids) is not None  # empty cache
    text = inputs["input_ids"].masked_fill(mask, 5)
    assert prompt_vision_mask((), {"input_ids": text}, ids) is None  # text-only prompt
    assert prompt_vision_mask((), {**inputs, "inputs_embeds": torch.zeros(2, 1, 8)}, ids) is None
    cache = DynamicCache()
    cache.update(torch.zeros(2, 1, 3, 4), torch.zeros(2, 1, 3, 4), 0)
    assert prompt_vision_mask((), {**inputs, "cache": cache}, ids) is None  # a filled cache: no prefill


# ------------------------------------------------------------------------------------------------
# the LlavaHf re-implementation's version guard


def test_llava_hf_version_guard(monkeypatch):
    for ok in ("0.7.3", "0.7.0", "0.7.10.dev2"):
        llava_hf.check_version(ok)
    for bad in ("0.8.0", "0.6.9", "1.7.0", "unknown"):
        with pytest.raises(tokencomp.UnsupportedModelError, match=f"lmms-eval 0.7.x .*found lmms-eval {bad}"):
            llava_hf.check_version(bad)
    monkeypatch.setattr(llava_hf, "installed_version", lambda: "0.9.1")
    with pytest.raises(tokencomp.UnsupportedModelError, match="Install lmms-eval==0.7"):
        llava_hf.batching_mixin()
    monkeypatch.setattr(llava_hf, "installed_version", lambda: "0.7.3")
    assert llava_hf.batching_mixin() is llava_hf.LlavaHfBatching
