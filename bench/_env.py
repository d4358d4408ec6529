"""Where a benchmark ran: versions, device, CPU model, threads and the git commit of the checkout."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    n = torch.get_num_threads()
    return f"{cpu_model()} ({n} thread{'s' if n != 1 else ''})"


def _git(*args) -> str | None:
    try:
        r = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_commit() -> dict:
    commit = _git("rev-parse", "HEAD")
    status = _git("status", "--porcelain", "--untracked-files=no")
    return dict(commit=commit, dirty=bool(status) if status is not None else None)


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: other work on the machine makes CPU times noisy."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:  # not installed, or broken: report as absent
        return None


def environment(device: str, argv: list[str]) -> dict:
    import rest_kernels
    from rest_kernels import _extension
    env = dict(
        date_utc=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        python=platform.python_version(),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        triton=_version("triton"),
        numpy=_version("numpy"),
        rest_kernels=rest_kernels.__version__,
        platform=platform.platform(),
        device=device,
        device_name=device_name(device),
        cpu_model=cpu_model(),
        cpu_count=os.cpu_count(),
        torch_threads=torch.get_num_threads(),
        load_average_start=load_average(),
        triton_interpret=os.environ.get("TRITON_INTERPRET"),
        backends=rest_kernels.available_backends(),
        extension_build=_extension.build_info(),
        argv=list(argv),
        **{f"git_{k}": v for k, v in git_commit().items()},
    )
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        env.update(gpu_memory_bytes=props.total_memory, gpu_capability=f"{props.major}.{props.minor}",
                   cuda_driver=_cuda_driver())
    return env


def _cuda_driver() -> str | None:
    try:
        r = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None
