"""The engine's KV cache events in the front end's process: numbered, kept for replay, and published.

The engine process sends each step's events with its outputs (StepOutputs.kv_events); the front end numbers them as
one batch per step and keeps the last `buffer_steps` batches, which `GET /kv_events?since=SEQ` reads. With an endpoint
they also go out as vLLM's ZMQ stream: a PUB socket sending (topic, sequence number as 8 big-endian bytes, msgpack
KVEventBatch) frames, and an optional ROUTER socket that answers a sequence number with every buffered batch from
there on, then (-1, b""). A thread of its own does the ZMQ work, so the engine's reader never waits on a subscriber.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
import uuid

import msgspec

from rtpjax.distributed.messages import KVEvent, KVEventBatch, KVEventsPage

log = logging.getLogger("rtpjax")
END_SEQ = (-1).to_bytes(8, "big", signed=True)


class KVEventLog:
    def __init__(self, buffer_steps: int = 10_000, endpoint: str | None = None, replay_endpoint: str | None = None,
                 topic: str = "", data_parallel_rank: int | None = None):  # fmt: skip
        self.instance = uuid.uuid4().hex  # this engine start: its numbers are not another's
        self.rank = data_parallel_rank
        self._batches: collections.deque[tuple[int, KVEventBatch]] = collections.deque(maxlen=buffer_steps)
        self._next = 0
        self._lock = threading.Lock()
        self._outbox: queue.Queue | None = None
        if endpoint is not None or replay_endpoint is not None:
            self._outbox = queue.Queue()
            zmq_ready = threading.Event()
            self._thread = threading.Thread(target=self._zmq_loop, args=(endpoint, replay_endpoint, topic.encode(),
                                            buffer_steps, zmq_ready), name="rtpjax-kv-events", daemon=True)  # fmt: skip
            self._thread.start()
            zmq_ready.wait(10)
            if self._error is not None:
                raise ValueError(f"cannot open the KV events endpoint: {self._error}")

    def publish(self, events: list[KVEvent]) -> None:
        batch = KVEventBatch(time.time(), events, self.rank)
        with self._lock:
            seq, self._next = self._next, self._next + 1
            self._batches.append((seq, batch))
        if self._outbox is not None:
            self._outbox.put((seq, batch))

    def page(self, since: int) -> KVEventsPage:
        with self._lock:
            oldest = self._batches[0][0] if self._batches else self._next
            batches = [b for b in self._batches if b[0] >= since] if since < self._next else []
            return KVEventsPage(self.instance, oldest, self._next, batches)

    def close(self) -> None:
        if self._outbox is not None:
            self._outbox.put(None)
            self._thread.join(timeout=5)

    # -- ZMQ --------------------------------------------------------------------------------------------------------

    _error: str | None = None

    def _zmq_loop(self, endpoint, replay_endpoint, topic: bytes, buffer_steps: int, ready: threading.Event) -> None:
        import zmq

        ctx = zmq.Context.instance()
        pub = replay = None
        try:
            if endpoint is not None:
                pub = ctx.socket(zmq.PUB)
                # vLLM's convention: bind a wildcard (or ipc/inproc) address, connect to a named one.
                (pub.bind if "*" in endpoint or "://" in endpoint and endpoint.split("://")[0] in ("ipc", "inproc")
                 else pub.connect)(endpoint)  # fmt: skip
            if replay_endpoint is not None:
                replay = ctx.socket(zmq.ROUTER)
                replay.bind(replay_endpoint)
        except zmq.ZMQError as e:
            self._error = str(e)
            ready.set()
            return
        ready.set()
        encoder = msgspec.msgpack.Encoder()
        sent: collections.deque[tuple[int, bytes]] = collections.deque(maxlen=buffer_steps)
        try:
            while True:
                if replay is not None and replay.poll(0):
                    self._replay(replay, sent)
                if pub is not None:
                    # libzmq reads a subscriber's subscription only when the socket is used: without this, the
                    # batches of a burst right after a subscriber joins would all go to nobody.
                    pub.getsockopt(zmq.EVENTS)
                try:
                    item = self._outbox.get(timeout=0.05)
                except queue.Empty:
                    continue
                if item is None:
                    return
                seq, batch = item
                payload = encoder.encode(batch)
                sent.append((seq, payload))
                if pub is not None:
                    pub.send_multipart((topic, seq.to_bytes(8, "big"), payload))
        finally:
            for sock in (pub, replay):
                if sock is not None:
                    sock.close(linger=0)

    @staticmethod
    def _replay(sock, sent) -> None:
        frames = sock.recv_multipart()
        if len(frames) != 3:
            log.warning("KV events: ignored a replay request of %d frames (expected identity, empty, sequence)",
                        len(frames))  # fmt: skip
            return
        client, _, start = frames
        first = int.from_bytes(start, "big", signed=True)
        for seq, payload in list(sent):
            if seq >= first:
                sock.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
        sock.send_multipart((client, b"", END_SEQ, b""))
