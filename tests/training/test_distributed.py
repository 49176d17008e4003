"""Data-parallel training under torchrun on CPU (gloo): DDP, FSDP2, resharded resumes, failing ranks.

Every test launches real processes: `python -m torch.distributed.run --nproc-per-node 2` for the
2-rank runs and a plain `python worker.py` for the 1-rank reference. The worker (written to a
temporary directory from `WORKER` below) runs `pretrain` on a tiny config and records, through
callbacks on every rank, what each rank saw; it writes `<out>/rank{r}.json`.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

LOSS_RTOL = 1e-5
NORM_RTOL = 1e-4
TRAIN_ITERS = 10
LAUNCH_TIMEOUT_S = 90

WORKER = r'''
"""Test worker: tiny pretrain run recording every rank's callbacks to <out>/rank{r}.json."""
import argparse
import json
import os
from pathlib import Path

import torch
import torch.distributed as dist

torch.set_num_threads(1)

from megatron.bridge.recipes.qwen import qwen25_tiny_pretrain_config
from megatron.bridge.training.callbacks import Callback
from megatron.bridge.training.gpt_step import forward_step
from megatron.bridge.training.pretrain import pretrain

parser = argparse.ArgumentParser()
parser.add_argument("--mode", choices=("ddp", "fsdp", "ddp-no-overlap"), default="ddp")
parser.add_argument("--out", required=True)
parser.add_argument("--save", default=None)
parser.add_argument("--exit-interval", type=int, default=None)
parser.add_argument("--train-iters", type=int, default=10)
parser.add_argument("--raise-at", type=int, default=None, help="raise in on_train_step_end on rank 1 at this step")
parser.add_argument("--bf16", action="store_true", help="bf16_mixed precision instead of the recipe's fp32")
parser.add_argument("--lora", action="store_true", help="train LoRA adapters on the frozen (random) base")
args = parser.parse_args()

cfg = qwen25_tiny_pretrain_config()
cfg.model.num_layers = 2
cfg.model.hidden_size = 64
cfg.model.ffn_hidden_size = 128
cfg.model.num_attention_heads = 4
cfg.model.num_query_groups = 2
cfg.model.seq_length = cfg.dataset.seq_length = 32
cfg.model.vocab_size = None
cfg.tokenizer.vocab_size = 256
cfg.train.global_batch_size = 8
cfg.train.micro_batch_size = 2
cfg.train.train_iters = args.train_iters
cfg.train.exit_interval = args.exit_interval
cfg.validation.eval_interval = 5
cfg.validation.eval_iters = 1
cfg.scheduler.lr_warmup_iters = 2
cfg.logger.log_interval = 5
cfg.logger.tensorboard_dir = None
cfg.checkpoint.save = cfg.checkpoint.load = args.save
cfg.checkpoint.save_interval = 5 if args.save else None
cfg.ddp.use_distributed_optimizer = args.mode == "fsdp"
cfg.ddp.overlap_grad_reduce = args.mode != "ddp-no-overlap"
if args.lora:
    from megatron.bridge.peft.lora import LoRA

    cfg.peft = LoRA(dim=4, alpha=8)
    cfg.optimizer.lr = 1e-2
if args.bf16:
    cfg.mixed_precision = "bf16_mixed"
    cfg.optimizer.bf16 = True

# Count gradient reductions, to check that accumulation reduces only on the last micro-batch.
REDUCTIONS = [0]
if args.mode == "fsdp":
    _reduce_scatter = dist.reduce_scatter_single

    def _counting_reduce_scatter(*a, **k):
        REDUCTIONS[0] += 1
        return _reduce_scatter(*a, **k)

    dist.reduce_scatter_single = _counting_reduce_scatter
if args.mode == "ddp-no-overlap":
    from megatron.bridge.training import parallelize

    _average = parallelize._average

    def _counting_average(*a, **k):
        REDUCTIONS[0] += 1
        return _average(*a, **k)

    parallelize._average = _counting_average


def _counting_allreduce_hook(state, bucket):
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    REDUCTIONS[0] += 1
    return allreduce_hook(state, bucket)


MARKS = []


def counting_forward_step(state, data_iterator, model):
    MARKS.append(REDUCTIONS[0])
    return forward_step(state, data_iterator, model)


class Recorder(Callback):
    def __init__(self):
        self.rec = {"ranks": set(), "world_sizes": set(), "train": [], "eval": [], "test": [], "saves": [],
                    "reductions": [], "train_start_step": None, "train_end": False}

    def _who(self):
        self.rec["ranks"].add(dist.get_rank())
        self.rec["world_sizes"].add(dist.get_world_size())

    def on_train_start(self, context):
        self._who()
        self.rec["train_start_step"] = context.state.train_state.step
        model = context.model[0]
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model.register_comm_hook(state=None, hook=_counting_allreduce_hook)

    def on_train_step_start(self, context):
        MARKS.clear()

    def on_train_step_end(self, context):
        self._who()
        step = context.state.train_state.step
        loss = context.loss_dict["lm loss"]
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0, loss
        self.rec["train"].append([step, float(loss.item()), context.grad_norm, bool(context.skipped_iter)])
        marks = MARKS + [REDUCTIONS[0]]
        self.rec["reductions"].append([step, len(MARKS), marks[-2] - marks[0], marks[-1] - marks[-2]])
        if args.raise_at is not None and dist.get_rank() == 1 and step == args.raise_at:
            raise RuntimeError(f"injected failure on rank 1 at step {step}")

    def on_eval_end(self, context):
        self._who()
        self.rec["eval"].append([context.state.train_state.step, float(context.total_loss_dict["lm loss"].item())])

    def on_test_end(self, context):
        self._who()
        self.rec["test"].append([context.state.train_state.step, float(context.total_loss_dict["lm loss"].item())])

    def on_checkpoint_save(self, context):
        self._who()
        self.rec["saves"].append(context.state.train_state.step)

    def on_train_end(self, context):
        self._who()
        self.rec["train_end"] = True


recorder = Recorder()
pretrain(cfg, counting_forward_step, callbacks=[recorder])
rec = recorder.rec
rec["ranks"], rec["world_sizes"] = sorted(rec["ranks"]), sorted(rec["world_sizes"])
rec["group_left"] = dist.is_initialized()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
rank = rec["ranks"][0] if rec["ranks"] else int(os.environ.get("RANK", "0"))
(out / f"rank{rank}.json").write_text(json.dumps(rec))
'''


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)
    return env


def _command(script: Path, nproc: int, *args: str) -> list[str]:
    if nproc == 1:
        return [sys.executable, str(script), *args]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-addr", "127.0.0.1", "--master-port", str(_free_port()), str(script), *args]


@dataclass
class Launch:
    returncode: int | None
    output: str
    """stdout then stderr."""
    timed_out: bool
    seconds: float


def _start(script: Path, nproc: int, *args: str) -> subprocess.Popen:
    return subprocess.Popen(_command(script, nproc, *args), env=_env(), cwd=script.parent, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen, started: float, timeout: float) -> Launch:
    """Wait for `proc`; past `timeout`, stop it (torchrun passes SIGTERM on to its workers) and say so."""
    try:
        out, err = proc.communicate(timeout=max(timeout - (time.monotonic() - started), 0.1))
        return Launch(proc.returncode, out + err, False, time.monotonic() - started)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        return Launch(None, out + err, True, time.monotonic() - started)


def _launch(script: Path, nproc: int, *args: str, timeout: float = LAUNCH_TIMEOUT_S) -> Launch:
    return _finish(_start(script, nproc, *args), time.monotonic(), timeout)


def _worker_args(out: Path, mode: str = "ddp", save: Path | None = None, exit_interval: int | None = None,
                 *extra: str) -> list[str]:
    args = ["--mode", mode, "--out", str(out), *extra]
    if save is not None:
        args += ["--save", str(save)]
    if exit_interval is not None:
        args += ["--exit-interval", str(exit_interval)]
    return args


def _collect(launch: Launch, out: Path, nproc: int) -> list[dict]:
    """Each rank's record, ordered by rank, after checking that the job ended well."""
    written = sorted(p.name for p in out.glob("rank*.json")) if out.is_dir() else []
    assert not launch.timed_out, (
        f"the job did not end within {launch.seconds:.0f} s; pretrain returned on {written or 'no rank'} "
        f"(a rank hung?):\n{launch.output[-6000:]}"
    )
    assert launch.returncode == 0, f"worker failed ({launch.returncode}):\n{launch.output[-8000:]}"
    assert written == [f"rank{r}.json" for r in range(nproc)], written
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(nproc)]


def run_worker(script: Path, out: Path, nproc: int, mode: str = "ddp", save: Path | None = None,
               exit_interval: int | None = None, *extra: str) -> list[dict]:
    """Run the worker on `nproc` ranks; return each rank's record, ordered by rank."""
    launch = _launch(script, nproc, *_worker_args(out, mode, save, exit_interval, *extra))
    return _collect(launch, out, nproc)


@pytest.fixture(scope="module")
def worker(tmp_path_factory) -> Path:
    script = tmp_path_factory.mktemp("worker") / "worker.py"
    script.write_text(WORKER)
    return script


@pytest.fixture(scope="module")
def reference(worker, tmp_path_factory) -> dict:
    """One uninterrupted 1-rank run (plain `python`, no torchrun), saving every 5 steps."""
    base = tmp_path_factory.mktemp("reference")
    (record,) = run_worker(worker, base / "out", 1, "ddp", base / "ckpt")
    return record


def _losses(record: dict, steps: range) -> list[float]:
    by_step = {step: loss for step, loss, _, _ in record["train"]}
    return [by_step[s] for s in steps]


def _norms(record: dict, steps: range) -> list[float]:
    by_step = {step: norm for step, _, norm, _ in record["train"]}
    return [by_step[s] for s in steps]


def _assert_close(actual: list[float], expected: list[float], rtol: float, what: str) -> None:
    assert len(actual) == len(expected), (what, actual, expected)
    bad = [(i, a, e) for i, (a, e) in enumerate(zip(actual, expected, strict=True))
           if not math.isclose(a, e, rel_tol=rtol, abs_tol=0.0)]
    assert not bad, f"{what} differ beyond rtol={rtol}: (index, actual, expected) {bad}"


def _assert_identical_across_ranks(records: list[dict]) -> None:
    first = records[0]
    for rank, record in enumerate(records):
        assert record["ranks"] == [rank], "every callback on this process saw torch.distributed.get_rank() == rank"
        assert record["world_sizes"] == [len(records)]
        assert not record["group_left"], "pretrain must tear down the process group it created"
        # Exactly equal: the payloads are reduced over all ranks, not per-rank values.
        for key in ("train", "eval", "test", "saves", "train_start_step", "train_end"):
            assert record[key] == first[key], f"{key} differs between rank 0 and rank {rank}"


def test_reference_run_is_a_world_of_one(reference):
    assert reference["ranks"] == [0] and reference["world_sizes"] == [1]
    assert not reference["group_left"]
    assert [s for s, *_ in reference["train"]] == list(range(TRAIN_ITERS))
    assert all(isinstance(norm, float) and norm > 0 for norm in _norms(reference, range(TRAIN_ITERS)))
    assert reference["saves"] == [5, 10]
    assert [s for s, _ in reference["eval"]] == [5, 10, 10] and [s for s, _ in reference["test"]] == [10]
    losses = _losses(reference, range(TRAIN_ITERS))
    assert losses[-1] < losses[0], "the loss should fall"


@pytest.mark.parametrize("mode", ["ddp", "fsdp", "ddp-no-overlap"])
def test_two_ranks_match_one_rank(worker, reference, tmp_path, mode):
    launch = _launch(worker, 2, *_worker_args(tmp_path / "out", mode, tmp_path / "ckpt"))
    records = _collect(launch, tmp_path / "out", 2)
    # No warning noise (once DDP's deprecated `broadcast_buffers`, FSDP2's "returned a view tensor").
    assert re.findall(r"^.*\w+Warning: .*$", launch.output, flags=re.MULTILINE) == []
    _assert_identical_across_ranks(records)
    record = records[0]
    assert [s for s, *_ in record["train"]] == list(range(TRAIN_ITERS))
    assert not any(skipped for *_, skipped in record["train"])
    assert record["train_start_step"] == 0 and record["train_end"]
    assert record["saves"] == [5, 10]
    assert (tmp_path / "ckpt" / "iter_0000010").is_dir()
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == "10"

    # The same global batch at every step: the loss curve and the global grad norm follow the 1-rank run.
    steps = range(TRAIN_ITERS)
    _assert_close(_losses(record, steps), _losses(reference, steps), LOSS_RTOL, f"{mode} train losses")
    _assert_close(_norms(record, steps), _norms(reference, steps), NORM_RTOL, f"{mode} grad norms")
    assert [s for s, _ in record["eval"]] == [s for s, _ in reference["eval"]]
    _assert_close([v for _, v in record["eval"]], [v for _, v in reference["eval"]], LOSS_RTOL, "eval losses")
    _assert_close([v for _, v in record["test"]], [v for _, v in reference["test"]], LOSS_RTOL, "test losses")

    # Gradient accumulation: 8 / (2 x 2) = 2 micro-batches per rank, reduced only after the last one.
    for rank_record in records:
        for step, microbatches, before_last, in_last in rank_record["reductions"]:
            assert microbatches == 2, (step, microbatches)
            assert before_last == 0, f"rank reduced gradients {before_last}x before the last micro-batch (step {step})"
            assert in_last > 0, f"no gradient reduction in the last micro-batch of step {step}"


# (ranks, mode) that save at step 5 and exit, then (ranks, mode) that resume to the end.
RESHARDS = [
    pytest.param((2, "fsdp"), (1, "ddp"), id="fsdp2-to-1"),
    pytest.param((1, "ddp"), (2, "fsdp"), id="1-to-fsdp2"),
    pytest.param((2, "ddp"), (2, "fsdp"), id="ddp2-to-fsdp2"),
]


@pytest.mark.parametrize(("saver", "resumer"), RESHARDS)
def test_checkpoint_reshards_and_resumes_exactly(worker, reference, tmp_path, saver, resumer):
    ckpt = tmp_path / "ckpt"
    (save_ranks, save_mode), (resume_ranks, resume_mode) = saver, resumer

    first = run_worker(worker, tmp_path / "first", save_ranks, save_mode, ckpt, 5)
    _assert_identical_across_ranks(first)
    assert [s for s, *_ in first[0]["train"]] == list(range(5))
    assert first[0]["saves"] == [5] and not first[0]["train_end"], "exit_interval stops after saving step 5"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    _assert_close(_losses(first[0], range(5)), _losses(reference, range(5)), LOSS_RTOL, "losses before the save")

    second = run_worker(worker, tmp_path / "second", resume_ranks, resume_mode, ckpt)
    _assert_identical_across_ranks(second)
    record = second[0]
    assert record["train_start_step"] == 5, "the resumed run must start at the saved step"
    assert [s for s, *_ in record["train"]] == list(range(5, TRAIN_ITERS))
    assert record["train_end"] and record["saves"] == [10]
    steps = range(5, TRAIN_ITERS)
    _assert_close(_losses(record, steps), _losses(reference, steps), LOSS_RTOL, "resumed train losses")
    _assert_close(_norms(record, steps), _norms(reference, steps), NORM_RTOL, "resumed grad norms")
    # The validation stream resumes too: the evaluation at step 10 and after training match.
    assert [s for s, _ in record["eval"]] == [10, 10]
    _assert_close([v for _, v in record["eval"]], [v for _, v in reference["eval"][1:]], LOSS_RTOL, "eval losses")
    _assert_close([v for _, v in record["test"]], [v for _, v in reference["test"]], LOSS_RTOL, "test losses")


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_bf16_mixed_precision_trains_on_cpu_ranks(worker, tmp_path, mode):
    # The shipped recipes (qwen25_500m_pretrain_config and siblings) default to bf16_mixed.
    records = run_worker(worker, tmp_path / "out", 2, mode, None, None, "--bf16", "--train-iters", "4")
    _assert_identical_across_ranks(records)
    record = records[0]
    assert [s for s, *_ in record["train"]] == list(range(4)) and record["train_end"]
    assert all(math.isfinite(loss) and math.isfinite(norm) for _, loss, norm, _ in record["train"])


def test_ddp_pretrain_returns_on_a_busy_machine(worker, tmp_path):
    """pretrain must return (and the job end) on every rank, also when the CPUs are busy.

    Three 2-rank jobs at once load the CPUs. The hazard: if the DDP wrapper outlives
    `destroy_process_group`, freeing it frees the last owner of the ProcessGroupGloo inside the
    C++ Reducer's destructor, which joins gloo's worker threads while holding the GIL; a worker
    that still has to free its last collective's tensors needs the GIL, and the rank hangs for ever.
    """
    jobs = 3
    started = time.monotonic()
    procs = [_start(worker, 2, *_worker_args(tmp_path / f"out{i}", "ddp", None, None, "--train-iters", "2"))
             for i in range(jobs)]
    launches = [_finish(proc, started, 60) for proc in procs]
    for i, launch in enumerate(launches):
        records = _collect(launch, tmp_path / f"out{i}", 2)
        _assert_identical_across_ranks(records)
        assert records[0]["train_end"]


def test_exception_on_one_rank_ends_the_job(worker, tmp_path):
    args = ["--mode", "ddp", "--out", str(tmp_path / "out"), "--train-iters", "1000", "--raise-at", "3"]
    launch = _launch(worker, 2, *args, timeout=60)
    assert not launch.timed_out, f"the job still ran 60 s after rank 1 raised (a hung rank?):\n{launch.output[-6000:]}"
    assert launch.returncode != 0, f"the job must fail:\n{launch.output[-4000:]}"
    assert "injected failure on rank 1 at step 3" in launch.output, launch.output[-4000:]
    assert "RuntimeError" in launch.output
    assert not list((tmp_path / "out").glob("rank*.json")), "no rank may finish the run normally"


@pytest.fixture(scope="module")
def lora_reference(worker, tmp_path_factory) -> dict:
    """One uninterrupted 1-rank LoRA run."""
    base = tmp_path_factory.mktemp("lora_reference")
    (record,) = run_worker(worker, base / "out", 1, "ddp", None, None, "--lora")
    return record


# FSDP2 only: DDP with adapters is covered by tests/peft/test_peft_distributed.py (and costs a launch here).
@pytest.mark.parametrize("mode", ["fsdp"])
def test_lora_on_two_ranks_matches_one_rank(worker, lora_reference, tmp_path, mode):
    records = run_worker(worker, tmp_path / "out", 2, mode, None, None, "--lora")
    _assert_identical_across_ranks(records)
    steps = range(TRAIN_ITERS)
    losses = _losses(lora_reference, steps)
    assert losses[-1] < losses[0], "the adapters should learn"
    _assert_close(_losses(records[0], steps), losses, LOSS_RTOL, f"{mode} LoRA train losses")
    _assert_close(_norms(records[0], steps), _norms(lora_reference, steps), NORM_RTOL, f"{mode} LoRA grad norms")
