"""Checkpoint conversion cost: time and peak memory of `import_ckpt` and `export_ckpt` at Qwen2.5-0.5B size.

Writes a random bf16 checkpoint with Qwen2.5-0.5B's shapes (24 layers, hidden 896, 14 heads over 2
key/value groups, FFN 4864, vocab 151936, tied embeddings: 494M parameters, 0.99 GB) with
`safetensors` directly (no `transformers`), then runs each direction in a fresh subprocess:

  import   Hugging Face folder -> training checkpoint (`AutoBridge.import_ckpt`)
  export   training checkpoint -> Hugging Face folder (`AutoBridge.export_ckpt`)

Each child reports its wall time and its peak resident set size (`resource.getrusage(RUSAGE_SELF).ru_maxrss`
at exit, cross-checked with /proc's VmHWM), plus its RSS after the imports and before converting (the
interpreter, torch and friends), so the table shows both the absolute peak and what the conversion
itself added, against the size of one copy of the weights. A last child checks that the exported
tensors equal the source bit for bit.

    .venv/bin/python bench/bridge_convert.py               # in a temporary folder, deleted afterwards
    .venv/bin/python bench/bridge_convert.py --dir /data/bench --keep
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QWEN25_500M = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 896,
    "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14, "num_key_value_heads": 2,
    "vocab_size": 151936, "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_sliding_window": False,
    "initializer_range": 0.02, "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151643,
}


def qwen25_500m_shapes() -> dict[str, tuple[int, ...]]:
    c = QWEN25_500M
    hidden, ffn, head_dim = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], hidden), "model.norm.weight": (hidden,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
            p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.q_proj.bias": (hidden,),
            p + "self_attn.k_proj.weight": (kv, hidden), p + "self_attn.k_proj.bias": (kv,),
            p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.v_proj.bias": (kv,),
            p + "self_attn.o_proj.weight": (hidden, hidden),
            p + "mlp.gate_proj.weight": (ffn, hidden), p + "mlp.up_proj.weight": (ffn, hidden),
            p + "mlp.down_proj.weight": (hidden, ffn),
        })
    return shapes


def make_source(folder: Path) -> int:
    """Write config.json and model.safetensors; return the bytes of one copy of the weights."""
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(QWEN25_500M, indent=2))
    generator = torch.Generator().manual_seed(0)
    tensors = {name: (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)
               for name, shape in qwen25_500m_shapes().items()}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _status_mb(field: str) -> float:
    """A memory line of /proc/self/status (VmRSS: now, VmHWM: peak of this process image), in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(direction: str, source: str, target: str) -> None:
    """Run one conversion and print {seconds, peak_mb, baseline_mb} as JSON."""
    import torch

    from megatron.bridge import AutoBridge
    from megatron.bridge.models.conversion import megatron_checkpoint  # noqa: F401  (load everything first)

    torch.set_num_threads(2)
    baseline = _status_mb("VmRSS")
    started = time.perf_counter()
    if direction == "import":
        AutoBridge.import_ckpt(source, target)
    else:
        AutoBridge.export_ckpt(source, target)
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "peak_mb": peak, "baseline_mb": baseline, "hwm_mb": _status_mb("VmHWM")}))


def verify(source: str, result: str) -> None:
    """Compare every tensor of two single-file folders bit for bit, one tensor at a time."""
    import torch

    from megatron.bridge.models.conversion.safetensors_io import SafetensorsReader

    a, b = SafetensorsReader(Path(source) / "model.safetensors"), SafetensorsReader(Path(result) / "model.safetensors")
    assert a.specs == b.specs, "tensor names, shapes or dtypes differ"
    for name in a.specs:
        assert torch.equal(a.read(name).view(torch.uint8), b.read(name).view(torch.uint8)), name
    print(json.dumps({"identical_tensors": len(a.specs)}))


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "2"})
    if out.returncode != 0:
        raise SystemExit(f"child {args[0]} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the files written")
    parser.add_argument("--child", nargs=3, metavar=("DIRECTION", "SOURCE", "TARGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        direction, source, target = args.child
        if direction == "make":
            print(json.dumps({"bytes": make_source(Path(target))}))
        elif direction == "verify":
            verify(source, target)
        else:
            child(direction, source, target)
        return

    work = Path(args.dir or tempfile.mkdtemp(prefix="bridge_convert_"))
    try:
        hf, ckpt, out = work / "hf", work / "ckpt", work / "hf_out"
        started = time.perf_counter()
        # Every step runs in its own child: this parent stays small, because a child's ru_maxrss starts
        # from the resident size of the process it was forked from.
        copy_mb = run_child("make", "-", str(hf))["bytes"] / 2**20
        print(f"source: Qwen2.5-0.5B-shaped, bf16, {copy_mb:.0f} MiB of weights "
              f"(written in {time.perf_counter() - started:.1f} s)")
        print(f"{'direction':<10}{'seconds':>9}{'peak RSS':>12}{'x copy':>8}{'baseline':>10}"
              f"{'peak-baseline':>15}{'x copy':>8}{'VmHWM':>10}")
        for direction, source, target in (("import", hf, ckpt), ("export", ckpt, out)):
            r = run_child(direction, str(source), str(target))
            added = r["peak_mb"] - r["baseline_mb"]
            print(f"{direction:<10}{r['seconds']:>9.1f}{r['peak_mb']:>8.0f} MiB{r['peak_mb'] / copy_mb:>8.2f}"
                  f"{r['baseline_mb']:>6.0f} MiB{added:>11.0f} MiB{added / copy_mb:>8.2f}{r['hwm_mb']:>6.0f} MiB")
        print(f"round trip: {run_child('verify', str(hf), str(out))['identical_tensors']} tensors bit-identical")
        print(f"cpu cores: {os.cpu_count()}, load average: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
