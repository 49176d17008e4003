"""megatron-bridge-lite: Megatron Bridge's training API and callback system in pure PyTorch.

Importing the package is cheap: sub-packages (training, models, data, recipes) load on demand.
"""

__version__ = "0.1.0"
