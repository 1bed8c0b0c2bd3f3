"""tokencomp: drop vision tokens inside the language model of Hugging Face VLMs, by recipe.

    import tokencomp
    recipe = tokencomp.load_recipe("v2drop/llava-1.5-7b-192")
    with tokencomp.apply(model, recipe) as handle:
        out = model.generate(**inputs)
        print(handle.stats)
"""

from .errors import PluginError, RecipeError, TokencompError, UnsupportedModelError
from .hookspecs import hookimpl
from .interfaces import LayerView, ModelAdapter, Schedule, Scorer, Selector, Stage
from .recipe import Recipe, load_recipe, shipped_recipes

__all__ = [
    "hookimpl",
    "load_recipe",
    "apply",
    "Recipe",
    "Handle",
    "Stats",
    "LayerView",
    "Scorer",
    "Selector",
    "Schedule",
    "Stage",
    "ModelAdapter",
    "RecipeError",
    "PluginError",
    "TokencompError",
    "UnsupportedModelError",
    "shipped_recipes",
]


def __getattr__(name):
    # The engine imports transformers; keep `import tokencomp` (and the CLI's validate) light.
    if name in ("apply", "Handle", "Stats"):
        from . import engine

        return getattr(engine, name)
    raise AttributeError(f"module 'tokencomp' has no attribute {name!r}")
