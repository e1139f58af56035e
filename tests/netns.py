"""Several 'hosts' on one machine: network namespaces on one bridge (iproute2, root only).

    with Hosts(3) as hosts:               # namespaces sgt<pid>h0..h2 at 10.77.<k>.1..3/24
        hosts.popen(0, [python, ...])     # a process inside host 0's namespace

The bridge lives in a namespace of its own, so the machine's own network is never touched.
Everything is deleted on exit, also when the test fails.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from typing import Optional


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def unavailable() -> Optional[str]:
    """Why namespaces cannot be made here (None when they can)."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"sgtprobe{os.getpid()}"
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


class Hosts:
    def __init__(self, count: int):
        self.prefix = f"sgt{os.getpid() % 100000}"
        self.names = [f"{self.prefix}h{i}" for i in range(count)]
        self.bridge_ns = f"{self.prefix}br"
        self.subnet = 10 + os.getpid() % 200  # 10.77.<subnet>.0/24
        self.addresses = [f"10.77.{self.subnet}.{i + 1}" for i in range(count)]

    def __enter__(self) -> "Hosts":
        try:
            _ip("netns", "add", self.bridge_ns)
            _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
            for i, (ns, addr) in enumerate(zip(self.names, self.addresses)):
                _ip("netns", "add", ns)
                _ip("-n", ns, "link", "set", "lo", "up")
                # a veth pair: eth0 inside the host, portI on the bridge
                _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", "name", f"port{i}",
                    "netns", self.bridge_ns)
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", "eth0")
                _ip("-n", ns, "link", "set", "eth0", "up")
                _ip("-n", self.bridge_ns, "link", "set", f"port{i}", "master", "br0")
                _ip("-n", self.bridge_ns, "link", "set", f"port{i}", "up")
        except BaseException:
            self.__exit__()
            raise
        return self

    def popen(self, host: int, cmd: list[str], **kwargs) -> subprocess.Popen:
        return subprocess.Popen(["ip", "netns", "exec", self.names[host], *cmd], **kwargs)

    def __exit__(self, *exc) -> None:
        for ns in [*self.names, self.bridge_ns]:  # deleting a namespace deletes its links
            _ip("netns", "del", ns, check=False)

    @staticmethod
    def leftovers() -> list[str]:
        listed = _ip("netns", "list", check=False).stdout.split()
        return [n for n in listed if n.startswith("sgt")]
