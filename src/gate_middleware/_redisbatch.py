"""Concurrent callers, shared Redis pipelines (auto-pipelining).

redis-py spends about 100 us of CPU on a round trip of one command and 130 to 190 us
on one of five (see `_limitstore`), so calls that arrive while a pipeline is in
flight, or in the same turn of the event loop, queue and leave together in the next
one: a burst costs a few round trips, not one per call. One pipeline is in flight at a
time, with at most `max_commands` commands (one call's commands are never split).
Each caller gets its own replies; an error of the pipeline as a whole (the connection,
a timeout) reaches every caller that was in it.

The pipeline runs in a task of its own, so a caller cancelled while it waits breaks
nothing for the others: if its call was not sent yet it is dropped (unless it must be
kept: it frees a slot others wait for), else its replies go to its `abandoned`
callback, to undo what its caller will never know was done.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["Abandoned", "Batcher", "Command"]

logger = logging.getLogger("gate_middleware.ratelimit")

Command = tuple[Any, ...]
# Sends commands in one pipeline: a reply per command, an exception object for one
# that failed; raises when the pipeline as a whole fails.
Send = Callable[[list[Command]], Awaitable[list[Any]]]
Abandoned = Callable[[list[Any]], None]


class _Call:
    __slots__ = ("abandoned", "commands", "future", "keep")

    def __init__(
        self,
        commands: list[Command],
        future: asyncio.Future[list[Any]] | None,
        abandoned: Abandoned | None,
        keep: bool = False,
    ) -> None:
        self.commands = commands
        self.future = future  # None: nobody waits for the replies
        self.abandoned = abandoned
        self.keep = keep  # sent even if its caller is gone (it frees what others wait on)


class Batcher:
    def __init__(self, send: Send, *, max_commands: int) -> None:
        self._send = send
        self._max = max_commands
        self._queue: deque[_Call] = deque()
        self._task: asyncio.Task[None] | None = None

    async def run(
        self, commands: list[Command], abandoned: Abandoned | None = None, *, keep: bool = False
    ) -> list[Any]:
        """The replies to `commands`, sent in the next pipeline with whatever else waits.
        `keep`: sent even if this caller is cancelled before they leave."""
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append(_Call(commands, future, abandoned, keep))
        self._start()
        try:
            return await future
        except asyncio.CancelledError:
            # Answered, but its caller was cancelled before it could take the answer.
            if abandoned and future.done() and not future.cancelled() and not future.exception():
                abandoned(future.result())
            raise

    def post(self, commands: list[Command]) -> None:
        """Send `commands` with the next pipeline; nobody waits for them."""
        self._queue.append(_Call(commands, None, None))
        self._start()

    async def aclose(self) -> None:
        """Wait until everything queued was sent."""
        while self._task is not None:
            await asyncio.shield(self._task)

    def _start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        try:
            while batch := self._next():
                await self._one(batch)
        finally:
            self._task = None

    def _next(self) -> list[_Call]:
        batch: list[_Call] = []
        size = 0
        while self._queue:
            call = self._queue[0]
            if call.future is not None and call.future.done() and not call.keep:
                self._queue.popleft()  # its caller was cancelled before it was sent
                continue
            if batch and size + len(call.commands) > self._max:
                break
            batch.append(self._queue.popleft())
            size += len(call.commands)
        return batch

    async def _one(self, batch: list[_Call]) -> None:
        commands = [command for call in batch for command in call.commands]
        try:
            replies = await self._send(commands)
        except Exception as exc:
            for call in batch:
                if call.future is not None and not call.future.done():
                    call.future.set_exception(exc)
                elif call.future is None:
                    logger.debug("Commands sent for nobody were lost: %s", exc)
            return
        except BaseException:  # this task cancelled: the loop is closing
            for call in batch:
                if call.future is not None:
                    call.future.cancel()
            raise
        start = 0
        for call in batch:
            mine = replies[start : start + len(call.commands)]
            start += len(call.commands)
            if call.future is None:
                continue
            if not call.future.done():
                call.future.set_result(mine)
            elif call.abandoned is not None:
                call.abandoned(mine)
