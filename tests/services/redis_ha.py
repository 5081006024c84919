"""redis_ha - a Redis Cluster and a Sentinel set of private redis-servers on loopback

SYNOPSIS
    RedisNode(workdir, name, extra_args=(), sentinel=False)
        .port .log_path .start() .stop() .kill() .running .client() -> redis.Redis

    RedisClusterSet(workdir, masters=3)
        .url                  "redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3/"
        .nodes: list[RedisNode]
        .start()              nodes up, `redis-cli --cluster create`, every node cluster_state:ok
        .client() -> redis.cluster.RedisCluster   sync, decode_responses=True
        .stop()               SIGTERM to each; AssertionError unless each exited 0
        .pick_ports()

    RedisSentinelSet(workdir, service="mymaster", sentinels=3, quorum=2)
        .url                  "redis+sentinel://127.0.0.1:S1,.../mymaster/0"
        .master, .replica: RedisNode (as started; roles change in a failover)
        .sentinels: list[RedisNode]
        .start()              master, replica in sync, sentinels that know both and each other
        .master_address() -> (host, port)   what the sentinels say now
        .client() -> redis.Redis            the current master, sync
        .kill_master() -> RedisNode         SIGKILL the current master (a crash)
        .wait_replicated(timeout=5)         WAIT until the replica has every write
        .stop()               SIGTERM to each (not the killed one); AssertionError unless 0
        .pick_ports()

DESCRIPTION
    Every server runs in the foreground with no persistence (no RDB, no
    AOF) in its own folder under workdir, on ports from services.ports,
    cluster bus ports included (cluster-port, not port + 10000, which could
    be anybody's). start() waits for each readiness with a deadline and
    raises with the log tail otherwise.

    The Sentinel set is the smallest that fails over by itself: one master,
    one replica, three sentinels with quorum 2 (a majority, so one sentinel
    alone never decides). down-after-milliseconds is 1000 and
    failover-timeout 5000: a dead master is replaced within a few seconds,
    where production settings would take 30 s or more.

    A node's exit status is checked at stop(): redis-server exits 0 on
    SIGTERM. A node killed with kill() is reaped and not checked again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import redis
import redis.cluster

from .ports import free_port
from .procs import run, spawn, stop_process
from .waiting import log_tail, wait_for_port, wait_until

HOST = "127.0.0.1"


class RedisNode:
    def __init__(self, workdir: Path, name: str, extra_args: tuple[str, ...] = (),
                 sentinel: bool = False) -> None:
        self.workdir = Path(workdir) / name
        self.name = name
        self.extra_args = tuple(extra_args)
        self.sentinel = sentinel
        self.log_path = self.workdir / "redis.log"
        self.killed = False
        self._proc = None
        self.pick_ports()

    def pick_ports(self) -> None:
        self.port = free_port(HOST)
        self.bus_port = free_port(HOST)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def client(self) -> redis.Redis:
        return redis.Redis(host=HOST, port=self.port, decode_responses=True, socket_timeout=5)

    def ask(self, *command: str):
        """One command on a fresh connection, closed after."""
        with self.client() as client:
            return client.execute_command(*command)

    def start(self, timeout: float = 10.0) -> None:
        if self.workdir.exists():
            shutil.rmtree(self.workdir)  # a cluster node must start with no nodes.conf
        self.workdir.mkdir(parents=True)
        common = ["--port", str(self.port), "--bind", HOST, "--dir", str(self.workdir),
                  "--daemonize", "no", "--protected-mode", "no", "--logfile", ""]
        if self.sentinel:
            conf = self.workdir / "sentinel.conf"
            conf.write_text("\n".join(self.extra_args) + "\n")
            argv = ["redis-server", str(conf), "--sentinel", *common]
        else:
            # shutdown-timeout 0: a master with a replica (after a failover, the former
            # replica) otherwise waits up to 10 s on SIGTERM for its replica to catch up
            argv = ["redis-server", *common, "--save", "", "--appendonly", "no",
                    "--shutdown-timeout", "0", *self.extra_args]
        self.killed = False
        self._proc = spawn(argv, self.log_path, cwd=self.workdir)
        wait_for_port(HOST, self.port, timeout, proc=self._proc, log=self.log_path)
        proc = self._proc
        try:
            wait_until(lambda: proc.poll() is not None or self.ask("PING"), timeout,
                       f"{self.name} PING on port {self.port}")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{log_tail(self.log_path)}") from None
        if proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited with status {proc.returncode}; log tail:\n"
                               f"{log_tail(self.log_path)}")

    def kill(self) -> None:
        """SIGKILL: a crash, not a shutdown."""
        assert self._proc is not None
        self._proc.kill()
        self._proc.wait(5)
        self.killed = True
        stop_process(self._proc)  # reaped; forgets it
        self._proc = None

    def stop(self) -> int | None:
        """Stop; the exit status (None if it was not running)."""
        if self._proc is None:
            return None
        proc, self._proc = self._proc, None
        stop_process(proc)
        return proc.returncode


def _stop_all(nodes: list[RedisNode]) -> None:
    statuses = {node.name: node.stop() for node in nodes}
    bad = {name: status for name, status in statuses.items() if status not in (None, 0)}
    assert not bad, f"redis-servers exited with {bad}"


class RedisClusterSet:
    def __init__(self, workdir: Path, masters: int = 3) -> None:
        self.workdir = Path(workdir)
        self.nodes = [RedisNode(self.workdir, f"node{i}") for i in range(masters)]
        self.log_path = self.nodes[0].log_path
        self._set_url()

    def _set_url(self) -> None:
        for node in self.nodes:
            node.extra_args = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                               "--cluster-node-timeout", "2000",
                               "--cluster-port", str(node.bus_port))
        self.url = "redis+cluster://" + ",".join(f"{HOST}:{n.port}" for n in self.nodes) + "/"

    def pick_ports(self) -> None:
        for node in self.nodes:
            node.pick_ports()
        self._set_url()

    def start(self, timeout: float = 30.0) -> None:
        for node in self.nodes:
            node.start()
        run(["redis-cli", "--cluster", "create", *(f"{HOST}:{n.port}" for n in self.nodes),
             "--cluster-replicas", "0", "--cluster-yes"], timeout=timeout,
            what="redis-cli --cluster create")
        for node in self.nodes:
            wait_until(lambda node=node: "cluster_state:ok" in node.ask("CLUSTER", "INFO"),
                       timeout, f"cluster_state:ok on {node.name}")

    def client(self) -> redis.cluster.RedisCluster:
        return redis.cluster.RedisCluster(
            startup_nodes=[redis.cluster.ClusterNode(HOST, n.port) for n in self.nodes],
            decode_responses=True, socket_timeout=5)

    def stop(self) -> None:
        _stop_all(self.nodes)


class RedisSentinelSet:
    def __init__(self, workdir: Path, service: str = "mymaster", sentinels: int = 3,
                 quorum: int = 2) -> None:
        self.workdir = Path(workdir)
        self.service = service
        self.quorum = quorum
        self.master = RedisNode(self.workdir, "master")
        self.replica = RedisNode(self.workdir, "replica")
        self.sentinels = [RedisNode(self.workdir, f"sentinel{i}", sentinel=True)
                          for i in range(sentinels)]
        self.log_path = self.master.log_path
        self._set_url()

    @property
    def nodes(self) -> list[RedisNode]:
        return [self.master, self.replica, *self.sentinels]

    def _set_url(self) -> None:
        self.replica.extra_args = ("--replicaof", HOST, str(self.master.port))
        for sentinel in self.sentinels:
            sentinel.extra_args = (
                f"sentinel monitor {self.service} {HOST} {self.master.port} {self.quorum}",
                f"sentinel down-after-milliseconds {self.service} 1000",
                f"sentinel failover-timeout {self.service} 5000",
                f"sentinel parallel-syncs {self.service} 1",
            )
        self.url = ("redis+sentinel://" + ",".join(f"{HOST}:{s.port}" for s in self.sentinels)
                    + f"/{self.service}/0")

    def pick_ports(self) -> None:
        for node in self.nodes:
            node.pick_ports()
        self._set_url()

    def start(self, timeout: float = 30.0) -> None:
        self.master.start()
        self.replica.start()
        wait_until(lambda: self.replica.ask("INFO", "replication").get("master_link_status")
                   == "up",
                   timeout, "the replica in sync with the master")
        for sentinel in self.sentinels:
            sentinel.start()
        others = len(self.sentinels) - 1

        def knows_all(sentinel: RedisNode) -> bool:
            with sentinel.client() as client:
                state = client.sentinel_master(self.service)
            return state["num-slaves"] == 1 and state["num-other-sentinels"] == others

        for sentinel in self.sentinels:
            wait_until(lambda s=sentinel: knows_all(s), timeout,
                       f"{sentinel.name} to know the replica and {others} other sentinels")

    def master_address(self) -> tuple[str, int]:
        for sentinel in self.sentinels:
            if sentinel.running:
                with sentinel.client() as client:
                    host, port = client.sentinel_get_master_addr_by_name(self.service)
                return host, int(port)
        raise RuntimeError("no sentinel running")

    def _node_on(self, port: int) -> RedisNode:
        return next(n for n in (self.master, self.replica) if n.port == port)

    def client(self) -> redis.Redis:
        return self._node_on(self.master_address()[1]).client()

    def wait_replicated(self, timeout: float = 5.0) -> None:
        client = self.client()
        try:
            assert client.wait(1, int(timeout * 1000)) >= 1, "the replica did not catch up"
        finally:
            client.close()

    def kill_master(self) -> RedisNode:
        node = self._node_on(self.master_address()[1])
        node.kill()
        return node

    def stop(self) -> None:
        _stop_all([*self.sentinels, self.replica, self.master])
