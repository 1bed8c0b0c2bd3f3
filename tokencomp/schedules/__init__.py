"""Built-in schedule *plugins*: the Python classes a recipe's ``schedule:`` names (``explicit``
stages, the depth-scaled ``v2drop``, the average-token ``budget`` solver), one per module.

Not the shipped recipes: those are YAML files in the repository's top-level ``schedules/`` folder,
installed as the package data ``tokencomp.recipes`` (:func:`tokencomp.shipped_recipes`; see the README
there)."""
