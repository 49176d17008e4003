"""LoRA / DoRA training worker for the data-parallel tests: a few real optimizer steps, then the adapters.

    python lora_worker.py --out DIR [--peft lora dora]                         # one process
    torchrun --nproc-per-node 2 lora_worker.py --mode fsdp --out DIR          # two ranks, DDP or FSDP2

The adapters come from the provider's pre-wrap hook, the wrapping from `training.parallelize` and the
optimizer from `training.optim`, as in a real run. Every rank trains on its share of one fixed global
batch; rank 0 writes `adapters.safetensors`, `merged.safetensors` (base + adapters), a peft folder `hf/`
and `result.json` (losses, checks) to DIR/<peft>; the gathers of sharded tensors run on every rank.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from megatron.bridge.models.conversion.peft_adapter import save_hf_adapter
from megatron.bridge.peft import DoRA, LoRA, adapter_state_dict, base_parameters, is_adapter_param, merged_state_dict
from megatron.bridge.peft.base import full_tensor
from megatron.bridge.recipes.qwen import qwen25_tiny_pretrain_config
from megatron.bridge.training.config import DistributedInitConfig
from megatron.bridge.training.distributed import initialize, teardown
from megatron.bridge.training.optim import setup_optimizer
from megatron.bridge.training.parallelize import parallelize

GLOBAL_BATCH, SEQ, STEPS, VOCAB = 4, 16, 3, 128


def tiny_config(mode: str, peft: str):
    cfg = qwen25_tiny_pretrain_config()
    model = cfg.model
    model.num_layers, model.hidden_size, model.ffn_hidden_size = 2, 64, 128
    model.num_attention_heads, model.num_query_groups, model.vocab_size, model.seq_length = 4, 2, VOCAB, SEQ
    cfg.ddp.use_distributed_optimizer = mode == "fsdp"
    cfg.train.compile = False
    cfg.optimizer.lr, cfg.optimizer.weight_decay = 1e-2, 0.0
    cfg.scheduler.lr_warmup_iters, cfg.scheduler.lr_decay_style = 0, "constant"
    adapters = LoRA(dim=4, alpha=8) if peft == "lora" else DoRA(dim=4, alpha=8)
    cfg.model.register_pre_wrap_hook(adapters)
    return cfg, adapters


def train(mode: str, peft: str, out: Path) -> None:
    """One run: `peft` ("lora" or "dora") on the tiny model, wrapped as `mode` says when there are two ranks.

    Uses the process group if one exists, else makes (and destroys) a 1-rank one.
    """
    ctx = initialize(DistributedInitConfig())
    cfg, adapters_config = tiny_config(mode, peft)
    torch.manual_seed(1234)
    raw = cfg.model.provide()
    base_before = {name: p.detach().clone() for name, p in base_parameters(raw).items()}
    model = parallelize(raw, cfg, ctx)
    optimizer, _ = setup_optimizer(cfg.optimizer, cfg.scheduler, [model], train_iters=STEPS)
    tokens = torch.randint(0, VOCAB, (GLOBAL_BATCH, SEQ + 1), generator=torch.Generator().manual_seed(0))
    share = tokens.chunk(ctx.world_size)[ctx.rank]
    losses = []
    for _ in range(STEPS):
        loss = model(share[:, :-1], labels=share[:, 1:]).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss, op=dist.ReduceOp.AVG)
        losses.append(global_loss.item())
    adapters, merged = adapter_state_dict(model), merged_state_dict(model)
    out.mkdir(parents=True, exist_ok=True)
    save_hf_adapter(model, out / "hf", peft_config=adapters_config)
    base_unchanged = all(torch.equal(full_tensor(p).cpu(), base_before[name])
                         for name, p in base_parameters(raw).items())
    optimized = [name for name, p in raw.named_parameters() if any(p is q for g in optimizer.param_groups
                                                                   for q in g["params"])]
    if ctx.rank == 0:
        save_file(adapters, out / "adapters.safetensors")
        save_file(merged, out / "merged.safetensors")
        result = {"losses": losses, "base_unchanged": base_unchanged, "world_size": ctx.world_size,
                  "optimizer_holds_adapters_only": bool(optimized) and all(map(is_adapter_param, optimized)),
                  "optimized": len(optimized), "adapters": len(adapters), "wrapper": type(model).__name__}
        (out / "result.json").write_text(json.dumps(result))
    dist.barrier()  # no rank leaves (and tears the group down) while another still needs it
    teardown(ctx)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--mode", choices=("ddp", "fsdp"), default="ddp")
    parser.add_argument("--peft", choices=("lora", "dora"), nargs="+", default=["lora"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    context = initialize(DistributedInitConfig())  # one group for every run: re-creating it races on the port
    for kind in args.peft:
        train(args.mode, kind, args.out / kind)
    teardown(context)
