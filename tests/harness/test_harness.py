"""The training harness end to end: real server on loopback, real worker processes, real
gymnasium, real TensorBoard and wandb (offline) files."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from evochi.server import ServerConfig
from evochi_torch import load_checkpoint, load_policy
from evochi_torch.__main__ import main
from evochi_torch.codec import decode_state
from evochi_torch.harness import (
    TIMING_FIELDS,
    RunConfig,
    Trainer,
    load_state,
    make_loggers,
    progress_line,
    read_metrics,
)
from evochi_torch.launch import WorkerSpec, train_processes

USER = "tests.harness.user_workers"
FILES = ("checkpoint.safetensors", "best.safetensors", "metrics.csv", "curve.png", "config.json")


def wandb_history(run_file: Path) -> list[dict[str, float]]:
    """The history rows of a wandb offline run file (a LevelDB-style log of protobuf records:
    32 KiB blocks, 7-byte record headers; wandb itself ships no Python reader)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = run_file.read_bytes()
    assert data[:4] == b":W&B"
    rows, pos, payload, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        payload += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = pb.Record()
            record.ParseFromString(payload)
            payload = b""
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {i.nested_key[0]: json.loads(i.value_json) for i in record.history.item}
                )
    return rows


@pytest.mark.timeout(240)
def test_user_worker_gets_a_run_directory_with_every_file(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    code = main(["train", f"{USER}:CartPole", "--workers", "2", "--max-epochs", "4",
                 "--run-dir", str(run_dir), "--checkpoint-every", "2",
                 "--logger", "csv,tensorboard,wandb"])  # fmt: skip
    assert code == 0
    for name in FILES:
        assert (run_dir / name).stat().st_size > 0, name
    assert (run_dir / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["worker"] == f"{USER}:CartPole" and config["es"]["population_size"] == 16

    rows = read_metrics(run_dir / "metrics.csv")
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert r["reward_min"] <= r["reward_mean"] <= r["reward_max"]
        assert r["center_score"] is not None and r["env_steps"] is None  # no env-step report
    state = load_checkpoint(run_dir / "checkpoint.safetensors")
    assert state.epoch == 4
    best = max(r["center_score"] for r in rows)
    assert load_state(run_dir, "best").epoch == next(
        r["epoch"] for r in rows if r["center_score"] == best
    )

    out = capsys.readouterr().out
    assert out.count("epoch ") >= 4 and "epoch     1  center" in out and "ETA" in out
    assert "trained epochs=4" in out

    # TensorBoard, read back with tensorboard's own reader.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"reward_mean", "reward_max", "center_score", "seconds"} <= set(events.Tags()["scalars"])
    logged = [(e.step, e.value) for e in events.Scalars("reward_mean")]
    assert logged == [(r["epoch"], pytest.approx(r["reward_mean"])) for r in rows]

    # wandb, offline: the run file holds one history row per epoch with the logged keys.
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    history = wandb_history(run_file)
    assert [h["_step"] for h in history] == [1, 2, 3, 4]
    assert [h["center_score"] for h in history] == [r["center_score"] for r in rows]
    assert {"reward_mean", "reward_std", "members_per_s"} <= set(history[0])


def identical(a: object, b: object) -> bool:
    """Bit-equality through the optimizer/strategy state, whatever its structure."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        same_keys = isinstance(b, dict) and a.keys() == b.keys()
        return same_keys and all(identical(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(identical(x, y) for x, y in zip(a, b, strict=True))
    if hasattr(a, "__dataclass_fields__"):
        return all(identical(getattr(a, f), getattr(b, f)) for f in a.__dataclass_fields__)
    return type(a) is type(b) and a == b


def gym_run(root: Path, name: str, max_epochs: int, **run) -> Trainer:
    return Trainer(f"{USER}:SmallCartPole", run=RunConfig(
        max_epochs=max_epochs, run_dir=root / name, workers=2, quiet=True, **run))  # fmt: skip


@pytest.mark.timeout(300)
def test_resume_is_bit_identical_and_env_steps_are_exact(tmp_path, capsys) -> None:
    straight = gym_run(tmp_path, "straight", 5).fit()
    gym_run(tmp_path, "resumed", 2).fit()
    resumed = Trainer(f"{USER}:SmallCartPole", run=RunConfig(
        max_epochs=5, resume=tmp_path / "resumed", workers=2, quiet=True)).fit()  # fmt: skip
    a, b = straight.state, load_checkpoint(tmp_path / "resumed" / "checkpoint.safetensors")
    assert a.epoch == b.epoch == 5 and resumed.state.epoch == 5
    assert torch.equal(a.params, b.params)
    assert identical(a.opt_state, b.opt_state)
    assert a.extra_tensors.keys() == b.extra_tensors.keys() == {"obs_mean", "obs_var", "obs_count"}
    for key, value in a.extra_tensors.items():
        assert torch.equal(value, b.extra_tensors[key]), key
    assert a.extra == b.extra
    rows_a = [{k: v for k, v in r.items() if k not in TIMING_FIELDS}
              for r in read_metrics(tmp_path / "straight" / "metrics.csv")]  # fmt: skip
    rows_b = [{k: v for k, v in r.items() if k not in TIMING_FIELDS}
              for r in read_metrics(tmp_path / "resumed" / "metrics.csv")]  # fmt: skip
    assert [r["epoch"] for r in rows_b] == [1, 2, 3, 4, 5]
    assert rows_a == rows_b

    # Exact env steps through the protocol (no side files): CartPole pays 1 per step, so
    # the members' episode lengths sum to their rewards; plus the statistics episodes.
    assert all(r["env_steps_exact"] == 1 for r in rows_a)
    population = 12
    training = sum(round(r["reward_mean"] * population) for r in rows_a)
    assert rows_a[-1]["env_steps"] == training + a.extra["stats_env_steps"]
    assert rows_a[-1]["env_steps"] < 5 * population * 120  # episodes ended early

    # play replays the fixed evaluation episodes: the reported center score.
    gif = tmp_path / "episode.gif"
    assert main(["play", f"{USER}:SmallCartPole", str(tmp_path / "straight"),
                 "--episodes", "3", "--gif", str(gif)]) == 0  # fmt: skip
    assert (
        f"mean return {rows_a[-1]['center_score']:.1f} over 3 episodes" in capsys.readouterr().out
    )
    assert gif.read_bytes()[:6] == b"GIF89a"


@pytest.mark.timeout(180)
def test_export_turns_a_server_state_dir_into_a_policy_file(tmp_path, capsys) -> None:
    state_dir = tmp_path / "state"
    config = ServerConfig(population_size=16, max_epochs=2, state_dir=str(state_dir))
    spec = WorkerSpec(f"{USER}:CartPole", cores=8, threads=1)
    import asyncio

    asyncio.run(train_processes(spec, config, ["cpu", "cpu"]))
    assert (state_dir / "checkpoint.evochi").exists()
    from evochi.server.store import CheckpointStore

    stored = decode_state(CheckpointStore(state_dir).load().state)

    out = tmp_path / "policy.safetensors"
    assert main(["export", str(state_dir), str(out)]) == 0
    assert torch.equal(load_checkpoint(out).params, stored.params)
    module = load_policy(torch.nn.Linear(4, 2), out)
    assert torch.equal(torch.cat([module.weight.flatten(), module.bias]), stored.params)

    plain = tmp_path / "plain.safetensors"
    assert main(["export", str(state_dir / "checkpoint.evochi"), str(plain),
                 "--state-dict", f"{USER}:CartPole"]) == 0  # fmt: skip
    from safetensors.torch import load_file

    linear = torch.nn.Linear(4, 2)
    linear.load_state_dict(load_file(plain))
    assert torch.equal(linear.weight, module.weight) and torch.equal(linear.bias, module.bias)
    assert main(["play", f"{USER}:CartPole", str(out)]) == 0
    assert "center score" in capsys.readouterr().out

    assert main(["export", str(tmp_path / "missing"), str(plain)]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.timeout(180)
def test_failing_evaluation_stops_the_training_with_its_error(tmp_path) -> None:
    trainer = Trainer(f"{USER}:BrokenEvaluation", run=RunConfig(
        max_epochs=50, run_dir=tmp_path / "run", workers=1, quiet=True))  # fmt: skip
    with pytest.raises(RuntimeError, match="broken evaluation"):
        trainer.fit()
    # What was trained is kept, and the resume guard names the run's epoch.
    assert load_checkpoint(tmp_path / "run" / "checkpoint.safetensors").epoch == 1
    with pytest.raises(ValueError, match="already trained to epoch 1"):
        Trainer(f"{USER}:CartPole", run=RunConfig(max_epochs=1, resume=tmp_path / "run"))


def test_bad_input_gets_clear_errors(tmp_path, capsys) -> None:
    assert main(["train", f"{USER}:CartPole", "--resume", str(tmp_path), "--sigma", "0.1"]) == 2
    assert "keeps its checkpoint's ES config" in capsys.readouterr().err
    assert main(["train", f"{USER}:CartPole", "--resume", str(tmp_path)]) == 1
    assert "not a run directory" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown logger"):
        make_loggers(["tensorbord"], tmp_path, ["epoch"], name="x", config={})
    with pytest.raises(ValueError, match="needs a center evaluation"):
        Trainer("tests.e2e.toy_workers:ToyRegression",
                run=RunConfig(target=1.0, run_dir=tmp_path / "t")).fit()  # fmt: skip


def test_progress_line_shows_score_throughput_and_eta() -> None:
    row = {"epoch": 5, "seconds": 10.0, "reward_mean": 1.5, "reward_max": 3.0,
           "center_score": 2.25, "env_steps": 5000, "env_steps_exact": 0,
           "steps_per_s": 500.0}  # fmt: skip
    line = progress_line(row, done=0.25)
    assert line.startswith("epoch     5  center      2.25  pop mean      1.50 max      3.00")
    assert "env steps      5,000*" in line and "500 steps/s" in line and "ETA 0:30" in line
    assert "ETA" not in progress_line({**row, "center_score": None}, done=None)
    assert np.isfinite(row["seconds"])
