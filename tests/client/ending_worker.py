"""A reconnecting `evochi.v1.Worker` in a process of its own, the way a worker CLI runs one:
exit 0 when `start()` returns, 1 with one `error:` line when it raises an EvochiError.

    python -m tests.client.ending_worker ADDRESS CORES [--give-up-after S] [--hold-last S]
        [--evaluate-seconds S]

It prints `> joined`, `> optimized <epoch>` after each optimize step (before `--hold-last`
seconds of sleep in the last epoch's), `> stop` from `on_stop`, and `> ` its final state as
JSON; its log goes to stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time

import evochi.v1 as evochi


class EndingWorker(evochi.Worker[dict]):
    def __init__(self, address: str, cores: int, args: argparse.Namespace) -> None:
        bound = {} if args.give_up_after is None else {"give_up_after": args.give_up_after}
        super().__init__(address, cores, reconnect=True, **bound)
        self.args = args

    def on_hello(self) -> None:
        print("> joined", flush=True)

    def initialize(self) -> dict:
        return {"epochs": 0}

    def evaluate(self, epoch: int, slices: list[slice]) -> list[evochi.Eval]:
        time.sleep(self.args.evaluate_seconds)
        return [evochi.Eval(s, [float(m) for m in range(s.start, s.stop)]) for s in slices]

    def optimize(self, epoch: int, rewards: list[float]) -> dict:
        print(f"> optimized {epoch}", flush=True)
        if epoch == self.max_epochs:
            time.sleep(self.args.hold_last)
        return {"epochs": self.state["epochs"] + 1}

    def on_stop(self, cancel: object) -> None:
        print("> stop", flush=True)


async def main(args: argparse.Namespace) -> int:
    worker = EndingWorker(args.address, args.cores, args)
    try:
        await worker.start()
    except evochi.EvochiError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        await worker.close()
    print(f"> {json.dumps(worker.state)}", flush=True)
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("cores", type=int)
    parser.add_argument("--give-up-after", type=float, default=None)
    parser.add_argument("--hold-last", type=float, default=0.0)
    parser.add_argument("--evaluate-seconds", type=float, default=0.0)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(main(parser.parse_args())))
