"""The training loop, its configuration, state and callbacks."""
