"""Hostile HTTP/2 peers against a live server, both transports side by side.

    python -m benchmarks.adversarial [--transports http2,grpcio] [--attacks rapid_reset,...]

For every (transport, attack): the server in its own process, 4 honest raw-stub workers
training (population 64) from this process, the attacker in a third process
(tests/server/adversary.py). Honest epochs/s are measured just before the attack (baseline),
during it and in the 5 s after it; prints one line per pair:

    adversarial transport=http2 attack=rapid_reset baseline_eps=... during_ratio=...
        after_ratio=... disconnects=0 server_rss_mb=...
"""

from __future__ import annotations

import argparse

from tests.server.adversary import ATTACKS, Fleet, ServerProcess, measure


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--transports", default="http2,grpcio")
    parser.add_argument("--attacks", default=",".join(ATTACKS))
    args = parser.parse_args()
    attacks = args.attacks.split(",")
    unknown = set(attacks) - set(ATTACKS)
    if unknown:
        parser.error(f"unknown attacks {sorted(unknown)}; known: {', '.join(ATTACKS)}")
    results = {}
    for transport in args.transports.split(","):
        server = ServerProcess(transport)
        fleet = Fleet(server.address)
        try:
            fleet.start()
            for attack in attacks:
                result = measure(server, fleet, attack)
                results[transport, attack] = result
                print(result.line(), flush=True)
                for error in result.errors[:3]:
                    print(f"  honest worker error: {error}", flush=True)
        finally:
            fleet.stop()
            server.stop()


if __name__ == "__main__":
    main()
