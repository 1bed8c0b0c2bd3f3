"""tokencomp: drop vision tokens inside the language model of Hugging Face VLMs, by recipe.

    import tokencomp
    recipe = tokencomp.load_recipe("my-recipe.yaml")   # or a shipped name: `tokencomp recipes`
    with tokencomp.apply(model, recipe) as handle:
        out = model.generate(**inputs)
        print(handle.stats)
"""

from .errors import PluginError, RecipeError, TokencompError, UnsupportedModelError, UsageError
from .hookspecs import hookimpl
from .interfaces import LayerView, Merger, ModelAdapter, Schedule, Scorer, Selection, Selector, Stage
from .recipe import Recipe, default_recipe, load_recipe, shipped_recipes

__all__ = [
    "hookimpl",
    "load_recipe",
    "default_recipe",
    "apply",
    "Recipe",
    "Handle",
    "Stats",
    "LayerView",
    "Selection",
    "Scorer",
    "Selector",
    "Merger",
    "Schedule",
    "Stage",
    "ModelAdapter",
    "RecipeError",
    "PluginError",
    "TokencompError",
    "UnsupportedModelError",
    "UsageError",
    "shipped_recipes",
    "methods",
    "contract",
]


def __getattr__(name):
    # The engine imports transformers (seconds); `import tokencomp` and `tokencomp validate` need only torch.
    if name in ("apply", "Handle", "Stats"):
        from . import engine

        return getattr(engine, name)
    if name in ("methods", "contract"):  # built-in plugin classes by name; the plugin contract checks
        import importlib

        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'tokencomp' has no attribute {name!r}")
