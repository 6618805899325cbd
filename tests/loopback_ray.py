"""A multi-node Ray cluster on this machine's loopback for tests: a head and nodes started and
stopped by PID (never `ray stop`, which would stop every Ray on the machine), each with its own
ports, all in a private temp folder, token authentication on. The same recipe as
cluster/local/two_nodes.sh, as a Python object a test can grow (nodes joining late) and shrink
(a node killed)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent

NODE_PY = '''
import signal, sys, time
import ray._private.node, ray._private.parameter
gcs, temp_dir, cpus, agent, agent_grpc, metrics, runtime = sys.argv[1:8]
params = ray._private.parameter.RayParams(
    gcs_address=gcs, node_ip_address="127.0.0.1", num_cpus=int(cpus), num_gpus=0,
    object_store_memory=100_000_000, temp_dir=temp_dir, include_log_monitor=False, node_manager_port=0,
    dashboard_agent_listen_port=int(agent), metrics_agent_port=int(agent_grpc), metrics_export_port=int(metrics),
    runtime_env_agent_port=int(runtime), min_worker_port=0, max_worker_port=0)
node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
print("node up", node.node_id, flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    time.sleep(3600)
'''


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            children = []
        out += [int(c) for c in children]
        todo += [int(c) for c in children]
    return out


class LoopbackRayCluster:
    def __init__(self, head_cpus: int = 0):
        self.tmp = Path(tempfile.mkdtemp(prefix="segpipe-rc-", dir="/tmp"))  # short: Ray's socket paths
        self.env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_TMPDIR": str(self.tmp),
                    "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0",
                    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"}
        self.env.pop("RAY_ADDRESS", None)
        self.procs: dict[str, subprocess.Popen] = {}
        gcs, client, agent, grpc, metrics, runtime = free_ports(6)
        self.address = f"127.0.0.1:{gcs}"
        self._start("head", [str(BIN / "ray"), "start", "--head", "--block", f"--port={gcs}",
                             "--node-ip-address=127.0.0.1", "--include-dashboard=false",
                             f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
                             f"--dashboard-agent-grpc-port={grpc}", f"--metrics-export-port={metrics}",
                             f"--runtime-env-agent-port={runtime}", f"--temp-dir={self.tmp / 'ray'}",
                             f"--num-cpus={head_cpus}", "--num-gpus=0", "--object-store-memory=100000000",
                             "--disable-usage-stats"])
        self._wait_log("head", "Ray runtime started", 180)

    def _start(self, name: str, cmd: list[str]) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "w")
        proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp,
                                start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def _wait_log(self, name: str, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.log(name):
            if self.procs[name].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Ray {name} did not start:\n{self.log(name)[-3000:]}")
            time.sleep(0.5)

    def add_node(self, name: str, cpus: int) -> str:
        """Start a worker node with `cpus` CPUs; returns its node id once it is up."""
        agent, grpc, metrics, runtime = free_ports(4)
        self._start(name, [sys.executable, "-c", NODE_PY, self.address, str(self.tmp / "ray"), str(cpus),
                           str(agent), str(grpc), str(metrics), str(runtime)])
        self._wait_log(name, "node up", 180)
        return self.log(name).split("node up", 1)[1].split()[0]

    def kill_node(self, name: str) -> None:
        """SIGKILL a node and every process it started (its raylet, its workers): a machine lost."""
        proc = self.procs[name]
        for pid in [*descendants(proc.pid), proc.pid]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait(timeout=30)

    def stop(self) -> None:
        """Stop what was started here, by PID: SIGTERM to each session, then SIGKILL what is left."""
        trees = {name: [p.pid, *descendants(p.pid)] for name, p in self.procs.items()}
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 20
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for pids in trees.values():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> LoopbackRayCluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
