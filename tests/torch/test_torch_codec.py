import base64
import os
import pickle

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from evochi_torch import (
    ESConfig,
    NoiseMismatchError,
    StateDecodeError,
    TorchESState,
    load_checkpoint,
    load_policy,
    save_checkpoint,
)
from evochi_torch import codec as codec_mod
from evochi_torch.codec import check_noise, decode_state, encode_state, initial_state
from evochi_torch.functional import NoiseTable, flatten_params, tell


def policy() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))


@pytest.fixture(scope="module")
def table() -> NoiseTable:
    return NoiseTable.from_seed(0, 1 << 14)


@pytest.fixture
def state(table) -> TorchESState:
    cfg = ESConfig(population_size=6, sigma=0.05, seed=0, noise_table_size=1 << 14)
    s = initial_state(
        policy(),
        cfg,
        table,
        extra_tensors={
            "obs_mean": torch.arange(4.0),
            "count": torch.tensor([7], dtype=torch.int64),
        },
        extra={"env": "CartPole-v1", "best": [1.5, None, (2, 3)], "tags": {"a"}},
    )
    return s.advance(np.array([1.0, 3.0, 2.0, 0.0, 5.0, 4.0]), table)


def assert_states_equal(a: TorchESState, b: TorchESState) -> None:
    assert torch.equal(a.params, b.params)
    assert a.opt_state.keys() == b.opt_state.keys()
    for k in a.opt_state:
        assert a.opt_state[k].dtype == b.opt_state[k].dtype
        assert torch.equal(a.opt_state[k], b.opt_state[k])
    assert a.extra_tensors.keys() == b.extra_tensors.keys()
    for k in a.extra_tensors:
        assert torch.equal(a.extra_tensors[k], b.extra_tensors[k])
    assert (a.epoch, a.config, a.noise_fingerprint, a.extra) == (
        b.epoch,
        b.config,
        b.noise_fingerprint,
        b.extra,
    )


def test_round_trip_is_exact(state):
    blob = encode_state(state)
    assert isinstance(blob, bytes)
    back = decode_state(blob)
    assert_states_equal(state, back)
    assert back.epoch == 1
    assert back.versions["torch"] == str(torch.__version__)
    assert encode_state(back)[:8] == blob[:8]  # deterministic layout
    assert decode_state(bytearray(blob)).epoch == 1


def test_advance_is_the_strategys_tell_and_increments_epoch(state, table):
    rewards = np.linspace(0, 1, 6)
    nxt = state.advance(rewards, table)
    params, opt = tell(state.config, state.params, state.opt_state, rewards, 1, table)
    assert nxt.epoch == 2
    assert torch.equal(nxt.params, params)
    assert torch.equal(nxt.opt_state["exp_avg"], opt["exp_avg"])
    assert nxt.extra == state.extra


def test_every_truncation_is_rejected(state):
    blob = encode_state(state)
    for n in range(len(blob)):
        with pytest.raises(StateDecodeError):
            decode_state(blob[:n])


def test_every_single_bit_flip_is_rejected(state):
    blob = encode_state(state)
    rng = np.random.default_rng(0)
    for pos in range(len(blob)):
        corrupt = bytearray(blob)
        corrupt[pos] ^= 1 << int(rng.integers(8))
        with pytest.raises(StateDecodeError):
            decode_state(bytes(corrupt))


def test_foreign_and_garbage_blobs_are_rejected():
    plain = safetensors.torch.save({"params": torch.zeros(3)})
    with pytest.raises(StateDecodeError, match="not an evochi-torch state"):
        decode_state(plain)
    with pytest.raises(StateDecodeError):
        decode_state(b"")
    with pytest.raises(StateDecodeError):
        decode_state(os.urandom(4096))


def _forge(state: TorchESState, meta_obj_bytes: bytes) -> bytes:
    """A blob with attacker-chosen metadata pickle and a *valid* checksum (it is no MAC)."""
    tensors = codec_mod._cpu_tensors(state)
    header = {
        "format": "pt",
        "evochi.format": codec_mod.STATE_FORMAT,
        "evochi.meta": base64.b64encode(meta_obj_bytes).decode(),
    }
    header["evochi.checksum"] = codec_mod._checksum(header, tensors)
    return safetensors.torch.save(tensors, metadata=header)


class _RunsCode:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_pickle_that_runs_code_is_refused(state, tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"epoch": 1, "config": _RunsCode(str(marker))})
    with pytest.raises(
        StateDecodeError, match=r"refusing to unpickle global (posix|nt|os)\.system"
    ):
        decode_state(_forge(state, payload))
    assert not marker.exists()
    # The forged blob is otherwise well-formed: the allow-list is what stops it.
    ok = pickle.dumps(
        {
            "epoch": 3,
            "config": state.config,
            "noise_fingerprint": state.noise_fingerprint,
            "versions": {},
            "extra": {},
        }
    )
    assert decode_state(_forge(state, ok)).epoch == 3


def test_other_dangerous_globals_are_refused(state):
    for payload in (
        pickle.dumps(eval),
        pickle.dumps(getattr),
        b"cbuiltins\nexec\n(S'print(1)'\ntR.",
    ):
        with pytest.raises(StateDecodeError, match="refusing"):
            decode_state(_forge(state, payload))


def test_tampered_config_is_revalidated(state):
    bad = ESConfig(population_size=6)
    object.__setattr__(bad, "population_size", 5)  # odd with antithetic: invalid
    payload = pickle.dumps(
        {
            "epoch": 1,
            "config": bad,
            "noise_fingerprint": "x",
            "versions": {},
            "extra": {},
        }
    )
    with pytest.raises(StateDecodeError, match="invalid ESConfig"):
        decode_state(_forge(state, payload))


def test_non_plain_extra_fails_at_encode(state):
    state.extra = {"obj": _RunsCode("/nonexistent")}
    with pytest.raises(ValueError, match="plain data"):
        encode_state(state)


def test_shared_storage_tensors_are_saved(state):
    base = torch.arange(10.0)
    state.extra_tensors = {"a": base[:5], "b": base[5:]}
    back = decode_state(encode_state(state))
    assert back.extra_tensors["a"].tolist() == [0, 1, 2, 3, 4]
    assert back.extra_tensors["b"].tolist() == [5, 6, 7, 8, 9]


def test_checkpoint_is_a_safetensors_file_and_loads_a_policy(state, tmp_path):
    path = save_checkpoint(tmp_path / "run" / "ckpt.safetensors", state)
    raw = safetensors.torch.load_file(path)
    assert torch.equal(raw["params"], state.params)
    assert set(raw) == {
        "params",
        "opt.step",
        "opt.exp_avg",
        "opt.exp_avg_sq",
        "extra.obs_mean",
        "extra.count",
    }
    assert_states_equal(load_checkpoint(path), state)

    module = load_policy(policy(), path)
    assert torch.equal(flatten_params(module), state.params)
    x = torch.randn(3, 4)
    fresh = policy()
    with torch.no_grad():
        for p, v in zip(fresh.parameters(), module.parameters(), strict=True):
            p.copy_(v)
    assert torch.equal(module(x), fresh(x))
    with pytest.raises(ValueError, match="same architecture"):
        load_policy(nn.Linear(4, 2), path)
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


def test_noise_mismatch_is_explicit(state, table):
    check_noise(state, table)
    other = NoiseTable.from_seed(1, 1 << 14)
    with pytest.raises(NoiseMismatchError, match="refusing to continue") as info:
        check_noise(state, other)
    assert "numpy" in str(info.value)
    with pytest.raises(NoiseMismatchError):
        state.advance(np.zeros(6), other)


def test_one_state_has_one_encoding_in_every_process(state, tmp_path) -> None:
    # safetensors writes its metadata in a hash map's order, seeded per process: without the
    # canonical header two workers (or two runs) encoded the same state to other bytes.
    import subprocess
    import sys

    path = tmp_path / "state.bin"
    path.write_bytes(encode_state(state))
    script = (
        "import sys; from evochi_torch.codec import decode_state, encode_state; "
        "blob = open(sys.argv[1], 'rb').read(); "
        "sys.stdout.write(encode_state(decode_state(blob)).hex())"
    )
    blobs = {
        subprocess.run(
            [sys.executable, "-c", script, str(path)], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(4)
    }
    assert blobs == {path.read_bytes().hex()}
    assert safetensors.torch.load(path.read_bytes()).keys()  # still a plain safetensors blob
