"""What a user finds by exploring the package: `dir()`, tab completion, `help()`, `__all__`."""

from __future__ import annotations

import importlib
import pkgutil
import pydoc
import subprocess
import sys

import pytest

import megatron.bridge
import megatron.bridge.training.callbacks as callbacks

SUBPACKAGES = {"checkpoint", "data", "models", "peft", "recipes", "training", "utils"}
# Every module of these gets an `__all__`.
COVERED = ("megatron.bridge.training", "megatron.bridge.data", "megatron.bridge.utils", "megatron.bridge.checkpoint",
           "megatron.bridge.peft", "megatron.bridge.models", "megatron.bridge.recipes")
# Modules whose `__all__` their owners add (issue 17 item 10); remove a name here once its module has one.
NOT_YET: set[str] = set()
CONTRACT_CALLBACK_NAMES = {"Callback", "CallbackContext", "CallbackManager", "VALID_EVENTS", "normalize_callbacks",
                           "should_fire"}
DOCUMENTED_CALLBACK_EXTRAS = {"untimed", "CallbackFn"}  # docs/callbacks.md ("Callback overhead"), the fn type


def covered_modules() -> list[str]:
    names = ["megatron.bridge", "megatron.bridge.cli", "megatron.bridge.convert", "megatron.bridge.pretrain"]
    for package_name in COVERED:
        package = importlib.import_module(package_name)
        names.append(package_name)
        names += [info.name for info in pkgutil.walk_packages(package.__path__, prefix=f"{package_name}.")]
    return names


def test_dir_lists_the_subpackages_and_autobridge():
    names = set(dir(megatron.bridge))
    assert SUBPACKAGES | {"AutoBridge", "__version__"} <= names
    assert "Any" not in names and "lazy_attributes" not in names
    assert set(megatron.bridge.__all__) == SUBPACKAGES | {"AutoBridge", "__version__"}


def test_subpackages_load_on_first_access_after_import_megatron_bridge():
    # A fresh interpreter: in this one every sub-package is already imported.
    code = (
        "import sys, megatron.bridge as mb\n"
        "assert 'megatron.bridge.training' not in sys.modules and 'torch' not in sys.modules\n"
        "assert mb.training.__name__ == 'megatron.bridge.training'\n"
        "assert mb.training.callbacks.Callback.__name__ == 'Callback'\n"
        "assert 'megatron.bridge.data' not in sys.modules and 'torch' not in sys.modules\n"
        "assert 'callbacks' in dir(mb.training) and 'io' in dir(mb.checkpoint)\n"
        "try:\n"
        "    mb.nothing_here\n"
        "except AttributeError as err:\n"
        "    assert 'nothing_here' in str(err)\n"
        "else:\n"
        "    raise SystemExit('no AttributeError')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def test_training_callbacks_exports_the_contract_and_its_documented_extras():
    assert set(callbacks.__all__) == CONTRACT_CALLBACK_NAMES | DOCUMENTED_CALLBACK_EXTRAS
    namespace: dict = {}
    exec("from megatron.bridge.training.callbacks import *", namespace)
    assert {"Any", "Callable", "contextlib", "time"}.isdisjoint(namespace)


@pytest.mark.parametrize("name", [name for name in covered_modules() if name not in NOT_YET])
def test_every_module_has_an___all___whose_names_exist(name):
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, list), f"{name} has no __all__"
    assert len(exported) == len(set(exported)), f"{name}.__all__ lists a name twice"
    missing = [item for item in exported if not hasattr(module, item)]
    assert missing == [], f"{name}.__all__ names what it does not have: {missing}"


def test_help_shows_the_map_of_the_package():
    text = pydoc.render_doc(megatron.bridge, renderer=pydoc.plaintext)
    assert "Where things live" in text and "training.callbacks" in text and "class AutoBridge" in text
    assert "Import one of the package's lazy names on first access" in text  # not a bare __getattr__
