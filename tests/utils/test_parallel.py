"""The parallel layout: built once per run, asked by everyone, and the only code that asks torch.distributed."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch.distributed as dist

import megatron.bridge
from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain
from megatron.bridge.utils.errors import ConfigError
from megatron.bridge.utils.parallel import current_layout, data_parallel_size

ROOT = Path(megatron.bridge.__file__).parent
RANK_QUERIES = {"get_rank", "get_world_size"}


def asks_for_ranks(path: Path) -> bool:
    return any(isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) in RANK_QUERIES
               for node in ast.walk(ast.parse(path.read_text())))


def test_only_the_layout_asks_torch_distributed_for_ranks_and_sizes():
    askers = sorted(str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py") if asks_for_ranks(p))
    assert askers == ["utils/parallel.py"]


def test_outside_a_run_the_layout_is_a_single_process():
    assert not dist.is_initialized()
    layout = current_layout()
    assert (layout.world_size, layout.rank, layout.data_parallel_size, layout.tensor_parallel_size) == (1, 0, 1, 1)
    assert layout.is_rank_zero and layout.mesh is None


class LayoutProbe(Callback):
    def on_train_start(self, context):
        layout = current_layout()
        self.seen = (layout.world_size, layout.data_parallel_size, layout.data_parallel_rank,
                     layout.tensor_parallel_size, layout.mesh.mesh_dim_names, layout.owns_process_group)


def test_a_run_registers_its_layout_and_forgets_it_at_the_end(tiny_config):
    probe = LayoutProbe()
    pretrain(tiny_config(train__train_iters=1), forward_step, callbacks=[probe])
    assert probe.seen == (1, 1, 0, 1, ("dp", "tp"), True)
    assert current_layout().mesh is None  # the run's layout is gone with its process group


@pytest.mark.parametrize(("world", "tp", "dp"), [(8, 1, 8), (8, 2, 4), (1, 1, 1)])
def test_data_parallel_size_is_the_world_over_the_tensor_parallel_size(world, tp, dp):
    assert data_parallel_size(world, tp) == dp


@pytest.mark.parametrize("tp", [3, 0, -1, 1.5, True])
def test_a_tensor_parallel_size_that_does_not_fit_is_a_config_error(tp):
    with pytest.raises(ConfigError, match="model.tensor_model_parallel_size"):
        data_parallel_size(8, tp)
