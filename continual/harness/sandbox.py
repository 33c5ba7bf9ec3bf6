"""The operating-system sandbox a submission runs in (bubblewrap + control groups).

Every guarantee the harness gives rests here, on the kernel, not on Python:

* **what exists**: a new mount namespace whose root holds only the system libraries, the
  Python installation, the project's code packages (all read-only), a size-capped tmpfs
  scratch (``HOME``, ``TMPDIR``, the working folder) and the submission file. Dataset files
  inside those trees (scikit-learn's bundled digits) and ``protected_paths`` are masked by
  empty mounts; the results folder, the caches, the scenario files and the harness's
  temporary folder are simply not there;
* **who**: the process tree runs as the unprivileged uid ``nobody`` (65534) with no
  capabilities and ``no_new_privs`` (when the harness runs as root; otherwise as the
  harness's own uid inside a user namespace that forbids nested ones);
* **whom it can see**: its own PID namespace (the harness and every other process of the
  machine are invisible, so neither ``/proc/<pid>/mem`` nor a signal nor a pidfd can reach
  them), its own IPC and UTS namespaces, and a network namespace with no interface but
  loopback; every descendant dies with the sandbox (``--die-with-parent``, PID namespace);
  a new session, so it cannot reach the harness's terminal;
* **how much**: one control group per controller (:mod:`continual.harness.cgroups`) bounds
  the whole tree's memory, number of tasks and CPU time, whatever the allocation path or
  however the processes are started.

The audit-hook policy of :mod:`continual.harness.audit` still runs inside as defence in
depth; nothing depends on it. Where this sandbox cannot be built (no ``bwrap``, no writable
cgroup hierarchy), :func:`probe` says why and the harness refuses to score unless the
organiser passes ``unsafe_no_sandbox=true``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from continual.harness import cgroups

#: inside the sandbox
SCRATCH = "/scratch"
SUBMISSION_DIR = "/submission"
#: the uid and gid submissions run as when the harness is root
NOBODY = 65534
#: the project's packages a submission may import
CODE_PACKAGES = ("continual", "tta", "benchmarks", "conf")
#: /etc files the runtime reads (dynamic loader, user names, time zone, fonts for matplotlib)
ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "passwd", "group", "nsswitch.conf", "localtime", "fonts")


class SandboxUnavailable(RuntimeError):
    """The sandbox cannot be built on this machine (the message says why)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed process tree."""

    #: memory of the whole tree until the harness tightens it (bytes)
    memory_bytes: int
    #: processes and threads alive at once
    max_tasks: int
    #: CPUs' worth of CPU time
    cpus: int
    #: size of the scratch tmpfs (bytes; its pages also count as memory)
    scratch_bytes: int


@dataclass
class SandboxLayout:
    """What the sandbox's file system shows (host paths, mounted at the same place)."""

    read_only: list[str] = field(default_factory=list)
    masked: list[str] = field(default_factory=list)


@functools.lru_cache(maxsize=1)
def _tool(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/bin:/bin:/usr/sbin:/sbin")


def _privileged() -> bool:
    return os.geteuid() == 0


def probe() -> str:
    """"" when a sandbox can be built here, else the reason it cannot."""
    if not sys.platform.startswith("linux"):
        return f"the sandbox needs Linux namespaces (this is {sys.platform})"
    if _tool("bwrap") is None:
        return "bubblewrap (bwrap) is not installed (Debian/Ubuntu: apt-get install bubblewrap)"
    if _privileged() and _tool("setpriv") is None:
        return "setpriv (util-linux) is not installed"
    problem = cgroups.available()
    if problem:
        return f"no usable control groups ({problem}); run the harness as root or in a delegated cgroup v2 subtree"
    try:
        subprocess.run(
            [_tool("bwrap") or "bwrap", *(_namespace_args()), "--ro-bind", "/", "/", "true"],
            check=True, capture_output=True, timeout=30,
        )
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as error:
        detail = getattr(error, "stderr", b"") or b""
        return f"bwrap cannot create namespaces here: {detail.decode(errors='replace').strip() or error}"
    return ""


def describe() -> dict[str, object]:
    """What isolates a run, for its record."""
    version = subprocess.run([_tool("bwrap") or "bwrap", "--version"], capture_output=True, text=True).stdout.strip()
    return {
        "tool": version,
        "cgroup": cgroups.versions(),
        "uid": NOBODY if _privileged() else os.geteuid(),
    }


def _namespace_args() -> list[str]:
    args = ["--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try"]
    if not _privileged():  # the harness's uid inside a user namespace, no nested ones
        args += ["--unshare-user", "--disable-userns"]
    return args


def _package_dir(name: str) -> str | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.realpath(next(iter(spec.submodule_search_locations)))


def default_layout(project_root: str | Path, protected: Iterable[str | Path] = ()) -> SandboxLayout:
    """The Python installation and the project's code packages, read-only; scikit-learn's
    bundled datasets and every protected path that lies inside them masked."""
    root = Path(project_root).resolve()
    read_only = {os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, sys.exec_prefix)}
    read_only |= {str(root / name) for name in CODE_PACKAGES if (root / name).is_dir()}
    masked = set()
    sklearn = _package_dir("sklearn")
    if sklearn:
        masked |= {os.path.join(sklearn, "datasets", sub) for sub in ("data", "images", "descr")}
    masked |= {os.path.realpath(p) for p in protected}
    inside = [p for p in masked if any(p == r or p.startswith(r + os.sep) for r in read_only) and os.path.exists(p)]
    return SandboxLayout(read_only=sorted(read_only), masked=sorted(inside))


def _system_args() -> list[str]:
    args: list[str] = ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        path = Path("/") / name
        if path.is_symlink():
            args += ["--symlink", os.readlink(path), str(path)]
        elif path.is_dir():
            args += ["--ro-bind", str(path), str(path)]
    for name in ETC_FILES:
        path = Path("/etc") / name
        if path.exists():
            args += ["--ro-bind", str(path), str(path)]
    return args


def _parents_args(paths: Iterable[str], existing: set[str]) -> list[str]:
    """``--dir`` for every ancestor of ``paths`` (traversable by the sandbox's user; bwrap
    would create them with mode 0700)."""
    wanted: set[str] = set()
    for path in paths:
        parent = Path(path).parent
        while str(parent) != "/":
            wanted.add(str(parent))
            parent = parent.parent
    args: list[str] = []
    for directory in sorted(wanted - existing, key=lambda p: (p.count("/"), p)):
        args += ["--perms", "0755", "--dir", directory]
    return args


class Sandbox:
    """One sandboxed process tree: its control groups and the command that starts it.

    Args:
        name: unique name (the run id) of its control groups.
        limits: see :class:`SandboxLimits`.
        layout: what its file system shows (:func:`default_layout`).
        submission: host path of the submission file, shown read-only under
            :data:`SUBMISSION_DIR`.
        env: the complete environment inside.

    Raises:
        SandboxUnavailable: the control groups cannot be created.
    """

    def __init__(
        self, name: str, limits: SandboxLimits, layout: SandboxLayout, submission: str | Path, env: dict[str, str]
    ) -> None:
        self.limits = limits
        self.layout = layout
        self.submission = Path(submission)
        self.env = dict(env)
        try:
            self.group = cgroups.ResourceGroup(name)
        except cgroups.CgroupUnavailable as error:
            raise SandboxUnavailable(str(error)) from error
        try:
            self.group.set_memory_limit(limits.memory_bytes)
            self.group.set_max_tasks(limits.max_tasks)
            self.group.set_cpus(limits.cpus)
        except OSError as error:
            self.group.remove()
            raise SandboxUnavailable(f"cannot set the control-group limits: {error}") from error

    @property
    def submission_path(self) -> str:
        """Where the submission file is inside."""
        return f"{SUBMISSION_DIR}/{self.submission.name}"

    def command(self, argv: Sequence[str]) -> list[str]:
        """The host command that runs ``argv`` inside (joining the control groups first)."""
        bwrap = _tool("bwrap")
        if bwrap is None:
            raise SandboxUnavailable("bubblewrap (bwrap) is not installed")
        args = [bwrap, *_namespace_args(), "--die-with-parent", "--new-session", "--hostname", "sandbox"]
        args += _system_args()
        args += _parents_args([*self.layout.read_only, *self.layout.masked], existing={"/usr", "/etc"})
        for path in self.layout.read_only:
            args += ["--ro-bind", path, path]
        for path in self.layout.masked:  # an empty, read-only stand-in
            if os.path.isdir(path):
                args += ["--perms", "0555", "--size", "4096", "--tmpfs", path]
            else:
                args += ["--ro-bind", "/dev/null", path]
        args += ["--proc", "/proc", "--dev", "/dev"]
        args += ["--perms", "1777", "--size", str(self.limits.scratch_bytes), "--tmpfs", SCRATCH]
        args += ["--perms", "1777", "--size", str(min(self.limits.scratch_bytes, 64 << 20)), "--tmpfs", "/dev/shm"]
        args += ["--perms", "0755", "--dir", SUBMISSION_DIR]
        args += ["--ro-bind", str(self.submission), self.submission_path]
        args += ["--chdir", SCRATCH, "--clearenv"]
        for key, value in self.env.items():
            args += ["--setenv", key, value]
        if _privileged():
            setpriv = _tool("setpriv") or "setpriv"
            args += [
                "--", setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all",
                "--bounding-set=-all", "--no-new-privs", "--",
            ]
        else:
            args += ["--"]
        return cgroups.join_command(self.group.procs_files(), [*args, *argv])

    def memory_usage(self) -> int:
        return self.group.memory_usage()

    def set_memory_limit(self, limit_bytes: int) -> None:
        self.group.set_memory_limit(limit_bytes)

    def memory_verdict(self) -> str:
        """Why the tree is over its memory limit ("" if it is not): the kernel's own count of
        the processes it stopped there, whatever the allocation path or error message."""
        kills = self.group.oom_kills()
        return f"the kernel stopped {kills} process(es) at the memory limit" if kills else ""

    def close(self) -> None:
        """Kill whatever is left of the tree and remove its control groups."""
        self.group.remove()


class Unsandboxed:
    """The organiser's explicit ``unsafe_no_sandbox=true``: a plain child process in its own
    session, with the audit-hook policy and a resident-memory watchdog over its process tree
    (which a new session or a double fork escapes). Nothing here is a security boundary;
    runs made this way are marked unsandboxed in their record and on the leaderboard."""

    def __init__(self, submission: str | Path, scratch: str | Path, env: dict[str, str], memory_bytes: int) -> None:
        self.submission = Path(submission)
        self.scratch = str(scratch)
        self.env = dict(env)
        self.memory_limit = int(memory_bytes)
        self.pid: int | None = None

    @property
    def submission_path(self) -> str:
        return str(self.submission)

    def command(self, argv: Sequence[str]) -> list[str]:
        return list(argv)

    def memory_usage(self) -> int:
        import psutil

        try:
            root = psutil.Process(self.pid)
            return sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except (psutil.Error, TypeError, ValueError):
            return 0

    def set_memory_limit(self, limit_bytes: int) -> None:
        self.memory_limit = int(limit_bytes)

    def memory_verdict(self) -> str:
        used = self.memory_usage()
        if used > self.memory_limit:
            return f"resident memory {used / 2**20:.0f} MB passed the limit of {self.memory_limit / 2**20:.0f} MB"
        return ""

    def close(self) -> None:
        if self.pid is not None:
            try:
                os.killpg(self.pid, 9)
            except (ProcessLookupError, PermissionError):
                pass
