"""One error root: every exception of evochi and evochi_torch is an ``EvochiError``, the
built-in bases callers catch stay, one ``StateDecodeError``, and the server's core imports
no gRPC."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import subprocess
import sys

import pytest

from evochi.errors import EvochiError

PACKAGES = ("evochi", "evochi_torch")
# A module-private class (leading underscore) is a signal caught inside its own module
# (http2's frame and call errors) that never reaches a caller, so it is not counted.


def _exception_classes() -> list[type[BaseException]]:
    found = []
    for package in PACKAGES:
        root = importlib.import_module(package)
        names = [package] + [m.name for m in pkgutil.walk_packages(root.__path__, package + ".")]
        for name in names:
            module = importlib.import_module(name)
            for attr, value in vars(module).items():
                if (
                    inspect.isclass(value)
                    and issubclass(value, BaseException)
                    and value.__module__ == module.__name__
                    and not attr.startswith("_")
                ):
                    found.append(value)
    return found


def _params():
    for cls in _exception_classes():
        name = f"{cls.__module__}.{cls.__qualname__}"
        yield pytest.param(cls, id=name)


def test_the_walk_finds_the_errors_of_every_layer():
    names = {cls.__name__ for cls in _exception_classes()}
    assert {"ConfigError", "CoreError", "CheckpointError", "StreamBrokenError"} <= names
    assert {"Terminated", "RayMissingError", "NoiseMismatchError"} <= names


@pytest.mark.parametrize("cls", list(_params()))
def test_every_exception_is_an_evochi_error(cls):
    assert issubclass(cls, EvochiError)


def test_the_built_in_bases_stay():
    from evochi.server import CheckpointError, ConfigError
    from evochi.server.core import CoreError
    from evochi.v1 import ServerUnavailableError
    from evochi_torch.launch import Terminated
    from evochi_torch.ray import RayMissingError

    assert issubclass(ConfigError, ValueError)
    assert issubclass(CheckpointError, RuntimeError)
    assert issubclass(RayMissingError, ImportError)
    assert issubclass(ServerUnavailableError, ConnectionError)
    # Not a BaseException: an ``except Exception`` around the launcher still sees it.
    assert issubclass(Terminated, Exception)
    assert issubclass(CoreError, EvochiError)


def test_one_evochi_error_class():
    import evochi.v1
    import evochi.v1.errors

    assert evochi.v1.EvochiError is EvochiError
    assert evochi.v1.errors.EvochiError is EvochiError


def test_one_state_decode_error():
    import evochi.v1
    import evochi_torch
    from evochi_torch import StateDecodeError
    from evochi_torch.codec import decode_state

    assert StateDecodeError is evochi.v1.StateDecodeError
    assert evochi_torch.codec.StateDecodeError is evochi.v1.StateDecodeError
    with pytest.raises(evochi.v1.StateDecodeError):
        decode_state(b"not a state")


def test_the_protocol_rules_keep_their_client_names():
    import evochi.protocol
    import evochi.v1.metrics

    assert evochi.v1.metrics.MAX_METRICS is evochi.protocol.MAX_METRICS
    assert evochi.v1.metrics.metric_name_error is evochi.protocol.metric_name_error


def _modules_loaded_by(code: str) -> set[str]:
    script = code + "\nimport sys\nprint('\\n'.join(sorted(sys.modules)))\n"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    return set(out.stdout.split())


def test_the_protocol_rules_import_no_grpc():
    loaded = _modules_loaded_by("import evochi.errors, evochi.protocol")
    assert not {m for m in loaded if m == "grpc" or m.startswith("grpc.")}


def test_the_server_core_imports_no_grpc():
    loaded = _modules_loaded_by(
        "import evochi.server.core, evochi.server.config, evochi.server.store"
    )
    assert "evochi.server.core" in loaded
    assert not {m for m in loaded if m == "grpc" or m.startswith("grpc.")}
