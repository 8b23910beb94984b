"""MuJoCo locomotion (HalfCheetah, Hopper, Walker2d, Ant) with distributed Evolution Strategies.

    python -m examples.mujoco --env HalfCheetah-v5                  # embedded server + 2 workers
    python -m examples.mujoco --env Hopper-v5 --env-steps 3000000 --seed 1
    python -m examples.mujoco --resume runs/HalfCheetah-v5-s0       # continue from its checkpoint
    python -m examples.mujoco --play runs/HalfCheetah-v5-s0/policy.safetensors --gif out.gif
    evochi-torch worker examples.mujoco:HalfCheetah --server HOST:PORT --devices all

Read top to bottom: per-environment defaults, the policy, rollouts (one CPU env per member,
only the members still alive are stepped and fed to the batched policy), observation
normalisation that every worker computes identically, the worker class, then the training
loop (progress lines, checkpoints, `runs/<name>/`: policy.safetensors, metrics.csv, curve.png,
config.json) and --play/--gif/--video.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import gymnasium as gym
import mujoco
import numpy as np
import torch
import tyro
from torch import nn

from evochi.server import EpochSummary, ServerConfig
from evochi_torch import (
    ESConfig,
    PopulationPolicy,
    TorchESState,
    TorchESWorker,
    decode_state,
    encode_state,
    load_checkpoint,
    load_flat,
    save_checkpoint,
)
from evochi_torch.launch import (
    WorkerSpec,
    class_path,
    default_threads,
    parse_devices,
    spread,
    train,
)

log = logging.getLogger("examples.mujoco")


def _mujoco_warning(message: str) -> None:
    # gymnasium's HalfCheetah model uses an attribute that MuJoCo 3.3+ deprecates: the
    # warning would be printed for every env built, in every worker. Pass on the others.
    if "settotalmass" not in message:
        print(f"MuJoCo warning: {message}", file=sys.stderr)


mujoco.set_mju_user_warning(_mujoco_warning)


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class EnvSettings:
    """What, besides the ES hyper-parameters, defines a training. Plain data: it travels in
    the shared state (`state.extra["mujoco"]`), so a worker that joins learns the env from it."""

    env_id: str
    hidden: tuple[int, ...] = (64, 64)
    """hidden layer sizes of the tanh MLP; () is a linear policy"""
    episode_steps: int = 1000
    """time limit of one episode (the env's own limit is 1000 for all four)"""
    reward_shift: float = 0.0
    """subtracted from every step's reward during training only (ARS): removes the survival
    bonus, so that standing still is not a local optimum; evaluation uses the true reward"""
    stats_episodes: int = 1
    """center-policy episodes per epoch that feed the observation statistics"""
    top_k: int = 0
    """keep only the k best antithetic pairs in each update (ARS); 0 keeps all"""
    pair_starts: bool = True
    """each antithetic pair starts from its own state; False: one start per epoch"""

    def to_extra(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "hidden": list(self.hidden)}

    @classmethod
    def from_extra(cls, data: dict[str, Any]) -> EnvSettings:
        return cls(**{**data, "hidden": tuple(data["hidden"])})


# Published starting points: es-torch's HalfCheetah (MLP 64-64 tanh, lr 0.04, sigma 0.025,
# weight decay 0.0025, antithetic, centered rank), OpenAI ES (Adam, observation
# normalisation) and ARS (smaller populations, many epochs, survival bonus removed).
# The populations are smaller than es-torch's 100 because the budget here is 1e7 steps:
# more, cheaper epochs learn faster per env step. See README.md for the measured results.
_ES = ESConfig(
    population_size=40,
    sigma=0.02,
    learning_rate=0.02,
    optimizer="adam",
    weight_decay=0.0025,
    antithetic=True,
    fitness_shaping="centered_rank",
)
PRESETS: dict[str, tuple[EnvSettings, ESConfig]] = {
    "HalfCheetah-v5": (EnvSettings("HalfCheetah-v5"), _ES),
    "Hopper-v5": (EnvSettings("Hopper-v5", reward_shift=1.0), _ES),
    # With the survival bonus removed (reward_shift=1) the initial Walker2d, which falls
    # within ~10 steps, earns more by falling at once: training stayed there for 1,700
    # epochs. So Walker2d keeps its bonus.
    "Walker2d-v5": (EnvSettings("Walker2d-v5", reward_shift=0.0), _ES),
    "Ant-v5": (EnvSettings("Ant-v5", reward_shift=1.0), _ES),
}


# --------------------------------------------------------------------------- the policy
_SPACES: dict[str, tuple[int, int]] = {}


def env_dims(env_id: str) -> tuple[int, int]:
    """(observation size, action size) of `env_id`."""
    if env_id not in _SPACES:
        env = gym.make(env_id)
        _SPACES[env_id] = (env.observation_space.shape[0], env.action_space.shape[0])
        env.close()
    return _SPACES[env_id]


def make_policy(settings: EnvSettings) -> nn.Module:
    """A tanh MLP from normalised observations to actions in [-1, 1].

    A plain `nn.Sequential` of `Linear` and `Tanh`, so the population runs on the fast bmm
    path. The last layer starts 100x smaller (OpenAI ES): near-zero initial actions.
    """
    obs_dim, act_dim = env_dims(settings.env_id)
    sizes = [obs_dim, *settings.hidden, act_dim]
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        layers.append(nn.Linear(a, b))
        layers.append(nn.Tanh())
        if i == len(sizes) - 2:
            with torch.no_grad():
                layers[-2].weight.mul_(0.01)
                layers[-2].bias.zero_()
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------- normalisation
@dataclass(frozen=True)
class ObsStats:
    """Running mean/variance of observations (float64), merged with Chan et al.'s formula.

    Pure numpy on the CPU with a fixed order of operations, so the same inputs give the same
    bits in every worker, whatever its device or thread count.
    """

    mean: np.ndarray
    var: np.ndarray
    count: float

    @classmethod
    def initial(cls, obs_dim: int) -> ObsStats:
        return cls(np.zeros(obs_dim), np.ones(obs_dim), 0.0)

    def update(self, batch: np.ndarray) -> ObsStats:
        n = float(len(batch))
        if n == 0:
            return self
        b_mean = batch.mean(axis=0)
        b_var = batch.var(axis=0)
        total = self.count + n
        delta = b_mean - self.mean
        mean = self.mean + delta * (n / total)
        m2 = self.var * self.count + b_var * n + delta * delta * (self.count * n / total)
        return ObsStats(mean, m2 / total, total)

    def normalize(self, obs: np.ndarray) -> np.ndarray:
        # The std floor keeps near-constant dimensions from being blown up into noise.
        std = np.maximum(np.sqrt(self.var), 1e-2)
        return np.clip((obs - self.mean) / std, -5.0, 5.0).astype(np.float32)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "obs_mean": torch.from_numpy(self.mean.copy()),
            "obs_var": torch.from_numpy(self.var.copy()),
            "obs_count": torch.tensor([self.count], dtype=torch.float64),
        }

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ObsStats:
        return cls(
            tensors["obs_mean"].numpy().copy(),
            tensors["obs_var"].numpy().copy(),
            float(tensors["obs_count"][0]),
        )


# --------------------------------------------------------------------------- rollouts
# `act(rows, obs)` maps the normalised observations of the members still alive (population
# rows `rows`) to their actions in [-1, 1].
Actor = Callable[[np.ndarray, np.ndarray], np.ndarray]


class PopulationActor:
    """Runs the batched population policy on the alive rows only: once a member's episode
    ends it costs neither env steps nor policy FLOPs."""

    def __init__(self, policy: PopulationPolicy) -> None:
        self.policy = policy
        self.rows = np.arange(policy.batch_size)
        self.current = policy

    def __call__(self, rows: np.ndarray, obs: np.ndarray) -> np.ndarray:
        if len(rows) != len(self.rows):  # rows only ever shrink
            params = self.policy.params
            index = torch.as_tensor(rows, device=params.device)
            self.current = PopulationPolicy(self.policy.module, params.index_select(0, index))
            self.rows = rows
        return self.current(torch.from_numpy(obs)).cpu().numpy()


def module_actor(module: nn.Module) -> Actor:
    """One policy (the center) for every row."""

    def act(rows: np.ndarray, obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(obs)).numpy()

    return act


@dataclass
class Rollouts:
    returns: np.ndarray  # [n] float64
    lengths: np.ndarray  # [n] int64: env steps spent per episode
    observations: list[np.ndarray] = field(default_factory=list)  # raw, if recorded

    @property
    def steps(self) -> int:
        return int(self.lengths.sum())


def make_env(env_id: str, render_mode: str | None = None) -> gym.Env:
    # The unwrapped env: the time limit is `episode_steps` below, and the checker/order
    # wrappers cost about a third of the step time.
    return gym.make(env_id, render_mode=render_mode, disable_env_checker=True).unwrapped


def rollout(
    envs: Sequence[gym.Env],
    act: Actor,
    seeds: np.ndarray,
    stats: ObsStats,
    max_steps: int,
    *,
    reward_shift: float = 0.0,
    record: bool = False,
) -> Rollouts:
    """One episode per seed, episode b in `envs[b]`; returns returns and lengths.

    Environments step synchronously on the CPU, one by one: on few cores this beats
    vector envs in subprocesses. Terminated members leave the batch at once.
    """
    n = len(seeds)
    low, high = envs[0].action_space.low, envs[0].action_space.high
    obs = np.stack([envs[b].reset(seed=int(seeds[b]))[0] for b in range(n)])
    returns = np.zeros(n)
    lengths = np.zeros(n, dtype=np.int64)
    observations = [obs.copy()] if record else []
    alive = np.arange(n)
    for _ in range(max_steps):
        actions = act(alive, stats.normalize(obs[alive])).astype(np.float64)
        actions = low + (np.clip(actions, -1.0, 1.0) + 1.0) * 0.5 * (high - low)
        still = []
        for j, b in enumerate(alive):
            obs[b], reward, terminated, _, _ = envs[b].step(actions[j])
            returns[b] += reward - reward_shift
            lengths[b] += 1
            if not terminated:
                still.append(b)
        if len(still) != len(alive):
            alive = np.asarray(still, dtype=np.int64)
        if record and len(alive):
            observations.append(obs[alive].copy())
        if not len(alive):
            break
    return Rollouts(returns, lengths, observations)


# Seeds of the start states. Training episodes: the two members of an antithetic pair start
# from the same state (common random numbers: their difference comes from the parameters, not
# from luck) and every pair from another one, so that each update sees many start states;
# with one start per epoch (`pair_starts=False`) HalfCheetah learned fast gaits that flip
# over from some starts (README.md). Statistics and evaluation episodes have their own seeds.
def train_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % 2**31


def pair_seeds(seed: int, epoch: int, members: np.ndarray) -> np.ndarray:
    return (500_000_000 + (seed * 1_000_003 + epoch) * 4096 + members // 2) % 2**31


def stats_seeds(seed: int, epoch: int, n: int) -> np.ndarray:
    return (1_000_000_007 + (seed * 1_000_003 + epoch) * 16 + np.arange(n)) % 2**31


EVAL_SEEDS = np.arange(2_000_000_000, 2_000_000_100)


# --------------------------------------------------------------------------- the worker
class MuJoCoES(TorchESWorker):
    """Scores each member by one episode of `settings.env_id`.

    The env and policy settings are part of the shared state (`state.extra["mujoco"]`),
    so any subclass below joins any MuJoCo training; the subclasses only pick defaults for
    the trainings they start.

    Args (besides TorchESWorker's):
        settings: overrides the class's `settings` for a training this worker initializes.
        steps_log: a directory; the worker appends "epoch members env_steps" per task to
            its own file there, so that the local trainer can count every env step.
    """

    settings: ClassVar[EnvSettings] = PRESETS["HalfCheetah-v5"][0]
    default_config = PRESETS["HalfCheetah-v5"][1]

    def __init__(
        self,
        channel: Any,
        cores: int,
        *,
        settings: EnvSettings | None = None,
        steps_log: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(channel, cores, **kwargs)
        self.env_settings = settings or type(self).settings
        self._envs: list[gym.Env] = []
        self._stats_envs: list[gym.Env] = []
        self._steps_file = None
        if steps_log is not None:
            Path(steps_log).mkdir(parents=True, exist_ok=True)
            self._steps_file = open(Path(steps_log) / f"worker-{os.getpid()}.tsv", "a")  # noqa: SIM115

    def make_policy(self) -> nn.Module:
        return make_policy(self.env_settings)

    def envs(self, n: int) -> list[gym.Env]:
        # Envs are reused across epochs: building a MuJoCo model costs milliseconds.
        while len(self._envs) < n:
            self._envs.append(make_env(self.env_settings.env_id))
        return self._envs[:n]

    def stats_envs(self, n: int) -> list[gym.Env]:
        while len(self._stats_envs) < n:
            self._stats_envs.append(make_env(self.env_settings.env_id))
        return self._stats_envs[:n]

    @property
    def obs_stats(self) -> ObsStats:
        return ObsStats.from_tensors(self.state.extra_tensors)

    # ------------------------------------------------------------------ hooks
    def initialize(self) -> TorchESState:
        state = super().initialize()
        state = dataclasses.replace(
            state,
            extra={"mujoco": self.env_settings.to_extra(), "stats_env_steps": 0},
            extra_tensors=ObsStats.initial(env_dims(self.env_settings.env_id)[0]).to_tensors(),
        )
        return self.with_new_stats(state)

    def on_state_change(self, state: TorchESState) -> None:
        if "mujoco" not in state.extra:
            raise ValueError(
                "the server's training was not started by examples.mujoco (its state has no "
                "env settings); join it with the worker class that started it"
            )
        shared = EnvSettings.from_extra(state.extra["mujoco"])
        if shared != self.env_settings:
            log.warning("adopting the training's env settings: %s", shared)
            self.env_settings = shared
            self._module = None
            self._envs, self._stats_envs = [], []
        super().on_state_change(state)

    def score(self, policy: PopulationPolicy, epoch: int, members: torch.Tensor) -> np.ndarray:
        s = self.env_settings
        n = len(members)
        if s.pair_starts:
            seeds = pair_seeds(self.config.seed, self.state.epoch, members.numpy())
        else:
            seeds = np.full(n, train_seed(self.config.seed, self.state.epoch))
        result = rollout(
            self.envs(n),
            PopulationActor(policy),
            seeds,
            self.obs_stats,
            s.episode_steps,
            reward_shift=s.reward_shift,
        )
        if self._steps_file is not None:
            self._steps_file.write(f"{epoch}\t{n}\t{result.steps}\n")
            self._steps_file.flush()
        return result.returns

    def optimize(self, epoch: int, rewards: list[float]) -> TorchESState:
        top_k = self.env_settings.top_k
        if top_k:
            rewards = keep_top_pairs(np.asarray(rewards, dtype=np.float64), top_k).tolist()
        return self.with_new_stats(super().optimize(epoch, rewards))

    def with_new_stats(self, state: TorchESState) -> TorchESState:
        """`state` with its observation statistics updated from center-policy episodes.

        Every worker runs the same episodes (the new center, seeds from the state's epoch, on
        the CPU whatever its device) and so computes bit-identical statistics: no data but
        the rewards crosses the wire, yet all workers normalise alike.
        """
        s = self.env_settings
        if s.stats_episodes <= 0:
            return state
        stats = ObsStats.from_tensors(state.extra_tensors)
        module = load_flat(make_policy(s), state.params)
        seeds = stats_seeds(state.config.seed, state.epoch, s.stats_episodes)
        result = rollout(
            self.stats_envs(len(seeds)),
            module_actor(module),
            seeds,
            stats,
            s.episode_steps,
            record=True,
        )
        stats = stats.update(np.concatenate(result.observations))
        extra = {**state.extra, "stats_env_steps": state.extra["stats_env_steps"] + result.steps}
        return dataclasses.replace(
            state, extra=extra, extra_tensors={**state.extra_tensors, **stats.to_tensors()}
        )


def keep_top_pairs(rewards: np.ndarray, k: int) -> np.ndarray:
    """ARS's top-k directions: antithetic pairs outside the k best (by their better member)
    get both members set to the pair's mean, so they cancel out of the update."""
    pairs = rewards.reshape(-1, 2)
    if k >= len(pairs):
        return rewards
    order = np.argsort(-pairs.max(axis=1), kind="stable")
    out = pairs.copy()
    dropped = order[k:]
    out[dropped] = pairs[dropped].mean(axis=1, keepdims=True)
    return out.reshape(-1)


# One class per environment, so that `evochi-torch worker examples.mujoco:Hopper` starts a
# Hopper training with its defaults; joining workers adopt the env from the state anyway.
class HalfCheetah(MuJoCoES):
    settings, default_config = PRESETS["HalfCheetah-v5"]


class Hopper(MuJoCoES):
    settings, default_config = PRESETS["Hopper-v5"]


class Walker2d(MuJoCoES):
    settings, default_config = PRESETS["Walker2d-v5"]


class Ant(MuJoCoES):
    settings, default_config = PRESETS["Ant-v5"]


WORKERS: dict[str, type[MuJoCoES]] = {
    "HalfCheetah-v5": HalfCheetah,
    "Hopper-v5": Hopper,
    "Walker2d-v5": Walker2d,
    "Ant-v5": Ant,
}


# --------------------------------------------------------------------------- training
@dataclass
class Args:
    """Train a MuJoCo locomotion policy with distributed ES on this machine.

    Unset ES and env settings take the environment's defaults (PRESETS)."""

    env: Literal["HalfCheetah-v5", "Hopper-v5", "Walker2d-v5", "Ant-v5"] = "HalfCheetah-v5"
    workers: int = 2
    """worker processes (each evaluates its share of the population)"""
    devices: str = "cpu"
    """policy evaluation devices: cpu, cuda:0,cuda:1, or all (envs always step on the CPU)"""
    seed: int = 0
    """seeds the initial policy, the noise and the episodes"""
    population_size: int | None = None
    sigma: float | None = None
    learning_rate: float | None = None
    weight_decay: float | None = None
    optimizer: Literal["adam", "sgd"] | None = None
    fitness_shaping: Literal["centered_rank", "zscore", "raw"] | None = None
    hidden: tuple[int, ...] | None = None
    """hidden layer sizes, e.g. --hidden 64 64; --hidden with no sizes is a linear policy"""
    episode_steps: int | None = None
    """time limit of training episodes"""
    reward_shift: float | None = None
    """subtracted from each training step's reward (Hopper, Ant: the survival bonus)"""
    stats_episodes: int | None = None
    """center episodes per epoch for the observation statistics"""
    top_k: int | None = None
    """antithetic pairs kept per update (0: all)"""
    pair_starts: bool | None = None
    """one start state per antithetic pair (default) or, with False, one per epoch"""
    env_steps: int = 10_000_000
    """stop once this many env steps were spent (training + statistics episodes)"""
    max_epochs: int = 0
    """stop after this many epochs; 0: no limit"""
    eval_episodes: int = 1
    """center-policy evaluation episodes per epoch (the curve; not counted in env_steps)"""
    final_episodes: int = 10
    """center-policy evaluation episodes at the end (the reported return)"""
    checkpoint_every: int = 10
    """write policy.safetensors, metrics.csv and curve.png every K epochs (and at the end)"""
    name: str | None = None
    """run directory name (default: <env>-s<seed>)"""
    runs_dir: Path = Path("runs")
    """where run directories are written"""
    resume: Path | None = None
    """continue the run in this directory from its last checkpoint (its stored settings are
    used; --env-steps, --max-epochs, --workers, --devices and --quiet come from this command)"""
    host: str = "127.0.0.1"
    """server address; 0.0.0.0 lets remote workers join (their env steps are then estimated)"""
    port: int = 0
    """server port (0: a free one)"""
    play: Path | None = None
    """instead of training: load this checkpoint (.safetensors, or a server's checkpoint.evochi)
    and play --final-episodes episodes"""
    gif: Path | None = None
    """with --play: render one episode to this GIF"""
    video: Path | None = None
    """with --play: render one episode to this MP4 (needs imageio's ffmpeg plugin)"""
    quiet: bool = False
    """no per-epoch lines"""


def resolve(args: Args) -> tuple[EnvSettings, ESConfig]:
    """The env's defaults with the command line's overrides."""
    settings, config = PRESETS[args.env]
    settings = dataclasses.replace(
        settings,
        **{
            k: getattr(args, k)
            for k in (
                "hidden",
                "episode_steps",
                "reward_shift",
                "stats_episodes",
                "top_k",
                "pair_starts",
            )
            if getattr(args, k) is not None
        },
    )
    changes = {
        k: getattr(args, k)
        for k in (
            "population_size",
            "sigma",
            "learning_rate",
            "weight_decay",
            "optimizer",
            "fitness_shaping",
        )
        if getattr(args, k) is not None
    }
    return settings, config.replace(seed=args.seed, **changes)


def policy_from_state(state: TorchESState) -> tuple[EnvSettings, nn.Module, ObsStats]:
    settings = EnvSettings.from_extra(state.extra["mujoco"])
    module = load_flat(make_policy(settings), state.params)
    return settings, module, ObsStats.from_tensors(state.extra_tensors)


def evaluate_center(state: TorchESState, episodes: int) -> Rollouts:
    """The center policy's true returns (no reward shift) on the fixed evaluation starts.

    One episode at a time: a batched forward rounds differently for other batch sizes, and
    MuJoCo's chaotic dynamics would turn that into different returns for the same episode.
    """
    settings, module, stats = policy_from_state(state)
    env = make_env(settings.env_id)
    act = module_actor(module)
    results = [
        rollout([env], act, EVAL_SEEDS[i : i + 1], stats, settings.episode_steps)
        for i in range(episodes)
    ]
    env.close()
    return Rollouts(
        np.concatenate([r.returns for r in results]), np.concatenate([r.lengths for r in results])
    )


class StepCounter:
    """Env steps of the training episodes, read from the workers' step logs.

    The protocol carries one reward per member and nothing else, so the local workers append
    "epoch members steps" per task to files in `directory`. Members evaluated by workers that
    do not log (remote ones) are counted at the full episode length: an upper bound.
    """

    def __init__(self, directory: Path, population: int, episode_steps: int) -> None:
        self.directory = directory
        self.population = population
        self.episode_steps = episode_steps
        self.offsets: dict[Path, int] = {}
        self.steps: dict[int, int] = {}
        self.members: dict[int, int] = {}

    def _read(self) -> None:
        for path in sorted(self.directory.glob("worker-*.tsv")):
            with open(path) as fh:
                fh.seek(self.offsets.get(path, 0))
                data = fh.read()
            complete = data[: data.rfind("\n") + 1]
            self.offsets[path] = self.offsets.get(path, 0) + len(complete)
            for line in complete.splitlines():
                epoch, members, steps = (int(v) for v in line.split("\t"))
                self.steps[epoch] = self.steps.get(epoch, 0) + steps
                self.members[epoch] = self.members.get(epoch, 0) + members

    def epoch_steps(self, epoch: int) -> tuple[int, bool]:
        """(steps spent in `epoch`, exact?); re-issued straggler tasks count: they were spent."""
        self._read()
        missing = max(0, self.population - self.members.get(epoch, 0))
        return self.steps.get(epoch, 0) + missing * self.episode_steps, missing == 0


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [r["env_steps"] for r in rows]
    ax.plot(steps, [r["center_return"] for r in rows], label="center policy")
    ax.plot(steps, [r["pop_mean"] for r in rows], label="population mean (training reward)",
            alpha=0.7)  # fmt: skip
    ax.set(xlabel="env steps", ylabel="return", title=title)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(run_dir: Path, rows: list[dict], state: TorchESState, title: str) -> None:
    save_checkpoint(run_dir / "policy.safetensors", state)
    with open(run_dir / "metrics.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, run_dir / "curve.png", title)


def read_metrics(path: Path, up_to_epoch: int) -> list[dict]:
    with open(path) as fh:
        rows = [
            {k: (float(v) if k not in ("epoch", "env_steps", "exact_steps") else int(v))
             for k, v in r.items()}
            for r in csv.DictReader(fh)
        ]  # fmt: skip
    return [r for r in rows if r["epoch"] <= up_to_epoch]


def run(args: Args) -> dict:
    """Trains; returns the final metrics row. Used by main(), the tests and the benchmark."""
    torch.set_num_threads(1)  # this process only evaluates one center policy at a time
    resumed: TorchESState | None = None
    if args.resume is not None:
        stored = json.loads((args.resume / "config.json").read_text())["args"]
        keep = ("env_steps", "max_epochs", "workers", "devices", "quiet", "host", "port")
        fields = {f.name for f in dataclasses.fields(Args)}
        stored = {k: v for k, v in stored.items() if k in fields and k not in keep}
        stored.update(
            runs_dir=args.resume.parent, name=args.resume.name, resume=args.resume, play=None
        )
        stored["hidden"] = None if stored["hidden"] is None else tuple(stored["hidden"])
        args = dataclasses.replace(args, **stored)
        resumed = load_checkpoint(args.resume / "policy.safetensors")
    settings, config = resolve(args)
    run_dir = args.runs_dir / (args.name or f"{args.env}-s{args.seed}")
    run_dir.mkdir(parents=True, exist_ok=True)
    if resumed is None:
        (run_dir / "config.json").write_text(
            json.dumps(
                {
                    "args": dataclasses.asdict(args),
                    "env": dataclasses.asdict(settings),
                    "es": config.to_dict(),
                },
                default=str,
                indent=2,
            )
        )
    steps_dir = Path(tempfile.mkdtemp(prefix="steps-", dir=run_dir))
    spec = WorkerSpec(
        class_path(WORKERS[args.env]),
        cores=-(-config.population_size // args.workers),
        kwargs={"config": config, "settings": settings, "steps_log": str(steps_dir)},
        threads=default_threads(args.workers),
    )
    counter = StepCounter(steps_dir, config.population_size, settings.episode_steps)
    title = f"{args.env} (ES, seed {args.seed})"
    rows: list[dict] = []
    train_steps = 0
    clock_offset = 0.0
    if resumed is not None:
        rows = read_metrics(run_dir / "metrics.csv", resumed.epoch)
        last = rows[-1] if rows else None
        train_steps = int(last["env_steps"]) - resumed.extra["stats_env_steps"] if last else 0
        clock_offset = float(last["seconds"]) if last else 0.0
    started = 0.0
    done = False
    latest: dict[str, TorchESState] = {}

    def on_epoch(summary: EpochSummary) -> bool:
        nonlocal train_steps, started, done
        if done:
            return True
        now = time.perf_counter()
        if not started:
            # Training time starts with the first epoch: process start-up is not training.
            started = now - summary.seconds
        state = decode_state(summary.state)
        latest["state"] = state
        epoch_steps, exact = counter.epoch_steps(summary.epoch)
        train_steps += epoch_steps
        center = evaluate_center(state, args.eval_episodes)
        row = {
            "epoch": summary.epoch,
            "env_steps": train_steps + state.extra["stats_env_steps"],
            "seconds": round(clock_offset + now - started, 3),
            "center_return": round(float(center.returns.mean()), 3),
            "pop_mean": round(float(summary.rewards.mean()), 3),
            "pop_max": round(float(summary.rewards.max()), 3),
            "steps_per_s": round(epoch_steps / max(summary.seconds, 1e-9)),
            "exact_steps": int(exact),
        }
        rows.append(row)
        if not args.quiet:
            print(
                f"epoch {row['epoch']:4d}  center {row['center_return']:8.1f}  "
                f"pop mean {row['pop_mean']:8.1f} max {row['pop_max']:8.1f}  "
                f"env steps {row['env_steps']:>9}{'' if exact else '*'}  "
                f"{row['steps_per_s']:>6} steps/s",
                flush=True,
            )
        # Stop before an epoch like this one would overrun the budget: the reported steps
        # stay within --env-steps (exactly, when episodes have a fixed length).
        spent = row["env_steps"] - (rows[-2]["env_steps"] if len(rows) > 1 else 0)
        done = row["env_steps"] + spent > args.env_steps or (
            args.max_epochs > 0 and row["epoch"] >= args.max_epochs
        )
        if done or row["epoch"] % args.checkpoint_every == 0:
            write_outputs(run_dir, rows, state, title)
        return done

    # No max_epochs for the server: on_epoch ends the training. (With a server-side limit the
    # workers are stopped before the last, slower on_epoch returns, and `train` takes their
    # clean exit for a crash.)
    server_config = ServerConfig(population_size=config.population_size, worker_timeout=60.0)
    resume_dir: tempfile.TemporaryDirectory | None = None
    if resumed is not None:
        # The server continues a training from its --state-dir checkpoint: write ours there.
        from evochi.server.store import Checkpoint, CheckpointStore

        resume_dir = tempfile.TemporaryDirectory(prefix="resume-", dir=run_dir)
        CheckpointStore(resume_dir.name).save(
            Checkpoint(resumed.epoch + 1, encode_state(resumed), server_config.stored_fields())
        )
        server_config.state_dir = resume_dir.name
    try:
        devices = spread(parse_devices(args.devices), args.workers)
        result = asyncio.run(
            train(spec, server_config, devices, on_epoch=on_epoch, host=args.host, port=args.port)
        )
    finally:
        if resume_dir is not None:
            resume_dir.cleanup()
        for path in steps_dir.glob("*"):
            path.unlink()
        steps_dir.rmdir()
    if "state" not in latest:
        raise RuntimeError("the training ended before its first epoch")
    state = latest["state"]
    rows = [r for r in rows if r["epoch"] <= state.epoch]
    write_outputs(run_dir, rows, state, title)
    final = evaluate_center(state, args.final_episodes)
    last = rows[-1]
    print(
        f"finished epoch={last['epoch']} env_steps={last['env_steps']} "
        f"seconds={last['seconds']:.1f} return={final.returns.mean():.1f} "
        f"(center policy, {args.final_episodes} episodes)"
    )
    print(f"wrote {run_dir}/ (policy.safetensors, metrics.csv, curve.png, config.json)")
    return {
        **last,
        "final_return": float(final.returns.mean()),
        "run_dir": str(run_dir),
        "crashed": result.crashed,
    }


# --------------------------------------------------------------------------- --play
def load_any_state(path: Path) -> TorchESState:
    """A safetensors checkpoint, or the checkpoint.evochi of a server's --state-dir."""
    if path.is_dir() or path.suffix == ".evochi":
        from evochi.server.store import CheckpointStore

        checkpoint = CheckpointStore(path if path.is_dir() else path.parent).load()
        if checkpoint is None:
            raise FileNotFoundError(f"no server checkpoint in {path}")
        return decode_state(checkpoint.state)
    return load_checkpoint(path)


def play(args: Args) -> None:
    assert args.play is not None
    state = load_any_state(args.play)
    result = evaluate_center(state, args.final_episodes)
    print(f"returns: {' '.join(f'{r:.1f}' for r in result.returns)}")
    print(f"lengths: {' '.join(str(n) for n in result.lengths)}")
    print(f"mean return {result.returns.mean():.1f} over {len(result.returns)} episodes")
    for path in (args.gif, args.video):
        if path is not None:
            write_animation(state, path)
            print(f"wrote {path}")


def write_animation(state: TorchESState, path: Path) -> None:
    """Renders evaluation episode 0 to a GIF or (by suffix .mp4) a video."""
    import imageio.v2 as imageio

    video = path.suffix.lower() != ".gif"
    if video:
        try:
            import imageio_ffmpeg  # noqa: F401
        except ImportError:
            raise SystemExit(
                "error: --video needs imageio's ffmpeg plugin: pip install imageio-ffmpeg "
                "(or use --gif)"
            ) from None
    # Headless Linux has no window system: render off-screen through EGL unless told otherwise.
    if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        os.environ.setdefault("MUJOCO_GL", "egl")
    settings, module, stats = policy_from_state(state)
    env = gym.make(settings.env_id, render_mode="rgb_array", width=320, height=240)
    act = module_actor(module)
    low, high = env.action_space.low, env.action_space.high
    obs, _ = env.reset(seed=int(EVAL_SEEDS[0]))
    frames = [env.render()]
    for _ in range(settings.episode_steps):
        action = act(np.arange(1), stats.normalize(obs[None]))[0].astype(np.float64)
        obs, _, terminated, _, _ = env.step(low + (action + 1.0) * 0.5 * (high - low))
        frames.append(env.render())
        if terminated:
            break
    env.close()
    if video:
        imageio.mimsave(path, frames, fps=round(env.metadata.get("render_fps", 30)))
    else:
        imageio.mimsave(path, frames[::4], duration=0.08, loop=0)


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(Args, args=argv)
    if args.play is not None:
        play(args)
        return 0
    if args.gif is not None or args.video is not None:
        raise SystemExit("error: --gif and --video go with --play")
    result = run(args)
    return 1 if result["crashed"] else 0


if __name__ == "__main__":
    sys.exit(main())
