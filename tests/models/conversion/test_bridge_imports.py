"""`AutoBridge` is importable from the package root, lazily, and never needs `transformers`."""

from __future__ import annotations

import subprocess
import sys

CHECK = """
import sys
import megatron.bridge.training.callbacks
import megatron.bridge.models
heavy = ("megatron.bridge.models.conversion", "safetensors", "transformers")
assert not [m for m in sys.modules if m.startswith(heavy)], "imported too early"
from megatron.bridge import AutoBridge
from megatron.bridge.models import AutoBridge as Same
assert AutoBridge is Same and AutoBridge.__module__ == "megatron.bridge.models.conversion.auto_bridge"
assert "transformers" not in sys.modules, "the bridge imported transformers"
print("ok")
"""


def test_bridge_loads_only_when_asked_for_and_without_transformers():
    out = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_unknown_attribute_is_an_attribute_error():
    import pytest

    import megatron.bridge

    with pytest.raises(AttributeError, match="NoSuchThing"):
        megatron.bridge.NoSuchThing  # noqa: B018
