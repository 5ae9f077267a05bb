"""Run a Python script as `python SCRIPT ARGS...` would, then print its peak CUDA memory on stderr.

    python tests/gpu/peak_mem.py sample.py model=tiny_llama sampler.device=cuda ...

The last stderr line is `GPU_PEAK_MEM_GB=<float>`, or `GPU_PEAK_MEM_GB=none` when the script never used CUDA
(gpu_runs.peak_memory reads it). The script's own exit status is kept.
"""
import atexit
import os
import runpy
import sys


def _report() -> None:
    torch = sys.modules.get("torch")
    peak = None
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = max(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())) / 2**30
    print(f"GPU_PEAK_MEM_GB={'none' if peak is None else f'{peak:.6f}'}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: peak_mem.py SCRIPT [ARGS...]")
    atexit.register(_report)
    script = os.path.abspath(sys.argv[1])
    sys.argv = [script, *sys.argv[2:]]
    sys.path[0] = os.path.dirname(script)  # as `python SCRIPT` sets it
    runpy.run_path(script, run_name="__main__")
