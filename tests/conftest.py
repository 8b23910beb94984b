import os
import socket

import pytest

# Ray (tests/e2e/test_ray.py) would otherwise report usage statistics to its maintainers'
# servers: tests talk to loopback only. Set before any test starts Ray or a subprocess.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture
def unused_port() -> int:
    """A loopback port nothing listens on (bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
