"""Every entry of a checkpoint's JSON files is checked before anything is loaded; errors name file and key.

Each case edits one entry and then re-seals the checkpoint (rewrites its manifest), as a buggy or
foreign writer would: the checksums pass, so the schema is what must refuse it.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from checkpoint_faults import expect_refused, train

from megatron.bridge.checkpoint import integrity as checkpoint_integrity

ITERATION = "iter_0000004"


def _set(path: tuple, value: Any) -> Callable[[Any], Any]:
    def edit(data: Any) -> Any:
        target = data
        for part in path[:-1]:
            target = target[part]
        if value is _DELETE:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return data

    return edit


_DELETE = object()

COMMON_CASES = {
    "not-an-object": (lambda data: [1, 2], "(top level)"),
    "step-negative": (_set(("train_state", "step"), -3), "train_state.step"),
    "step-fraction": (_set(("train_state", "step"), 3.7), "train_state.step"),
    "step-text": (_set(("train_state", "step"), "seven"), "train_state.step"),
    "step-of-another-iteration": (_set(("train_state", "step"), 5), "train_state.step=5"),
    "consumed-below-step": (_set(("train_state", "consumed_train_samples"), 2), "consumed_train_samples=2"),
    "skipped-above-consumed": (_set(("train_state", "skipped_train_samples"), 99), "skipped_train_samples=99"),
    "flops-negative": (_set(("train_state", "floating_point_operations_so_far"), -1.0),
                       "floating_point_operations_so_far"),
    "flag-not-bool": (_set(("train_state", "do_train"), "yes"), "train_state.do_train"),
    "unknown-train-state-key": (_set(("train_state", "bogus"), 1), "bogus"),
    "no-train-state": (_set(("train_state",), _DELETE), "train_state"),
    "no-scheduler": (_set(("scheduler",), _DELETE), "'scheduler'"),
    "scheduler-bad-style": (_set(("scheduler", "lr_decay_style"), "bogus"), "lr_decay_style"),
    "scheduler-steps-text": (_set(("scheduler", "num_steps"), "7"), "scheduler.num_steps"),
    "scheduler-lr-nan": (_set(("scheduler", "max_lr"), float("nan")), "scheduler.max_lr"),
    "scheduler-unknown-key": (_set(("scheduler", "lr"), 1.0), "scheduler"),
    "unknown-format": (_set(("format_version",), 999), "format_version"),
    "unknown-top-level-key": (_set(("extra",), {}), "extra"),
}

RANK_CASES = {
    "not-an-object": (lambda data: [1, 2], "(top level)"),
    "bad-base64": (_set(("rng", "torch_cpu", "__tensor__"), "!!not base64!!"), "rng.torch_cpu.__tensor__"),
    "unknown-dtype": (_set(("rng", "torch_cpu", "dtype"), "float99"), "rng.torch_cpu.dtype"),
    "wrong-shape": (_set(("rng", "torch_cpu", "shape"), [7]), "rng.torch_cpu.shape"),
    "python-state-short": (lambda data: _set(("rng", "python", 1), data["rng"]["python"][1][:10])(data),
                           "rng.python[1]"),
    "python-state-huge-value": (_set(("rng", "python", 1, 0), 2**40), "rng.python[1][0]"),
    "numpy-unknown-generator": (_set(("rng", "numpy", 0), "PCG64"), "rng.numpy[0]"),
    "rng-not-an-object": (_set(("rng",), "x"), "rng"),
    "callback-tensor-bytes": (_set(("callbacks", "stateful"), {"__tensor__": "AAAA", "dtype": "float32",
                                                               "shape": [5]}), "callbacks.stateful"),
    "unknown-key": (_set(("extra",), 1), "extra"),
}


def _edit_and_reseal(root: Path, name: str, edit: Callable[[Any], Any]) -> Path:
    directory = root / ITERATION
    path = directory / name
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    checkpoint_integrity.seal(directory, 4)
    return path


@pytest.mark.parametrize("case", COMMON_CASES)
def test_a_bad_common_json_entry_is_refused_naming_file_and_key(root, monkeypatch, case):
    edit, key = COMMON_CASES[case]
    path = _edit_and_reseal(root, "common.json", edit)
    expect_refused(root, monkeypatch, str(path), key)


@pytest.mark.parametrize("case", RANK_CASES)
def test_a_bad_rank_file_entry_is_refused_naming_file_and_key(root, monkeypatch, case):
    edit, key = RANK_CASES[case]
    path = _edit_and_reseal(root, "rank_00000.json", edit)
    expect_refused(root, monkeypatch, str(path), key)


def test_a_resealed_but_unchanged_checkpoint_loads(root, capsys):
    # The cases above fail for their edit alone: the same round trip without one resumes.
    _edit_and_reseal(root, "common.json", lambda data: data)
    _edit_and_reseal(root, "rank_00000.json", lambda data: data)
    train(root, train__train_iters=5)
    assert "loaded model, optimizer and training state" in capsys.readouterr().out
