"""TensorBoard as Megatron Bridge writes it: tags, `vs samples` copies, intervals and the logger's switches."""

from __future__ import annotations

import pytest

from helpers import make_tiny_config
from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.metrics import LOOP_TIMERS
from megatron.bridge.training.pretrain import pretrain
from megatron.bridge.training.state import GlobalState

GBS = 4  # the tiny config's global batch


class StepLosses(Callback):
    def __init__(self):
        self.losses = {}

    def on_train_step_end(self, context):
        self.losses[context.state.train_state.step + 1] = float(context.loss_dict["lm loss"])


def _events(directory):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(directory))
    events.Reload()
    return events


@pytest.fixture(scope="module")
def everything_on(tmp_path_factory):
    """6 steps: points every 2, log lines every 3 (and at 1), validation every 3, every switch on."""
    tmp = tmp_path_factory.mktemp("tb")
    losses = StepLosses()
    cfg = make_tiny_config(
        train__train_iters=6, logger__log_interval=3, logger__tensorboard_dir=str(tmp / "tb"),
        logger__tensorboard_log_interval=2, logger__log_throughput_to_tensorboard=True,
        logger__throughput_window_size=2, logger__log_timers_to_tensorboard=True, logger__timing_log_level=1,
        logger__log_validation_ppl_to_tensorboard=True, validation__eval_interval=3,
    )
    pretrain(cfg, forward_step, callbacks=[losses])
    return _events(tmp / "tb"), losses.losses


def _steps(events, tag):
    return [event.step for event in events.Scalars(tag)]


def test_step_scalars_come_every_tensorboard_log_interval_with_vs_samples_copies(everything_on):
    events, losses = everything_on
    for tag in ("learning-rate", "batch-size", "lm loss", "loss-scale", "grad-norm"):
        assert _steps(events, tag) == [2, 4, 6], tag
        assert _steps(events, f"{tag} vs samples") == [2 * GBS, 4 * GBS, 6 * GBS], tag
    # Each point is its own step's value, written after the loop read the device.
    assert [e.value for e in events.Scalars("lm loss")] == pytest.approx([losses[2], losses[4], losses[6]], rel=1e-6)
    assert [e.value for e in events.Scalars("batch-size")] == [GBS] * 3
    assert [e.value for e in events.Scalars("loss-scale")] == [1.0] * 3


def test_throughput_rates_over_the_window_and_tflops_at_the_log_lines(everything_on):
    events, _ = everything_on
    rates = [f"throughput/{kind}_per_sec" for kind in ("batches", "samples", "tokens")]
    for tag in [*rates, *(tag.replace("throughput/", "throughput/device/") for tag in rates),
                "throughput/micro_batch_size", "throughput/global_batch_size"]:
        assert _steps(events, tag) == [2, 4, 6], tag  # a window of 2 steps is full from step 2 on
    samples, tokens = (events.Scalars(f"throughput/{kind}_per_sec") for kind in ("samples", "tokens"))
    assert [t.value for t in tokens] == pytest.approx([32 * s.value for s in samples], rel=1e-5)  # 32-token samples
    for tag in ("throughput/tflops/device", "throughput/tflops", "iteration-time"):
        assert _steps(events, tag) == [1, 3, 6], tag  # the log lines: first, every 3rd, last
    for name in LOOP_TIMERS:
        assert _steps(events, f"{name}-time") == [1, 3, 6], name
        assert all(0 < e.value < 60 for e in events.Scalars(f"{name}-time"))


def test_validation_has_upstream_s_tags_and_the_final_pass_its_own(everything_on):
    events, _ = everything_on
    tags = set(events.Tags()["scalars"])
    for suffix in ("", " vs samples", " ppl", " ppl vs samples"):
        assert _steps(events, f"lm loss validation{suffix}") == ([3, 6] if "samples" not in suffix
                                                                  else [3 * GBS, 6 * GBS])
    assert _steps(events, "lm loss validation final") == [6]
    assert _steps(events, "lm loss validation final ppl") == [6]
    assert _steps(events, "lm loss test") == [6] and "lm loss test ppl" in tags
    assert not tags & {"tokens-per-second-per-device", "throughput-tflops-per-device", "lm loss validation ppl final"}


def test_the_defaults_leave_out_throughput_timers_and_perplexity(chdir):
    pretrain(make_tiny_config(train__train_iters=3, logger__log_interval=3, logger__tensorboard_dir=str(chdir / "tb")),
             forward_step)
    events = _events(chdir / "tb")
    tags = set(events.Tags()["scalars"])
    assert _steps(events, "lm loss") == [1, 2, 3]  # tensorboard_log_interval=1: every step
    assert "loss-scale" in tags  # log_loss_scale_to_tensorboard=True
    assert not [tag for tag in tags if tag.startswith("throughput/") or tag.endswith("-time") or "ppl" in tag
                or tag == "iteration-time"]
    assert "skipped-train-samples" not in tags  # nothing was skipped


def test_the_writer_holds_tensorboard_queue_size_events(tmp_path):
    state = GlobalState(make_tiny_config(logger__tensorboard_dir=str(tmp_path), logger__tensorboard_queue_size=7))
    assert state.tensorboard_logger.max_queue == 7
    state.close_loggers()


def test_skipped_samples_are_written_once_a_step_was_skipped(chdir):
    from helpers import nan_at_step

    pretrain(make_tiny_config(train__train_iters=3, ddp__check_for_nan_in_grad=False,
                              logger__tensorboard_dir=str(chdir / "tb")), nan_at_step(1))
    skipped = _events(chdir / "tb").Scalars("skipped-train-samples")
    assert [(e.step, e.value) for e in skipped] == [(2, GBS), (3, GBS)]  # the NaN step is iteration 2


def test_the_loss_scale_can_be_left_out(chdir):
    pretrain(make_tiny_config(train__train_iters=3, validation__eval_iters=0, logger__tensorboard_log_interval=3,
                              logger__log_loss_scale_to_tensorboard=False, logger__tensorboard_dir=str(chdir / "tb")),
             forward_step)
    events = _events(chdir / "tb")
    assert _steps(events, "lm loss") == [3]
    assert not [tag for tag in events.Tags()["scalars"] if tag.startswith("loss-scale")]
