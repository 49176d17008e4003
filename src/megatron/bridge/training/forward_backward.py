"""Running the user's forward step over the micro-batches of one global batch.

Shared by training (with backward) and evaluation (without).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist

from megatron.bridge.training.parallelize import set_grad_sync
from megatron.bridge.training.state import GlobalState
from megatron.bridge.utils.parallel import current_layout

__all__ = ["ForwardStep", "LossReport", "adapt_forward_step", "run_microbatches"]

ForwardStep = Callable[[GlobalState, Iterator[Any], torch.nn.Module], tuple[torch.Tensor, Callable]]
_STATE_NAMES = ("state", "global_state")
_ACCEPTED = (
    "(data_iterator, model), (data_iterator, model, return_schedule_plan=False), "
    "(state, data_iterator, model) or (state, data_iterator, model, return_schedule_plan=False)"
)


def adapt_forward_step(func: Callable[..., Any]) -> ForwardStep:
    """Return `func` as a `(state, data_iterator, model)` callable, whichever documented form it has.

    The forms are told apart by the parameters other than `return_schedule_plan`: three mean the
    first is the `GlobalState`; two mean there is none. A first parameter named `state` or
    annotated as `GlobalState` always receives the state.
    """
    if not callable(func):
        raise ValueError(f"forward_step_func must be callable, got {type(func).__name__}")
    try:
        params = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError) as err:
        raise ValueError(f"cannot read the signature of forward_step_func {func!r}: {err}") from err
    positional = [
        p for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "return_schedule_plan"
    ]
    takes_state = bool(positional) and (positional[0].name in _STATE_NAMES or _is_state_annotation(positional[0]))
    if len(positional) == 3 or (takes_state and len(positional) >= 3):
        return func
    if len(positional) == 2 and not takes_state:
        return partial(_drop_state, func)
    names = [p.name for p in params]
    raise ValueError(f"forward_step_func {func!r} has parameters {names}; accepted forms: {_ACCEPTED}")


def _is_state_annotation(param: inspect.Parameter) -> bool:
    annotation = param.annotation
    name = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    return name.split(".")[-1] == "GlobalState"


def _drop_state(func: Callable[..., Any], state: GlobalState, data_iterator: Iterator[Any], model: Any) -> Any:
    return func(data_iterator, model)


@dataclass
class LossReport:
    """Loss sums over micro-batches (and, once reduced, over ranks).

    `sums` maps each reported name to its `[loss_sum, num_tokens]` pair; `num_tokens` is the
    number of tokens the backward losses covered, which normalises the gradients.
    """

    sums: dict[str, torch.Tensor]
    num_tokens: torch.Tensor
    input_tokens: int = 0
    """Tokens this rank's micro-batches fed the model (padding included), read from the batches' shapes."""

    def all_reduce(self) -> None:
        """Sum everything over the data-parallel replicas with one collective (a no-op with one replica)."""
        layout = current_layout()
        if layout.data_parallel_size == 1:
            return
        flat = torch.cat([self.num_tokens.reshape(1), *self.sums.values()])
        dist.all_reduce(flat, group=layout.data_parallel_group)
        self.num_tokens = flat[0]
        self.sums = {name: flat[1 + 2 * i: 3 + 2 * i] for i, name in enumerate(self.sums)}

    def means(self) -> dict[str, torch.Tensor]:
        """Each name's token-weighted mean as a 0-dim float tensor."""
        return {name: pair[0] / pair[1].clamp(min=1) for name, pair in self.sums.items()}


def run_microbatches(
    forward_step: ForwardStep, state: GlobalState, data_iterator: Iterator[Any], model: torch.nn.Module,
    *, num_microbatches: int, autocast: Callable[[], AbstractContextManager], backward: Callable | None,
) -> LossReport:
    """Run `num_microbatches` forward passes (and backward passes when `backward` is given).

    Returns this rank's accumulated report. `backward(loss_sum)`
    back-propagates the un-normalised loss sum; the trainer divides gradients by the global token
    count afterwards, which is exact and needs the count only once every micro-batch has run.
    """
    report: dict[str, torch.Tensor] = {}
    local_tokens: torch.Tensor | None = None
    data_iterator = _TokenCounter(data_iterator)
    for index in range(num_microbatches):
        if backward is not None:
            set_grad_sync(model, index == num_microbatches - 1)
        with autocast():
            output_tensor, loss_func = forward_step(state, data_iterator, model)
            result = loss_func(output_tensor)
        if not (isinstance(result, tuple) and len(result) == 3):
            raise ValueError(
                "loss_func must return (loss_sum, num_tokens, {name: tensor([loss_sum, num_tokens])}), "
                f"got {type(result).__name__}"
            )
        loss_sum, num_tokens, loss_reports = result
        if backward is not None:
            backward(loss_sum)
        count = torch.as_tensor(num_tokens).detach().float()
        local_tokens = count if local_tokens is None else local_tokens + count
        for name, pair in loss_reports.items():
            pair = pair.detach().float().reshape(2)
            report[name] = pair if name not in report else report[name] + pair
    assert local_tokens is not None, "num_microbatches must be positive"
    return LossReport(report, local_tokens, data_iterator.tokens)


class _TokenCounter:
    """The data iterator, counting the tokens of each batch it hands out (a shape: no wait for the device)."""

    def __init__(self, iterator: Iterator[Any]) -> None:
        self.iterator, self.tokens = iterator, 0

    def __iter__(self) -> _TokenCounter:
        return self

    def __next__(self) -> Any:
        batch = next(self.iterator)
        tokens = batch.get("tokens") if isinstance(batch, dict) else None
        if isinstance(tokens, torch.Tensor):
            self.tokens += tokens.numel()
        return batch
