"""Recipes: functions that return a complete `ConfigContainer`."""
