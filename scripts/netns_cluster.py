#!/usr/bin/env python3
"""Two "hosts" on one machine: two Linux network namespaces joined by a private veth pair, each with its
own address (never any outside address), and a Ray node in each. For tests of a multi-node search
where the nodes really talk over a network link instead of sharing loopback.

    python scripts/netns_cluster.py up --prefix sslt --subnet 10.213.7      # namespaces sslt-a, sslt-b
    python scripts/netns_cluster.py ray --prefix sslt --dir /tmp/c          # head in -a, worker in -b (JSON)
    python scripts/netns_cluster.py down --prefix sslt --dir /tmp/c         # stop the nodes by PID, delete

Needs root (CAP_NET_ADMIN) and `ip` (iproute2); the file system stays shared, only the network is split.
Ray nodes run with `--block` in their own process groups, so they are stopped by PID, never with
`ray stop` (which would stop every Ray node on the machine).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def addresses(subnet: str) -> tuple[str, str]:
    return f"{subnet}.1", f"{subnet}.2"


def up(prefix: str, subnet: str) -> dict:
    """Create namespaces PREFIX-a and PREFIX-b, a veth pair between them, SUBNET.1 and SUBNET.2."""
    a, b = f"{prefix}-a", f"{prefix}-b"
    first, second = addresses(subnet)
    down(prefix)
    _ip("netns", "add", a)
    _ip("netns", "add", b)
    _ip("link", "add", f"{prefix}-va", "type", "veth", "peer", "name", f"{prefix}-vb")
    for ns, veth, address in ((a, f"{prefix}-va", first), (b, f"{prefix}-vb", second)):
        _ip("link", "set", veth, "netns", ns)
        _ip("-n", ns, "addr", "add", f"{address}/24", "dev", veth)
        _ip("-n", ns, "link", "set", veth, "up")
        _ip("-n", ns, "link", "set", "lo", "up")
    return {"namespaces": [a, b], "addresses": [first, second]}


def start_ray(prefix: str, subnet: str, directory: Path, cpus: float = 1, env: dict[str, str] | None = None,
              port: int = 6379, timeout: float = 120, worker_only: bool = False,
              worker_private_dir: Path | None = None, worker_cpus: float | None = None) -> dict:
    """A Ray head in PREFIX-a and a worker node in PREFIX-b; returns the head's address and the PIDs.
    `worker_only`: (re)start only the worker node, e.g. a host that comes back after it was lost.
    `worker_private_dir`: a directory the worker node sees as an empty disk of its own (a tmpfs in a
    mount namespace of its own), like a node-local path on a real second host. `worker_cpus`: the
    worker node's CPUs, if not `cpus` (0: a node that hosts no trial worker)."""
    directory.mkdir(parents=True, exist_ok=True)
    first, second = addresses(subnet)
    ray = str(Path(sys.executable).parent / "ray")
    full_env = {**os.environ, **cluster_env(directory), **(env or {})}
    pids = {}
    nodes = [("head", f"{prefix}-a", ["--head", "--port", str(port), "--node-ip-address", first, "--include-dashboard",
                                      "false"]),
             ("worker", f"{prefix}-b", ["--address", f"{first}:{port}", "--node-ip-address", second])]
    for name, ns, args in nodes if not worker_only else nodes[1:]:
        log = open(directory / f"ray-{name}.log", "a")
        # The host name resolves to loopback inside a namespace: gloo (DDP on CPU) must be told which
        # interface carries the traffic between the nodes, as on any host with several interfaces.
        node_env = {**full_env, "GLOO_SOCKET_IFNAME": f"{prefix}-v{ns[-1]}"}
        node_cpus = cpus if name == "head" or worker_cpus is None else worker_cpus
        command = ["ip", "netns", "exec", ns, ray, "start", "--block", f"--num-cpus={node_cpus:g}", *args]
        if name == "worker" and worker_private_dir is not None:
            worker_private_dir.mkdir(parents=True, exist_ok=True)
            command = ["ip", "netns", "exec", ns, "unshare", "--mount", "--propagation", "private", "sh", "-c",
                       'mount -t tmpfs ssl-tune-node-local "$0" && exec "$@"', str(worker_private_dir), *command[4:]]
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=node_env)
        pids[name] = proc.pid
        (directory / f"ray-{name}.pid").write_text(str(proc.pid))
        if name == "head":
            _wait_for_nodes(prefix, first, port, 1, timeout, proc, full_env)
    _wait_for_nodes(prefix, first, port, 2, timeout, None, full_env)
    return {"address": f"{first}:{port}", "pids": pids, "env": cluster_env(directory)}


def cluster_env(directory: Path) -> dict[str, str]:
    """What the nodes and every driver of this cluster share: token authentication (Ray 2.60 turns it
    on at the head wherever ~/.ray/auth_token exists), with a token of this cluster's own."""
    token_file = directory / "auth_token"
    if not token_file.exists():
        directory.mkdir(parents=True, exist_ok=True)
        token_file.write_text(os.urandom(32).hex())
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token_file.read_text().strip(), "RAY_USAGE_STATS_ENABLED": "0"}


def _wait_for_nodes(prefix: str, head: str, port: int, count: int, timeout: float, proc, env: dict) -> None:
    """Wait until the cluster has `count` alive nodes (asked from inside the head's namespace)."""
    probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
             "print(sum(n['Alive'] for n in ray.nodes()))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"ray start exited ({proc.returncode})")
        out = subprocess.run(["ip", "netns", "exec", f"{prefix}-a", sys.executable, "-c", probe, f"{head}:{port}"],
                             capture_output=True, text=True, timeout=60, env=env)
        if out.returncode == 0 and out.stdout.strip().isdigit() and int(out.stdout.strip()) >= count:
            return
        time.sleep(1)
    raise RuntimeError(f"the Ray cluster did not reach {count} node(s) within {timeout:g} s")


def stop_node(directory: Path, name: str) -> None:
    """Stop one Ray node (its whole process group) by the PID recorded at start; SIGKILL, like a lost host."""
    with contextlib.suppress(OSError, ValueError):  # no such node, or it is gone already
        os.killpg(int((directory / f"ray-{name}.pid").read_text()), signal.SIGKILL)


def down(prefix: str, directory: Path | None = None) -> None:
    if directory is not None:
        for name in ("worker", "head"):
            stop_node(directory, name)
    for ns in (f"{prefix}-a", f"{prefix}-b"):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # takes its end of the veth pair along


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=["up", "ray", "down"])
    parser.add_argument("--prefix", default="sslt")
    parser.add_argument("--subnet", default="10.213.7", help="the first three octets of the private /24")
    parser.add_argument("--dir", type=Path, help="ray, down: where the nodes' PIDs and logs are")
    parser.add_argument("--cpus", type=float, default=1)
    args = parser.parse_args(argv)
    if args.action == "up":
        print(json.dumps(up(args.prefix, args.subnet)))
    elif args.action == "ray":
        print(json.dumps(start_ray(args.prefix, args.subnet, args.dir, args.cpus)))
    else:
        down(args.prefix, args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
