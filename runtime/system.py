"""What this process may use and has used: CPUs (job-aware) and peak memory. One place for
training workers, ONNX Runtime threads and the benchmarks."""
from __future__ import annotations

import os


def cpu_allowance() -> int:
    """CPUs this process may use: its affinity mask (cgroup/taskset aware), capped by
    SLURM_CPUS_PER_TASK (a Slurm job owns some CPUs of a node, not all of them)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    slurm = os.environ.get("SLURM_CPUS_PER_TASK")
    if slurm and slurm.isdigit():
        n = min(n, int(slurm))
    return max(1, n)


def peak_rss_mib() -> float:
    """This process's peak resident set. VmHWM, not getrusage: Linux carries ru_maxrss over
    fork + exec, so a child started by a big parent would report the parent's peak."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
