"""Speed and peak memory of ``polyak average`` on N checkpoints of a GPT-2-small-shaped model (not a test).

Writes N checkpoints of a GPT-2-small-shaped state dict (124M parameters with ``--layers 12``, one
38.6M-parameter embedding; fewer layers make smaller files) in a temporary folder, then, for each input
format, ``--rounds`` times in turn:

* reads every input file once, front to back, into one reused buffer (the floor for any average), and
* runs ``polyak average`` in a fresh interpreter that first imports torch, resets its peak RSS
  (``/proc/self/clear_refs``), and reports ``VmHWM`` minus its ``VmRSS`` at that point: the memory the
  averaging itself added, memory-mapped file pages included.

It prints each round's ratio of the averaging time to the plain read in that round, and the median. Memory
is given as a multiple of one float32 copy of the model (4 bytes per parameter). The files are read once
before timing to warm the page cache. CPU time is given next to wall time: on a shared machine it is the
steadier measure. The averaging time includes checking the inputs (polyak's checksums in files it wrote; the
zip CRCs of ``.pt`` files) and writing the output durably (fsync). ``--writer safetensors`` writes the
safetensors inputs with the safetensors package, as a trainer would (no polyak checksum to check);
``--writer polyak`` with ``polyak.save_state_dict`` (checksummed). Needs ~5 GB of disk per format for 10
float32 inputs of 12 layers; everything is deleted at the end unless ``--keep``.

    PYTHONPATH=src python benchmarks/average_memory.py --inputs 10 --rounds 3 --formats safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from polyak import save_state_dict

CHILD = """
import json, sys, time
import torch
from polyak.cli import main

def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024

open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
baseline = status("VmRSS:")
started, cpu = time.perf_counter(), time.process_time()
code = main(sys.argv[1:])
print(json.dumps({"code": code, "seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu,
                  "baseline": baseline, "peak": status("VmHWM:")}))
"""


def gpt2_small(dtype: torch.dtype, seed: int, layers: int = 12) -> dict[str, torch.Tensor]:
    """GPT-2-small shapes (124.4M parameters with 12 layers), random values."""
    g = torch.Generator().manual_seed(seed)
    width, vocab, context = 768, 50257, 1024
    shapes: dict[str, tuple[int, ...]] = {"wte.weight": (vocab, width), "wpe.weight": (context, width)}
    for i in range(layers):
        for name, shape in {
            "ln_1.weight": (width,),
            "ln_1.bias": (width,),
            "attn.c_attn.weight": (width, 3 * width),
            "attn.c_attn.bias": (3 * width,),
            "attn.c_proj.weight": (width, width),
            "attn.c_proj.bias": (width,),
            "ln_2.weight": (width,),
            "ln_2.bias": (width,),
            "mlp.c_fc.weight": (width, 4 * width),
            "mlp.c_fc.bias": (4 * width,),
            "mlp.c_proj.weight": (4 * width, width),
            "mlp.c_proj.bias": (width,),
        }.items():
            shapes[f"h.{i}.{name}"] = shape
    shapes.update({"ln_f.weight": (width,), "ln_f.bias": (width,)})
    return {name: torch.randn(shape, generator=g).to(dtype) for name, shape in shapes.items()}


def read_once(paths: list[Path]) -> tuple[float, float]:
    """Seconds (wall, CPU) to read every byte of ``paths`` once, in 64 MiB blocks."""
    buffer = bytearray(64 << 20)
    started, cpu = time.perf_counter(), time.process_time()
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    return time.perf_counter() - started, time.process_time() - cpu


def measure(paths: list[Path], output: Path, threads: str) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent / "src"), "OMP_NUM_THREADS": threads}
    argv = ["average", *map(str, paths), "-o", str(output), "-q"]
    done = subprocess.run([sys.executable, "-c", CHILD, *argv], env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(done.stderr)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", type=int, default=10)
    parser.add_argument("--dir", default=None, help="where to write the checkpoints (default: system temp)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="dtype of the inputs")
    parser.add_argument("--formats", nargs="+", default=["safetensors", "pt"], choices=("safetensors", "pt"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the averaging process")
    parser.add_argument("--layers", type=int, default=12, help="transformer blocks (12: GPT-2 small, 124M)")
    parser.add_argument("--rounds", type=int, default=3, help="plain read + average, in turn, this many times")
    parser.add_argument("--outputs", nargs="+", default=["safetensors"], choices=("safetensors", "pt"))
    parser.add_argument(
        "--writer", choices=("polyak", "safetensors"), default="polyak", help="what writes safetensors inputs"
    )
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint files")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    folder = Path(tempfile.mkdtemp(prefix="polyak-bench-", dir=args.dir))
    try:
        params = sum(t.numel() for t in gpt2_small(torch.float32, 0, args.layers).values())
        model_f32 = 4 * params
        print(
            f"model: {params / 1e6:.1f}M parameters; one float32 copy = {model_f32 / 1e6:.0f} MB; "
            f"{args.threads} torch thread(s); load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
        )
        for fmt in args.formats:
            paths = []
            for i in range(args.inputs):
                state = gpt2_small(dtype, i, args.layers)
                path = folder / f"ckpt_{i}.{'safetensors' if fmt == 'safetensors' else 'pt'}"
                if fmt == "safetensors" and args.writer == "safetensors":
                    import safetensors.torch

                    safetensors.torch.save_file(state, path)
                elif fmt == "safetensors":
                    save_state_dict(state, path)
                else:
                    torch.save(state, path)
                paths.append(path)
            size = sum(p.stat().st_size for p in paths)
            read_once(paths)  # warm the page cache
            for out_suffix in args.outputs:
                ratios = []
                for round in range(args.rounds):
                    floor, floor_cpu = read_once(paths)
                    result = measure(paths, folder / f"average.{out_suffix}", str(args.threads))
                    added = result["peak"] - result["baseline"]
                    ratios.append(result["seconds"] / floor)
                    print(
                        f"round {round + 1}: {args.inputs} x {fmt} ({args.dtype}, {size / 1e9:.2f} GB"
                        f"{', ' + args.writer + '-written' if fmt == 'safetensors' else ''}) -> {out_suffix}: "
                        f"peak RSS +{added / 1e6:.0f} MB = {added / model_f32:.2f}x one float32 model; "
                        f"{result['seconds']:.2f} s vs {floor:.2f} s to read the files once "
                        f"({ratios[-1]:.2f}x; {size / result['seconds'] / 1e9:.2f} GB/s); CPU time "
                        f"{result['cpu']:.2f} s vs {floor_cpu:.2f} s ({result['cpu'] / floor_cpu:.2f}x); "
                        f"load average {os.getloadavg()[0]:.1f}",
                        flush=True,
                    )
                    (folder / f"average.{out_suffix}").unlink()
                median = statistics.median(ratios)
                print(
                    f"{fmt} -> {out_suffix}: median ratio to a plain read {median:.2f}x "
                    f"(goal <= 1.5x for safetensors inputs: {'met' if median <= 1.5 else 'NOT met'})",
                    flush=True,
                )
            for path in paths:
                path.unlink()
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
