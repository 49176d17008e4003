"""The package's layers: every import of every module, read from the source, obeys the layer rules.

    utils        imports nothing of the package but utils
    checkpoint   utils                                (the on-disk format)
    data         utils
    models       checkpoint, utils                    (the decoder, the providers)
    peft         models, utils                        (adapters on the decoder's layers)
    bridge       models, peft, data, checkpoint, utils (models/conversion, models/registry.py, the families'
                                                       *_bridge.py: Hugging Face in and out; data for the
                                                       tokenizer of an exported run)
    training     anything below it
    recipes      anything but the command line
    top level    anything (cli.py, convert.py, pretrain.py, finetune.py, __init__.py)

`models/__init__.py` may name the bridge's `AutoBridge` (imported when first asked for). Function-local
imports and imports under `if TYPE_CHECKING:` count like any other: `ast.walk` sees them all. A second
test checks what `from megatron.bridge import AutoBridge` really loads.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import megatron.bridge

PACKAGE = "megatron.bridge"
ROOT = Path(megatron.bridge.__file__).parent
LAYERS: dict[str, set[str]] = {
    "utils": {"utils"},
    "checkpoint": {"checkpoint", "utils"},
    "data": {"data", "utils"},
    "models": {"models", "checkpoint", "utils"},
    "peft": {"peft", "models", "utils"},
    "bridge": {"bridge", "models", "peft", "data", "checkpoint", "utils"},
    "training": {"training", "bridge", "models", "data", "checkpoint", "peft", "utils"},
    "recipes": {"recipes", "training", "bridge", "models", "data", "checkpoint", "peft", "utils"},
}
SUBPACKAGES = {path.name for path in ROOT.iterdir() if (path / "__init__.py").is_file()}
LAZY_EXPORTS = {"models/__init__.py": {"bridge"}}
"""Package `__init__`s that name a higher layer's class, imported only when first asked for."""


def layer_of_module(parts: list[str]) -> str:
    """The layer of module `megatron.bridge.<parts...>` (parts without the package prefix)."""
    if parts[0] == "models" and len(parts) > 1 and (
            parts[1] in ("conversion", "registry") or (len(parts) > 2 and parts[2].endswith("_bridge"))):
        return "bridge"
    return parts[0]


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join((PACKAGE, *parts[:-1])) if parts[-1] == "__init__" else ".".join((PACKAGE, *parts))


def imported_subpackages(path: Path) -> set[str]:
    """The `megatron.bridge.<sub>` packages `path` imports, wherever in the file the import stands."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    return subpackages_imported_by(path.read_text(), package=package, filename=str(path))


def subpackages_imported_by(source: str, *, package: str, filename: str = "<source>") -> set[str]:
    """The `megatron.bridge.<sub>` packages `source` (a module of `package`) imports."""
    found = set()
    for node in ast.walk(ast.parse(source, filename=filename)):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parents = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parents + ([base] if base else []))
            # `from megatron.bridge import models` imports the subpackage `models`, and
            # `from megatron.bridge.models import registry` the module `registry`.
            targets = [f"{base}.{alias.name}" for alias in node.names] if base in (PACKAGE, f"{PACKAGE}.models") \
                else [base]
        for target in targets:
            parts = target.split(".")
            if target.startswith(PACKAGE + ".") and parts[2] in SUBPACKAGES:
                found.add(layer_of_module(parts[2:]))
    return found


def layer_of(path: Path) -> str | None:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return layer_of_module(parts) if len(parts) > 1 else None  # None: a top-level module


SOURCES = sorted(ROOT.rglob("*.py"))


def test_every_subpackage_has_a_layer():
    assert SUBPACKAGES | {"bridge"} == set(LAYERS), f"give each subpackage a rule: {sorted(SUBPACKAGES ^ set(LAYERS))}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_obey_the_layers(path):
    layer = layer_of(path)
    if layer is None:
        return  # top-level modules (the command line, the package itself) may import anything
    allowed = LAYERS[layer] | LAZY_EXPORTS.get(str(path.relative_to(ROOT)), set())
    forbidden = imported_subpackages(path) - allowed
    assert not forbidden, (
        f"{module_name(path)} (layer {layer}) imports {sorted(forbidden)}; allowed: {sorted(allowed)}"
    )


@pytest.mark.parametrize("source", [
    "def f():\n    from megatron.bridge.training.config import ConfigContainer\n",
    "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from megatron.bridge.training.state import GlobalState\n",
    "from megatron.bridge import training\n",
    "from ..training import setup\n",
    "import megatron.bridge.training.train\n",
])
def test_every_kind_of_import_is_seen(source):
    assert subpackages_imported_by(source, package="megatron.bridge.models") == {"training"}


@pytest.mark.parametrize(("source", "layer"), [
    ("from megatron.bridge.models.conversion.auto_bridge import AutoBridge\n", "bridge"),
    ("from megatron.bridge.models import registry\n", "bridge"),
    ("from megatron.bridge.models.qwen.qwen3_bridge import QWEN3\n", "bridge"),
    ("from megatron.bridge.models import GPTModelProvider\n", "models"),
    ("from megatron.bridge.models.qwen.qwen3_provider import Qwen3ModelProvider\n", "models"),
])
def test_the_bridge_is_told_apart_from_the_models(source, layer):
    assert subpackages_imported_by(source, package="megatron.bridge.peft") == {layer}


def test_autobridge_loads_no_training_module():
    code = (
        "import sys\n"
        "from megatron.bridge import AutoBridge\n"
        "AutoBridge.list_supported_models()\n"
        "print(sorted(m for m in sys.modules if m.startswith('megatron.bridge.training')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
