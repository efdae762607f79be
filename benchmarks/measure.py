"""How the benchmarks measure: time through `torch.utils.benchmark`, with the models taking turns; peak memory."""

from collections.abc import Callable

import torch
from torch.utils.benchmark import Measurement, Timer


def interleaved_times(
    calls: dict[str, Callable[[], object]], rounds: int, min_run_time: float
) -> dict[str, Measurement]:
    """Times each of `calls` with `torch.utils.benchmark.Timer.blocked_autorange(min_run_time)` (one untimed warm-up
    call, then timed calls until `min_run_time` seconds have passed, at least one; CUDA synchronised), `rounds` times,
    the calls taking turns round by round: a change in the machine's load (others' work on a shared machine) falls on
    all of them alike, and each turn starts warm. Returns {name: all of its timed calls, merged}; `.median` is the
    figure to report.
    """
    threads = torch.get_num_threads()  # Timer's default is 1 thread
    timers = {name: Timer("call()", globals={"call": call}, num_threads=threads) for name, call in calls.items()}
    turns = {name: [] for name in calls}
    for _ in range(rounds):
        for name, timer in timers.items():
            turns[name].append(timer.blocked_autorange(min_run_time=min_run_time))
    return {name: Measurement.merge(measurements)[0] for name, measurements in turns.items()}


def _proc_status_gb(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: resident now, VmHWM: peak resident), in GB."""
    with open("/proc/self/status") as status:
        return int(next(line for line in status if line.startswith(field + ":")).split()[1]) * 1024 / 1e9


class PeakMemory:
    """Peak memory of what runs inside `with`, in GB above what was in use when it started (`baseline_gb`).

    On CUDA, torch.cuda's peak statistics (max_memory_allocated). On CPU no library gives a peak that can be reset,
    so: the process's peak resident set size (VmHWM), reset on entry through /proc/self/clear_refs (Linux).
    """

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline_gb = torch.cuda.memory_allocated() / 1e9
        else:
            with open("/proc/self/clear_refs", "w") as clear_refs:
                clear_refs.write("5")  # peak resident set size := resident set size now
            self.baseline_gb = _proc_status_gb("VmRSS")
        return self

    def __exit__(self, *exc_info):
        if self.device == "cuda":
            torch.cuda.synchronize()
            self.peak_gb = torch.cuda.max_memory_allocated() / 1e9 - self.baseline_gb
        else:
            self.peak_gb = _proc_status_gb("VmHWM") - self.baseline_gb


def available_gb(device: str) -> float:
    """Memory free for a new measurement: the GPU's free memory, or the machine's MemAvailable."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0] / 1e9
    with open("/proc/meminfo") as meminfo:
        return int(next(line for line in meminfo if line.startswith("MemAvailable:")).split()[1]) * 1024 / 1e9
