"""The plugin system: built-ins, in-process plugins, clashes, broken plugins, entry points, the template."""

from __future__ import annotations

import ast
import dataclasses
import filecmp
import io
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import tokenize
from pathlib import Path

import pytest
import torch

import tokencomp
import tokencomp.plugins as plugins
from tokencomp import PluginError, RecipeError, Scorer
from tokencomp.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "plugins" / "tokencomp-keynorm"
STAGES = "schedule: {stages: [{layer: 1, keep: 0.5}]}\n"


# --------------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------------


def _scorer(name: str) -> type:
    """A new, distinct Scorer class registered as ``name``."""

    @dataclasses.dataclass(frozen=True)
    class _Scorer(Scorer):
        """Test scorer."""

        weight: float = 1.0

        def score(self, view):
            return torch.zeros(view.vision_mask.shape)

    _Scorer.name = name
    return _Scorer


class ScorerPlugin:
    """A plugin object that registers the given classes through ``register_scorers``."""

    def __init__(self, *classes, error: Exception | None = None):
        self.classes, self.error = classes, error

    @tokencomp.hookimpl
    def register_scorers(self, register):
        for cls in self.classes:
            register(cls)
        if self.error is not None:
            raise self.error


def _env_without_autoload_switches() -> dict:
    env = dict(os.environ)
    env.pop("TOKENCOMP_DISABLE_PLUGIN_AUTOLOAD", None)
    env.pop("TOKENCOMP_LOAD_PLUGINS", None)
    return env


@pytest.fixture
def fake_dist(tmp_path, monkeypatch, plugin_registry):
    """``make(dist, version, entry_points={name: module}, modules={module: source})``: a distribution
    installed in a temporary folder on ``sys.path`` (a real ``.dist-info``), found by importlib.metadata.

    Entry-point autoload is switched on for the test; what loads goes into the test's own registry.
    """
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv("TOKENCOMP_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    module_names = []

    def make(dist: str, version: str, entry_points: dict, modules: dict) -> Path:
        for mod, source in modules.items():
            (site / f"{mod}.py").write_text(textwrap.dedent(source))
            module_names.append(mod)
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        eps = "".join(f"{name} = {value}\n" for name, value in entry_points.items())
        (info / "entry_points.txt").write_text(f"[tokencomp]\n{eps}")
        return site

    try:
        yield make
    finally:
        for mod in module_names:
            sys.modules.pop(mod, None)


GOOD_MODULE = """
    import dataclasses, torch, tokencomp

    @dataclasses.dataclass(frozen=True)
    class GoodScorer(tokencomp.Scorer):
        '''Scores nothing in particular.'''
        name = "{name}"

        def score(self, view):
            return torch.zeros(view.vision_mask.shape)

    @tokencomp.hookimpl
    def register_scorers(register):
        register(GoodScorer)
"""


# --------------------------------------------------------------------------------------------------
# built-ins and in-process plugins
# --------------------------------------------------------------------------------------------------


def test_builtins_are_plugins_registered_by_module_path():
    """Every built-in class comes from a built-in plugin module registered under its module path."""
    reg = plugins.registry()
    assert reg.errors == []
    for modname in plugins.builtin_plugins():
        assert plugins.pm.get_plugin(modname) is sys.modules[modname]
    for kind in plugins.KINDS:
        assert reg.names(kind), f"no built-in {kind}"
        for entry in reg.entries[kind].values():
            assert entry.plugin in plugins.builtin_plugins()
            assert entry.distribution == "tokencomp"
            assert entry.version == importlib.metadata.version("tokencomp")
    assert reg.entries["scorer"]["v2drop"].plugin == "tokencomp.scorers.v2drop"
    assert reg.get("selector", "topk").name == "topk"


def test_in_process_register_and_unregister(in_process_plugin):
    """A plugin object registered at run time provides its scorer until it is unregistered."""
    cls = _scorer("inproc-test")
    name = in_process_plugin(ScorerPlugin(cls), "test-inproc", distribution=("my-dist", "1.0"))
    entry = plugins.registry().entries["scorer"]["inproc-test"]
    assert (entry.cls, entry.plugin, entry.distribution, entry.version) == (cls, "test-inproc", "my-dist", "1.0")
    recipe = tokencomp.load_recipe("scorer: {name: inproc-test, weight: 2}\n" + STAGES)
    assert recipe.scorer == cls(weight=2.0)

    plugins.unregister(name)
    assert "inproc-test" not in plugins.registry().names("scorer")
    with pytest.raises(PluginError, match="unknown scorer 'inproc-test'"):
        plugins.registry().get("scorer", "inproc-test")


def test_in_process_plugin_without_distribution_is_labelled(in_process_plugin):
    in_process_plugin(ScorerPlugin(_scorer("anon-test")), "test-anon")
    assert plugins.registry().entries["scorer"]["anon-test"].distribution == "(in-process)"


def test_duplicate_names_are_an_error_naming_both_plugins(in_process_plugin):
    """Two plugins claiming one name: the name is unusable, the error names both; others still work."""
    in_process_plugin(ScorerPlugin(_scorer("dup-test")), "test-first", distribution=("dist-a", "1"))
    in_process_plugin(ScorerPlugin(_scorer("dup-test")), "test-second", distribution=("dist-b", "2"))
    reg = plugins.registry()
    clash = [str(e) for e in reg.errors if "dup-test" in str(e)]
    assert len(clash) == 1
    assert "'test-first' (dist-a 1)" in clash[0] and "'test-second' (dist-b 2)" in clash[0]
    with pytest.raises(PluginError, match="registered twice.*test-first.*test-second"):
        reg.get("scorer", "dup-test")
    assert "dup-test" not in reg.names("scorer")
    assert reg.get("scorer", "v2drop").name == "v2drop"
    with pytest.raises(RecipeError, match=r"^<string>:1: .*registered twice"):
        tokencomp.load_recipe("scorer: dup-test\n" + STAGES)
    tokencomp.load_recipe("scorer: v2drop\n" + STAGES)


class TryFirstScorerPlugin(ScorerPlugin):
    """Like ScorerPlugin, but its hook runs before the built-ins' (pluggy's tryfirst)."""

    @tokencomp.hookimpl(tryfirst=True)
    def register_scorers(self, register):
        for cls in self.classes:
            register(cls)


@pytest.mark.parametrize("plugin_type", [ScorerPlugin, TryFirstScorerPlugin])
def test_builtin_wins_a_clash_with_a_third_party_plugin(in_process_plugin, capsys, plugin_type):
    """A third-party class named like a built-in is ignored and reported naming both distributions;
    the built-in, the default and the default recipe keep working (whichever hook runs first)."""
    builtin = plugins.registry().get("scorer", "v2drop")
    impostor = _scorer("v2drop")
    in_process_plugin(plugin_type(impostor), "test-impostor", distribution=("impostor-dist", "0.1"))
    reg = plugins.registry()
    assert reg.get("scorer", "v2drop") is builtin
    assert reg.entries["scorer"]["v2drop"].plugin == "tokencomp.scorers.v2drop"
    (err,) = [str(e) for e in reg.errors]
    version = importlib.metadata.version("tokencomp")
    assert err == (
        "scorer name 'v2drop' of plugin 'test-impostor' (impostor-dist 0.1) is ignored: "
        f"it is the name of built-in plugin 'tokencomp.scorers.v2drop' (tokencomp {version})"
    )
    assert reg.default_name("scorer") == "v2drop"
    assert type(tokencomp.default_recipe().scorer) is builtin
    assert type(tokencomp.load_recipe("scorer: v2drop\n" + STAGES).scorer) is builtin

    assert cli_main(["plugins"]) == 1
    out, errout = capsys.readouterr()
    assert "impostor-dist 0.1" in errout and "tokencomp.scorers.v2drop" in errout and "Traceback" not in errout


def test_clash_between_third_party_plugins_beside_a_builtin_name(in_process_plugin):
    """Two third-party classes on a built-in name: both are reported, the built-in is kept."""
    in_process_plugin(ScorerPlugin(_scorer("topk-like")), "test-a", distribution=("dist-a", "1"))
    in_process_plugin(ScorerPlugin(_scorer("v2drop")), "test-b", distribution=("dist-b", "2"))
    in_process_plugin(TryFirstScorerPlugin(_scorer("v2drop")), "test-c", distribution=("dist-c", "3"))
    reg = plugins.registry()
    errors = [str(e) for e in reg.errors]
    assert len(errors) == 2 and all("tokencomp.scorers.v2drop" in e for e in errors)
    assert any("dist-b 2" in e for e in errors) and any("dist-c 3" in e for e in errors)
    assert reg.entries["scorer"]["v2drop"].plugin == "tokencomp.scorers.v2drop"
    assert reg.get("scorer", "topk-like").name == "topk-like"
    tokencomp.default_recipe()


def test_third_party_default_marker_does_not_change_the_default(in_process_plugin):
    """Only a built-in may be the default: a third-party class marked default is reported, not used."""
    marked = _scorer("wants-default")
    marked.default = True
    in_process_plugin(ScorerPlugin(marked), "test-marked", distribution=("marked-dist", "1.0"))
    reg = plugins.registry()
    assert reg.default_name("scorer") == "v2drop"
    assert tokencomp.default_recipe().scorer.name == "v2drop"
    (err,) = [str(e) for e in reg.errors]
    assert "scorer 'wants-default' of plugin 'test-marked' (marked-dist 1.0) is marked default" in err
    assert reg.get("scorer", "wants-default") is marked  # still usable by name


def test_subclass_of_builtin_default_is_not_a_default(in_process_plugin):
    """A subclass inherits `default = True` without asking for it: no error, the default is unchanged."""
    base = plugins.registry().get("selector", "topk")
    sub = dataclasses.dataclass(frozen=True)(type("MyTopK", (base,), {"name": "my-topk", "__doc__": "Sub."}))

    class Plugin:
        @tokencomp.hookimpl
        def register_selectors(self, register):
            register(sub)
            register(base)  # re-registering a built-in class is no clash and keeps it built-in

    in_process_plugin(Plugin(), "test-sub", distribution=("sub-dist", "1"))
    reg = plugins.registry()
    assert reg.errors == []
    assert reg.default_name("selector") == "topk"
    assert reg.entries["selector"]["topk"].plugin == "tokencomp.selectors.topk"
    assert reg.get("selector", "my-topk") is sub


def test_entry_point_taking_a_builtin_name_is_reported_with_both_distributions(fake_dist, monkeypatch, capsys):
    """The installed-distribution case: `tokencomp plugins` names both; the default recipe still loads."""
    fake_dist("tp-clash", "4.2", {"clashplug": "tp_clash_mod"}, {"tp_clash_mod": GOOD_MODULE.format(name="v2drop")})
    monkeypatch.setenv("TOKENCOMP_LOAD_PLUGINS", "clashplug")
    plugins.reload_entrypoints()
    (err,) = [str(e) for e in plugins.registry().errors]
    assert "plugin 'clashplug' (tp-clash 4.2) is ignored" in err and "'tokencomp.scorers.v2drop' (tokencomp " in err
    assert tokencomp.default_recipe().scorer.name == "v2drop"
    assert type(tokencomp.default_recipe().scorer).__module__ == "tokencomp.scorers.v2drop"
    assert cli_main(["plugins", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["errors"] == [err]


def test_same_class_registered_twice_is_not_a_clash(in_process_plugin):
    cls = _scorer("twice-test")
    in_process_plugin(ScorerPlugin(cls), "test-twice-a")
    in_process_plugin(ScorerPlugin(cls), "test-twice-b")
    assert plugins.registry().get("scorer", "twice-test") is cls


def test_plugin_raising_while_registering_is_reported_and_others_survive(in_process_plugin, capsys):
    """The error names the plugin and its distribution; `tokencomp plugins` lists the healthy ones, exit 1."""
    healthy = _scorer("before-boom-test")
    in_process_plugin(ScorerPlugin(healthy, error=RuntimeError("boom")), "test-broken", distribution=("broken-dist", "9.9"))
    reg = plugins.registry()
    (err,) = [str(e) for e in reg.errors]
    assert err == "plugin 'test-broken' (distribution broken-dist 9.9) raised in register_scorers: RuntimeError: boom"
    assert {"v2drop", "before-boom-test"} <= set(reg.names("scorer"))
    # Using a name from the registry mentions the broken plugin.
    with pytest.raises(RecipeError, match="note: plugin 'test-broken'"):
        tokencomp.load_recipe("scorer: not-there\n" + STAGES)

    assert cli_main(["plugins"]) == 1
    out, errout = capsys.readouterr()
    assert "v2drop" in out and "topk" in out
    assert "error: plugin 'test-broken' (distribution broken-dist 9.9) raised in register_scorers" in errout
    assert "Traceback" not in errout


@pytest.mark.parametrize(
    "bad, message",
    [
        (object, "not a subclass of Scorer"),
        (tokencomp.Selector, "not a subclass of Scorer"),
        (type("Nameless", (Scorer,), {}), "has no `name`"),
    ],
)
def test_registering_a_wrong_class_is_an_error(in_process_plugin, bad, message):
    in_process_plugin(ScorerPlugin(bad), "test-wrong")
    (err,) = plugins.registry().errors
    assert "plugin 'test-wrong'" in str(err) and message in str(err)


# --------------------------------------------------------------------------------------------------
# registries are objects: one per test, or passed to load_recipe / apply
# --------------------------------------------------------------------------------------------------


def test_a_registry_passed_to_load_recipe_and_apply_is_used_and_stays_private():
    """A plugin registered in one PluginRegistry works through ``plugins=`` and is unknown elsewhere."""
    from tokencomp.testing import build_tiny, make_inputs

    mine = plugins.PluginRegistry()
    cls = _scorer("only-mine")
    mine.register(ScorerPlugin(cls), "test-mine")
    text = "scorer: only-mine\nschedule: {stages: [{layer: 1, keep: 0.5}]}\n"
    assert type(tokencomp.load_recipe(text, plugins=mine).scorer) is cls
    assert tokencomp.default_recipe(plugins=mine) == tokencomp.default_recipe()
    for other in (plugins.registry(), plugins.PluginRegistry().registry()):
        assert "only-mine" not in other.names("scorer")
    with pytest.raises(RecipeError, match="unknown scorer 'only-mine'"):
        tokencomp.load_recipe(text)
    model = build_tiny("llava", layers=2)
    inputs = make_inputs(model)
    with torch.no_grad(), tokencomp.apply(model, text, plugins=mine) as handle:
        model(**inputs)
    n = handle.stats.input_vision_tokens[0]
    assert type(handle.recipe.scorer) is cls and handle.stats.vision_tokens_per_layer == [[n, n // 2]]
    assert plugins.current() is plugins.DEFAULT  # the block ended with the call


def test_use_is_per_thread_and_nests():
    mine, other = plugins.PluginRegistry(), plugins.PluginRegistry()
    seen = []
    with mine.use():
        assert plugins.current() is mine
        with other.use():
            assert plugins.current() is other
        assert plugins.current() is mine
        worker = threading.Thread(target=lambda: seen.append(plugins.current()))
        worker.start()
        worker.join()
    assert seen == [plugins.DEFAULT] and plugins.current() is plugins.DEFAULT


def test_register_hooks_run_again_on_every_rebuild():
    """What hookspecs.py promises plugin authors: the table is cached, and every change rebuilds it by
    calling every ``register_*`` hook again (so hooks must have no side effects)."""
    calls = []

    class Counting:
        @tokencomp.hookimpl
        def register_scorers(self, register):
            calls.append(1)
            register(counted)

    counted = _scorer("counted")
    reg = plugins.PluginRegistry()
    reg.register(Counting(), "test-counting")
    assert reg.registry() is reg.registry() and len(calls) == 1
    reg.register(ScorerPlugin(_scorer("another")), "test-another")
    assert {"counted", "another"} <= set(reg.registry().names("scorer")) and len(calls) == 2


def test_plugin_registry_fixture_is_in_effect_for_the_test_only(plugin_registry, in_process_plugin):
    assert plugins.current() is plugin_registry and plugin_registry is not plugins.DEFAULT
    in_process_plugin(ScorerPlugin(_scorer("fixture-only")), "test-fixture-only")
    assert "fixture-only" in plugins.registry().names("scorer")
    assert "fixture-only" not in plugins.DEFAULT.registry().names("scorer")
    assert "test-fixture-only" not in dict(plugins.DEFAULT.pm.list_name_plugin())


# --------------------------------------------------------------------------------------------------
# entry points (fake distributions on sys.path)
# --------------------------------------------------------------------------------------------------


def test_broken_entry_point_names_plugin_and_distribution(fake_dist, monkeypatch, capsys):
    """An entry point that fails to import is a PluginError naming it and its distribution."""
    fake_dist("tp-broken", "1.2.3", {"brokenplug": "tp_broken_mod"}, {"tp_broken_mod": "raise ImportError('needs frobnicate')\n"})
    fake_dist("tp-good", "0.5", {"goodplug": "tp_good_mod"}, {"tp_good_mod": GOOD_MODULE.format(name="ep-good")})
    monkeypatch.setenv("TOKENCOMP_LOAD_PLUGINS", "brokenplug,goodplug")
    plugins.reload_entrypoints()
    reg = plugins.registry()
    assert [str(e) for e in reg.errors] == [
        "plugin 'brokenplug' (distribution tp-broken 1.2.3) failed to load: ImportError: needs frobnicate"
    ]
    good = reg.entries["scorer"]["ep-good"]
    assert (good.plugin, good.distribution, good.version) == ("goodplug", "tp-good", "0.5")

    plugins.reload_entrypoints()  # retrying does not pile up copies of the error
    assert len(plugins.registry().errors) == 1

    assert cli_main(["plugins", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert {"kind": "scorer", "name": "ep-good", "distribution": "tp-good"}.items() <= next(
        r for r in data["plugins"] if r["name"] == "ep-good"
    ).items()
    assert len(data["errors"]) == 1 and "tp-broken 1.2.3" in data["errors"][0]


def test_entry_point_raising_in_hook_names_distribution(fake_dist, monkeypatch):
    source = "import tokencomp\n\n@tokencomp.hookimpl\ndef register_scorers(register):\n    raise KeyError('oops')\n"
    fake_dist("tp-raise", "2.0", {"raiseplug": "tp_raise_mod"}, {"tp_raise_mod": source})
    monkeypatch.setenv("TOKENCOMP_LOAD_PLUGINS", "raiseplug")
    plugins.reload_entrypoints()
    (err,) = [str(e) for e in plugins.registry().errors]
    assert err == "plugin 'raiseplug' (distribution tp-raise 2.0) raised in register_scorers: KeyError: 'oops'"


def test_cli_with_broken_entry_point_lists_healthy_plugins_without_traceback(fake_dist):
    """Real process, real entry-point scan: exit 1, the error on stderr, the healthy plugins on stdout."""
    site = fake_dist("tp-broken", "1.2.3", {"brokenplug": "tp_broken_mod"}, {"tp_broken_mod": "import frobnicate_not_installed\n"})
    env = _env_without_autoload_switches()
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    env["TOKENCOMP_LOAD_PLUGINS"] = "brokenplug"
    proc = subprocess.run([sys.executable, "-m", "tokencomp.cli", "plugins"], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "v2drop" in proc.stdout and "topk" in proc.stdout
    assert "plugin 'brokenplug' (distribution tp-broken 1.2.3) failed to load: ModuleNotFoundError" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_autoload_disabled_by_environment(fake_dist, monkeypatch):
    """With TOKENCOMP_DISABLE_PLUGIN_AUTOLOAD set, entry points are not even imported."""
    fake_dist("tp-auto", "1.0", {"autoplug": "tp_auto_mod"}, {"tp_auto_mod": GOOD_MODULE.format(name="ep-auto")})
    monkeypatch.setenv("TOKENCOMP_DISABLE_PLUGIN_AUTOLOAD", "1")
    plugins.reload_entrypoints()
    assert plugins.current().pm.get_plugin("autoplug") is None
    assert "tp_auto_mod" not in sys.modules
    assert "ep-auto" not in plugins.registry().names("scorer")

    monkeypatch.delenv("TOKENCOMP_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.setenv("TOKENCOMP_LOAD_PLUGINS", "autoplug")
    plugins.reload_entrypoints()
    assert plugins.registry().entries["scorer"]["ep-auto"].distribution == "tp-auto"


@pytest.mark.parametrize("selection, expected", [("plug-a", {"ep-a"}), (" plug-b , plug-a ", {"ep-a", "ep-b"}), ("", set())])
def test_load_plugins_variable_selects_entry_points(fake_dist, monkeypatch, selection, expected):
    fake_dist(
        "tp-two", "1.0", {"plug-a": "tp_mod_a", "plug-b": "tp_mod_b"},
        {"tp_mod_a": GOOD_MODULE.format(name="ep-a"), "tp_mod_b": GOOD_MODULE.format(name="ep-b")},
    )
    monkeypatch.setenv("TOKENCOMP_LOAD_PLUGINS", selection)
    plugins.reload_entrypoints()
    assert set(plugins.registry().names("scorer")) & {"ep-a", "ep-b"} == expected


# --------------------------------------------------------------------------------------------------
# the plugins/ template, installed for real
# --------------------------------------------------------------------------------------------------


def _template_is_installed() -> bool:
    """The template is installed and its installed files are the ones in the repository."""
    try:
        dist = importlib.metadata.distribution("tokencomp-keynorm")
    except importlib.metadata.PackageNotFoundError:
        return False
    installed = {str(f): f for f in dist.files or []}
    for src in (TEMPLATE / "tokencomp_keynorm").glob("*.py"):
        rel = f"tokencomp_keynorm/{src.name}"
        if rel not in installed or not filecmp.cmp(src, dist.locate_file(installed[rel]), shallow=False):
            return False
    return True


@pytest.fixture(scope="module")
def keynorm_installed(tmp_path_factory):
    """Install plugins/tokencomp-keynorm into this interpreter's environment (unless it already is)."""
    if not _template_is_installed():
        # Build from a copy so that setuptools' build/ and *.egg-info never land in the repository.
        src = tmp_path_factory.mktemp("keynorm") / "tokencomp-keynorm"
        shutil.copytree(TEMPLATE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index", "-q", str(src)]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (
            "installing plugins/tokencomp-keynorm failed; the test environment needs pip and setuptools>=61 "
            f"(offline build, no isolation):\n{proc.stdout}\n{proc.stderr}"
        )
        importlib.invalidate_caches()
    assert _template_is_installed()
    return importlib.metadata.distribution("tokencomp-keynorm")


def test_template_entry_point_is_discovered(keynorm_installed):
    (ep,) = [ep for ep in importlib.metadata.entry_points(group="tokencomp") if ep.name == "keynorm"]
    assert ep.value == "tokencomp_keynorm"
    assert ep.dist.metadata["Name"] == "tokencomp-keynorm"
    assert "tokencomp" in keynorm_installed.requires


def test_template_listed_by_cli_with_its_distribution(keynorm_installed):
    """`tokencomp plugins --json` in a fresh process with autoload on lists keynorm from tokencomp-keynorm."""
    proc = subprocess.run(
        [sys.executable, "-m", "tokencomp.cli", "plugins", "--json"],
        env=_env_without_autoload_switches(), capture_output=True, text=True, timeout=120,
    )
    data = json.loads(proc.stdout)
    assert proc.returncode == (1 if data["errors"] else 0), proc.stderr
    (row,) = [r for r in data["plugins"] if r["name"] == "keynorm"]
    assert row["kind"] == "scorer"
    assert (row["plugin"], row["distribution"], row["version"]) == ("keynorm", "tokencomp-keynorm", keynorm_installed.version)
    assert not any("keynorm" in e for e in data["errors"])


@pytest.fixture
def keynorm_loaded(keynorm_installed, monkeypatch, plugin_registry):
    """The template loaded through its entry point, into this test's registry."""
    monkeypatch.delenv("TOKENCOMP_DISABLE_PLUGIN_AUTOLOAD", raising=False)
    monkeypatch.setenv("TOKENCOMP_LOAD_PLUGINS", "keynorm")
    plugin_registry.reload_entrypoints()
    return plugin_registry.registry().entries["scorer"]["keynorm"]


def test_template_scorer_usable_from_a_recipe(keynorm_loaded):
    """`scorer: keynorm` loads, validates its parameters and, applied, keeps the highest-norm tokens."""
    from tokencomp.testing import build_tiny, make_inputs

    assert (keynorm_loaded.plugin, keynorm_loaded.distribution) == ("keynorm", "tokencomp-keynorm")
    with pytest.raises(RecipeError, match=r"^<string>:1: .*ord must be positive"):
        tokencomp.load_recipe("scorer: {name: keynorm, ord: -1}\n" + STAGES)

    model = build_tiny("llava", layers=4)
    inputs = make_inputs(model, batch=1)
    recipe = tokencomp.load_recipe("scorer: keynorm\nschedule:\n  stages:\n    - {layer: 2, keep: 0.25}\n")
    assert type(recipe.scorer).__module__ == "tokencomp_keynorm"
    with torch.no_grad():
        reference = model(**inputs, output_hidden_states=True).hidden_states[2][0]  # input of layer 2
        with tokencomp.apply(model, recipe) as handle:
            model(**inputs)
    n = int((inputs["input_ids"] == model.config.image_token_index).sum())
    assert handle.stats.vision_tokens_per_layer == [[n, n, n // 4, n // 4]]
    vision = (inputs["input_ids"][0] == model.config.image_token_index).nonzero().flatten()
    norms = reference[vision].norm(dim=-1)
    expected = vision[norms.topk(n // 4).indices]
    assert sorted(handle.stats.kept_positions[2][0].tolist()) == sorted(expected.tolist())


def test_core_names_no_method():
    """The core (tokencomp/*.py) knows no method by name: methods live in the plugin packages."""
    core = Path(plugins.__file__).parent
    methods = ("v2drop", "v²drop", "fastv", "pdrop", "pyramiddrop", "sparsevlm", "topk")
    for path in sorted(core.glob("*.py")):
        text = path.read_text(encoding="utf-8").lower()
        found = [m for m in methods if m in text]
        assert not found, f"{path.name} mentions {found}"


FAMILY = re.compile(r"llava|qwen|onevision", re.IGNORECASE)
FAMILY_HOMES = ("models", "synthetic", "toy", "integrations")
"""Where a model family may be named in code: its adapter (``tokencomp/models/``); the packages that
build models of named families (``synthetic/``: random-weight models, their inputs and checkpoints;
``toy/``: the trained toy model); and integrations, which map each family to the other tool's own
class for it (lmms-eval's ``llava_hf``)."""


def family_names_in_code(source: str) -> list[str]:
    """``line: token`` of every identifier, and every string literal without white space, that names a
    model family (``LlavaForConditionalGeneration``, ``"qwen2_vl"``, ``.startswith("Qwen")``).
    Comments, docstrings and prose (a string with a space: a message, a help text) may name families
    as examples; code that dispatches on a family cannot do so in prose."""
    docs = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            docs.update(range(node.lineno, node.end_lineno + 1))
    found = []
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME:
            named = FAMILY.search(tok.string)
        elif tok.type == tokenize.STRING and tok.start[0] not in docs:
            body = re.sub(r"^[A-Za-z]*('\'\'|\"\"\"|'|\")|('\'\'|\"\"\"|'|\")$", "", tok.string)  # f-strings too
            named = not any(c.isspace() for c in body) and FAMILY.search(body)
        else:
            continue
        if named:
            found.append(f"{tok.start[0]}: {tok.string}")
    return found


def test_family_rule_catches_dispatch_and_allows_prose():
    """The negative check of the rule below: dispatch on a family in any spelling is caught; prose is not."""
    caught = [
        "isinstance(model, transformers.LlavaForConditionalGeneration)",
        "if type(model).__name__.startswith('Qwen'): pass",
        "if cfg.model_type == 'llava_onevision': pass",
        "llava_sizes = {}",
        "spec = 'llava-1.5-7b:layers=8'",
    ]
    for code in caught:
        assert family_names_in_code(code), code
    allowed = [
        "x = 1  # LLaVA-NeXT rows end in a newline token",
        'def f():\n    """Qwen3-VL deepstack."""\n',
        "raise ValueError('use a video model: Qwen2-VL, LLaVA-OneVision')",
        "name = 'v2drop'",
    ]
    for code in allowed:
        assert not family_names_in_code(code), code


def test_core_names_no_model_family():
    """Model-family knowledge lives in the adapters: the core (every module outside
    :data:`FAMILY_HOMES`) names no family in its code (see :func:`family_names_in_code`)."""
    core = Path(plugins.__file__).parent
    found = {}
    for path in sorted(core.rglob("*.py")):
        rel = path.relative_to(core)
        if rel.parts[0] not in FAMILY_HOMES:
            found[str(rel)] = family_names_in_code(path.read_text(encoding="utf-8"))
    assert "engine.py" in found and not any(found.values()), {k: v for k, v in found.items() if v}


def test_one_default_per_kind_and_default_recipe():
    """Recipes that name no scorer/selector use the plugins marked default; the default recipe
    is made of the default plugins only."""
    reg = plugins.registry()
    for kind in ("scorer", "selector", "schedule"):
        name = reg.default_name(kind)
        assert reg.get(kind, name).default is True
    recipe = tokencomp.default_recipe()
    assert recipe.scorer.name == reg.default_name("scorer")
    assert recipe.schedule.name == reg.default_name("schedule")
    bare = tokencomp.load_recipe("schedule: {stages: [{layer: 1, keep: 0.5}]}")
    assert bare.selector.name == reg.default_name("selector")
