"""What a run prints: start-up phases, layout, memory estimate and settings; the log line; the end summary."""

from __future__ import annotations

import contextlib
import io
import re

import pytest
import torch

from helpers import make_tiny_config
from megatron.bridge.peft.lora import LoRA
from megatron.bridge.training import run_report
from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.memory import (
    MemoryEstimate,
    activation_bytes,
    device_memory_bytes,
    estimate_memory,
    resident_bytes,
)
from megatron.bridge.training.pretrain import pretrain
from megatron.bridge.utils.parallel import current_layout

LOG_LINE = re.compile(r"iteration +(\d+)/ +(\d+) \|")


class Losses(Callback):
    """The validation and test losses the callbacks see, to compare with the summary."""

    def __init__(self):
        self.validation, self.test = [], []

    def on_eval_end(self, context):
        self.validation.append(float(context.total_loss_dict["lm loss"]))

    def on_test_end(self, context):
        self.test.append(float(context.total_loss_dict["lm loss"]))


def _pretrain(cfg, *callbacks) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        pretrain(cfg, forward_step, callbacks=list(callbacks))
    return out.getvalue()


def _log_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if LOG_LINE.search(line) and "consumed samples" in line]


def _summary(out: str) -> dict[str, str]:
    rows = out.split("> training summary:\n", 1)[1].splitlines()
    return {name.strip(): value for name, value in (re.split(r" \.+ ", row.strip(), maxsplit=1) for row in rows)}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    """Five steps logged every 100 from scratch, with a checkpoint and TensorBoard: (output, losses, folder)."""
    tmp = tmp_path_factory.mktemp("first_run")
    losses = Losses()
    with contextlib.chdir(tmp):
        out = _pretrain(make_tiny_config(train__train_iters=5, logger__log_interval=100,
                                         checkpoint__save=str(tmp / "ckpt"), logger__tensorboard_dir=str(tmp / "tb")),
                        losses)
    return out, losses, tmp


# ------------------------------------------------------------------------------------- start-up


def test_start_up_says_what_it_is_doing_in_order(first_run):
    out, _, tmp = first_run
    lines = out.splitlines()

    def index(prefix):
        return next(i for i, line in enumerate(lines) if line.startswith(prefix))

    order = [index("> settings that differ from their defaults"), index("> building the model ..."),
             index("> building the model: done in "), index("> model: "), index("> training on 1 x cpu"),
             index("> parallel layout: "), index("> memory per rank (estimate): "),
             index("> building the datasets and their sample indices ..."),
             index("> building the datasets and their sample indices: done in "), index(" [")]
    assert order == sorted(order)
    assert re.search(r"> building the model: done in \d+\.\d\d s", out)
    assert ("> parallel layout: world 1 = data-parallel 1 x tensor-parallel 1; rank 0 on cpu, "
            f"CPU threads per rank: {torch.get_num_threads()}") in lines
    assert "global batch 4 = 2 micro-batches of 2 x 1 data-parallel ranks" in out
    assert "loading the checkpoint" not in out  # nothing to resume


def test_start_up_lists_the_settings_that_differ_from_their_defaults(first_run):
    out, _, tmp = first_run
    block = out.split("> settings that differ from their defaults", 1)[1].split("\n> ", 1)[0]
    rows = {row.split()[0]: row for row in block.splitlines()[1:]}
    assert rows["train.train_iters"].endswith(" 5  (default: None)")
    assert "logger.log_interval" not in rows  # 100, the default
    assert rows["checkpoint.save"].endswith(f"{str(tmp / 'ckpt')!r}  (default: None)")
    assert rows["model.hidden_size"].endswith(" 64  (default: 768)")  # the provider class's default
    assert f", {len(rows)}:" in block.splitlines()[0]


def test_the_memory_estimate_is_printed_with_what_the_machine_has(first_run):
    line = next(line for line in first_run[0].splitlines() if line.startswith("> memory per rank"))
    assert re.fullmatch(r"> memory per rank \(estimate\): weights [\d.]+ KiB, gradients [\d.]+ KiB, optimizer "
                        r"state [\d.]+ KiB, activations [\d.]+ KiB \(micro-batch 2 x 32 tokens\); total [\d.]+ \w+ "
                        r"of [\d.]+ \w+ RAM", line), line
    assert "> warning" not in first_run[0]


# ------------------------------------------------------------------------------------- log lines


def test_a_run_shorter_than_log_interval_logs_its_first_and_last_iteration(first_run):
    lines = _log_lines(first_run[0])
    assert [LOG_LINE.search(line).groups() for line in lines] == [("1", "5"), ("5", "5")]
    for line in lines:
        assert re.search(r"\| lm loss: \d\.\d{6}E\+00 \|", line)
        assert re.search(r"\| time elapsed: \d+:\d\d:\d\d \| ETA: \d+:\d\d:\d\d \| memory RSS \(GiB\): \d+\.\d\d \|$",
                         line)
    assert "| ETA: 0:00:00 |" in lines[-1]
    rss = float(lines[-1].split("memory RSS (GiB): ")[1].split(" ")[0])
    assert 0.01 < rss < 64


def test_the_log_interval_still_applies_between_the_first_and_last_iteration(chdir):
    out = _pretrain(make_tiny_config(train__train_iters=5, logger__log_interval=2, validation__eval_iters=0))
    assert [int(LOG_LINE.search(line).group(1)) for line in _log_lines(out)] == [1, 2, 4, 5]


def test_the_pass_after_training_is_labelled_apart_from_the_in_training_one(chdir):
    out = _pretrain(make_tiny_config(train__train_iters=2, validation__eval_interval=2))
    headers = [line.split(" | ")[0] for line in out.splitlines() if "loss at " in line]
    assert headers == [" validation loss at iteration 2", " validation loss at the end of training (iteration 2)",
                       " test loss at the end of training (iteration 2)"]


# --------------------------------------------------------------------------------------- summary


def test_the_summary_reports_times_rates_final_losses_and_where_things_are(first_run):
    out, losses, tmp = first_run
    summary = _summary(out)
    assert list(summary) == ["wall time", "steps", "samples/s", "tokens/s", "train lm loss", "validation lm loss",
                             "test lm loss", "checkpoint", "TensorBoard logs"]
    assert re.fullmatch(r"\d+:\d\d:\d\d \(training loop \d+:\d\d:\d\d\)", summary["wall time"])
    assert summary["steps"] == "5 this run, at iteration 5 of 5"
    samples_per_s, tokens_per_s = float(summary["samples/s"]), float(summary["tokens/s"])
    assert samples_per_s > 0 and tokens_per_s == pytest.approx(32 * samples_per_s, rel=0.01)  # full 32-token samples
    last_log_loss = float(_log_lines(out)[-1].split("lm loss: ")[1].split(" ")[0])
    assert summary["train lm loss"] == f"{last_log_loss:.4f} (the last log line's)"
    assert summary["validation lm loss"] == f"{losses.validation[-1]:.4f}"
    assert summary["test lm loss"] == f"{losses.test[-1]:.4f}"
    assert summary["checkpoint"] == str(tmp / "ckpt" / "iter_0000005")
    assert summary["TensorBoard logs"] == str(tmp / "tb")


def test_a_resume_times_the_load_lists_changed_settings_and_logs_its_own_first_iteration(first_run, chdir):
    _, _, tmp = first_run
    checkpoint = tmp / "ckpt" / "iter_0000005"
    # Read only: load from the first run's folder, save nowhere.
    out = _pretrain(make_tiny_config(train__train_iters=7, logger__log_interval=100,
                                     checkpoint__load=str(tmp / "ckpt")))
    assert f"> loading the checkpoint {checkpoint} ..." in out
    assert re.search(rf"> loading the checkpoint {re.escape(str(checkpoint))}: done in \d+\.\d\d s", out)
    block = out.split(f"> settings that differ from {checkpoint / 'run_config.yaml'}, ", 1)[1].split("\n> ", 1)[0]
    rows = {row.split()[0]: row for row in block.splitlines()[1:]}
    assert block.startswith(f"{len(rows)}:")
    assert rows["train.train_iters"].endswith(" 7  (checkpoint: 5)")
    assert rows["checkpoint.save"].endswith(f" None  (checkpoint: {str(tmp / 'ckpt')!r})")
    assert rows["logger.tensorboard_dir"].endswith(f" None  (checkpoint: {str(tmp / 'tb')!r})")
    assert set(rows) == {"train.train_iters", "checkpoint.save", "checkpoint.load", "logger.tensorboard_dir"}
    assert [LOG_LINE.search(line).groups() for line in _log_lines(out)] == [("6", "7"), ("7", "7")]
    assert _summary(out)["steps"] == "2 this run, at iteration 7 of 7"


def test_an_unchanged_resume_says_so(chdir):
    cfg = dict(train__train_iters=2, validation__eval_iters=0, checkpoint__save=str(chdir / "ckpt"),
               checkpoint__load=str(chdir / "ckpt"))
    _pretrain(make_tiny_config(**cfg))
    out = _pretrain(make_tiny_config(**cfg))
    assert f"> the settings are those of {chdir / 'ckpt' / 'iter_0000002' / 'run_config.yaml'}" in out
    assert _summary(out)["steps"] == "0 this run, at iteration 2 of 2"


# ---------------------------------------------------------------------------------- the estimate


def _model(cfg):
    cfg.model.vocab_size = cfg.tokenizer.vocab_size
    return cfg.model.provide()


def test_weights_gradients_and_optimizer_state_count_the_real_parameter_bytes():
    cfg = make_tiny_config()
    model = _model(cfg)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    single = estimate_memory(model, cfg, data_parallel_size=1)
    assert (single.weights, single.gradients, single.optimizer) == (weights, weights, 2 * weights)  # AdamW
    ddp = estimate_memory(model, cfg, data_parallel_size=2)
    assert (ddp.weights, ddp.gradients, ddp.optimizer) == (weights, 2 * weights, 2 * weights)  # DDP's buckets
    cfg.ddp.use_distributed_optimizer = True
    fsdp = estimate_memory(model, cfg, data_parallel_size=4)
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer) == (-(-weights // 4), -(-weights // 4), -(-2 * weights // 4))
    cfg.ddp.use_distributed_optimizer = None
    cfg.optimizer.optimizer = "sgd"
    assert estimate_memory(model, cfg, data_parallel_size=1).optimizer == weights  # momentum: one tensor


def test_a_lora_run_counts_gradients_and_optimizer_state_of_its_adapters_only():
    cfg = make_tiny_config()
    model = LoRA(dim=4)(_model(cfg))
    adapters = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    everything = sum(p.numel() * p.element_size() for p in model.parameters())
    estimate = estimate_memory(model, cfg, data_parallel_size=1)
    assert 0 < adapters < everything
    assert (estimate.weights, estimate.gradients, estimate.optimizer) == (everything, adapters, 2 * adapters)


def _saved_for_backward(cfg) -> int:
    """Bytes of the tensors autograd keeps during one micro-batch's forward pass (parameters left out)."""
    model = _model(cfg)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.randint(0, cfg.tokenizer.vocab_size, (cfg.train.micro_batch_size, cfg.model.seq_length))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.compute_dtype == "bf16")
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor), autocast:
        model(tokens, labels=tokens)
    return sum(storages.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16_mixed"])
def test_the_activation_estimate_is_near_what_autograd_keeps(precision):
    cfg = make_tiny_config(mixed_precision=precision, model__num_layers=2, model__hidden_size=128,
                           model__ffn_hidden_size=384, model__seq_length=128, dataset__seq_length=128)
    saved = _saved_for_backward(cfg)  # builds the model, which sets model.vocab_size
    ratio = activation_bytes(cfg) / saved
    assert 0.67 < ratio < 1.5, ratio


def test_a_run_that_does_not_fit_is_warned_about_naming_what_to_change(capsys, monkeypatch):
    monkeypatch.setattr(run_report, "device_memory_bytes", lambda device: 2**20)
    estimate = MemoryEstimate(weights=2**20, gradients=2**20, optimizer=2**21, activations=2**22)
    run_report.print_memory_estimate(estimate, make_tiny_config(), current_layout(), ranks_per_machine=2)
    out = capsys.readouterr().out
    assert "total 8.0 MiB of 1.0 MiB RAM shared by 2 ranks" in out
    assert ("> warning: this run needs about 16.0 MiB, more than the 1.0 MiB of RAM it has: lower "
            "train.micro_batch_size or model.seq_length, set model.recompute_granularity='full'") in out


def test_what_the_machine_has_and_what_this_process_holds():
    total = device_memory_bytes(torch.device("cpu"))
    assert total is not None and total > 2**28
    assert 2**24 < resident_bytes() < total


def test_differences_from_defaults_name_the_sections_whose_class_changed():
    cfg = make_tiny_config(train__train_iters=9)
    cfg.peft = LoRA(dim=4)
    found = {name: (value, default) for name, value, default in run_report.differences_from_defaults(cfg)}
    assert found["train.train_iters"] == (9, None)
    assert found["peft"] == ("LoRA", None) and found["peft.dim"] == (4, 32)
    assert "peft.alpha" not in found and "logger.callback_time_warning_share" not in found


def test_a_field_without_a_default_is_listed_as_such(capsys):
    from megatron.bridge.data.sft.config import GPTSFTDatasetConfig

    cfg = make_tiny_config()
    cfg.dataset = GPTSFTDatasetConfig(seq_length=32)
    found = {name: default for name, _, default in run_report.differences_from_defaults(cfg)}
    assert found["dataset.seq_length"] is run_report.NO_DEFAULT
    run_report.print_config_differences(cfg)
    assert re.search(r"\n    dataset\.seq_length \.+ 32  \(no default\)\n", capsys.readouterr().out)
