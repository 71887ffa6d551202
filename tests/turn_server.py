"""A real TURN server for the tests: coturn's `turnserver`, on 127.0.0.1 only.

It listens on 127.0.0.1 (UDP and TCP, one free port), relays from 127.0.0.1, takes long-term
credentials (one user, one realm), and has no TLS, no DTLS, no STUN-only service, no CLI and no
database or pid file outside its own temporary folder. ``--allow-loopback-peers``: coturn refuses
to relay to 127.x peers by default, and every peer in the tests is on loopback.

``TurnServer.start()`` returns once the server answers a TURN request (an unauthenticated Allocate
gets "401 Unauthorized" with a nonce: the port is open and the TURN service behind it works).
``close()`` stops it and waits for it, so no process is left. The log (``log_text()``) says what it
did: allocations, permissions, and at each allocation's end its traffic with the peers ("peer
usage: ... rp=PACKETS, rb=BYTES, sp=..., sb=...").

Installed by tests/system_packages.sh (Debian's coturn package); ``missing()`` says why not here.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time

USER = "l2d-user"
PASSWORD = "l2d-turn-secret"
REALM = "live2diff.test"


def missing() -> str | None:
    """Why no TURN server can run here, or None."""
    return None if shutil.which("turnserver") else "coturn's turnserver is not installed"


def _free_port() -> int:
    """A port free for both UDP and TCP on 127.0.0.1 (turnserver listens on both)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.bind(("127.0.0.1", 0))
            port = u.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
                try:
                    t.bind(("127.0.0.1", port))
                except OSError:
                    continue
        return port
    raise RuntimeError("no port free for both UDP and TCP on 127.0.0.1")


def _answers(port: int) -> bool:
    """Whether a TURN server answers on 127.0.0.1:port: an Allocate without credentials must come
    back as an error response (401) from that port."""
    from aioice import stun

    request = stun.Message(message_method=stun.Method.ALLOCATE, message_class=stun.Class.REQUEST)
    request.attributes["REQUESTED-TRANSPORT"] = 0x11000000  # UDP
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.3)
        s.sendto(bytes(request), ("127.0.0.1", port))
        try:
            data, _ = s.recvfrom(2048)
            reply = stun.parse_message(data)
        except (OSError, ValueError):
            return False
    return reply.transaction_id == request.transaction_id and reply.message_class == stun.Class.ERROR


class TurnServer:
    def __init__(self, *, user: str = USER, password: str = PASSWORD, realm: str = REALM):
        self.user, self.password, self.realm = user, password, realm
        self.folder = tempfile.mkdtemp(prefix="l2d-turn-")
        self.log_path = os.path.join(self.folder, "turnserver.log")
        self.port = None
        self.proc = None

    def url(self, password: str | None = None) -> str:
        """The server as LIVE2DIFF_ICE_SERVERS takes it: turn:USER:PASSWORD@127.0.0.1:PORT."""
        return f"turn:{self.user}:{self.password if password is None else password}@127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> "TurnServer":
        self.port = _free_port()
        cmd = ["turnserver", "-n",  # no configuration file: everything is here
               "--listening-ip", "127.0.0.1", "--relay-ip", "127.0.0.1", "--listening-port", str(self.port),
               "--lt-cred-mech", "--user", f"{self.user}:{self.password}", "--realm", self.realm,
               "--no-tls", "--no-dtls", "--no-cli", "--no-stun", "--no-rfc5780", "--allow-loopback-peers",
               "--log-file", self.log_path, "--simple-log", "--no-stdout-log", "--verbose",
               "--pidfile", os.path.join(self.folder, "turnserver.pid"),
               "--userdb", os.path.join(self.folder, "turndb")]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)  # in our process group: a Ctrl-C stops it too
        end = time.monotonic() + timeout
        while not _answers(self.port):
            if self.proc.poll() is not None or time.monotonic() > end:
                log = self.log_text()
                self.close()
                raise RuntimeError(f"turnserver did not answer on 127.0.0.1:{self.port} "
                                   f"(exit status {self.proc.returncode}):\n{log[-2000:]}")
            time.sleep(0.1)
        return self

    def log_text(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def peer_usage(self) -> list[tuple[int, int, int, int]]:
        """(packets received, bytes received, packets sent, bytes sent) between the relay and the
        peers, one per ended allocation of this server's user, from the log."""
        return [tuple(int(x) for x in m) for m in re.findall(
            rf"peer usage: realm=<{re.escape(self.realm)}>, username=<{re.escape(self.user)}>, "
            r"rp=(\d+), rb=(\d+), sp=(\d+), sb=(\d+)", self.log_text())]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
