"""Who am I in the job? One function maps every launcher's environment to torch's.

torch.distributed (and DeepSpeed) read RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR
and MASTER_PORT. `torchrun` and the `deepspeed` launcher set them; `srun` sets
SLURM_* instead; a plain `cxr-train fit` sets nothing. `resolve_world()` reads
whichever is there *without* starting a process group (so config errors can be
reported first), and `init_process_group()` exports the variables and starts it:
gloo on CPU, nccl on GPU.

CXR_DEVICE=cpu forces CPU (gloo, no CUDA) even where a GPU is visible. A run asks
`use_cuda()` once (plan.plan_run) and hands the answer on: the backend, the device, the
attention kernels, pinned memory and the RNG state all follow that one decision.
"""
from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cxr_ddpm.runtime.errors import CxrError

if TYPE_CHECKING:                        # imported lazily at run time (the launcher needs no torch)
    import torch


@dataclass(frozen=True)
class World:
    rank: int
    local_rank: int
    world_size: int
    master_addr: str
    master_port: int
    launcher: str                       # "torchrun" (or deepspeed), "srun", "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _int_env(name: str, env: dict[str, str]) -> int:
    value = env.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise CxrError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_world(env: dict[str, str] | None = None) -> World:
    """Read the launcher's environment (no side effects)."""
    env = dict(os.environ if env is None else env)
    if "RANK" in env and "WORLD_SIZE" in env:                     # torchrun / deepspeed launcher
        rank, world = _int_env("RANK", env), _int_env("WORLD_SIZE", env)
        local = _int_env("LOCAL_RANK", env) if "LOCAL_RANK" in env else rank
        addr = env.get("MASTER_ADDR", "127.0.0.1")
        port = _int_env("MASTER_PORT", env) if "MASTER_PORT" in env else 29500
        launcher = "torchrun"
    elif "SLURM_STEP_NUM_TASKS" in env and "SLURM_PROCID" in env:  # inside an srun step
        # SLURM_STEP_NUM_TASKS (not SLURM_NTASKS): the batch script itself also sees
        # SLURM_NTASKS, and a python started there without srun is one process, not N.
        rank, world = _int_env("SLURM_PROCID", env), _int_env("SLURM_STEP_NUM_TASKS", env)
        local = _int_env("SLURM_LOCALID", env) if "SLURM_LOCALID" in env else 0
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env)
        port = _int_env("MASTER_PORT", env) if "MASTER_PORT" in env else slurm_port(env)
        launcher = "srun"
    else:                                                          # plain process: world size 1
        rank, local, world = 0, 0, 1
        addr = "127.0.0.1"
        port = _int_env("MASTER_PORT", env) if "MASTER_PORT" in env else free_port()
        launcher = "none"
    if world < 1 or not 0 <= rank < world:
        raise CxrError(f"launcher environment is inconsistent: rank {rank} of world size {world}")
    return World(rank, local, world, addr, port, launcher)


def slurm_port(env: dict[str, str]) -> int:
    """A port every task of the job agrees on without talking: derived from the job id.

    Range 20000-39999 stays clear of the ephemeral range (32768+ on Linux is mostly
    used by clients, but jobs on a shared node collide far less often by id than by luck).
    """
    job = env.get("SLURM_JOB_ID", "0")
    return 20000 + (int(job) % 20000 if job.isdigit() else 0)


def _first_slurm_host(env: dict[str, str]) -> str:
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        return "127.0.0.1"
    try:  # scontrol expands 'node[01-04]' the way Slurm does; no regex of our own
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True, timeout=30).stdout.split()
    except (OSError, subprocess.SubprocessError):
        raise CxrError(f"cannot expand SLURM nodelist {nodelist!r} with scontrol; "
                       "set MASTER_ADDR in the job script") from None
    return out[0] if out else "127.0.0.1"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wants_cuda(env: dict[str, str], cuda_available: bool) -> bool:
    """CUDA when torch sees a GPU, unless CXR_DEVICE says cpu (pure: env and torch's answer)."""
    choice = env.get("CXR_DEVICE", "").strip().lower()
    if choice not in ("", "cpu", "cuda"):
        raise CxrError(f"environment variable CXR_DEVICE={choice!r}: use cpu or cuda (or leave it unset)")
    if choice == "cuda" and not cuda_available:
        raise CxrError("CXR_DEVICE=cuda but torch sees no CUDA device")
    return cuda_available and choice != "cpu"


def use_cuda() -> bool:
    import torch
    return wants_cuda(dict(os.environ), torch.cuda.is_available())


def local_world_size(env: dict[str, str], world: World) -> int:
    """Ranks on this node: LOCAL_WORLD_SIZE (torchrun), srun's tasks per node, else LOCAL_RANK + 1."""
    if "LOCAL_WORLD_SIZE" in env:
        return _int_env("LOCAL_WORLD_SIZE", env)
    counts = [part.split("(")[0] for part in env.get("SLURM_STEP_TASKS_PER_NODE", "").split(",")]
    if world.launcher == "srun" and all(c.isdigit() for c in counts):  # e.g. "4(x2),3"
        return max(int(c) for c in counts)                             # the most any node runs
    return world.local_rank + 1


def check_gpus_per_node(ranks_per_node: int, gpus: int) -> None:
    """One GPU per rank: refuse before NCCL, which would fail deep inside with a device error."""
    if ranks_per_node > gpus:
        raise CxrError(f"{ranks_per_node} ranks per node but {gpus} CUDA device(s) visible: start at "
                       f"most {gpus} rank(s) per node (one per GPU), or set CXR_DEVICE=cpu to train on CPU")


def backend(cuda: bool) -> str:
    return "nccl" if cuda else "gloo"


def device_of(world: World, cuda: bool) -> torch.device:
    """This rank's device: its local GPU (one per rank, check_gpus_per_node) or the CPU."""
    import torch
    return torch.device("cuda", world.local_rank) if cuda else torch.device("cpu")


def init_process_group(world: World, cuda: bool) -> str:
    """Export the torch variables and start the process group; returns the backend used."""
    import deepspeed
    import torch

    os.environ.update(RANK=str(world.rank), LOCAL_RANK=str(world.local_rank),
                      WORLD_SIZE=str(world.world_size), MASTER_ADDR=world.master_addr,
                      MASTER_PORT=str(world.master_port))
    name = backend(cuda)
    if name == "nccl":
        torch.cuda.set_device(world.local_rank)
    elif os.environ.get("CXR_DS_SHM_COMM") != "1":
        # On CPU DeepSpeed JIT-compiles a shared-memory all-reduce op (~90 s of g++ per
        # fresh machine, sometimes again when ranks race on the build dir) that only its
        # *inference* all-reduce uses; training collectives go through gloo. Mark the op
        # unavailable so it is never built (CXR_DS_SHM_COMM=1 restores DeepSpeed's default).
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # DeepSpeed would otherwise try MPI discovery (mpi4py) when it thinks nothing launched us.
    deepspeed.init_distributed(dist_backend=name, auto_mpi_discovery=False)
    return name
