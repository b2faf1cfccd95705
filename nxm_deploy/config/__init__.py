"""Recipes: strict pydantic configs loaded from YAML (after ModelOpt's ``ModeloptBaseConfig``)."""

from nxm_deploy.config.recipe import Recipe, load_recipe

__all__ = ["Recipe", "load_recipe"]
