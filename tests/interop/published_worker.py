"""A worker written against the *published* evochi 0.1.4 client, exactly as its README
shows (run by tests/interop/test_published_client.py under Python >= 3.12 in a separate
virtualenv that has that client installed, never imported by the test suite itself).

Rewards are a known function of (epoch, member); the state counts epochs and sums every
reward vector, so the test can check that each member was evaluated and counted once.
Prints the final state as JSON on stdout.
"""

import asyncio
import json
import sys

import grpc.aio as grpc

import evochi.v1 as evochi


def reward_of(epoch: int, member: int) -> float:
    return float((epoch * 7 + member * 3) % 11)  # small integers: exact in float32


class PublishedWorker(evochi.Worker[dict]):
    def initialize(self) -> dict:
        return {"epochs": 0, "total": 0.0, "evaluated": 0}

    def evaluate(self, epoch: int, slices: list[slice]) -> list[evochi.Eval]:
        rewards = [reward_of(epoch, m) for s in slices for m in range(s.start, s.stop)]
        return evochi.Eval.from_flat(slices, rewards)

    def optimize(self, epoch: int, rewards: list[float]) -> dict:
        state = self.state
        return {
            "epochs": state["epochs"] + 1,
            "total": state["total"] + sum(rewards),
            "evaluated": state["evaluated"] + len(rewards),
        }


async def main(address: str, cores: int) -> None:
    worker = PublishedWorker(grpc.insecure_channel(address), cores)
    await worker.start()
    print(json.dumps(worker.state), flush=True)
    await worker.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
