"""Each sandbox node's own cgroup v2: `<cgroup2 mount>/propolis/<sandbox>/<node>/`.

Why: cgroup programs (socket LB's connect4/sendmsg4/recvmsg4/getpeername4) act on every socket
of every process in the cgroup they are attached to and below. On a real node that is the host's
root cgroup; here every process of the machine (every sandbox, every test run) is in the root, so
each node gets a cgroup of its own, the datapath-writer attaches there (`--cgroup-root`), and
everything the node runs is started inside it: its suite services, its listeners (10250, 22), its
pods' workloads and `pods/exec` commands (as kubepods sit under a node's root; a hostNetwork pod's
in the node's namespace too), `sandbox exec node:X` and probes from `node:X`. Processes running *in*
the node but in another network namespace (the services act on the node from the root namespace;
pods have their own) are left alone by the programs (hostNamespaceOnly), as on a real node.

`down` kills whatever is still in a node's cgroup (cgroup.kill) and removes the cgroups.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from propolis.datapath.socket_lb import cgroup2_mount
from propolis.errors import PermanentError, TemporaryError

#: under the cgroup2 mount: propolis/<sandbox>/<node>
ROOT_NAME = "propolis"
#: a shell that moves itself into the cgroup ($0) and becomes the command: the child is in the cgroup
#: from its first instruction, without a preexec_fn in a threaded parent
_JOIN_AND_EXEC = 'echo 0 > "$0/cgroup.procs" && exec "$@"'


def sandbox_cgroup(sandbox: str) -> Path:
    return Path(cgroup2_mount()) / ROOT_NAME / sandbox


def node_cgroup(sandbox: str, node: str) -> Path:
    return sandbox_cgroup(sandbox) / node


def create_node_cgroups(sandbox: str, nodes: list[str]) -> list[Path]:
    """Each node's cgroup (kept if it exists: a restarted supervisor adopts it)."""
    paths = [node_cgroup(sandbox, node) for node in nodes]
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
    return paths


def in_cgroup_argv(cgroup: Path | str, argv: list[str]) -> list[str]:
    """`argv` started inside `cgroup` (same pid: the shell execs it)."""
    return ["sh", "-c", _JOIN_AND_EXEC, str(cgroup), *argv]


def move_self(cgroup: Path | str) -> None:
    """Move this process (every thread) into `cgroup`; sockets it creates from now on belong to it."""
    with open(Path(cgroup) / "cgroup.procs", "w") as f:
        f.write("0")


def current_cgroup() -> Path:
    """This process's cgroup v2 directory."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            if line.startswith("0::"):
                return Path(cgroup2_mount()) / line.strip()[3:].lstrip("/")
    raise TemporaryError("this process has no cgroup v2 membership (no 0:: line in /proc/self/cgroup)")


@contextmanager
def joined(cgroup: Path | str) -> Iterator[None]:
    """This process inside `cgroup` for the block, then back where it was. A socket keeps the cgroup it was
    created in, so a probe creates its socket inside the block and uses it after (no awaits inside: the
    whole process moves, so sockets other tasks created meanwhile would land in the node too)."""
    previous = current_cgroup()
    move_self(cgroup)
    try:
        yield
    finally:
        move_self(previous)


def _processes(path: Path) -> list[int]:
    try:
        return [int(p) for p in (path / "cgroup.procs").read_text().split()]
    except FileNotFoundError:
        return []


def remove_sandbox_cgroups(sandbox: str, timeout: float = 5.0) -> list[str]:
    """Kill what is left in each node's cgroup and remove them, then the sandbox's and (if empty) ours."""
    try:
        top = sandbox_cgroup(sandbox)
    except PermanentError:  # no cgroup2 here: nothing was made
        return []
    if not top.is_dir():
        return []
    removed = []
    for path in sorted((p for p in top.iterdir() if p.is_dir()), reverse=True) + [top]:
        deadline = time.monotonic() + timeout
        while _processes(path) and time.monotonic() < deadline:
            (path / "cgroup.kill").write_text("1")
            time.sleep(0.05)
        try:
            path.rmdir()
            removed.append(str(path))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise TemporaryError(f"cgroup {path} could not be removed: {exc} (processes {_processes(path)})") from exc
    try:
        top.parent.rmdir()  # the last sandbox of this machine: leave the hierarchy as we found it
    except OSError:
        pass
    return removed


def sandbox_cgroup_exists(sandbox: str) -> bool:
    try:
        return os.path.isdir(sandbox_cgroup(sandbox))
    except PermanentError:  # no cgroup2
        return False
