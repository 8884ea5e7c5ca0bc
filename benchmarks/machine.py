"""What the benchmark ran on, and how fast that machine reads memory.

A latency figure means little without the machine: the description (CPU model, threads, GPU,
library versions, the emu_fast commit) is printed with every run and stored in its JSON.
The bandwidth is measured in the same run because a shared machine's varies and a decode step
is bound by reading its weights: the step's fraction of it is the figure that travels.
"""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Callable, Optional, Tuple

import torch


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn: Callable, device: str, reps: int) -> Tuple[float, object]:
    """(median seconds over `reps` calls after one warm-up, the last result)."""
    fn()  # warm-up
    sync(device)
    times = []
    result = None
    for _ in range(reps):
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def read_bandwidth(device: str, nbytes: int, reps: int = 20) -> float:
    """The machine's memory bandwidth in bytes/s, best of `reps`. CPU: reading (summing) a
    float32 buffer of nbytes, the working set of one decode step, all threads. GPU: a
    device-to-device copy of a 1 GiB buffer, counting the bytes read plus the bytes written
    (the usual "copy bandwidth"; a buffer the size of Emu's weights would not fit beside them)."""
    if device.startswith("cuda"):
        n = 2**30 // 4
        x = torch.ones(n, dtype=torch.float32, device=device)
        y = torch.empty_like(x)
        best = min(timed(lambda: y.copy_(x), device, 1)[0] for _ in range(reps))
        del x, y
        return 2 * n * 4 / best
    n = max(1, min(nbytes, 2**30) // 4)
    x = torch.ones(n, dtype=torch.float32, device=device)
    best = min(timed(lambda: x.sum(), device, 1)[0] for _ in range(reps))
    return n * 4 / best


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name(device: str) -> Optional[str]:
    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return None


def emu_fast_commit() -> Tuple[str, Optional[bool]]:
    """(short commit of the checkout emu_fast is imported from, whether its tree has changes), or
    ("unknown", None) outside a git checkout of emu_fast (an installed wheel, a tarball)."""
    import emu_fast

    package = Path(emu_fast.__file__).resolve().parent

    def git(*args):
        return subprocess.check_output(["git", "-C", str(package), *args], text=True,
                                       stderr=subprocess.DEVNULL).strip()
    try:
        top = Path(git("rev-parse", "--show-toplevel"))
        if top != package.parent:  # emu_fast installed inside some other repository
            return "unknown", None
        return git("rev-parse", "--short", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.CalledProcessError):
        return "unknown", None


def describe(device: str) -> dict:
    """The machine and software, for the header line and the JSON's "machine"."""
    import transformers

    commit, dirty = emu_fast_commit()
    return {
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "gpu": gpu_name(device),
        "device": device,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "emu_fast_commit": commit,
        "emu_fast_tree_modified": dirty,  # uncommitted changes to tracked files when measured
        # Other work on a shared machine moves CPU figures a lot (threads that spin at barriers
        # wait for a core): how busy the CPUs were as the run started says how much to trust them.
        "cpus_busy_at_start": cpus_busy(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cpu_count": os.cpu_count(),
    }


def one_line(machine: dict) -> str:
    where = machine["gpu"] or f"{machine['cpu']}"
    commit = machine["emu_fast_commit"] + ("+changes" if machine["emu_fast_tree_modified"] else "")
    return (f"{where}, {machine['threads']} CPU threads | torch {machine['torch']}, "
            f"transformers {machine['transformers']} | emu_fast {commit}")


def _system_busy_ticks() -> int:
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    return sum(values) - values[3] - (values[4] if len(values) > 4 else 0)  # all but idle, iowait


def _own_ticks() -> int:
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime, all of this process's threads


class OtherWork:
    """How many CPUs other processes kept busy between start() and stop(): the system's busy
    time (/proc/stat) less this process's own (/proc/self/stat), per second of wall time. None
    where /proc is not there. Unlike the load average it is not an echo of the last minute,
    and it can run while this process measures."""

    def start(self) -> "OtherWork":
        try:
            self.t0, self.sys0, self.own0 = time.perf_counter(), _system_busy_ticks(), _own_ticks()
        except (OSError, ValueError, IndexError):
            self.t0 = None
        return self

    def stop(self) -> Optional[float]:
        if self.t0 is None:
            return None
        try:
            others = (_system_busy_ticks() - self.sys0) - (_own_ticks() - self.own0)
        except (OSError, ValueError, IndexError):
            return None
        return max(0.0, others / os.sysconf("SC_CLK_TCK") / max(1e-9, time.perf_counter() - self.t0))


def cpus_busy(seconds: float = 0.5) -> Optional[float]:
    """CPUs other processes keep busy right now, over `seconds`."""
    work = OtherWork().start()
    time.sleep(seconds)
    return work.stop()


def busy_warning(machine: dict) -> str:
    """A line to print when other work was using the CPUs as the run started, else ''."""
    busy = machine.get("cpus_busy_at_start")
    if busy is not None and busy > 0.25:
        return (f"warning: other processes kept {busy:.1f} of {machine['cpu_count']} CPUs busy as this run started; "
                f"the figures will be noisy")
    return ""
