"""The command line: pick a recipe, merge a YAML file, apply `key=value` overrides, pretrain or finetune.

    python -m megatron.bridge.pretrain --recipe qwen25_500m train.train_iters=100 model.num_layers=4
    megatron-bridge-pretrain --recipe qwen25_tiny --config-file run.yaml optimizer.lr=1e-3
    torchrun --nproc-per-node 8 -m megatron.bridge.pretrain --recipe qwen25_1p5b ...
    python -m megatron.bridge.finetune --recipe qwen25_500m_peft checkpoint.pretrained_checkpoint=./Qwen2.5-0.5B \
        dataset.dataset_root=./data/sft

`pretrain` takes the `*_pretrain_config` recipes, `finetune` the `*_sft_config` and `*_peft_config`
ones (named without the `_config`: `qwen25_500m_sft`, `qwen25_500m_peft`).

Order: the recipe's config, then `--config-file` (nested YAML mapping), then the overrides, left
to right. Keys are dotted paths of `ConfigContainer` fields (`train.train_iters`,
`dataset.blend`); values are YAML (`null`, `true`, `[a, b]`, `1e-3`). Each value is checked
against the field's type, and unknown keys are rejected with the valid ones listed. The final
config is validated before any work starts. Nothing here depends on the rank, so the same
command runs under `torchrun`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import difflib
import importlib
import os
import pkgutil
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from megatron.bridge.training.config import ConfigContainer
from megatron.bridge.utils.errors import INTERRUPTED_STATUS, ConfigError, UserError, one_line, short_repr
from megatron.bridge.utils.safe_yaml import YAMLInputError, load_yaml_file, safe_load

__all__ = [
    "DEFAULT_FORWARD_STEP",
    "FINETUNE_MODULE_PROG",
    "FINETUNE_SUFFIXES",
    "MODULE_PROG",
    "RECIPE_SUFFIX",
    "available_recipes",
    "build_config",
    "build_parser",
    "check_config",
    "finetune_main",
    "invoked_as",
    "load_forward_step",
    "load_recipe",
    "main",
    "merge_yaml",
    "parse_override",
    "set_field",
]

RECIPE_SUFFIX = "_pretrain_config"
FINETUNE_SUFFIXES = ("_sft_config", "_peft_config")
DEFAULT_FORWARD_STEP = "megatron.bridge.training.gpt_step:forward_step"
MODULE_PROG = "python -m megatron.bridge.pretrain"
"""The command's name when run as a module, and when `main` is given its arguments by a program."""
FINETUNE_MODULE_PROG = "python -m megatron.bridge.finetune"
"""The same for `finetune_main`."""


def available_recipes(kind: str = "pretrain") -> dict[str, Callable[[], ConfigContainer]]:
    """Recipe name to recipe function, for each recipe of `kind` in `megatron.bridge.recipes`.

    `pretrain`: each `*_pretrain_config`, named without the suffix (`qwen25_500m`); `finetune`: each
    `*_sft_config` and `*_peft_config`, named without `_config` (`qwen25_500m_sft`, `qwen25_500m_peft`).
    """
    import megatron.bridge.recipes as recipes_package

    recipes: dict[str, Callable[[], ConfigContainer]] = {}
    for module_info in sorted(pkgutil.iter_modules(recipes_package.__path__), key=lambda m: m.name):
        if not module_info.ispkg:
            continue  # helpers such as recipes/common.py
        module = importlib.import_module(f"{recipes_package.__name__}.{module_info.name}")
        for name in getattr(module, "__all__", ()):
            if kind == "pretrain" and name.endswith(RECIPE_SUFFIX):
                recipes[name[: -len(RECIPE_SUFFIX)]] = getattr(module, name)
            elif kind == "finetune" and name.endswith(FINETUNE_SUFFIXES):
                recipes[name.removesuffix("_config")] = getattr(module, name)
    return recipes


def load_recipe(name: str, kind: str = "pretrain") -> ConfigContainer:
    """The config of recipe `name` (`qwen25_500m` or `qwen25_500m_pretrain_config`; `qwen25_500m_peft` or
    `qwen25_500m_peft_config` for `kind="finetune"`)."""
    recipes = available_recipes(kind)
    key = name[: -len(RECIPE_SUFFIX)] if kind == "pretrain" and name.endswith(RECIPE_SUFFIX) else name
    key = key.removesuffix("_config") if kind == "finetune" else key
    if key not in recipes:
        raise ConfigError(f"--recipe={short_repr(name)} is invalid: choose one of {', '.join(recipes)}")
    return recipes[key]()


def parse_override(item: str) -> tuple[str, Any]:
    """`"a.b=value"` -> `("a.b", value)` with the value read as YAML (empty -> ""; no anchors or aliases)."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not part.isidentifier() for part in key.split(".")):
        raise ConfigError(
            f"override {short_repr(item)} is invalid: expected key=value with a dotted key, e.g. train.train_iters=100"
        )
    if text == "":
        return key, ""
    try:
        return key, safe_load(text)
    except YAMLInputError as err:
        raise ConfigError(f"override {key}: {err}") from err
    except yaml.YAMLError:
        return key, text  # not YAML (e.g. an unbalanced bracket): keep the raw string and let the type decide


def set_field(config: ConfigContainer, key: str, value: Any) -> None:
    """Assign `value` to the dotted field `key`, checked against the field's type."""
    *sections, name = key.split(".")
    target: Any = config
    walked: list[str] = []
    for section in sections:
        _check_known(target, section, walked)
        target = getattr(target, section)
        walked.append(section)
        if not _is_config(target):
            raise ConfigError(f"{'.'.join(walked)} is a value, not a section: {key} cannot be set")
    _check_known(target, name, walked)
    if _is_config(getattr(target, name)):
        example = _field_names(getattr(target, name))[0]
        raise ConfigError(f"{key} is a section: set its fields instead, e.g. {key}.{example}=...")
    hint = _field_types(type(target)).get(name, Any)
    setattr(target, name, _coerce(value, hint, key))


def merge_yaml(config: ConfigContainer, path: str) -> None:
    """Apply a nested YAML mapping (e.g. `train: {train_iters: 100}`) to `config`, field by field.

    The file is read with `safe_yaml.load_yaml_file`: UTF-8, bounded in size, no anchors or aliases.
    """
    data = load_yaml_file(path, label=f"--config-file {path}")
    if data is None:
        return
    if not isinstance(data, dict):
        raise ConfigError(f"--config-file {path}: expected a mapping of sections, got {type(data).__name__}")
    for key, value in _flatten(config, data, []):
        try:
            set_field(config, key, value)
        except ConfigError as err:
            raise ConfigError(f"--config-file {path}: {err}") from err


def _flatten(target: Any, data: dict[str, Any], prefix: list[str]) -> list[tuple[str, Any]]:
    items = []
    for name, value in data.items():
        if name == "_target_":
            continue  # written by ConfigContainer.to_dict(); the recipe already fixes the classes
        key = [*prefix, str(name)]
        # Only real fields are descended into; set_field reports any other name as an unknown key.
        child = getattr(target, str(name)) if str(name) in _field_names(target) else None
        if isinstance(value, dict) and _is_config(child):
            items += _flatten(child, value, key)
        else:
            items.append((".".join(key), value))
    return items


def build_config(recipe: str, config_file: str | None = None, overrides: Sequence[str] = (), *,
                 kind: str = "pretrain") -> ConfigContainer:
    """The recipe's config (a `kind` recipe: see `available_recipes`) with the YAML file, then the overrides."""
    config = load_recipe(recipe, kind)
    if config_file:
        merge_yaml(config, config_file)
    for item in overrides:
        set_field(config, *parse_override(item))
    return config


def load_forward_step(spec: str) -> Callable[..., Any]:
    """The function `module:function` names."""
    module_name, sep, function_name = spec.partition(":")
    if not sep or not module_name or not function_name:
        raise ConfigError(
            f"--forward-step={short_repr(spec)} is invalid: expected module:function, e.g. {DEFAULT_FORWARD_STEP}"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ConfigError(f"--forward-step={spec!r} is invalid: cannot import {module_name} ({err})") from err
    function = getattr(module, function_name, None)
    if not callable(function):
        raise ConfigError(f"--forward-step={spec!r} is invalid: {module_name} has no function {function_name}")
    return function


def check_config(config: ConfigContainer, *, kind: str = "pretrain") -> None:
    """Validate a copy of `config` exactly as `pretrain` (or, `kind="finetune"`, `finetune`) will."""
    from megatron.bridge.training.finetune import prepare_finetune
    from megatron.bridge.training.pretrain import _resolve_vocab_size, planned_data_parallel_size

    # A copy: pretrain resolves the vocabulary itself, and the config should reach it as the user wrote it.
    trial = copy.deepcopy(config)
    if kind == "finetune":
        prepare_finetune(trial)
    _resolve_vocab_size(trial)
    trial.validate(data_parallel_size=planned_data_parallel_size(trial))


def _is_config(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _field_names(target: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(target)]


def _check_known(target: Any, name: str, walked: list[str]) -> None:
    names = _field_names(target)
    if name in names:
        return
    where = ".".join(walked)
    key = f"{where}.{name}" if where else name
    scope = f"valid keys of {where}" if where else "valid top-level keys"
    close = difflib.get_close_matches(name[:100], names, n=1)
    hint = f" (did you mean {where + '.' if where else ''}{close[0]}?)" if close else ""
    shown = key if len(key) <= 200 else f"{key[:200]}..."  # a key read from a file can be any length
    raise ConfigError(f"unknown key {shown}{hint}; {scope}: {', '.join(sorted(names))}")


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass's fields."""
    return typing.get_type_hints(cls)


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    return getattr(hint, "__name__", str(hint))


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` as the type `hint` describes, or ConfigError `key=value is invalid: expected <type>`."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is not type(None):
                try:
                    return _coerce(value, arg, key)
                except ConfigError:
                    continue
        expected = " or ".join(_type_name(arg) for arg in args)
        raise ConfigError(f"{key}={short_repr(value)} is invalid: expected {expected}")
    converted = _convert_scalar(value, hint)
    if converted is _INVALID:
        raise ConfigError(f"{key}={short_repr(value)} is invalid: expected {_type_name(origin or hint)}")
    return converted


_INVALID = object()


def _convert_scalar(value: Any, hint: Any) -> Any:
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is bool:
        return value if isinstance(value, bool) else _INVALID
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _INVALID
    if hint is float:
        if not is_number and not isinstance(value, str):
            return _INVALID
        try:  # a string too: YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except (ValueError, OverflowError):  # OverflowError: an integer beyond the float range
            return _INVALID
    if hint is str:
        return str(value) if isinstance(value, str) or is_number else _INVALID
    origin = typing.get_origin(hint) or hint
    if origin in (list, tuple):
        return origin(value) if isinstance(value, (list, tuple)) else _INVALID
    if isinstance(origin, type):
        return value if isinstance(value, origin) else _INVALID
    return value


def invoked_as(argv: Sequence[str] | None, kind: str = "pretrain") -> str:
    """The command's name as the user typed it: the console script's (`megatron-bridge-pretrain`), else the module's.

    `python -m` and `torchrun -m` put the module's file path in `sys.argv[0]`, and a program calling
    `main(argv)` has its own; neither is what the user typed, so those get `MODULE_PROG` (or
    `FINETUNE_MODULE_PROG`).
    """
    name = os.path.basename(sys.argv[0]) if argv is None and sys.argv and sys.argv[0] else ""
    module = FINETUNE_MODULE_PROG if kind == "finetune" else MODULE_PROG
    return name if name and not name.endswith(".py") and name != "-c" else module


def build_parser(prog: str = MODULE_PROG, kind: str = "pretrain") -> argparse.ArgumentParser:
    """The argument parser, named `prog` in its usage and error lines; `--help` lists the `kind` recipes."""
    recipes = available_recipes(kind)
    width = max(14, *(len(name) for name in recipes))
    listing = "\n".join(f"  {name:<{width}} {(fn.__doc__ or '').strip().splitlines()[0]}"
                        for name, fn in recipes.items())
    what = "Pretrain a GPT model" if kind == "pretrain" else "Finetune a model (full SFT, LoRA or DoRA)"
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"{what} from a recipe, a YAML file and key=value overrides.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            f"recipes:\n{listing}\n\n"
            "overrides are dotted ConfigContainer fields with YAML values, applied after --config-file:\n"
            "  train.train_iters=100 optimizer.lr=3e-4 checkpoint.save=null\n"
            "  dataset.blend=[runs/corpus] tokenizer.tokenizer_type=HuggingFaceTokenizer \\\n"
            "    tokenizer.tokenizer_model=runs/tok\n"
            "see docs/configuration.md for every field and docs/data.md for data and this command"
        ),
    )
    parser.add_argument("--recipe", required=True, metavar="NAME", help=f"one of: {', '.join(recipes)}")
    parser.add_argument("--config-file", metavar="YAML", help="nested YAML mapping merged before the overrides")
    parser.add_argument("--forward-step", default=DEFAULT_FORWARD_STEP, metavar="MODULE:FUNCTION",
                        help=f"the forward step to train with (default: {DEFAULT_FORWARD_STEP})")
    parser.add_argument("--print-config", action="store_true", help="print the final config as YAML and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.train_iters=100")
    parser.set_defaults(kind=kind)
    return parser


def main(argv: Sequence[str] | None = None, *, prog: str | None = None, kind: str = "pretrain") -> None:
    """Run the command line: build and check the config, then `pretrain` it (`kind="finetune"`: `finetune`).

    A `UserError` ends the process with one line, `<prog>: error: <message>`: status 2 while the config
    is built and checked, 1 once training has started (a checkpoint that does not fit, bad data). Ctrl-C
    prints `<prog>: interrupted` and exits with 130. Anything else is a bug and keeps its traceback.
    `prog` defaults to how the command was invoked (`invoked_as`).
    """
    parser = build_parser(prog or invoked_as(argv, kind), kind)
    args = parser.parse_args(argv)
    try:
        _run(parser, args)
    except KeyboardInterrupt:
        parser.exit(INTERRUPTED_STATUS, f"{parser.prog}: interrupted\n")


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    try:
        config = build_config(args.recipe, args.config_file, args.overrides, kind=args.kind)
        forward_step = load_forward_step(args.forward_step)
        check_config(config, kind=args.kind)
    except UserError as err:
        parser.exit(2, f"{parser.prog}: error: {one_line(err)}\n")
    if args.print_config:
        print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="")
        return
    from megatron.bridge.training.finetune import finetune
    from megatron.bridge.training.pretrain import pretrain

    try:
        (finetune if args.kind == "finetune" else pretrain)(config, forward_step)
    except UserError as err:
        parser.exit(1, f"{parser.prog}: error: {one_line(err)}\n")


def finetune_main(argv: Sequence[str] | None = None, *, prog: str | None = None) -> None:
    """`main` for the finetuning recipes (the `megatron-bridge-finetune` script, `-m megatron.bridge.finetune`)."""
    main(argv, prog=prog, kind="finetune")
