"""A worker process for the chaos test: ``python -m tests.server.chaos_worker ADDRESS CORES``."""

from __future__ import annotations

import asyncio
import sys

from tests.server.workers import HistoryWorker


async def main(address: str, cores: int) -> None:
    worker = HistoryWorker(address, cores)
    worker.loop = asyncio.get_running_loop()
    worker.evaluate_delay = 0.05  # so that kills land mid-task too
    worker.optimize_delay = 0.01
    await worker.start()
    await worker.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
