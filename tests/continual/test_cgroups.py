"""The control-group wrapper on simulated cgroup v1 and v2 trees (the real v1 hierarchy is
exercised by every sandboxed run in test_hostile_submissions.py)."""

from __future__ import annotations

from pathlib import Path

from continual.harness import cgroups
from continual.harness.cgroups import ResourceGroup, _Hierarchy


def _empty(group: ResourceGroup) -> None:
    for path in set(group.paths.values()):
        for child in path.iterdir():
            child.unlink()


def test_v2_limits_and_readings(tmp_path: Path) -> None:
    (tmp_path / "cgroup.subtree_control").write_text("")
    group = ResourceGroup("run1", {c: _Hierarchy(2, tmp_path) for c in cgroups.CONTROLLERS})
    path = tmp_path / "tta-harness-run1"
    assert set(group.paths.values()) == {path}  # one group for every controller
    assert set((tmp_path / "cgroup.subtree_control").read_text().split()) == {"+memory", "+pids", "+cpu"}
    group.set_memory_limit(3 << 30)
    group.set_max_tasks(64)
    group.set_cpus(2)
    assert (path / "memory.max").read_text() == f"{3 << 30}\n"
    assert (path / "pids.max").read_text() == "64\n" and (path / "cpu.max").read_text() == "200000 100000\n"
    (path / "memory.events").write_text("low 0\nhigh 0\nmax 12\noom 1\noom_kill 2\n")
    (path / "pids.events").write_text("max 5\n")
    (path / "memory.current").write_text("1234\n")
    assert group.oom_kills() == 2 and group.task_limit_hits() == 5 and group.memory_usage() == 1234
    assert group.procs_files() == [str(path / "cgroup.procs")]
    _empty(group)
    group.remove()
    assert not path.exists()


def test_v1_memory_and_swap_limits_keep_their_order(tmp_path: Path) -> None:
    hierarchies = {c: _Hierarchy(1, tmp_path / c) for c in cgroups.CONTROLLERS}
    for hierarchy in hierarchies.values():
        hierarchy.root.mkdir()
    group = ResourceGroup("run2", hierarchies)
    memory = tmp_path / "memory" / "tta-harness-run2"
    (memory / "memory.limit_in_bytes").write_text(f"{1 << 40}\n")
    (memory / "memory.memsw.limit_in_bytes").write_text(f"{1 << 40}\n")
    writes: list[str] = []
    real_write = group._write
    group._write = lambda controller, name, value: (writes.append(name), real_write(controller, name, value))[1]
    group.set_memory_limit(1 << 30)  # lowering: memory first, then memory+swap
    assert writes == ["memory.limit_in_bytes", "memory.memsw.limit_in_bytes"]
    writes.clear()
    group.set_memory_limit(1 << 32)  # raising: memory+swap first
    assert writes == ["memory.memsw.limit_in_bytes", "memory.limit_in_bytes"]
    group.set_cpus(1)
    assert (tmp_path / "cpu" / "tta-harness-run2" / "cpu.cfs_quota_us").read_text() == "100000\n"
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    assert group.oom_kills() == 3
    _empty(group)
    group.remove()
    assert not memory.exists()


def test_join_command_moves_the_shell_before_it_execs(tmp_path: Path) -> None:
    import subprocess

    files = [tmp_path / "a.procs", tmp_path / "b.procs"]
    out = subprocess.run(cgroups.join_command(map(str, files), ["/bin/sh", "-c", "echo $$"]), capture_output=True, text=True)
    pid = out.stdout.strip()
    assert all(f.read_text().strip() == pid for f in files)  # the same process: it exec'd
