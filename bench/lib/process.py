"""Processes: starting them in their own session, pinning them to CPUs, reading their CPU time,
memory and files from /proc, waiting for them to be ready and stopping them (also on Ctrl-C)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import resource
import shlex
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final, Protocol, TypeVar

LOOPBACK: Final = "127.0.0.1"
TICKS_PER_SECOND: Final = os.sysconf("SC_CLK_TCK")
READY_TIMEOUT: Final = 15.0
STOP_TIMEOUT: Final = 5.0
BUSY_CORES: Final = 0.1  # other work on the machine above this disturbs a run

# -- CPUs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The "pin" layout of the anchor measurements (bench/README.md, "Anchors"): servers on one
    CPU, load on another."""

    servers: frozenset[int] | None  # None: unpinned
    load: frozenset[int] | None
    note: str

    def pin_harness(self) -> None:
        """Keep this process (a harness that measures or observes) off the servers' CPU."""
        if self.load is not None:
            os.sched_setaffinity(0, self.load)


def choose_layout() -> Layout:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return Layout(None, None, f"only {len(cpus)} CPU: unpinned (servers and load share it)")
    servers, load = frozenset({cpus[0]}), frozenset({cpus[1]})
    return Layout(
        servers,
        load,
        f"pin: servers (backend, proxy, helpers) on CPU {cpus[0]}, load generator on CPU {cpus[1]}",
    )


def pin_prefix(taskset: str | None, cpus: frozenset[int] | None) -> list[str]:
    """``taskset -c CPUS`` to put before a command (nothing when unpinned or no taskset)."""
    if cpus is None or taskset is None:
        return []
    return [taskset, "-c", ",".join(map(str, sorted(cpus)))]


def _stat(pid: int) -> list[str]:
    """The fields of /proc/PID/stat after the command name (field 3, the state, is [0])."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (nginx's workers, the gateway's), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            children.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, ()))
    return tree


def pin_tree(root: int, cpus: frozenset[int] | None) -> None:
    """Pin every thread of every process under ``root`` (taskset covers only what it starts)."""
    if cpus is None:
        return
    for pid in process_tree(root):
        with contextlib.suppress(FileNotFoundError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(ProcessLookupError, FileNotFoundError):
                    os.sched_setaffinity(int(task.name), cpus)


# -- CPU time, memory, files ---------------------------------------------------------------

T = TypeVar("T")


def _each(root: int, read: Callable[[int], T]) -> list[T]:
    """``read(pid)`` for ``root`` and each of its descendants, leaving out the processes that
    ended meanwhile or whose /proc files cannot be read."""
    values = []
    for pid in process_tree(root):
        with contextlib.suppress(OSError, ValueError, IndexError):
            values.append(read(pid))
    return values


def _cpu_ticks(pid: int) -> int:
    fields = _stat(pid)
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


def cpu_seconds(root: int) -> float:
    """utime + stime of ``root`` and its descendants (a process's stat covers all threads)."""
    return sum(_each(root, _cpu_ticks)) / TICKS_PER_SECOND


def _kernel_side(pid: int) -> tuple[int, int]:
    found = re.search(r"^syscw: (\d+)", Path(f"/proc/{pid}/io").read_text(), re.MULTILINE)
    return int(_stat(pid)[12]), int(found.group(1)) if found else 0


def kernel_side(root: int) -> tuple[float, int]:
    """(system CPU seconds, write syscalls) of ``root`` and its descendants, from /proc."""
    found = _each(root, _kernel_side)
    return sum(ticks for ticks, _ in found) / TICKS_PER_SECOND, sum(w for _, w in found)


def _preempted(pid: int) -> int:
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            status = (task / "status").read_text()
            found = re.search(r"^nonvoluntary_ctxt_switches:\s+(\d+)", status, re.MULTILINE)
            total += int(found.group(1)) if found else 0
    return total


def preemptions(root: int) -> int:
    """Involuntary context switches so far of every thread of ``root`` and its descendants:
    how often the scheduler took the CPU from them while they could still run (on a CPU
    shared with the backend: mostly the backend, woken by a write, running at once)."""
    return sum(_each(root, _preempted))


def children_cpu() -> float:
    """CPU seconds of this process's reaped children (the load generators that finished)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def machine_cpu() -> tuple[float, float, float]:
    """Seconds of (busy, stolen, all) CPU time of the whole machine, from /proc/stat."""
    with Path("/proc/stat").open() as stat:
        user, nice, system, idle, iowait, irq, softirq, steal = map(
            int, stat.readline().split()[1:9]
        )
    busy = user + nice + system  # processes; irq/softirq time is charged to none of them
    total = busy + irq + softirq + idle + iowait + steal
    return busy / TICKS_PER_SECOND, steal / TICKS_PER_SECOND, total / TICKS_PER_SECOND


def idle_cpu(cpus: frozenset[int] | None) -> float:
    """Seconds the CPUs ``cpus`` (None: all) have been idle (idle + iowait), from /proc/stat:
    over a run, what the servers' CPU had to spare, interrupts and other work included."""
    seconds = 0
    with Path("/proc/stat").open() as stat:
        for line in stat:
            name, *fields = line.split()
            if name.startswith("cpu") and name[3:].isdigit():
                if cpus is None or int(name[3:]) in cpus:
                    seconds += int(fields[3]) + int(fields[4])
            elif not name.startswith("cpu"):
                break
    return seconds / TICKS_PER_SECOND


def busy_machine() -> float:
    """Cores used by all processes over one second (before a harness starts anything, the
    other work on the machine)."""
    busy0, _, _ = machine_cpu()
    time.sleep(1.0)
    busy1, _, _ = machine_cpu()
    return busy1 - busy0


def wait_idle(limit: float) -> float:
    """Wait until other work uses at most BUSY_CORES (over 1 s), ``limit`` seconds at most;
    returns the cores still in use."""
    deadline = time.monotonic() + limit
    while (busy := busy_machine()) > BUSY_CORES and time.monotonic() < deadline:
        pass
    return busy


class Disturbable(Protocol):
    @property
    def other_cpu(self) -> float: ...  # cores other work on the machine used during the run


D = TypeVar("D", bound=Disturbable)


def _worst(group: list[D]) -> float:
    return max((run.other_cpu for run in group), default=0.0)


def least_disturbed(
    measure: Callable[[], list[D]], label: str, retries: int, discarded: list[D], idle_wait: float
) -> list[D]:
    """``measure()``, a group of runs measured together (every target at one rep and load),
    and, while other work used more than BUSY_CORES during one of its runs, up to ``retries``
    times again after waiting (``idle_wait`` s at most) for an idle machine: the least disturbed
    attempt. The attempts not kept go to ``discarded``; ``label`` names the group when it is
    measured again (``--rerun-disturbed``)."""
    best: list[D] = []
    for attempt in range(retries + 1):
        if attempt:
            print(
                f"  {label} was disturbed (other CPU {_worst(best):.2f} cores): waiting for an "
                f"idle machine, then attempt {attempt + 1}",
                flush=True,
            )
            wait_idle(idle_wait)
        group = measure()
        if not best or _worst(group) < _worst(best):
            best, group = group, best
        discarded.extend(group)
        if _worst(best) <= BUSY_CORES:
            break
    return best


@dataclass(frozen=True)
class CpuClock:
    """CPU seconds used so far by each party of a run (the proxy, the backend, the load
    generator, this harness ...) and by the whole machine; ``after - before`` is what a run
    used."""

    parties: dict[str, float]
    busy: float  # every process of the machine (user + nice + system)
    steal: float
    total: float

    @classmethod
    def read(cls, parties: Mapping[str, Callable[[], float]]) -> CpuClock:
        busy, steal, total = machine_cpu()
        return cls({name: read() for name, read in parties.items()}, busy, steal, total)

    def __sub__(self, before: CpuClock) -> CpuClock:
        return CpuClock(
            {name: cpu - before.parties[name] for name, cpu in self.parties.items()},
            self.busy - before.busy,
            self.steal - before.steal,
            self.total - before.total,
        )

    def __getitem__(self, party: str) -> float:
        return self.parties[party]

    def other_cores(self, seconds: float, also_ours: float = 0.0) -> float:
        """Cores the rest of the machine (other people's work) used over ``seconds``: busy CPU
        beyond the parties' and ``also_ours`` (CPU seconds counted elsewhere)."""
        return max(0.0, self.busy - sum(self.parties.values()) - also_ours) / seconds

    @property
    def steal_pct(self) -> float:
        return 100.0 * self.steal / max(self.total, 1e-9)


def _proc_number(path: str, prefix: str, word: int) -> int:
    """Word ``word`` of the line of a /proc file that starts with ``prefix`` (0 if none)."""
    for line in Path(path).read_text().splitlines():
        if line.startswith(prefix):
            return int(line.split()[word])
    return 0


def rss_kib(root: int) -> int:
    """VmRSS of ``root`` and its descendants (the gateway's workers) from /proc (KiB)."""
    return sum(_each(root, lambda pid: _proc_number(f"/proc/{pid}/status", "VmRSS:", 1)))


def fd_count(root: int) -> int:
    """Open files of ``root`` and its descendants (the gateway's workers)."""
    return sum(_each(root, lambda pid: len(os.listdir(f"/proc/{pid}/fd"))))


def fd_limit(pid: int) -> int:
    """The soft open-files limit of ``pid`` (from /proc/PID/limits)."""
    return _proc_number(f"/proc/{pid}/limits", "Max open files", 3)


def raise_nofile(needed: int) -> str:
    """Raise this process's open-files limit (the children inherit it); say what it is.
    Raising the hard limit needs CAP_SYS_RESOURCE; without it the soft limit goes up to the hard
    one and the note says why not further."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    refused = ""
    if soft < needed:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, max(hard, needed)))
        except (ValueError, OSError) as exc:
            refused = f": setrlimit({needed}) refused ({exc}; CAP_SYS_RESOURCE missing?)"
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return f"RLIMIT_NOFILE {soft} (hard {hard}) for the harness and its children{refused}"


# -- starting and stopping -----------------------------------------------------------------


def _die_with_parent() -> None:
    """In the child: get SIGTERM if the harness dies, so nothing outlives a kill -9."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


Stream = IO[str] | IO[bytes] | int | None


def spawn(
    command: list[str],
    *,
    env: dict[str, str] | None = None,
    stdin: Stream = None,
    stdout: Stream = None,
    stderr: Stream = None,
) -> subprocess.Popen[bytes]:
    """Start a child in its own session and process group (Ctrl-C reaches only the harness;
    ``stop`` ends the whole group); it gets SIGTERM if the harness dies. stdin is /dev/null and
    stdout /dev/null unless given; stderr goes where stdout goes unless given."""
    return subprocess.Popen(
        command,
        env=env,
        stdin=stdin if stdin is not None else subprocess.DEVNULL,
        stdout=stdout if stdout is not None else subprocess.DEVNULL,
        stderr=stderr if stderr is not None else subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_parent,  # noqa: PLW1509 - single-threaded harness
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the child's process group, SIGKILL it if it lingers."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(STOP_TIMEOUT)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)  # stragglers of the group (nginx workers)


def output(command: list[str], timeout: float) -> str:
    """Run ``command`` (a load generator) to its end; its stdout, or RuntimeError if it fails."""
    proc = spawn(command, stdout=subprocess.PIPE)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        stop(proc)
    text = out.decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(
            f"load generator failed ({proc.returncode}): {shlex.join(command)}\n{text}"
        )
    return text


def tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a log file ("" if it cannot be read)."""
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


@dataclass
class Server:
    """A started server: its process, the port it listens on and the file it logs to."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def log_tail(self, lines: int = 15) -> str:
        return tail(self.log, lines)


def wait_ready(server: Server, ready: Callable[[], bool]) -> None:
    """Poll ``ready`` until it holds; RuntimeError with the log's tail if the server exits or
    READY_TIMEOUT passes first."""
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with {server.proc.returncode}:\n{server.log_tail()}"
            )
        if ready():
            return
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} not ready in {READY_TIMEOUT:.0f} s:\n{server.log_tail()}")


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = LOOPBACK) -> bool:
    """Whether ``host:port`` accepts a connection."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
        return True
    return False


def pgrep(args: list[str]) -> list[str]:
    out = subprocess.run(["pgrep", "-a", *args], capture_output=True, text=True, check=False)
    return [line for line in out.stdout.splitlines() if line.strip()]


def leftovers(sessions: Iterable[int], workdir: Path) -> list[str]:
    """Processes still alive in any of ``sessions`` (the session ids, which are the pids of the
    processes ``spawn`` started) or naming ``workdir`` on their command line."""
    found = {line for session in sessions for line in pgrep(["-s", str(session)])}
    found.update(pgrep(["-f", str(workdir)]))
    return sorted(found)


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def stop_on_signals() -> None:
    """Ctrl-C, SIGTERM and SIGHUP stop a bench the same way: every process it started is
    stopped on the way out (KeyboardInterrupt), even if it was started ignoring SIGINT."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _raise_interrupt)
