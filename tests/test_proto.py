"""The committed generated code must match what `make proto` produces from the .proto."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GENERATED = ["evochi_pb2.py", "evochi_pb2_grpc.py", "evochi_pb2.pyi"]


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{ROOT / 'proto'}",
            f"--python_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            str(ROOT / "proto/evochi/v1/evochi.proto"),
        ],
        check=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "evochi/v1" / name).read_text()
        committed = (ROOT / "evochi/v1" / name).read_text()
        assert fresh == committed, f"evochi/v1/{name} is stale: run `make proto` and commit"


def test_wire_numbers_match_protocol() -> None:
    """Field numbers are the contract with the Go server and the published client."""
    from evochi.v1 import evochi_pb2 as pb

    def numbers(message) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    assert numbers(pb.Slice) == {"start": 1, "end": 2}
    # Extension (docs/protocol.md): metrics = 3, never one of the published numbers.
    assert numbers(pb.Evaluation) == {"slice": 1, "rewards": 2, "metrics": 3}
    assert numbers(pb.Metric) == {"name": 1, "values": 2}
    metrics = pb.Evaluation.DESCRIPTOR.fields_by_name["metrics"]
    assert metrics.message_type is pb.Metric.DESCRIPTOR and metrics.is_repeated
    values = pb.Metric.DESCRIPTOR.fields_by_name["values"]
    assert values.type == values.TYPE_DOUBLE and values.is_repeated
    assert numbers(pb.HelloEvent) == {
        "id": 1,
        "token": 2,
        "state": 3,
        "population_size": 4,
        "heartbeat_interval": 5,
        "max_epochs": 6,
    }
    # Extension (docs/protocol.md): the training's state for a worker that drifted, and the
    # digests that reveal the drift; all on numbers the published schema leaves free.
    assert numbers(pb.EvaluateEvent) == {"task_id": 1, "epoch": 2, "slices": 3, "state": 4}
    assert numbers(pb.OptimizeEvent) == {"task_id": 1, "epoch": 2, "rewards": 3, "state": 4}
    assert numbers(pb.InitializeEvent) == {"task_id": 1}
    assert numbers(pb.ShareStateEvent) == {"task_id": 1, "epoch": 2}
    assert numbers(pb.StopEvent) == {"task_id": 1}
    assert numbers(pb.SubscribeRequest) == {"cores": 1}
    assert numbers(pb.SubscribeResponse) == {
        "type": 1,
        "hello": 2,
        "evaluate": 3,
        "optimize": 4,
        "initialize": 5,
        "share_state": 6,
        "stop": 7,
    }
    assert numbers(pb.HeartbeatRequest) == {"seq_id": 1, "timestamp": 2}
    assert numbers(pb.FinishEvaluationRequest) == {"task_id": 1, "evaluations": 2}
    assert numbers(pb.FinishOptimizationRequest) == {"task_id": 1, "state_digest": 2}
    assert numbers(pb.FinishInitializationRequest) == {"task_id": 1, "state": 2, "state_digest": 3}
    assert numbers(pb.FinishShareStateRequest) == {"task_id": 1, "state": 2, "state_digest": 3}
    assert dict(pb.EventType.items()) == {
        "EVENT_TYPE_UNSPECIFIED": 0,
        "EVENT_TYPE_HELLO": 1,
        "EVENT_TYPE_EVALUATE": 3,
        "EVENT_TYPE_OPTIMIZE": 4,
        "EVENT_TYPE_INITIALIZE": 5,
        "EVENT_TYPE_SHARE_STATE": 6,
        "EVENT_TYPE_STOP": 7,
    }
    assert pb.HelloEvent.DESCRIPTOR.fields_by_name["state"].has_presence
    service = pb.DESCRIPTOR.services_by_name["EvochiService"]
    assert service.full_name == "evochi.v1.EvochiService"
    assert [m.name for m in service.methods] == [
        "Subscribe",
        "Heartbeat",
        "FinishEvaluation",
        "FinishOptimization",
        "FinishInitialization",
        "FinishShareState",
    ]


def test_known_bytes() -> None:
    """A hand-encoded message, so a type change (e.g. float -> double) cannot slip by."""
    from evochi.v1 import evochi_pb2 as pb

    msg = pb.Evaluation(slice=pb.Slice(start=1, end=3), rewards=[1.0, -2.0])
    # slice: tag 0x0a len 4 {08 01 10 03}; rewards packed float: tag 0x12 len 8.
    assert msg.SerializeToString() == bytes.fromhex("0a04080110031208") + bytes.fromhex(
        "0000803f000000c0"
    )


def test_known_bytes_of_the_metrics_extension() -> None:
    from evochi.v1 import evochi_pb2 as pb

    msg = pb.Evaluation(
        slice=pb.Slice(start=0, end=1),
        rewards=[1.0],
        metrics=[pb.Metric(name="n", values=[2.0])],
    )
    # slice (start 0 is the default, so omitted), rewards, then metrics: tag 0x1a len 13
    # {name: 0a 01 'n', values packed double: 12 08 <2.0>}.
    assert msg.SerializeToString() == bytes.fromhex(
        "0a02100112040000803f1a0d0a016e12080000000000000040"
    )


# The last commit whose generated code predates the metrics extension: the schema of the
# published client and of the reference Go server.
PRE_EXTENSION_COMMIT = "9ca776b7c8f768ab56552bfd80745fd604dcb840"


def pre_extension_descriptor() -> bytes:
    """The serialized FileDescriptorProto of evochi.proto before the metrics extension,
    taken from the generated code in git history (skips the test without history)."""
    import ast
    import re
    import shutil

    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    show = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{PRE_EXTENSION_COMMIT}:evochi/v1/evochi_pb2.py"],
        capture_output=True,
        text=True,
    )
    if show.returncode != 0:
        pytest.skip(f"no git history here: {show.stderr.strip()}")
    match = re.search(r"AddSerializedFile\((b'.*?')\)\n", show.stdout)
    assert match is not None, "the old generated code has no serialized descriptor"
    return ast.literal_eval(match.group(1))


def _pre_extension_messages() -> dict[str, type]:
    """The message classes of the pre-extension generated code, in a descriptor pool of
    their own (the current ones live in the default pool)."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2

    pool = descriptor_pool.DescriptorPool()
    timestamp = descriptor_pb2.FileDescriptorProto()
    timestamp_pb2.DESCRIPTOR.CopyToProto(timestamp)
    pool.Add(timestamp)
    pool.AddSerializedFile(pre_extension_descriptor())
    names = (
        "Evaluation",
        "FinishEvaluationRequest",
        "FinishOptimizationRequest",
        "FinishShareStateRequest",
        "EvaluateEvent",
        "OptimizeEvent",
    )
    return {
        n: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"evochi.v1.{n}"))
        for n in names
    }


def test_old_generated_code_parses_metrics_and_skips_them() -> None:
    """What the published client and the Go server (same .proto, proto3 unknown-field
    rules) do with a result carrying the extension: every published field intact, the
    metrics skipped as an unknown field."""
    from evochi.v1 import evochi_pb2 as pb

    old = _pre_extension_messages()
    assert "metrics" not in old["Evaluation"].DESCRIPTOR.fields_by_name
    evaluations = [
        pb.Evaluation(
            slice=pb.Slice(start=s, end=s + 2),
            rewards=[1.5, -2.0],
            metrics=[
                pb.Metric(name="env_steps", values=[10, 20]),
                pb.Metric(name="bd", values=[1, 2]),
            ],
        )
        for s in (0, 4)
    ]
    new = pb.FinishEvaluationRequest(task_id="t-1", evaluations=evaluations)
    parsed = old["FinishEvaluationRequest"].FromString(new.SerializeToString())
    assert parsed.task_id == "t-1"
    assert [(e.slice.start, e.slice.end, list(e.rewards)) for e in parsed.evaluations] == [
        (0, 2, [1.5, -2.0]),
        (4, 6, [1.5, -2.0]),
    ]
    parsed.DiscardUnknownFields()
    for e in new.evaluations:
        del e.metrics[:]
    assert parsed.SerializeToString() == new.SerializeToString()


def test_new_code_reads_old_results_as_reporting_no_metrics() -> None:
    from evochi.v1 import evochi_pb2 as pb

    old = _pre_extension_messages()
    request = old["FinishEvaluationRequest"](
        task_id="t", evaluations=[old["Evaluation"](rewards=[1.0, 2.0])]
    )
    parsed = pb.FinishEvaluationRequest.FromString(request.SerializeToString())
    assert list(parsed.evaluations[0].rewards) == [1.0, 2.0]
    assert len(parsed.evaluations[0].metrics) == 0


def test_old_generated_code_skips_the_digests_and_the_repair_state() -> None:
    """The published client and the Go server read every published field of a message that
    carries the drift extension, and old peers' messages read as carrying none of it."""
    from evochi.v1 import evochi_pb2 as pb

    old = _pre_extension_messages()
    cases = [
        (pb.FinishOptimizationRequest(task_id="t", state_digest=b"d" * 32), {"task_id": "t"}),
        (
            pb.FinishShareStateRequest(task_id="t", state=b"s", state_digest=b"d" * 32),
            {"task_id": "t", "state": b"s"},
        ),
        (
            pb.EvaluateEvent(task_id="t", epoch=3, slices=[pb.Slice(start=0, end=2)], state=b"s"),
            {"task_id": "t", "epoch": 3},
        ),
        (pb.OptimizeEvent(task_id="t", epoch=3, rewards=[1.0], state=b"s"), {"epoch": 3}),
    ]
    for new, published in cases:
        name = type(new).DESCRIPTOR.name
        parsed = old[name].FromString(new.SerializeToString())
        for field, value in published.items():
            assert getattr(parsed, field) == value, (name, field)
        back = type(new).FromString(old[name](**published).SerializeToString())
        if name.endswith("Event"):
            assert not back.HasField("state")
        else:
            assert back.state_digest == b""
