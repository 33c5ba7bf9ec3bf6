"""Control groups that bound a whole process tree: memory, number of tasks, CPU time.

A submission's sandbox joins one group per controller before its first instruction runs, and
every process or thread it starts inherits the group, whatever it does (a new session, a
double fork, a thread pool). The kernel then enforces

* ``memory``: resident memory of the whole tree, any allocation path (malloc, ``mmap``,
  numpy, torch, files written to the tmpfs scratch), swap included where it is accounted;
  past the limit the kernel's OOM killer stops a process of the group and counts the kill;
* ``pids``: the number of tasks (processes and threads) alive at once;
* ``cpu``: CPU time, ``threads`` CPUs' worth per scheduling period, however many threads run.

Both hierarchies are supported: cgroup v1 (one mount per controller, as on this project's
CI machines) and the unified v2 hierarchy (``memory.max``, ``pids.max``, ``cpu.max``,
``memory.events``). Creating groups needs write access to the hierarchy (root, or a v2
subtree delegated to the user); :func:`available` says whether it works here.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

CONTROLLERS = ("memory", "pids", "cpu")
#: scheduling period for the CPU quota, microseconds
CPU_PERIOD_US = 100_000


class CgroupUnavailable(RuntimeError):
    """The resource controllers cannot be used here (with the reason)."""


@dataclass(frozen=True)
class _Hierarchy:
    version: int  # 1 or 2
    root: Path  # where the current process's group lies in this mount


def _mounts() -> list[tuple[str, Path, set[str]]]:
    """(fs type, mount point, options) of every cgroup mount."""
    found = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        separator = fields.index("-")
        fstype, options = fields[separator + 1], fields[separator + 3]
        if fstype in ("cgroup", "cgroup2"):
            found.append((fstype, Path(fields[4]), set(fields[5].split(",")) | set(options.split(","))))
    return found


def _own_groups() -> dict[str, str]:
    """Controller (or "" for v2) -> this process's group path, from /proc/self/cgroup."""
    groups = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            groups[name] = path
    return groups


def _hierarchies() -> dict[str, _Hierarchy]:
    """For each controller of :data:`CONTROLLERS`, the hierarchy that carries it (a v1 mount
    of that controller, else the unified v2 hierarchy where the controller is available)."""
    mounts, own = _mounts(), _own_groups()
    found: dict[str, _Hierarchy] = {}
    for fstype, point, options in mounts:
        for controller in CONTROLLERS:
            if fstype == "cgroup" and controller in options and controller in own:
                found.setdefault(controller, _Hierarchy(1, point / own[controller].lstrip("/")))
    unified = next((point for fstype, point, _ in mounts if fstype == "cgroup2"), None)
    if unified is not None and "" in own:
        root = unified / own[""].lstrip("/")
        try:
            offered = set((root / "cgroup.controllers").read_text().split())
        except OSError:
            offered = set()
        for controller in CONTROLLERS:
            if controller in offered:
                found.setdefault(controller, _Hierarchy(2, root))
    return found


class ResourceGroup:
    """One group per controller (shared on v2) for one sandboxed run.

    Args:
        name: a unique directory name (the run id).
        hierarchies: for tests: controller -> hierarchy; by default the system's.
    """

    def __init__(self, name: str, hierarchies: dict[str, _Hierarchy] | None = None) -> None:
        found = _hierarchies() if hierarchies is None else hierarchies
        missing = [c for c in CONTROLLERS if c not in found]
        if missing:
            raise CgroupUnavailable(f"no cgroup hierarchy with the {', '.join(missing)} controller(s)")
        self.paths: dict[str, Path] = {}
        self.version = {c: found[c].version for c in CONTROLLERS}
        try:
            for controller in CONTROLLERS:
                hierarchy = found[controller]
                path = hierarchy.root / f"tta-harness-{name}"
                if hierarchy.version == 2 and path in self.paths.values():
                    self.paths[controller] = path
                    continue
                if hierarchy.version == 2:
                    self._enable_v2(hierarchy.root)
                path.mkdir()
                self.paths[controller] = path
        except OSError as error:
            self.remove()
            raise CgroupUnavailable(f"cannot create a control group: {error}") from error

    @staticmethod
    def _enable_v2(parent: Path) -> None:
        """Let children of ``parent`` use the controllers. v2 allows that only in a group
        without processes of its own: where the harness itself sits in ``parent`` (EBUSY),
        it first moves into a leaf group of its own."""
        control = parent / "cgroup.subtree_control"
        wanted = [c for c in CONTROLLERS if c not in control.read_text().split()]
        if not wanted:
            return
        try:
            control.write_text(" ".join(f"+{c}" for c in wanted))
        except OSError:
            leaf = parent / "tta-harness-self"
            leaf.mkdir(exist_ok=True)
            (leaf / "cgroup.procs").write_text(f"{os.getpid()}\n")
            control.write_text(" ".join(f"+{c}" for c in wanted))

    def _write(self, controller: str, name: str, value: object) -> None:
        (self.paths[controller] / name).write_text(f"{value}\n")

    def _read(self, controller: str, name: str) -> str:
        return (self.paths[controller] / name).read_text()

    def _has(self, controller: str, name: str) -> bool:
        return (self.paths[controller] / name).exists()

    # -- limits ---------------------------------------------------------------------------------
    def set_memory_limit(self, limit_bytes: int) -> None:
        """Resident memory (and swap, where accounted) of the whole group."""
        limit = int(limit_bytes)
        if self.version["memory"] == 2:
            self._write("memory", "memory.max", limit)
            if self._has("memory", "memory.swap.max"):
                self._write("memory", "memory.swap.max", 0)
            return
        swap = "memory.memsw.limit_in_bytes"
        current = int(self._read("memory", "memory.limit_in_bytes"))
        # memsw must stay >= the memory limit: raise it first, lower it last
        if self._has("memory", swap) and limit > current:
            self._write("memory", swap, limit)
        self._write("memory", "memory.limit_in_bytes", limit)
        if self._has("memory", swap) and limit <= current:
            self._write("memory", swap, limit)

    def set_max_tasks(self, count: int) -> None:
        self._write("pids", "pids.max", int(count))

    def set_cpus(self, cpus: int) -> None:
        """At most ``cpus`` CPUs' worth of time per period, over all threads of the group."""
        quota = int(cpus) * CPU_PERIOD_US
        if self.version["cpu"] == 2:
            self._write("cpu", "cpu.max", f"{quota} {CPU_PERIOD_US}")
        else:
            self._write("cpu", "cpu.cfs_period_us", CPU_PERIOD_US)
            self._write("cpu", "cpu.cfs_quota_us", quota)

    # -- readings -------------------------------------------------------------------------------
    def memory_usage(self) -> int:
        name = "memory.current" if self.version["memory"] == 2 else "memory.usage_in_bytes"
        return int(self._read("memory", name))

    def _counters(self, controller: str, name: str) -> dict[str, int]:
        counters = {}
        for line in self._read(controller, name).splitlines():
            key, _, value = line.partition(" ")
            if value.strip().lstrip("-").isdigit():
                counters[key] = int(value)
        return counters

    def oom_kills(self) -> int:
        """How many processes of the group the kernel killed for memory."""
        name = "memory.events" if self.version["memory"] == 2 else "memory.oom_control"
        return self._counters("memory", name).get("oom_kill", 0)

    def task_limit_hits(self) -> int:
        """How many process or thread creations the task limit refused."""
        if self.version["pids"] == 2 or self._has("pids", "pids.events"):
            return self._counters("pids", "pids.events").get("max", 0)
        return 0

    def pids(self) -> list[int]:
        found: set[int] = set()
        for path in set(self.paths.values()):
            try:
                found.update(int(line) for line in (path / "cgroup.procs").read_text().split())
            except (OSError, ValueError):
                pass
        return sorted(found)

    # -- membership and teardown ---------------------------------------------------------------
    def procs_files(self) -> list[str]:
        """The files a process writes its pid to, to join every group (before it execs)."""
        return [str(path / "cgroup.procs") for path in dict.fromkeys(self.paths.values())]

    def kill_all(self, timeout: float = 10.0) -> None:
        """SIGKILL every process of the group until none is left."""
        deadline = time.monotonic() + timeout
        while True:
            members = self.pids()
            if not members or time.monotonic() > deadline:
                return
            for pid in members:
                try:
                    os.kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            time.sleep(0.02)

    def remove(self) -> None:
        """Kill what is left and delete the groups (idempotent)."""
        if self.paths:
            self.kill_all()
        for path in dict.fromkeys(self.paths.values()):
            for _ in range(100):
                try:
                    path.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:  # busy until the last zombie is reaped
                    time.sleep(0.02)
        self.paths = {}


def available() -> str:
    """"" when groups with every controller can be created here, else why not."""
    try:
        group = ResourceGroup(f"probe-{os.getpid()}-{time.monotonic_ns()}")
    except (CgroupUnavailable, OSError) as error:
        return str(error)
    group.remove()
    return ""


def versions() -> list[str]:
    """The cgroup versions that carry the controllers here (``["v1"]``, ``["v2"]``, both)."""
    return sorted({f"v{h.version}" for h in _hierarchies().values()})


def join_command(procs_files: Iterable[str], command: list[str]) -> list[str]:
    """``command`` run by a shell that first moves itself into every group, then execs it,
    so that nothing of the command ever runs outside them."""
    files = list(procs_files)
    script = 'n=$1; shift; while [ "$n" -gt 0 ]; do echo $$ > "$1" || exit 125; shift; n=$((n-1)); done; exec "$@"'
    return ["/bin/sh", "-c", script, "join-cgroups", str(len(files)), *files, *command]
