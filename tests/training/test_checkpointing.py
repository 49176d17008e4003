"""Checkpoints: when they are saved, what they hold, exact resume, and refusing bad checkpoints.

Everything here runs `pretrain` in-process on a tiny CPU model. The issue under test is
"Checkpoints: save, exact resume, graceful exit, and nothing lost on a hard kill"; the hard kill and
signal tests live in `test_hard_kill.py`.
"""

from __future__ import annotations

import builtins
import hashlib
import io
import json
import math
import pickle
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
import yaml
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from helpers import make_tiny_config
from megatron.bridge.checkpoint import integrity as checkpoint_integrity
from megatron.bridge.checkpoint import io as checkpoint_io
from megatron.bridge.data.mock import MockGPTDataset
from megatron.bridge.training.callbacks import Callback, CallbackManager
from megatron.bridge.training.config import ConfigContainer
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain

EVENTS = (
    "on_data_init_start", "on_train_start", "on_train_step_start", "on_train_step_end", "on_train_end",
    "on_eval_start", "on_eval_step_start", "on_eval_step_end", "on_eval_end", "on_test_start",
    "on_test_step_start", "on_test_step_end", "on_test_end", "on_checkpoint_save",
)


# ------------------------------------------------------------------------------------------- helpers




def tiny_config(**overrides: Any) -> ConfigContainer:
    """The shared tiny test config (`tests/helpers.py`); `overrides` like `train__train_iters=8`."""
    return make_tiny_config(**overrides)


def _recording(name: str):
    def method(self, context):
        self.record(name, context)

    method.__name__ = name
    return method


class Recorder(Callback):
    """Records every event with the step it saw, plus losses, checkpoint contexts and parameters."""

    def __init__(self, save: str | Path | None = None) -> None:
        self.save = Path(save) if save else None
        self.events: list[tuple[str, int]] = []
        self.losses: dict[int, float] = {}
        self.eval_losses: list[tuple[int, float]] = []
        self.saves: list[dict[str, Any]] = []
        self.start: dict[str, Any] = {}
        self.final_params: list[torch.Tensor] | None = None

    def record(self, name: str, ctx) -> None:
        step = ctx.state.train_state.step
        self.events.append((name, step))
        if name == "on_train_step_end":
            self.losses[step + 1] = ctx.loss_dict["lm loss"].item()
        elif name == "on_eval_end":
            self.eval_losses.append((step, ctx.total_loss_dict["lm loss"].item()))
        elif name == "on_train_start":
            self.start = {
                "step": step,
                "consumed": ctx.state.train_state.consumed_train_samples,
                "params": [p.detach().clone() for p in ctx.model[0].parameters()],
                "optimizer_state": len(ctx.optimizer.state),
                "scheduler_steps": ctx.scheduler.num_steps,
            }
        elif name == "on_train_end":
            self.final_params = [p.detach().clone() for p in ctx.model[0].parameters()]
        elif name == "on_checkpoint_save":
            info: dict[str, Any] = {
                "step": step, "optimizer": ctx.optimizer, "scheduler": ctx.scheduler, "loss_dict": ctx.loss_dict,
                "user_state": ctx.user_state,
                "params": [p.detach().clone() for p in ctx.model[0].parameters()],
            }
            if self.save is not None:
                info["iterations"] = checkpoint_io.list_iterations(self.save)
                tracker = self.save / checkpoint_io.TRACKER_FILE
                info["tracker"] = int(tracker.read_text()) if tracker.exists() else None
                info["temporary"] = sorted(p.name for p in self.save.iterdir() if p.name.startswith(".tmp_iter_"))
            self.saves.append(info)

    def names(self) -> list[str]:
        return [name for name, _ in self.events]

    def count(self, name: str) -> int:
        return self.names().count(name)

    def index(self, name: str, step: int) -> int:
        return self.events.index((name, step))


for _name in EVENTS:
    setattr(Recorder, _name, _recording(_name))


def run(cfg: ConfigContainer, **kwargs: Any) -> Recorder:
    recorder = Recorder(cfg.checkpoint.save, **kwargs)
    pretrain(cfg, forward_step, [recorder])
    return recorder


def snapshot(root: Path) -> list[tuple]:
    """Every file and directory under `root` with its size, mtime and content hash.

    The mtime of `root` itself is left out: a run saving there creates and removes its lock file.
    """
    root = Path(root)
    entries = [("", True, 0, 0, "")]
    for path in sorted(root.rglob("*")):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""
        entries.append((str(path.relative_to(root)), path.is_dir(), stat.st_size, stat.st_mtime_ns, digest))
    return entries


def read_checkpoint_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint, read through the safe reader."""
    index = checkpoint_io.read_index(directory)
    tensors = {
        key: torch.empty(tuple(md.size), dtype=md.properties.dtype)
        for key, md in index.state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }
    checkpoint_io.load_tensors(tensors, directory)
    return tensors


def model_params_from_checkpoint(directory: Path, cfg: ConfigContainer) -> list[torch.Tensor]:
    """The checkpoint's model tensors in `parameters()` order of a model built from `cfg`."""
    tensors = read_checkpoint_tensors(directory)
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = cfg.tokenizer.vocab_size  # as pretrain does
    model = cfg.model.provide()
    return [tensors[f"model.{name}"] for name, _ in model.named_parameters()]


def assert_same_tensors(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert torch.equal(a, e)


def rank_file(directory: Path) -> Path:
    """The JSON file of rank 0's own state (RNG states, ...)."""
    files = sorted(directory.glob("*rank_00000.json"))
    assert len(files) == 1, files
    return files[0]


def rng_states(rank_state: dict[str, Any]) -> dict[str, Any]:
    """The RNG part of a rank file (the whole file, or its "rng" entry)."""
    return rank_state["rng"] if "rng" in rank_state else rank_state


MARKER_CODE = "open({path!r}, 'w').write('pwned')"


class Evil:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (builtins.exec, (MARKER_CODE.format(path=self.marker),))


# --------------------------------------------------------------------------------- when saves happen


@pytest.mark.parametrize("async_save", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize(("train_iters", "save_interval", "expected"), [
    (8, 7, [7, 8]),
    (6, 3, [3, 6]),
    (5, None, [5]),
    (4, 2, [2, 4]),
])
def test_on_checkpoint_save_fires_once_per_saved_step_before_on_train_end(
        tmp_path, train_iters, save_interval, expected, async_save):
    save = tmp_path / "ckpt"
    cfg = tiny_config(train__train_iters=train_iters, checkpoint__save=str(save),
                      checkpoint__save_interval=save_interval, checkpoint__async_save=async_save)
    recorder = Recorder(save)
    manager = CallbackManager()
    manager.add(recorder)
    pretrain(cfg, forward_step, manager)

    assert checkpoint_io.list_iterations(save) == expected
    assert (save / checkpoint_io.TRACKER_FILE).read_text().strip() == str(expected[-1])
    assert recorder.count("on_checkpoint_save") == len(expected)
    end = recorder.index("on_train_end", train_iters)
    saves = [i for i, (name, _) in enumerate(recorder.events) if name == "on_checkpoint_save"]
    assert all(i < end for i in saves)
    seen = [info["step"] for info in recorder.saves]
    if async_save:
        # The event may come later than the save, but in order and never before the step was saved.
        assert seen == sorted(seen)
        assert all(s >= e for s, e in zip(seen, expected, strict=True))
    else:
        assert seen == expected
    for info, step in zip(recorder.saves, expected, strict=True):
        # Fired after the checkpoint is completely written: in place, tracked, no temporary left.
        assert step in info["iterations"]
        assert info["tracker"] >= step
        assert f".tmp_iter_{step:07d}" not in info["temporary"]
        assert info["optimizer"] is not None
        assert isinstance(info["optimizer"], torch.optim.Optimizer)
        assert info["scheduler"] is None
        assert info["loss_dict"] is None
        assert info["user_state"] is manager.user_state
    if not async_save:
        for info in recorder.saves:
            assert info["tracker"] == info["step"]
            assert info["temporary"] == []


def test_in_training_validation_comes_before_the_checkpoint_of_the_same_step(tmp_path):
    save = tmp_path / "ckpt"
    cfg = tiny_config(train__train_iters=6, validation__eval_interval=5, validation__eval_iters=1,
                      checkpoint__save=str(save), checkpoint__save_interval=5)
    recorder = run(cfg)
    assert [s for name, s in recorder.events if name == "on_checkpoint_save"] == [5, 6]
    assert recorder.index("on_eval_end", 5) < recorder.index("on_checkpoint_save", 5)
    assert recorder.index("on_checkpoint_save", 5) < recorder.index("on_train_step_start", 5)
    assert recorder.index("on_checkpoint_save", 6) < recorder.index("on_train_end", 6)
    assert recorder.index("on_train_end", 6) < recorder.index("on_eval_end", 6)


def test_no_save_without_checkpoint_save(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recorder = run(tiny_config(checkpoint__save_interval=2))
    assert recorder.count("on_checkpoint_save") == 0
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------------------------- layout


def test_checkpoint_layout(tmp_path):
    save = tmp_path / "ckpt"
    cfg = tiny_config(train__train_iters=4, checkpoint__save=str(save), checkpoint__save_interval=2)
    recorder = run(cfg)
    names = sorted(p.name for p in save.iterdir())
    assert names == ["iter_0000002", "iter_0000004", "latest_checkpointed_iteration.txt"]
    assert (save / "latest_checkpointed_iteration.txt").read_text().strip() == "4"
    for step in (2, 4):
        directory = save / f"iter_{step:07d}"
        files = {p.name for p in directory.iterdir()}
        assert {".metadata", "common.json", "run_config.yaml"} <= files
        assert any(name.endswith(".distcp") for name in files)

        run_config = yaml.safe_load((directory / "run_config.yaml").read_text())
        assert run_config["model"]["num_layers"] == 1
        assert run_config["model"]["hidden_size"] == 64
        assert run_config["train"]["train_iters"] == 4
        assert run_config["checkpoint"]["save"] == str(save)

        common = json.loads((directory / "common.json").read_text())
        assert common["train_state"]["step"] == step
        assert common["train_state"]["consumed_train_samples"] == 4 * step
        assert "scheduler" in common
        rng = rng_states(json.loads(rank_file(directory).read_text()))
        assert {"python", "numpy", "torch_cpu"} <= set(rng)

        tensors = read_checkpoint_tensors(directory)
        assert any(key.startswith("model.") for key in tensors)
        assert any(key.startswith("optimizer.") and key.endswith("exp_avg") for key in tensors)
    # The last checkpoint holds exactly the weights training ended with.
    assert_same_tensors(model_params_from_checkpoint(save / "iter_0000004", cfg), recorder.final_params)


def test_save_optim_false_leaves_the_optimizer_out_and_resume_starts_it_fresh(tmp_path):
    save = tmp_path / "ckpt"
    run(tiny_config(train__train_iters=4, checkpoint__save=str(save), checkpoint__save_optim=False))
    tensors = read_checkpoint_tensors(save / "iter_0000004")
    assert tensors and all(key.startswith("model.") for key in tensors)

    resumed = run(tiny_config(train__train_iters=6, checkpoint__save=str(save), checkpoint__save_optim=False))
    assert resumed.start["step"] == 4
    assert resumed.start["optimizer_state"] == 0
    assert resumed.count("on_train_step_start") == 2


def test_load_optim_false_restores_weights_and_step_but_not_the_optimizer(tmp_path):
    save = tmp_path / "ckpt"
    cfg = tiny_config(train__train_iters=4, checkpoint__save=str(save))
    first = run(cfg)
    resumed = run(tiny_config(train__train_iters=6, checkpoint__save=str(save), checkpoint__load_optim=False))
    assert resumed.start["step"] == 4
    assert resumed.start["consumed"] == 16
    assert resumed.start["optimizer_state"] == 0
    assert_same_tensors(resumed.start["params"], first.final_params)


def test_unknown_ckpt_format_is_a_config_error(tmp_path):
    cfg = tiny_config(checkpoint__save=str(tmp_path / "ckpt"), checkpoint__ckpt_format="zarr")
    with pytest.raises(ValueError, match="ckpt_format"):
        run(cfg)
    assert not (tmp_path / "ckpt").exists()


# --------------------------------------------------------------------------------------- exact resume


def resume_config(dropout: float = 0.0, **overrides: Any) -> ConfigContainer:
    # Warm-up + cosine make the scheduler state matter, validation the valid stream's position and
    # dropout the RNG state.
    base = dict(train__train_iters=8, model__hidden_dropout=dropout, model__attention_dropout=dropout,
                scheduler__lr_warmup_iters=2, scheduler__lr_decay_style="cosine",
                validation__eval_interval=2, validation__eval_iters=1)
    base.update(overrides)
    return tiny_config(**base)


_UNINTERRUPTED: dict[float, Recorder] = {}


def uninterrupted(dropout: float = 0.0) -> Recorder:
    """Eight steps without a stop (and without saving), once per dropout value."""
    if dropout not in _UNINTERRUPTED:
        _UNINTERRUPTED[dropout] = run(resume_config(dropout))
    return _UNINTERRUPTED[dropout]


@pytest.mark.parametrize(("stop_at", "dropout", "async_save"), [
    (3, 0.0, False),
    (3, 0.0, True),
    (4, 0.0, False),
    (3, 0.1, False),
    (4, 0.1, True),
], ids=["step3-sync", "step3-async", "step4-sync", "step3-dropout-sync", "step4-dropout-async"])
def test_exact_resume_matches_an_uninterrupted_run_bit_for_bit(tmp_path, stop_at, dropout, async_save):
    reference = uninterrupted(dropout)
    save = tmp_path / "ckpt"
    common = dict(checkpoint__save=str(save), checkpoint__save_interval=2, checkpoint__async_save=async_save)
    first = run(resume_config(dropout, train__exit_interval=stop_at, **common))
    assert max(first.losses) == stop_at
    assert first.count("on_train_end") == 0
    assert checkpoint_io.list_iterations(save)[-1] == stop_at

    second = run(resume_config(dropout, **common))  # checkpoint.load is None: resumes from checkpoint.save
    assert second.start["step"] == stop_at
    assert second.start["consumed"] == 4 * stop_at
    assert min(second.losses) == stop_at + 1

    assert first.losses == {k: v for k, v in reference.losses.items() if k <= stop_at}
    assert second.losses == {k: v for k, v in reference.losses.items() if k > stop_at}
    assert first.eval_losses + second.eval_losses == reference.eval_losses
    assert_same_tensors(second.final_params, reference.final_params)
    # The checkpoint the resumed run saved last holds the same weights.
    assert_same_tensors(model_params_from_checkpoint(save / "iter_0000008", resume_config()),
                        reference.final_params)


def test_resume_from_load_and_save_elsewhere(tmp_path):
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    run(resume_config(train__exit_interval=3, checkpoint__save=str(first_dir)))
    before = snapshot(first_dir)
    second = run(resume_config(checkpoint__load=str(first_dir), checkpoint__save=str(second_dir),
                               checkpoint__save_interval=4))
    assert second.start["step"] == 3
    assert second.losses == {k: v for k, v in uninterrupted().losses.items() if k > 3}
    assert checkpoint_io.list_iterations(second_dir) == [4, 8]
    assert snapshot(first_dir) == before


def test_resume_when_train_iters_is_already_reached_trains_nothing(tmp_path, capsys):
    save = tmp_path / "ckpt"
    cfg = tiny_config(train__train_iters=4, checkpoint__save=str(save))
    first = run(cfg)
    before = snapshot(save)
    capsys.readouterr()
    again = run(tiny_config(train__train_iters=4, checkpoint__save=str(save)))
    out = capsys.readouterr().out
    assert "nothing to train" in out
    assert again.start["step"] == 4
    assert again.count("on_train_step_start") == 0
    assert again.count("on_checkpoint_save") == 0
    assert_same_tensors(again.start["params"], first.final_params)
    assert snapshot(save) == before


def recording_step(tokens: list[torch.Tensor]):
    """The default forward step, recording the tokens of every training micro-batch it reads."""

    def step(state, data_iterator, model):
        def tap():
            for batch in data_iterator:
                if model.training:
                    tokens.append(batch["tokens"].clone())
                yield batch

        return forward_step(state, tap(), model)

    return step


@pytest.mark.parametrize("new_gbs", [4, 12], ids=["8-to-4", "8-to-12"])
def test_resume_with_another_global_batch_size_goes_on_at_the_consumed_sample(tmp_path, new_gbs):
    # Megatron's sampler continues from consumed samples whatever the batch size; so does ours.
    save = tmp_path / "ckpt"
    first_tokens: list[torch.Tensor] = []
    pretrain(tiny_config(train__train_iters=4, train__global_batch_size=8, checkpoint__save=str(save)),
             recording_step(first_tokens), [Recorder(save)])
    resumed_tokens: list[torch.Tensor] = []
    resumed = Recorder(save)
    cfg = tiny_config(train__train_iters=7, train__global_batch_size=new_gbs, checkpoint__save=str(save))
    pretrain(cfg, recording_step(resumed_tokens), [resumed])

    assert resumed.start["step"] == 4 and resumed.start["consumed"] == 32
    assert sorted(resumed.losses) == [5, 6, 7] and all(math.isfinite(v) for v in resumed.losses.values())
    dataset = MockGPTDataset(num_samples=32 + 3 * new_gbs, seq_length=32, vocab_size=128,
                             seed=cfg.dataset.random_seed, split="train")
    expected = [dataset[i]["tokens"] for i in range(32 + 3 * new_gbs)]
    # Micro-batches of 2: the first run read samples 0..31, the resumed one the next 3 x new_gbs.
    assert torch.equal(torch.cat(first_tokens), torch.stack(expected[:32]))
    assert torch.equal(torch.cat(resumed_tokens), torch.stack(expected[32:]))
    train_state = json.loads((save / "iter_0000007" / "common.json").read_text())["train_state"]
    assert train_state["step"] == 7 and train_state["consumed_train_samples"] == 32 + 3 * new_gbs


# ----------------------------------------------------------------------------------- keeping, cleaning


def test_most_recent_k_keeps_only_the_newest_checkpoints(tmp_path):
    save = tmp_path / "ckpt"
    recorder = run(tiny_config(train__train_iters=8, checkpoint__save=str(save), checkpoint__save_interval=2,
                               checkpoint__most_recent_k=2))
    assert checkpoint_io.list_iterations(save) == [6, 8]
    assert (save / checkpoint_io.TRACKER_FILE).read_text().strip() == "8"
    assert [info["iterations"] for info in recorder.saves] == [[2], [2, 4], [4, 6], [6, 8]]
    assert not [p for p in save.iterdir() if p.name.startswith(".")]


def test_a_partial_temporary_directory_is_ignored_on_load_and_removed_by_the_next_save(tmp_path):
    save = tmp_path / "ckpt"
    first = run(tiny_config(train__train_iters=4, checkpoint__save=str(save), checkpoint__save_interval=2))
    for step in (6, 99):
        junk = save / f".tmp_iter_{step:07d}"
        junk.mkdir()
        (junk / "junk.txt").write_text("half-written")
        (junk / ".metadata").write_bytes(b"\x80\x04garbage")
        (junk / "common.json").write_text("{")

    class Check(Callback):
        def on_train_start(self, context):
            # Still there: loading looked past it rather than cleaning it up.
            assert (save / ".tmp_iter_0000006" / "junk.txt").exists()

    recorder = Recorder(save)
    pretrain(tiny_config(train__train_iters=6, checkpoint__save=str(save), checkpoint__save_interval=2),
             forward_step, [recorder, Check()])
    assert recorder.start["step"] == 4
    assert_same_tensors(recorder.start["params"], first.final_params)
    assert recorder.saves[0]["temporary"] == []
    assert checkpoint_io.list_iterations(save) == [2, 4, 6]
    assert not [p.name for p in save.iterdir() if p.name.startswith(".")]
    assert "junk.txt" not in {p.name for p in (save / "iter_0000006").iterdir()}


# ----------------------------------------------------------------------------------------- finetuning


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run of 4 steps saved under `<dir>/ckpt`; yields (directory, recorder)."""
    save = tmp_path_factory.mktemp("trained") / "ckpt"
    recorder = run(tiny_config(train__train_iters=4, checkpoint__save=str(save)))
    return save, recorder


def _assert_fresh_start_from(recorder: Recorder, saved: Recorder) -> None:
    assert recorder.start["step"] == 0
    assert recorder.start["consumed"] == 0
    assert recorder.start["optimizer_state"] == 0  # AdamW's exp_avg etc. were not loaded
    assert recorder.start["scheduler_steps"] == 0
    assert_same_tensors(recorder.start["params"], saved.final_params)
    assert recorder.count("on_train_step_start") == 3


def test_finetune_loads_weights_only_and_starts_at_step_0(tmp_path, trained):
    source, saved = trained
    before = snapshot(source)
    recorder = run(tiny_config(train__train_iters=3, checkpoint__load=str(source), checkpoint__finetune=True))
    _assert_fresh_start_from(recorder, saved)
    assert snapshot(source) == before


@pytest.mark.parametrize("point_at", ["root", "iteration"])
def test_pretrained_checkpoint_loads_weights_only_and_starts_at_step_0(tmp_path, trained, point_at):
    source, saved = trained
    path = source if point_at == "root" else source / "iter_0000004"
    save = tmp_path / "finetuned"
    recorder = run(tiny_config(train__train_iters=3, checkpoint__pretrained_checkpoint=str(path),
                               checkpoint__save=str(save)))
    _assert_fresh_start_from(recorder, saved)
    assert checkpoint_io.list_iterations(save) == [3]
    assert json.loads((save / "iter_0000003" / "common.json").read_text())["train_state"]["step"] == 3


def test_pretrained_checkpoint_without_a_checkpoint_raises_naming_the_path(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=str(empty)):
        run(tiny_config(checkpoint__pretrained_checkpoint=str(empty)))
    assert list(empty.iterdir()) == []


@pytest.mark.parametrize("where", ["empty-dir", "missing-dir", "missing-save-dir"])
def test_load_dir_without_a_checkpoint_starts_fresh_and_says_so(tmp_path, capsys, where):
    load = tmp_path / "nothing"
    if where == "empty-dir":
        load.mkdir()
    # The same folder as checkpoint.save: a first run, which creates it; elsewhere a missing folder is a typo.
    save = str(load) if where == "missing-save-dir" else None
    recorder = run(tiny_config(train__train_iters=2, checkpoint__load=str(load), checkpoint__save=save))
    out = capsys.readouterr().out
    if where == "missing-dir":
        assert (f"> WARNING: checkpoint.load={str(load)!r} does not exist (a typo?): nothing is resumed and training "
                "starts from random weights") in out
        assert "no checkpoint found" not in out
    else:
        assert f"no checkpoint found in checkpoint.load={str(load)!r}; starting from scratch" in out
        assert "WARNING" not in out
    assert recorder.start["step"] == 0
    assert recorder.count("on_train_step_start") == 2


# ---------------------------------------------------------------------------- corrupt or incompatible


@pytest.fixture
def checkpoint_copy(tmp_path, trained):
    """A private copy of the 4-step checkpoint (mtimes kept): (root, iteration directory)."""
    source, _ = trained
    root = tmp_path / "ckpt"
    shutil.copytree(source, root)
    return root, root / "iter_0000004"


def expect_load_error(root: Path, *fragments: str, **overrides: Any) -> str:
    """Resuming from `root` must raise a ValueError whose message holds `fragments`, and write nothing."""
    before = snapshot(root)
    cfg = tiny_config(train__train_iters=6, checkpoint__save=str(root), checkpoint__save_interval=1, **overrides)
    with pytest.raises(BaseException) as caught:
        run(cfg)
    error = caught.value
    assert isinstance(error, ValueError), f"expected a ValueError, got {type(error).__name__}: {error}"
    message = str(error)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    assert snapshot(root) == before
    return message


def test_wrong_shapes_name_the_checkpoint_and_the_tensor_with_both_shapes(checkpoint_copy):
    root, directory = checkpoint_copy
    message = expect_load_error(root, str(directory), "model.embedding.weight", "(128, 64)", "(128, 32)",
                                model__hidden_size=32)
    assert "model.final_norm.weight" in message


def test_untied_model_from_a_tied_checkpoint_names_the_missing_tensors(checkpoint_copy):
    root, directory = checkpoint_copy
    expect_load_error(root, str(directory), "missing", "output_layer.weight",
                      model__share_embeddings_and_output_weights=False)


def test_tied_model_from_an_untied_checkpoint_names_the_unexpected_tensors(tmp_path):
    root = tmp_path / "untied"
    run(tiny_config(train__train_iters=2, checkpoint__save=str(root),
                    model__share_embeddings_and_output_weights=False))
    expect_load_error(root, str(root / "iter_0000002"), "unexpected", "model.output_layer.weight",
                      model__share_embeddings_and_output_weights=True)


def test_unknown_format_version_names_common_json(checkpoint_copy):
    root, directory = checkpoint_copy
    common = json.loads((directory / "common.json").read_text())
    common["format_version"] = 999
    (directory / "common.json").write_text(json.dumps(common))
    expect_load_error(root, str(directory / "common.json"))


@pytest.mark.parametrize("damage", ["not-json", "missing"])
def test_unreadable_common_json_names_the_file(checkpoint_copy, damage):
    root, directory = checkpoint_copy
    if damage == "missing":
        (directory / "common.json").unlink()
    else:
        (directory / "common.json").write_text('{"format_version": 1, "train_state": {')
    expect_load_error(root, str(directory / "common.json"))


@pytest.mark.parametrize("tamper", ["step-not-a-number", "unknown-key", "no-train-state"])
def test_invalid_train_state_in_common_json_names_the_file(checkpoint_copy, tamper):
    root, directory = checkpoint_copy
    common = json.loads((directory / "common.json").read_text())
    if tamper == "step-not-a-number":
        common["train_state"]["step"] = "seven"
    elif tamper == "unknown-key":
        common["train_state"]["bogus"] = 1
    else:
        del common["train_state"]
    (directory / "common.json").write_text(json.dumps(common))
    expect_load_error(root, str(directory / "common.json"))


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupt_metadata_names_the_file(checkpoint_copy, damage):
    root, directory = checkpoint_copy
    metadata = directory / ".metadata"
    data = metadata.read_bytes()
    metadata.write_bytes({"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"not a pickle"}[damage])
    expect_load_error(root, str(metadata))


def test_corrupt_tensor_data_names_the_file(checkpoint_copy):
    root, directory = checkpoint_copy
    data_file = next(directory.glob("*.distcp"))
    data_file.write_bytes(data_file.read_bytes()[:1000])
    expect_load_error(root, str(directory), data_file.name)


@pytest.mark.parametrize("tamper", ["python-state", "torch-state", "not-json"])
def test_invalid_rng_state_names_the_file(checkpoint_copy, tamper):
    root, directory = checkpoint_copy
    path = rank_file(directory)
    rank_state = json.loads(path.read_text())
    if tamper == "python-state":
        rng_states(rank_state)["python"] = [3, "not a state", None]
        path.write_text(json.dumps(rank_state))
    elif tamper == "torch-state":
        rng_states(rank_state)["torch_cpu"] = "AAAA"
        path.write_text(json.dumps(rank_state))
    else:
        path.write_text("[1, 2")
    expect_load_error(root, str(path))


# ------------------------------------------------------------------------------------------ tampering


def expect_refused(root: Path, marker: Path) -> None:
    """Resuming from a tampered checkpoint raises, runs none of its code and writes nothing."""
    before = snapshot(root)
    with pytest.raises(BaseException) as caught:  # noqa: B017 - whatever it is, it must not run the payload
        run(tiny_config(train__train_iters=6, checkpoint__save=str(root)))
    assert not isinstance(caught.value, (KeyboardInterrupt, SystemExit))
    assert not marker.exists(), "loading the checkpoint ran code from it"
    assert snapshot(root) == before


@pytest.mark.parametrize("how", ["bare-payload", "inside-real-index"])
def test_a_metadata_pickle_payload_is_never_executed(tmp_path, checkpoint_copy, how):
    root, directory = checkpoint_copy
    marker = tmp_path / "PWNED"
    if how == "bare-payload":
        payload = pickle.dumps(Evil(marker))
    else:
        index = checkpoint_io.read_index(directory)
        index.planner_data = {"x": Evil(marker)}
        payload = pickle.dumps(index)
    (directory / ".metadata").write_bytes(payload)
    expect_refused(root, marker)
    with pytest.raises(ValueError, match=str(directory / ".metadata")):
        checkpoint_io.read_index(directory)
    assert not marker.exists()
    # The payload is live: a plain pickle.load would have run it.
    pickle.loads((directory / ".metadata").read_bytes())
    assert marker.exists()


def test_a_tensor_data_pickle_payload_is_never_executed(tmp_path, checkpoint_copy):
    root, directory = checkpoint_copy
    marker = tmp_path / "PWNED"
    buffer = io.BytesIO()
    torch.save(Evil(marker), buffer)
    payload = buffer.getvalue()
    # Put a torch.save blob of the payload where each tensor's bytes were, and make the index agree.
    index = checkpoint_io.read_index(directory)
    data_file = next(directory.glob("*.distcp"))
    data = bytearray()
    for key, info in index.storage_data.items():
        index.storage_data[key] = type(info)(relative_path=info.relative_path, offset=len(data),
                                             length=len(payload))
        data += payload
    data_file.write_bytes(bytes(data))
    (directory / ".metadata").write_bytes(pickle.dumps(index))
    expect_refused(root, marker)
    # The payload is live: torch.load without weights_only would have run it.
    torch.load(io.BytesIO(payload), weights_only=False)
    assert marker.exists()


def test_whole_tensor_file_replaced_by_a_pickle_is_never_executed(tmp_path, checkpoint_copy):
    root, directory = checkpoint_copy
    marker = tmp_path / "PWNED"
    data_file = next(directory.glob("*.distcp"))
    data_file.write_bytes(pickle.dumps(Evil(marker)) * 64)
    expect_refused(root, marker)


def test_a_non_tensor_entry_in_place_of_a_weight_is_never_unpickled(tmp_path, checkpoint_copy):
    root, directory = checkpoint_copy
    marker = tmp_path / "PWNED"
    tensors: dict[str, Any] = read_checkpoint_tensors(directory)
    tensors["model.embedding.weight"] = Evil(marker)
    for path in list(directory.glob("*.distcp")) + [directory / ".metadata"]:
        path.unlink()
    dcp.save(tensors, storage_writer=dcp.FileSystemWriter(directory), no_dist=True)
    assert not marker.exists()
    expect_refused(root, marker)
    # The payload is live: torch's stock reader and planner would have run it.
    dcp.load({"model.embedding.weight": None}, storage_reader=dcp.FileSystemReader(directory), no_dist=True)
    assert marker.exists()


def test_an_unsafe_yaml_tag_in_run_config_is_not_executed(tmp_path, checkpoint_copy):
    root, directory = checkpoint_copy
    marker = tmp_path / "PWNED"
    code = MARKER_CODE.format(path=str(marker))
    (directory / "run_config.yaml").write_text(f"evil: !!python/object/apply:builtins.exec [{json.dumps(code)}]\n")
    checkpoint_integrity.seal(directory, 4)  # as if written so: past the checksums, the YAML itself is the test
    recorder = run(tiny_config(train__train_iters=5, checkpoint__save=str(root)))
    assert recorder.start["step"] == 4
    assert not marker.exists()
