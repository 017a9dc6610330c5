"""Is the NVIDIA driver new enough for the CUDA build of the GPU packages? One line if not.

The `gpu` extra targets CUDA 13 (cuda-python 13, tensorrt-cu13, onnxruntime-gpu 1.31's
CUDA 13 build): those need a driver that supports CUDA 13 (R580+). CUDA's minor version
compatibility makes any 13.x runtime run on any 13.0+ driver, so only the major counts.
A CUDA 12 cluster that pins the CUDA 12 builds (README, GPU) passes the same check.
The driver is asked through libcuda directly (cuDriverGetVersion), so the check needs
neither cuda-python nor a working CUDA runtime.
"""
from __future__ import annotations

import ctypes
import re

from ..errors import CxrError


def driver_cuda_version() -> int | None:
    """The CUDA version the installed driver supports, as 1000*major + 10*minor (13000 = 13.0); None: no driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int(0)
    if libcuda.cuDriverGetVersion(ctypes.byref(version)) != 0:
        return None
    return version.value


def driver_problem(driver: int | None, needed_cuda: str, package: str) -> str | None:
    """None if a driver supporting CUDA `driver` runs `package` built for CUDA `needed_cuda` ("13.0")."""
    m = re.match(r"^(\d+)", str(needed_cuda))
    if not m:
        return None                        # unknown build: nothing to say
    need = int(m.group(1))
    if driver is None:
        return f"{package} (CUDA {need}) needs an NVIDIA driver, and none was found (libcuda.so.1)"
    have_major, have_minor = driver // 1000, (driver % 1000) // 10
    if have_major >= need:
        return None
    return (f"the NVIDIA driver supports CUDA {have_major}.{have_minor} but {package} is built for CUDA {need}: "
            f"update the driver (CUDA 13: R580 or newer) or install the CUDA {have_major} builds "
            f"(README, GPU install)")


def check_driver(needed_cuda: str | None, package: str) -> None:
    """Refuse with one line at start-up when the driver is older than the package's CUDA major."""
    if not needed_cuda:
        return
    problem = driver_problem(driver_cuda_version(), needed_cuda, package)
    if problem:
        raise CxrError(problem)
