"""A network namespace of a test's own, for media between two real WebRTC peers on one machine.

Why: aioice (under aiortc) leaves 127.0.0.1 out of the host candidates it gathers, so two peers on
this machine would send their RTP to the machine's own interface address, and a test would depend
on the machine having one. In a namespace made here (``unshare -rn``: no privilege needed) the
loopback device also carries a second address, NETNS_ADDRESS, which aioice does gather: every
packet stays on the loopback device of a namespace that only this test can see.

Run a process inside with ``Netns.cmd(...)`` (nsenter into it); its sockets, /proc/PID/net/udp
included, are the namespace's. Tests that need it skip where user namespaces are not allowed.
"""

from __future__ import annotations

import shutil
import subprocess

NETNS_ADDRESS = "10.213.0.1"


class Netns:
    def __init__(self):
        if not shutil.which("unshare") or not shutil.which("nsenter"):
            raise RuntimeError("unshare and nsenter (util-linux) are needed")
        script = f"ip link set lo up && ip addr add {NETNS_ADDRESS}/32 dev lo && echo ready && exec sleep 100000"
        self.proc = subprocess.Popen(["unshare", "-rn", "sh", "-c", script], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline().strip()
        if line != "ready":
            err = self.proc.stderr.read() if self.proc.poll() is not None else ""
            self.close()
            raise RuntimeError(f"cannot make a network namespace: {err.strip() or line or 'no answer'}")

    def cmd(self, *args) -> list[str]:
        """The command line that runs ``args`` inside the namespace (the same pid: nsenter execs)."""
        return ["nsenter", "-t", str(self.proc.pid), "-U", "-n", "--preserve-credentials", *map(str, args)]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
