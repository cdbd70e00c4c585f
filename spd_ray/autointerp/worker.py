"""The Ray Data worker of an autointerp run: an async callable that holds one `LLMClient` and
runs a batch of tasks (tasks.py) with at most `concurrency` requests in flight, each result tagged
with the worker process that made it."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from spd_ray.autointerp.client import LLMClient, LLMSettings
from spd_ray.autointerp.tasks import TASK, LabelTask, Result, ScoreTask, run_task


@dataclass(frozen=True)
class WorkerPlace:
    """Where one worker process runs (`actor`: its Ray actor id); a restarted actor is a new
    process, so it has a new place."""

    actor: str
    node_id: str
    hostname: str
    node_ip: str
    pid: int


class LLMWorker:
    """Ray Data async callable: a batch of tasks -> a batch of results, at most `concurrency`
    requests in flight in this actor (Ray Data may run several batches of one actor at once; the
    semaphore is shared by all of them)."""

    def __init__(self, llm: LLMSettings, limiter_name: str | None, concurrency: int):
        self.llm = llm
        self.limiter_name = limiter_name
        self.concurrency = concurrency
        self._client: LLMClient | None = None
        self._sem: asyncio.Semaphore | None = None
        self._limiter: Any = None
        self._where = ""

    def _setup(self) -> tuple[LLMClient, asyncio.Semaphore]:
        if self._client is None:
            import ray

            from spd_ray.autointerp.limits import RayLimiter
            from spd_ray.ray_session import here

            actor = ray.get_runtime_context().get_actor_id()
            self._where = json.dumps({"actor": actor, **here()})
            if self.limiter_name is not None:
                self._limiter = RayLimiter(ray.get_actor(self.limiter_name), self.limiter_name)
            self._client = LLMClient(self.llm, self._limiter)
            self._sem = asyncio.Semaphore(self.concurrency)
        assert self._sem is not None
        return self._client, self._sem

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        client, sem = self._setup()
        tasks = [TASK.validate_json(t) for t in batch["task"]]

        async def one(task: LabelTask | ScoreTask) -> Result:
            async with sem:
                return await run_task(client, task)

        results = await asyncio.gather(*(one(t) for t in tasks))
        return {
            "result": np.array([r.model_dump_json() for r in results], dtype=object),
            "worker": np.array([self._where] * len(results), dtype=object),
        }
