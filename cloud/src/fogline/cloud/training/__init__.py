"""Training recipes and Ray Train. Importing this package imports torch."""

from ._recipes import BUILTIN_RECIPES, Recipe, load_recipe, resolve_recipe

__all__ = ["BUILTIN_RECIPES", "Recipe", "load_recipe", "resolve_recipe"]
