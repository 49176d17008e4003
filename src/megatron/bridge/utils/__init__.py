"""Neutral helpers shared by `models`, `data` and `training`; nothing here imports those packages."""
