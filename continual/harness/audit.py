"""An audit-hook policy inside the submission process: defence in depth, not a boundary.

The guarantees of the harness rest on the operating-system sandbox
(:mod:`continual.harness.sandbox`): what the submission's file system holds, which processes
it can see, how much memory, CPU and how many tasks its tree gets. This policy (PEP 578 audit
hooks), installed by the runner before the submission loads, only turns the obvious attempts
into early, readable ``SandboxViolation`` errors: reading dataset or result locations, writing
outside the scratch folder, starting processes through ``subprocess``/``os``, ``ctypes``,
sockets, signals to other processes and raising resource limits. A submission can switch it
off (it is an object in its own process) or step around it (native code, the low-level
fork/exec primitive raise no audit event); nothing depends on it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from pathlib import Path

#: events refused outright once the policy is active.
BLOCKED_EVENTS = frozenset(
    {
        "subprocess.Popen",
        "os.system",
        "os.exec",
        "os.posix_spawn",
        "os.spawn",
        "os.fork",
        "os.forkpty",
        "os.startfile",
        "pty.spawn",
        "ctypes.dlopen",
        "ctypes.dlsym",
        "ctypes.call_function",
        "ctypes.cdata",
        "ctypes.addressof",
        "ctypes.string_at",
        "ctypes.wstring_at",
        "socket.connect",
        "socket.bind",
        "socket.sendto",
        "socket.sendmsg",
        "resource.setrlimit",
        "resource.prlimit",
        "sys.remote_exec",
    }
)
#: events whose first argument is a path that must lie inside the scratch folder.
WRITE_EVENTS = frozenset(
    {
        "os.remove",
        "os.rename",
        "os.rmdir",
        "os.mkdir",
        "os.link",
        "os.symlink",
        "os.truncate",
        "os.chmod",
        "os.chown",
        "os.utime",
        "os.setxattr",
        "os.removexattr",
        "shutil.rmtree",
        "shutil.move",
        "shutil.copyfile",
        "shutil.copytree",
    }
)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC


class SandboxViolation(PermissionError):
    """A submission did something the competition rules forbid."""


def _resolve(path: object) -> str | None:
    if isinstance(path, int):  # an already open descriptor
        return None
    try:
        return os.path.realpath(os.fsdecode(path))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def _inside(path: str, roots: Iterable[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip(os.sep) + os.sep) for root in roots)


class Policy:
    """The allow and deny lists of one submission process.

    Args:
        scratch: the only folder the submission may write (also readable).
        readable: folders that may be read (the Python installation and the project code).
        protected: folders and files that may never be read, even inside ``readable``.
    """

    def __init__(self, scratch: str | Path, readable: Iterable[str | Path], protected: Iterable[str | Path]) -> None:
        self.scratch = os.path.realpath(scratch)
        self.readable = [os.path.realpath(p) for p in readable] + [self.scratch]
        self.protected = [os.path.realpath(p) for p in protected]
        own = str(os.getpid())
        # Our own /proc entry is fine (torch reads CPU and memory info); others are not.
        self.readable += [f"/proc/{own}", "/proc/self", "/proc/cpuinfo", "/proc/meminfo", "/sys/devices/system/cpu",
                          "/dev/null", "/dev/urandom", "/etc"]
        self.own_pid = os.getpid()

    def check(self, event: str, args: tuple) -> None:
        """Raise :class:`SandboxViolation` if ``event(args)`` is not allowed."""
        if event in BLOCKED_EVENTS:
            raise SandboxViolation(f"{event} is not allowed in a submission")
        if event == "open":
            path = _resolve(args[0])
            if path is None:
                return
            flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
            writing = bool(flags & _WRITE_FLAGS) or any(c in mode for c in "wax+")
            self._check_path(path, writing)
        elif event in WRITE_EVENTS:
            for arg in args[:2]:
                path = _resolve(arg)
                if path is not None:
                    self._check_path(path, writing=True)
        elif event in ("os.kill", "os.killpg", "signal.pthread_kill"):
            if event != "os.kill" or args[0] not in (0, self.own_pid):
                raise SandboxViolation(f"{event} is not allowed in a submission")

    def _check_path(self, path: str, writing: bool) -> None:
        if _inside(path, self.protected):
            raise SandboxViolation(f"reading {path} is not allowed in a submission")
        if writing:
            if not (_inside(path, [self.scratch]) or path == "/dev/null"):
                raise SandboxViolation(f"writing {path} is not allowed (only the scratch folder)")
        elif not _inside(path, self.readable):
            raise SandboxViolation(f"reading {path} is not allowed in a submission")

    def install(self) -> None:
        """Activate the policy for the rest of this process's life (cannot be undone)."""
        policy = self

        def hook(event: str, args: tuple) -> None:
            policy.check(event, args)

        sys.addaudithook(hook)


def default_protected_paths(results_dir: str | Path, extra: Iterable[str | Path] = ()) -> list[str]:
    """Dataset and result locations a submission may not read."""
    paths: list[str] = [str(results_dir), *map(str, extra)]
    try:
        from benchmarks.data.folder import cache_dir, shared_data_dir

        paths += [str(cache_dir()), str(shared_data_dir())]
    except ImportError:
        pass
    try:
        import sklearn.datasets

        paths.append(str(Path(sklearn.datasets.__file__).parent / "data"))
    except ImportError:
        pass
    # scikit-learn's download folder (get_data_home() would create it, so spell it out).
    paths.append(os.environ.get("SCIKIT_LEARN_DATA", os.path.expanduser("~/scikit_learn_data")))
    paths += [os.path.expanduser("~/.avalanche"), os.path.expanduser("~/.cache")]
    return paths


def default_readable_paths(project_root: str | Path) -> list[str]:
    """The Python installation and the project's code."""
    return sorted({sys.prefix, sys.base_prefix, sys.exec_prefix, str(project_root)})
