"""The metrics extension under Go's protobuf runtime, the one the reference Go server is
built on: a result carrying ``Evaluation.metrics``, parsed with the pre-extension schema,
keeps every published field and sets the metrics aside as unknown fields.

The reference server itself is not available here; this runs Go's proto3 parser with that
server's schema (evochi.proto before the extension, from git history) on the bytes our
client sends. Needs ``go`` and google.golang.org/protobuf in a GOPATH (Debian/Ubuntu:
``apt-get install golang-go golang-google-protobuf-dev``; another GOPATH via
``EVOCHI_GOPATH``); skipped otherwise, because tests never download anything.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from evochi.v1 import evochi_pb2 as pb
from tests.test_proto import pre_extension_descriptor

PROGRAM = Path(__file__).with_name("go") / "main.go"


def _gopath() -> str:
    if shutil.which("go") is None:
        pytest.skip("Go is not installed (apt-get install golang-go golang-google-protobuf-dev)")
    gopath = os.environ.get("EVOCHI_GOPATH", "/usr/share/gocode")
    if not (Path(gopath) / "src/google.golang.org/protobuf/proto").is_dir():
        pytest.skip(
            f"google.golang.org/protobuf is not in GOPATH {gopath} "
            "(apt-get install golang-google-protobuf-dev, or set EVOCHI_GOPATH)"
        )
    return gopath


@pytest.mark.timeout(600)
def test_go_protobuf_with_the_old_schema_skips_the_metrics() -> None:
    gopath = _gopath()
    request = pb.FinishEvaluationRequest(
        task_id="task-3",
        evaluations=[
            pb.Evaluation(
                slice=pb.Slice(start=s, end=s + 2),
                rewards=[0.5, -3.0],
                metrics=[
                    pb.Metric(name="env_steps", values=[17, 250]),
                    pb.Metric(name="bd/x", values=[-1.5, 2.0]),
                ],
            )
            for s in (0, 6)
        ],
    )
    # Go's own build cache (~/.cache/go-build) makes runs after the first one fast.
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": gopath, "GOFLAGS": ""}
    out = subprocess.run(
        ["go", "run", str(PROGRAM), pre_extension_descriptor().hex(),
         request.SerializeToString().hex()],
        capture_output=True, text=True, env=env, timeout=540,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    parsed = json.loads(out.stdout)
    assert parsed["fields"] == ["slice", "rewards"]  # really the pre-extension schema
    assert parsed["request"] == {
        "taskId": "task-3",
        "evaluations": [
            {"slice": {"end": 2}, "rewards": [0.5, -3.0]},  # start 0 is proto3's default
            {"slice": {"start": 6, "end": 8}, "rewards": [0.5, -3.0]},
        ],
    }
    assert parsed["had_unknown"] is True  # the metrics, kept aside and otherwise ignored
    for evaluation in request.evaluations:
        del evaluation.metrics[:]
    assert bytes.fromhex(parsed["reserialized"]) == request.SerializeToString()
