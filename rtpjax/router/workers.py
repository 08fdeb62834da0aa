"""The replicas behind a router: health, load and KV events, each followed by a task of its own.

Nothing here knows what a replica is for, so a prefill/decode router keeps one WorkerPool per role. A replica is out
as soon as a request to it fails to connect or `GET /load` (polled every `interval_s`) fails, or when `misses_to_out`
polls in a row take longer than `timeout_s`: a dead process refuses at once, a hung one is out within
misses_to_out x (interval + timeout), and a busy one whose answer was late once keeps its streams. Its watchers (the
requests and relays waiting on it, `Worker.watch`) are then called to end them; it is back with its first good
answer, and a new engine start (another `kv_events_instance`) makes the index forget what it knew of the old one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time

import aiohttp
import msgspec

from rtpjax.distributed.messages import KVEventsPage
from rtpjax.router.cost import CostModel
from rtpjax.router.index import PrefixIndex

log = logging.getLogger("rtpjax.router")


@dataclasses.dataclass(eq=False)
class Worker:
    url: str
    healthy: bool = False  # out until its first good answer
    watchers: set = dataclasses.field(default_factory=set)  # callbacks for when it goes out
    load: dict = dataclasses.field(default_factory=dict)  # the last GET /load
    cost: CostModel = dataclasses.field(default_factory=CostModel)
    inflight: int = 0  # requests the router has open on it
    fresh_requests: int = 0  # routed here since `load` was read (not in its numbers yet)
    fresh_tokens: int = 0  # their uncached prompt tokens
    reports: int = 0  # load reports read
    reported_at: float = 0.0  # when the last was read (time.monotonic())
    instance: str | None = None  # the engine start its KV events come from
    cursor: int = 0  # the next KV event batch to read
    events: bool = True  # False once it said it publishes none
    misses: int = 0  # load polls in a row that got no answer in time

    def watch(self, callback) -> None:
        """Call `callback()` if this worker is marked out before `unwatch(callback)`."""
        self.watchers.add(callback)

    def unwatch(self, callback) -> None:
        self.watchers.discard(callback)

    def outstanding(self) -> int:
        """Requests it holds or is about to: what it reported, plus what was sent since."""
        return max(self.load.get("num_unfinished", 0), 0) + self.fresh_requests

    def queued_tokens(self, cost: CostModel | None = None) -> float:
        """Prompt tokens queued ahead of a new request now: those it reported, less what its measured steps have
        run through since the report, plus what was sent since."""
        waiting, budget = self.load.get("waiting_prompt_tokens", 0), self.load.get("max_num_batched_tokens", 0)
        if waiting and budget:
            steps = (time.monotonic() - self.reported_at) / max((cost or self.cost).step_time(budget), 1e-6)
            waiting = max(0.0, waiting - steps * budget)
        return waiting + self.fresh_tokens

    def begin(self, uncached_tokens: int):
        """Count a request sent to it; returns what `end` takes back when it is over."""
        self.inflight += 1
        self.fresh_requests += 1
        self.fresh_tokens += uncached_tokens
        reports = self.reports
        return lambda: self._end(reports, uncached_tokens)

    def _end(self, reports: int, uncached_tokens: int) -> None:
        self.inflight -= 1
        if reports == self.reports:  # no load report since it began: it is still in the fresh counts
            self.fresh_requests -= 1
            self.fresh_tokens -= uncached_tokens

    def reported(self, load: dict) -> None:
        self.load, self.fresh_requests, self.fresh_tokens = load, 0, 0
        self.reports += 1
        self.reported_at = time.monotonic()
        self.cost.observe(load.get("total_steps", 0), load.get("total_tokens", 0), load.get("total_busy_s", 0.0))


class WorkerPool:
    def __init__(self, urls: list[str], session: aiohttp.ClientSession | None, index: PrefixIndex | None = None,
                 interval_s: float = 0.5, timeout_s: float = 1.0, events_interval_s: float = 0.1,
                 on_change=None, misses_to_out: int = 2):  # fmt: skip
        if not urls:
            raise ValueError("--worker-urls needs at least one URL")
        self.workers = [Worker(u.rstrip("/")) for u in urls]
        self.session, self.index = session, index
        self.interval_s, self.timeout_s, self.events_interval_s = interval_s, timeout_s, events_interval_s
        self.misses_to_out = misses_to_out
        self.on_change = on_change or (lambda worker: None)  # called when a worker goes up or down
        self._tasks: list[asyncio.Task] = []

    def healthy(self) -> list[Worker]:
        return [w for w in self.workers if w.healthy]

    def start(self) -> None:
        for w in self.workers:
            self._tasks.append(asyncio.create_task(self._watch(w)))
            if self.index is not None:
                self._tasks.append(asyncio.create_task(self._follow(w)))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def mark_down(self, w: Worker, why: str) -> None:
        if w.healthy:
            log.warning("replica %s is out: %s", w.url, why)
            w.healthy = False
            for callback in list(w.watchers):
                callback()
            self.on_change(w)

    def _mark_up(self, w: Worker) -> None:
        if not w.healthy:
            log.info("replica %s is in", w.url)
            w.healthy = True
            self.on_change(w)

    async def _watch(self, w: Worker) -> None:
        while True:
            try:
                load = json.loads(await self._get(w.url + "/load"))
            except TimeoutError:
                w.misses += 1
                if w.misses >= self.misses_to_out:
                    self.mark_down(w, f"no answer to GET /load within {self.timeout_s:g} s, {w.misses} times in a row")
            except (aiohttp.ClientError, ValueError) as e:
                self.mark_down(w, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)
            else:
                w.misses = 0
                w.reported(load)
                self._mark_up(w)
            await asyncio.sleep(self.interval_s)

    async def _get(self, url: str, absent_ok: bool = False) -> bytes | None:
        """GET `url`'s body within `timeout_s`; None for a 404 where `absent_ok`, else an error for any status
        but 200."""
        async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=self.timeout_s)) as r:
            if r.status == 404 and absent_ok:
                return None
            if r.status != 200:
                raise aiohttp.ClientResponseError(r.request_info, r.history, status=r.status,
                                                  message=f"GET {r.url.path} answered {r.status}")  # fmt: skip
            return await r.read()

    async def _follow(self, w: Worker) -> None:
        """Reads the replica's KV events into the index (GET /kv_events?since=cursor)."""
        while w.events:
            if w.healthy:
                try:
                    await self._read_events(w)
                except (aiohttp.ClientError, TimeoutError, msgspec.ValidationError, msgspec.DecodeError) as e:
                    log.debug("KV events of %s: %s", w.url, e)
            await asyncio.sleep(self.events_interval_s)

    async def _read_events(self, w: Worker) -> None:
        body = await self._get(f"{w.url}/kv_events?since={w.cursor}", absent_ok=True)
        if body is None:
            log.warning("replica %s publishes no KV events: cache_aware routes to it on load alone", w.url)
            w.events = False
            return
        page = msgspec.json.decode(body, type=KVEventsPage)
        if page.instance != w.instance or w.cursor < page.oldest:  # a new engine, or events it no longer has
            self.index.forget(w.url, tentative=page.instance != w.instance)
            if page.instance != w.instance and w.cursor:
                w.instance, w.cursor = page.instance, 0
                return  # read the new engine's events from its first
            w.instance = page.instance
        for _, batch in page.batches:
            self.index.apply(w.url, batch.events)
        w.cursor = page.next
