"""What every benchmark script shares: the machine line and the dated section appended to RESULTS.md."""

from __future__ import annotations

import datetime
import fcntl
import os
import platform
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


def machine() -> str:
    """Cores this process may use, CPU model, RAM, GPU (if torch sees one), Python."""
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    names = (line.split(":", 1)[1].strip() for line in cpuinfo if "model name" in line)
    cpu = next(names, platform.processor() or platform.machine())
    cores = len(os.sched_getaffinity(0))  # not `nproc`: it reports OMP_NUM_THREADS when that is set
    meminfo = Path("/proc/meminfo").read_text().splitlines()
    mem_gib = int(next(line.split()[1] for line in meminfo if line.startswith("MemTotal"))) // 2**20
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    except ImportError:
        gpu = "no GPU"
    return f"{cores} cores available, {cpu}, {mem_gib} GiB RAM, {gpu}, Python {platform.python_version()}"


def process_memory(pid: int | str = "self") -> tuple[float, float, float]:
    """(anonymous memory, file pages mapped, PSS) of a process in MiB, from /proc/<pid>/smaps_rollup: what the
    process owns, what it maps of the page cache (shared with every process mapping the same file, reclaimable),
    and its proportional share (pages shared with n processes counted 1/n)."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value, *_ = line.split()
        fields[name.rstrip(":")] = int(value) / 1024
    return fields["Anonymous"], fields["Rss"] - fields["Anonymous"], fields["Pss"]


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def append_section(title: str, lines: list[str], path: Path = RESULTS) -> None:
    """Append `## <UTC time> <title>` and `lines` to RESULTS.md (created if missing), and print them."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    text = "\n".join([f"\n## {stamp} {title}\n", *lines]) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # another benchmark may append at the same time
        try:
            fh.seek(0, os.SEEK_END)
            if fh.tell() == 0:
                fh.write("# Benchmark results\n")
            fh.write(text)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    print(text)
