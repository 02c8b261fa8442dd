"""What the benchmarks record beside pytest-benchmark's wall times (CUDA only)."""
import torch


def record_kernel_time(benchmark, fn, *args):
    """The GPU's busy time for one call (sum of its kernels and copies, from the profiler): at
    these sizes the wall time is mostly the CPU launching work, so both are worth reading."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn(*args)
        torch.cuda.synchronize()
    benchmark.extra_info["kernel_us"] = sum(e.self_device_time_total for e in prof.key_averages())


def record_peak(benchmark, fn):
    """Peak GPU memory of one call above what was allocated before it, in MiB."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    benchmark.extra_info["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def own_benchmarks(path: str, module_file: str) -> list[dict]:
    """The entries of a pytest-benchmark JSON that came from one bench file (run_all.py writes one
    JSON for all of them)."""
    import json
    from pathlib import Path

    stem = Path(module_file).stem
    return [b for b in json.load(open(path))["benchmarks"] if stem in b["fullname"]]
