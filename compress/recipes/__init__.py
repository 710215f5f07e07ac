"""Built-in recipes (YAML files read by compress.recipe.load_recipe)."""
