"""Recipes: functions that return a complete `ConfigContainer`."""

__all__: list[str] = []  # the recipe packages: megatron.bridge.recipes.qwen, .llama, .gemma
