"""One engine over several processes (hosts): `jax.distributed`, a leader that schedules, followers that replay.

Every process runs the same SPMD programs over one mesh of all processes' devices, so every process must dispatch
the same device work in the same order. Process 0 (the leader) runs the whole engine: scheduling, sampling
parameters, outputs, HTTP. Before each piece of device work (a step, a sampler-state admit, a prompt scoring) it sends
what the followers need to dispatch the same program: the step's packed int32 input buffers and its buckets
(messages.FollowStep), over one TCP connection per follower. Followers hold no scheduler and no requests; they
dispatch, drop the results, and exit when the leader stops.

Why a socket and not a collective (a broadcast from process 0): a collective waits inside XLA, where a dead peer is
noticed late or never, and every idle moment would need a polling collective. A socket gives EOF the moment a peer's
process dies, costs one small frame per step, and heartbeats each way catch a peer that went silent. When a peer is
lost, the survivor's next dispatch raises a clear error (the engine fails the requests in flight with it) and a
watchdog ends the process a few seconds later in case it is stuck in a collective that will never complete.
"""

from __future__ import annotations

import atexit
import logging
import os
import queue
import socket
import sys
import threading
import time
from multiprocessing.connection import Connection

import jax
import numpy as np

from rtpjax.distributed import messages
from rtpjax.distributed.messages import FollowAdmit, FollowScore, FollowStep, Heartbeat, Hello, Stop

log = logging.getLogger("rtpjax")

CHANNEL_PORT_OFFSET = 1  # the step channel listens on the coordinator's port + 1
HEARTBEAT_S = 1.0
PEER_TIMEOUT_S = 20.0  # silence this long (no heartbeat, no step) means the peer is gone
CONNECT_TIMEOUT_S = 60.0  # after jax.distributed.initialize, by which every process has started
EXIT_GRACE_S = 3.0  # after a lost peer: time to fail the requests in flight before the watchdog ends the process
EXIT_LOST_PEER = 3  # the exit status of a process whose peer was lost


class PeerLost(RuntimeError):
    """Another process of the engine is gone; this one cannot run another step."""


def initialize(args) -> None:
    """jax.distributed for an engine of several processes; before anything touches a device. A no-op for one."""
    if args.num_processes == 1:
        return
    from jax._src import distributed

    if distributed.global_state.client is None:
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    if jax.process_count() != args.num_processes or jax.process_index() != args.process_id:
        raise RuntimeError(f"jax.distributed already runs as process {jax.process_index()} of {jax.process_count()}; "
                           f"the engine was asked for {args.process_id} of {args.num_processes}")  # fmt: skip


def check_mesh(mesh) -> None:
    """Every process must hold part of the mesh: one without devices in it would have nothing to run."""
    if jax.process_count() == 1:
        return
    holders = {d.process_index for d in mesh.devices.flat}
    if len(holders) < jax.process_count():
        raise ValueError(f"the mesh's {mesh.devices.size} devices lie on {len(holders)} of the {jax.process_count()} "
                         f"processes ({jax.device_count()} devices in all): make --tensor-parallel-size x "
                         "--expert-parallel-size cover every process's devices")  # fmt: skip


def local(x: jax.Array) -> jax.Array:
    """`x` as this process can read it: itself in one process; across processes, its copy on a local device (the
    step's outputs are replicated, so every process holds them whole)."""
    if x.is_fully_addressable:
        return x
    if not x.sharding.is_fully_replicated:
        raise ValueError(f"an output of sharding {x.sharding} is not whole on this process; replicate it first")
    return x.addressable_data(0)


def agree_min(n: int) -> int:
    """The smallest of every process's `n` (e.g. KV blocks sized by each host's free memory: the programs' shapes
    must be the same everywhere)."""
    if jax.process_count() == 1:
        return n
    from jax.experimental import multihost_utils

    return int(np.min(multihost_utils.process_allgather(np.int64(n))))


def _channel_address(args) -> tuple[str, int]:
    host, _, port = args.coordinator_address.rpartition(":")
    return host.strip("[]"), int(port) + CHANNEL_PORT_OFFSET


class _Peer:
    """One connection to another process: framed messages out (under a lock, heartbeats included), a reader thread
    in, and what happens when the other side goes quiet or away."""

    def __init__(self, sock: socket.socket, name: str, on_lost, inbox: queue.Queue | None = None):
        self.name, self._on_lost, self._inbox = name, on_lost, inbox
        self.conn = Connection(sock.detach())
        self._lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._read, name=f"rtpjax-{self.name}-reader", daemon=True).start()

    def send(self, data: bytes) -> None:
        with self._lock:
            self.conn.send_bytes(data)

    def _read(self) -> None:
        try:
            while self.conn.poll(PEER_TIMEOUT_S):
                message = messages.decode(self.conn.recv_bytes())
                if self._inbox is not None and not isinstance(message, Heartbeat):
                    self._inbox.put(message)
            reason = f"nothing from it for {PEER_TIMEOUT_S:.0f} s"
        except (EOFError, OSError) as e:
            reason = "its connection closed" if isinstance(e, EOFError) else f"its connection failed ({e})"
        except messages.ProtocolError as e:
            reason = str(e)
        self._on_lost(f"{self.name} is gone: {reason}")


class _Channel:
    """What leader and followers share: peers, heartbeats, and the lost-peer policy."""

    def __init__(self):
        self.peers: list[_Peer] = []
        self.lost: str | None = None
        self.closing = False
        self._beat = threading.Event()

    def _start_heartbeats(self) -> None:
        threading.Thread(target=self._heartbeats, name="rtpjax-heartbeat", daemon=True).start()

    def _heartbeats(self) -> None:
        beat = messages.encode(Heartbeat())
        while not self._beat.wait(HEARTBEAT_S):
            for peer in self.peers:
                try:
                    peer.send(beat)
                except OSError:
                    pass  # its reader reports it

    def _peer_lost(self, reason: str) -> None:
        if self.closing or self.lost is not None:
            return
        self.lost = reason
        log.error("%s; this process exits in %.0f s", reason, EXIT_GRACE_S)
        threading.Thread(target=_exit_after, args=(reason,), name="rtpjax-watchdog", daemon=True).start()

    def check(self) -> None:
        if self.lost is not None:
            raise PeerLost(self.lost)


def _exit_after(reason: str) -> None:
    """The watchdog: a process whose peer is gone may be blocked in a collective that never completes, and
    jax.distributed's shutdown at exit would wait for the lost peer too."""
    time.sleep(EXIT_GRACE_S)
    print(f"rtpjax: {reason}; exiting", file=sys.stderr, flush=True)
    logging.shutdown()
    os._exit(EXIT_LOST_PEER)


class Leader(_Channel):
    """Process 0's end: one connection per follower; `send` fans each piece of device work out to all of them."""

    def __init__(self, args):
        super().__init__()
        server = socket.create_server(_channel_address(args))
        server.settimeout(CONNECT_TIMEOUT_S)
        try:
            for _ in range(args.num_processes - 1):
                try:
                    sock, _ = server.accept()
                except socket.timeout:
                    raise PeerLost(f"{args.num_processes - 1 - len(self.peers)} follower(s) did not connect to "
                                   f"{_channel_address(args)} within {CONNECT_TIMEOUT_S:.0f} s") from None  # fmt: skip
                sock.settimeout(None)
                peer = _Peer(sock, "a follower", self._peer_lost)
                if not peer.conn.poll(CONNECT_TIMEOUT_S):
                    raise PeerLost(f"a follower connected to {_channel_address(args)} but said nothing")
                peer.name = f"follower process {messages.decode(peer.conn.recv_bytes(), Hello).process_id}"
                self.peers.append(peer)
        finally:
            server.close()
        for peer in self.peers:
            peer.start()
        self._start_heartbeats()
        atexit.register(self.close)  # before jax.distributed's own shutdown: followers stop first

    def send(self, message) -> None:
        """Raises PeerLost once a follower is gone (nothing is dispatched here either, so nothing waits for it)."""
        self.check()
        data = messages.encode(message)
        for peer in self.peers:
            try:
                peer.send(data)
            except OSError as e:
                self._peer_lost(f"{peer.name} is gone: sending failed ({e})")
                self.check()

    def close(self) -> None:
        """Tell the followers to exit (idempotent)."""
        if self.closing:
            return
        self.closing = True
        self._beat.set()
        for peer in self.peers:
            try:
                peer.send(messages.encode(Stop()))
            except OSError:
                pass


class Follower(_Channel):
    """A follower's end: the leader's messages arrive in `inbox`; `follow` dispatches them until Stop."""

    def __init__(self, args):
        super().__init__()
        address, deadline = _channel_address(args), time.monotonic() + CONNECT_TIMEOUT_S
        while True:
            try:
                sock = socket.create_connection(address, timeout=5.0)
                break
            except OSError as e:
                if time.monotonic() > deadline:
                    raise PeerLost(f"could not reach the leader's step channel at {address}: {e}") from None
                time.sleep(0.2)
        sock.settimeout(None)
        self.inbox: queue.Queue = queue.Queue()
        leader = _Peer(sock, "the leader (process 0)", self._leader_lost, self.inbox)
        leader.send(messages.encode(Hello(args.process_id)))
        leader.start()
        self.peers.append(leader)
        self._start_heartbeats()

    def _leader_lost(self, reason: str) -> None:
        self._peer_lost(reason)
        self.inbox.put(None)

    def follow(self, runner) -> None:
        """Dispatch the leader's device work until it stops; raises PeerLost if it disappears instead."""
        while True:
            message = self.inbox.get()
            if message is None:
                self.check()
            if isinstance(message, Stop):
                self.closing = True
                self._beat.set()
                return
            if isinstance(message, FollowStep):
                runner.replay_step(message)
            elif isinstance(message, FollowAdmit):
                runner.admit(message.rows, message.tokens, message.token_rows, message.is_output)
            elif isinstance(message, FollowScore):
                runner.score_prompt(message.prompt_ids, message.top_n)
            else:
                raise PeerLost(f"unexpected {type(message).__name__} from the leader")


def connect(args) -> Leader | Follower | None:
    """This process's end of the step channel (None for an engine of one process)."""
    if args.num_processes == 1:
        return None
    return Leader(args) if args.process_id == 0 else Follower(args)


def follow(engine) -> int:
    """A follower from its engine's start (its shards of the weights, the same compiled steps) to its end: replay the
    leader's device work until it stops. Returns the exit status; a lost leader ends the process at once."""
    args = engine.args
    log.info("process %d of %d: following the leader", args.process_id, args.num_processes)
    try:
        engine.channel.follow(engine.runner)
    except PeerLost as e:
        log.error("%s", e)
        logging.shutdown()
        os._exit(EXIT_LOST_PEER)  # not through jax.distributed's shutdown, which would wait for the lost leader
    jax.effects_barrier()
    log.info("the leader stopped; process %d exits", args.process_id)
    return 0
