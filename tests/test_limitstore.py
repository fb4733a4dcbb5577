"""The Redis limit store under concurrent callers: shared pipelines, each caller its own
answer, errors and cancellations contained. On the real Redis."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from limits.errors import StorageError
from redis.asyncio.client import Pipeline

from gate_middleware._limitstore import _MAX_BATCH, RedisStore
from gate_middleware._redisbatch import Batcher, Command

from .test_ratelimit import Proxy


class Pipelines:
    """Counts the pipelines redis-py sends, and how many commands each carried; can hold
    their replies back (`go`) once Redis has answered (`answered`)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sizes: list[int] = []
        self.answered = asyncio.Event()
        self.go = asyncio.Event()
        self.go.set()
        execute = Pipeline.execute

        async def counted(pipe: Pipeline, raise_on_error: bool = True) -> list[Any]:
            self.sizes.append(len(pipe.command_stack))
            replies = await execute(pipe, raise_on_error)
            self.answered.set()
            await self.go.wait()
            return replies

        monkeypatch.setattr(Pipeline, "execute", counted)


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    prefix = f"gate-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    with redis.Redis.from_url(redis_url) as client:
        keys = list(client.scan_iter(f"{prefix}:*"))
        if keys:
            client.delete(*keys)


async def open_store(uri: str, prefix: str) -> RedisStore:
    store = RedisStore(uri, key_prefix=prefix, timeout=2.0, lease=60.0)
    # Connections open and scripts loaded: what follows counts only its own pipelines.
    await asyncio.gather(*(store.apply([("warm", 60, 1)], take=("warm", 99)) for _ in range(20)))
    return store


async def test_concurrent_calls_share_pipelines_and_each_gets_its_own_answer(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_store(redis_url, prefix)
    pipelines = Pipelines(monkeypatch)
    try:
        calls = 100
        answers = await asyncio.gather(
            *(store.apply([("window", 60, 1)], take=("key", 10)) for _ in range(calls))
        )
        tokens = [token for token, _ in answers if token is not None]
        assert len(tokens) == len(set(tokens)) == 10
        assert await store.count("key") == 10
        # Every caller saw the counter as its own charge left it: 1 to 100, once each.
        assert sorted(totals[0] for _, totals in answers) == list(range(1, calls + 1))
        assert pipelines.sizes == [2 * calls]  # all arrived in one turn of the loop
    finally:
        await store.aclose()


async def test_a_shared_pipeline_never_grows_past_its_bound(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_store(redis_url, prefix)
    pipelines = Pipelines(monkeypatch)
    try:
        calls = 300  # three commands each
        counts = [("a", 60, 1), ("b", 60, 2)]
        answers = await asyncio.gather(
            *(store.apply(counts, take=("key", 1000)) for _ in range(calls))
        )
        assert all(token is not None for token, _ in answers)
        assert sorted(totals[1] for _, totals in answers) == list(range(2, 2 * calls + 1, 2))
        assert sum(pipelines.sizes) == 3 * calls
        assert max(pipelines.sizes) <= _MAX_BATCH
        assert len(pipelines.sizes) == math.ceil(3 * calls / (_MAX_BATCH - _MAX_BATCH % 3))
    finally:
        await store.aclose()


async def test_forgotten_scripts_are_loaded_and_only_what_did_not_run_runs_again(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_store(redis_url, prefix)
    taken, _ = await store.apply([], take=("key", 5))
    assert taken is not None
    with redis.Redis.from_url(redis_url) as admin:
        admin.script_flush()  # as a restarted Redis would have
    pipelines = Pipelines(monkeypatch)
    try:
        calls = 50
        freeing = store.apply([("window", 60, 1)], free=[("key", taken)])
        answers = await asyncio.gather(
            freeing, *(store.apply([("window", 60, 1)], take=("key", 5)) for _ in range(calls))
        )
        # The slot freed in the batch was free for the others: 5 of them got one.
        assert len([token for token, _ in answers if token is not None]) == 5
        assert sorted(totals[0] for _, totals in answers) == list(range(1, calls + 2))
        # One pipeline met NOSCRIPT; one more loaded the scripts and ran those again.
        assert pipelines.sizes == [1 + 2 * calls + 1, 2 + 2 * calls + 1]
    finally:
        await store.aclose()


async def test_a_cut_connection_fails_every_caller_of_the_pipeline(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    proxy = Proxy(redis_url)
    await proxy.start()
    store = await open_store(f"redis://127.0.0.1:{proxy.port}/0", prefix)
    try:
        await proxy.stop()
        pipelines = Pipelines(monkeypatch)
        answers = await asyncio.gather(
            *(store.apply([("window", 60, 1)], take=("key", 10)) for _ in range(20)),
            return_exceptions=True,
        )
        assert all(isinstance(answer, StorageError) for answer in answers), answers
        assert len(pipelines.sizes) == 1
        await proxy.start()
        token, totals = await store.apply([("window", 60, 1)], take=("key", 10))
        assert token is not None and totals[0] >= 1
    finally:
        await store.aclose()
        if proxy.server is not None and proxy.server.is_serving():
            await proxy.stop()


async def test_one_callers_failed_command_fails_it_alone_and_frees_its_slot(
    redis_url: str, prefix: str
) -> None:
    store = await open_store(redis_url, prefix)
    with redis.Redis.from_url(redis_url) as admin:
        admin.set(f"{prefix}:broken", "not a number")
    try:
        answers = await asyncio.gather(
            store.apply([("broken", 60, 1)], take=("key", 10)),
            *(store.apply([("window", 60, 1)], take=("key", 10)) for _ in range(9)),
            return_exceptions=True,
        )
        assert isinstance(answers[0], StorageError)
        rest = [answer for answer in answers[1:] if not isinstance(answer, BaseException)]
        assert len(rest) == 9 and all(token is not None for token, _ in rest)
        await store.apply([])  # after the give-back the failure queued
        assert await store.count("key") == 9
    finally:
        await store.aclose()


async def test_a_cancelled_caller_keeps_no_slot_and_breaks_nobody_elses_call(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await open_store(redis_url, prefix)
    pipelines = Pipelines(monkeypatch)
    pipelines.go.clear()
    try:
        calls = [
            asyncio.create_task(store.apply([("window", 60, 1)], take=("key", 100)))
            for _ in range(10)
        ]
        await pipelines.answered.wait()  # Redis ran them; the callers do not know yet
        # Queued behind the pipeline in flight, and cancelled before it leaves.
        late = asyncio.create_task(store.apply([("late", 60, 1)], take=("key", 100)))
        await asyncio.sleep(0)
        late.cancel()
        calls[4].cancel()
        pipelines.go.set()
        answers = await asyncio.gather(*calls, late, return_exceptions=True)
        assert isinstance(answers[4], asyncio.CancelledError)
        assert isinstance(answers[-1], asyncio.CancelledError)
        kept = [answer for answer in answers if not isinstance(answer, BaseException)]
        assert len(kept) == 9 and all(token is not None for token, _ in kept)
        assert sorted(totals[0] for _, totals in kept) == [1, 2, 3, 4, 6, 7, 8, 9, 10]
        await store.apply([])  # after the give-back the cancellation queued
        # The cancelled take that ran was given back; the one never sent did not run.
        assert await store.count("key") == 9
        with redis.Redis.from_url(redis_url) as admin:
            assert admin.get(f"{prefix}:late") is None
    finally:
        await store.aclose()


async def test_a_caller_cancelled_as_its_answer_arrives_hands_the_answer_on() -> None:
    """Answered, then cancelled before it resumed: the answer goes where an answer to
    a caller already gone goes, so what it took is given back all the same."""
    sent: list[list[Command]] = []

    async def send(commands: list[Command]) -> list[Any]:
        sent.append(commands)
        return [1] * len(commands)

    batcher = Batcher(send, max_commands=10)
    abandoned: list[list[Any]] = []
    call = asyncio.create_task(batcher.run([("TAKE",)], abandoned.append))
    other = asyncio.create_task(batcher.run([("OTHER",)]))
    await asyncio.sleep(0)  # both queued
    await asyncio.sleep(0)  # the one pipeline sent and answered; neither caller resumed
    assert sent == [[("TAKE",), ("OTHER",)]]
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert abandoned == [[1]]
    assert await other == [1]
    await batcher.aclose()


async def test_a_free_is_sent_even_when_its_caller_is_cancelled_before_it_leaves(
    redis_url: str, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request settling on Redis frees its slot; cancelled while that free still waits
    for the pipeline in flight, the free must leave all the same: else the key's slot
    stays taken until its lease ends (15 minutes by default)."""
    store = await open_store(redis_url, prefix)
    pipelines = Pipelines(monkeypatch)
    try:
        token, _ = await store.apply([], take=("key", 5))
        assert token is not None and await store.count("key") == 1
        pipelines.go.clear()
        blocker = asyncio.create_task(store.apply([("window", 60, 1)]))
        await pipelines.answered.wait()  # a pipeline in flight: the free must queue
        freeing = asyncio.create_task(store.apply([], free=[("key", token)]))
        await asyncio.sleep(0)
        freeing.cancel()
        pipelines.go.set()
        await blocker
        with pytest.raises(asyncio.CancelledError):
            await freeing
        await store.apply([])  # the next pipeline has gone
        assert await store.count("key") == 0
    finally:
        await store.aclose()
