"""LoRA and DoRA under torchrun (gloo, CPU): DDP and FSDP2 runs train the adapters a 1-rank run trains."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import lora_worker
import pytest
import torch
from safetensors.torch import load_file

WORKER = Path(lora_worker.__file__)
LAUNCH_TIMEOUT_S = 120


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
               "127.0.0.1", "--master-port", str(_free_port()), str(WORKER), *args]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


def _result(out: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """The run's checks and its tensors: adapters, merged weights and the peft folder's, by file and name."""
    tensors = {f"{file}:{name}": tensor for file in ("adapters", "merged", "hf/adapter_model")
               for name, tensor in load_file(out / f"{file}.safetensors").items()}
    return json.loads((out / "result.json").read_text()), tensors


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory):
    """The 1-rank reference of each PEFT kind, trained in this process (no wrapper)."""
    out = tmp_path_factory.mktemp("single")
    for peft in ("lora", "dora"):
        lora_worker.train("ddp", peft, out / peft)
    return out


@pytest.mark.parametrize("mode, kinds", [("ddp", ["lora"]), ("fsdp", ["lora", "dora"])])
def test_two_ranks_train_the_adapters_one_rank_trains(mode, kinds, single_rank, tmp_path):
    launch = _torchrun("--mode", mode, "--peft", *kinds, "--out", str(tmp_path))
    assert launch.returncode == 0, launch.stdout + launch.stderr
    for peft in kinds:
        result, adapters = _result(tmp_path / peft)
        reference, reference_adapters = _result(single_rank / peft)
        assert result["world_size"] == 2 and reference["world_size"] == 1
        assert result["wrapper"] == ("DistributedDataParallel" if mode == "ddp" else "FSDPGPTModel")
        assert result["base_unchanged"] and reference["base_unchanged"]
        assert result["optimizer_holds_adapters_only"] and result["optimized"] == result["adapters"]
        torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(reference["losses"]), rtol=1e-5,
                                   atol=0)
        assert adapters.keys() == reference_adapters.keys() and len(adapters) > 16 + 2 * 14
        for name, tensor in adapters.items():
            torch.testing.assert_close(tensor, reference_adapters[name], rtol=1e-4, atol=1e-6, msg=name)
