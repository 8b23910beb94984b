"""published_worker.py's worker, on the *published* evochi 0.1.4 client, as a straggler: at
the last epoch its evaluation lasts until the file named by the third argument exists (the
test creates it once the training has finished without this worker's result).

Run by tests/interop/test_clean_end.py in .venv-interop; prints the final state as JSON.
"""

import asyncio
import json
import os
import sys
import time

import grpc.aio as grpc
from published_worker import PublishedWorker  # this script's directory is on sys.path

import evochi.v1 as evochi


class Straggler(PublishedWorker):
    release_file = ""

    def evaluate(self, epoch: int, slices: list[slice]) -> list[evochi.Eval]:
        if epoch == self.max_epochs:
            # The published client runs hooks on its event loop: block it, as a slow
            # evaluation does.
            print("straggling", flush=True)
            while not os.path.exists(self.release_file):
                time.sleep(0.02)
        return super().evaluate(epoch, slices)


async def main(address: str, cores: int, release_file: str) -> None:
    worker = Straggler(grpc.insecure_channel(address), cores)
    worker.release_file = release_file
    await worker.start()  # raises on any error status: the test sees a non-zero exit
    print(json.dumps(worker.state), flush=True)
    await worker.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
