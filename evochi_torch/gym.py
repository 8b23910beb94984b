"""Gymnasium tasks as ES workers, without plumbing.

    class HalfCheetah(GymWorker):
        settings = GymSettings("HalfCheetah-v5")
        default_config = ESConfig(population_size=40, learning_rate=0.02)

`GymWorker` scores each population member by one episode and does what every RL training
needs: per-member environments of which only the living ones are stepped (or one
vectorised environment), discrete (argmax) and continuous (clipped, rescaled) actions,
observation normalisation that every worker computes bit-identically (the statistics live in
the shared state), a reward shift, common random numbers (both members of an antithetic pair
start from the same state), an episode length, a center evaluation on fixed start states
(`evaluate_center`, used by the trainer) and `play` (returns, GIF, video) of a saved policy.

Subclasses override what they need: `make_policy` (default: a tanh MLP of
`settings.hidden`), `make_env` (default: `gym.make(settings.env_id, **settings.env_kwargs)`
unwrapped), `shape_rewards`, `score`.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch
from torch import nn

from . import portable
from .codec import TorchESState
from .population import PopulationPolicy, load_flat
from .portable import column_sums
from .worker import TorchESWorker

__all__ = [
    "GymSettings",
    "GymWorker",
    "ObsStats",
    "Rollouts",
    "eval_seeds",
    "pair_seeds",
    "stats_seeds",
    "train_seed",
]

log = logging.getLogger("evochi_torch.gym")


@dataclass(frozen=True)
class GymSettings:
    """What, besides the ES hyper-parameters, defines a gymnasium training. Plain data: it
    travels in the shared state (`state.extra["gym"]`), so a joining worker learns it."""

    env_id: str
    """the gymnasium id (also the default `make_env`'s argument)"""
    env_kwargs: dict[str, bool | int | float | str] = field(default_factory=dict)
    """keyword arguments of `gym.make` / `gym.make_vec` (the default `make_env` and
    `make_vector_env`), e.g. Ant-v5's include_cfrc_ext_in_observation=False"""
    hidden: tuple[int, ...] = (64, 64)
    """hidden layer sizes of the default tanh MLP; () is a linear policy"""
    episode_steps: int | None = None
    """time limit of one episode; None: the env's registered limit (else 1000)"""
    reward_shift: float = 0.0
    """subtracted from every step's reward during training only (ARS: removes a survival
    bonus); the center evaluation uses the true reward"""
    stats_episodes: int = 1
    """center-policy episodes per epoch feeding the observation statistics; 0 turns
    observation normalisation off"""
    pair_starts: bool = True
    """each antithetic pair starts from its own state; False: one start state per epoch"""
    vectorized: bool = False
    """one `gym.make_vec` env (the env's own vector implementation when it has one) for a
    task's members and for the evaluation episodes, instead of one env per member: every
    sub-env steps until the last member ends (finished ones are masked)"""
    eval_episodes: int = 5
    """center-policy episodes per evaluation (fixed start states)"""

    def to_extra(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "hidden": list(self.hidden)}

    @classmethod
    def from_extra(cls, data: dict[str, Any]) -> GymSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known}).replace(
            hidden=tuple(data["hidden"])
        )

    def replace(self, **changes: Any) -> GymSettings:
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------ observation statistics
@dataclass(frozen=True)
class ObsStats:
    """Running mean/variance of observations (float64), merged with Chan et al.'s formula.

    Exactly rounded column sums and separate IEEE operations on the CPU
    (:mod:`evochi_torch.portable`), so the same observations give the same bits in every
    worker, whatever its CPU, device or thread count.
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
        batch = np.asarray(batch, dtype=np.float64).reshape(len(batch), -1)
        b_mean = column_sums(batch) / n
        dev = batch - b_mean
        b_var = column_sums(dev * dev) / n
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
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> ObsStats | None:
        if "obs_mean" not in tensors:
            return None
        return cls(
            tensors["obs_mean"].numpy().copy(),
            tensors["obs_var"].numpy().copy(),
            float(tensors["obs_count"][0]),
        )


# ------------------------------------------------------------------ seeds
# Training episodes: the two members of an antithetic pair start from the same state (common
# random numbers: their difference comes from the parameters, not from luck) and every pair
# from another one, so each update sees many start states. Statistics and evaluation
# episodes have their own seeds; the evaluation ones are fixed, so `play` reproduces them.
def train_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch) % 2**31


def pair_seeds(seed: int, epoch: int, members: np.ndarray) -> np.ndarray:
    return (500_000_000 + (seed * 1_000_003 + epoch) * 4096 + members // 2) % 2**31


def stats_seeds(seed: int, epoch: int, n: int) -> np.ndarray:
    return (1_000_000_007 + (seed * 1_000_003 + epoch) * 16 + np.arange(n)) % 2**31


def eval_seeds(n: int) -> np.ndarray:
    return np.arange(2_000_000_000, 2_000_000_000 + n)


# ------------------------------------------------------------------ rollouts
# `act(rows, obs)` maps the observations of the living rows to raw policy outputs.
Actor = Callable[[np.ndarray, np.ndarray], np.ndarray]


class PopulationActor:
    """Runs the batched population policy on the living rows only: once a member's episode
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
    """One policy (the center) for every row, run by torch."""

    def act(rows: np.ndarray, obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(obs)).numpy()

    return act


def pinned_actor(module: nn.Module) -> Actor:
    """`module_actor` with the arithmetic pinned: a plain stack of Linear/Tanh/ReLU layers (the
    default policies) runs in :mod:`evochi_torch.portable`'s functions, which give the same
    actions on every CPU, so an evaluation episode replays alike on any machine with the same
    simulator. Any other module runs in torch. About 5x torch's time for a small MLP: for
    evaluation episodes, not for every epoch's statistics."""
    forward = portable.sequential(module)
    if forward is None:
        return module_actor(module)
    return lambda rows, obs: forward(obs)


@dataclass
class Rollouts:
    returns: np.ndarray  # [n] float64
    lengths: np.ndarray  # [n] int64: env steps spent per episode
    observations: list[np.ndarray] = field(default_factory=list)  # raw, if recorded

    @property
    def steps(self) -> int:
        return int(self.lengths.sum())


# ------------------------------------------------------------------ the worker
class GymWorker(TorchESWorker):
    """Scores each population member by one episode of a gymnasium environment.

    Args (besides TorchESWorker's):
        settings: overrides the class's `settings` for a training this worker initializes
            (a joining worker adopts the training's settings from the state).
    """

    settings: ClassVar[GymSettings]

    def __init__(
        self, channel: Any, cores: int, *, settings: GymSettings | None = None, **kwargs: Any
    ) -> None:
        super().__init__(channel, cores, **kwargs)
        settings = settings or getattr(type(self), "settings", None)
        if settings is None:
            raise TypeError(
                f"{type(self).__name__} needs GymSettings: set the class attribute `settings` "
                "or pass settings="
            )
        self.env_settings: GymSettings = settings
        self._envs: list[gym.Env] = []
        self._stats_envs: list[gym.Env] = []
        self._spaces: tuple[gym.Space, gym.Space] | None = None
        self._vector_envs: dict[int, gym.vector.VectorEnv] = {}
        #: env steps of the members of the last `score` call (their episode lengths)
        self.last_lengths: np.ndarray = np.zeros(0, dtype=np.int64)

    # ------------------------------------------------------------------ overridable
    def make_env(self, render_mode: str | None = None) -> gym.Env:
        """One environment. The default is the registered env without its wrappers: the
        time limit is `episode_steps`, and the checker/order wrappers cost step time."""
        s = self.env_settings
        return gym.make(
            s.env_id, render_mode=render_mode, disable_env_checker=True, **s.env_kwargs
        ).unwrapped

    def make_policy(self) -> nn.Module:
        """A tanh MLP from (normalised) observations to action logits (discrete) or actions
        in [-1, 1] (continuous). Plain Linear/Tanh layers: the population runs on the fast
        bmm path. The last layer starts 100x smaller (OpenAI ES): near-zero initial actions."""
        obs_dim, act_dim = self.dims
        sizes = [obs_dim, *self.env_settings.hidden, act_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2 or not self.discrete:
                layers.append(nn.Tanh())
        if not self.discrete:
            with torch.no_grad():
                layers[-2].weight.mul_(0.01)
                layers[-2].bias.zero_()
        return nn.Sequential(*layers)

    def shape_rewards(self, rewards: np.ndarray) -> np.ndarray:
        """Hook on the epoch's rewards before the update (e.g. ARS's top-k pairs)."""
        return rewards

    # ------------------------------------------------------------------ environment facts
    @property
    def spaces(self) -> tuple[gym.Space, gym.Space]:
        if self._spaces is None:
            env = self.make_env()
            self._spaces = (env.observation_space, env.action_space)
            env.close()
        return self._spaces

    @property
    def discrete(self) -> bool:
        return isinstance(self.spaces[1], gym.spaces.Discrete)

    @property
    def dims(self) -> tuple[int, int]:
        """(observation size, action size or number of discrete actions)."""
        obs_space, act_space = self.spaces
        if not isinstance(obs_space, gym.spaces.Box):
            raise TypeError(f"{self.env_settings.env_id}: only Box observations are supported")
        if isinstance(act_space, gym.spaces.Discrete):
            return int(np.prod(obs_space.shape)), int(act_space.n)
        if isinstance(act_space, gym.spaces.Box):
            return int(np.prod(obs_space.shape)), int(np.prod(act_space.shape))
        raise TypeError(f"{self.env_settings.env_id}: unsupported action space {act_space}")

    @property
    def episode_steps(self) -> int:
        s = self.env_settings
        if s.episode_steps is not None:
            return s.episode_steps
        spec = gym.spec(s.env_id) if s.env_id in gym.registry else None
        return (spec.max_episode_steps if spec else None) or 1000

    def max_env_steps(self) -> int:
        """Env steps one epoch spends at most (the trainer's upper bound)."""
        return self.config.population_size * self.episode_steps

    @property
    def obs_stats(self) -> ObsStats | None:
        return ObsStats.from_tensors(self.state.extra_tensors)

    def envs(self, n: int) -> list[gym.Env]:
        # Envs are reused across epochs: building one (a MuJoCo model) costs milliseconds.
        while len(self._envs) < n:
            self._envs.append(self.make_env())
        return self._envs[:n]

    def stats_envs(self, n: int) -> list[gym.Env]:
        while len(self._stats_envs) < n:
            self._stats_envs.append(self.make_env())
        return self._stats_envs[:n]

    # ------------------------------------------------------------------ rollouts
    def to_actions(self, out: np.ndarray) -> np.ndarray:
        """Policy outputs -> env actions: argmax, or [-1, 1] rescaled to the action box."""
        if self.discrete:
            return out.argmax(-1)
        space = self.spaces[1]
        low, high = space.low.reshape(-1), space.high.reshape(-1)
        out = out.astype(np.float64)
        return (low + (np.clip(out, -1.0, 1.0) + 1.0) * 0.5 * (high - low)).reshape(
            (len(out), *space.shape)
        )

    def rollout(
        self,
        envs: Sequence[gym.Env],
        act: Actor,
        seeds: np.ndarray,
        stats: ObsStats | None,
        *,
        reward_shift: float = 0.0,
        record: bool = False,
    ) -> Rollouts:
        """One episode per seed, episode b in `envs[b]`. Environments step one by one on the
        CPU (on few cores this beats subprocess vector envs); ended members leave at once."""
        n = len(seeds)
        normalize = stats.normalize if stats is not None else _as_float32
        obs = np.stack([_flat(envs[b].reset(seed=int(seeds[b]))[0]) for b in range(n)])
        returns = np.zeros(n)
        lengths = np.zeros(n, dtype=np.int64)
        observations = [obs.copy()] if record else []
        alive = np.arange(n)
        for _ in range(self.episode_steps):
            actions = self.to_actions(act(alive, normalize(obs[alive])))
            still = []
            for j, b in enumerate(alive):
                o, reward, terminated, truncated, _ = envs[b].step(actions[j])
                obs[b] = _flat(o)
                returns[b] += reward - reward_shift
                lengths[b] += 1
                if not (terminated or truncated):
                    still.append(b)
            if len(still) != len(alive):
                alive = np.asarray(still, dtype=np.int64)
            if record and len(alive):
                observations.append(obs[alive].copy())
            if not len(alive):
                break
        return Rollouts(returns, lengths, observations)

    def make_vector_env(self, n: int) -> gym.vector.VectorEnv:
        """`n` copies of the env as one vector env (`vectorized=True`). The default steps
        them one by one ("sync"); an env's own vector implementation ("vector_entry_point")
        is faster, and then needs a `reset_vector` that pins each episode's start."""
        s = self.env_settings
        return gym.make_vec(s.env_id, num_envs=n, vectorization_mode="sync", **s.env_kwargs)

    def reset_vector(self, envs: gym.vector.VectorEnv, seeds: np.ndarray) -> np.ndarray:
        """Starts episode b from `seeds[b]`; returns the observations."""
        return envs.reset(seed=[int(s) for s in seeds])[0]

    def vector_rollout(
        self, act: Actor, seeds: np.ndarray, stats: ObsStats | None, *, reward_shift: float = 0.0
    ) -> Rollouts:
        """`rollout` on one vector env: all members step until the last one ends."""
        n = len(seeds)
        normalize = stats.normalize if stats is not None else _as_float32
        envs = self._vector_envs.get(n)
        if envs is None:
            envs = self._vector_envs[n] = self.make_vector_env(n)
        obs = np.asarray(self.reset_vector(envs, seeds)).reshape(n, -1)
        returns = np.zeros(n)
        lengths = np.zeros(n, dtype=np.int64)
        alive = np.ones(n, dtype=bool)
        rows = np.arange(n)
        for _ in range(self.episode_steps):
            actions = self.to_actions(act(rows, normalize(obs)))
            obs, reward, terminated, truncated, _ = envs.step(actions)
            obs = np.asarray(obs).reshape(n, -1)
            returns += (reward - reward_shift) * alive
            lengths += alive
            alive &= ~(terminated | truncated)
            if not alive.any():
                break
        return Rollouts(returns, lengths)

    # ------------------------------------------------------------------ worker hooks
    def initialize(self) -> TorchESState:
        state = super().initialize()
        stats = ObsStats.initial(self.dims[0]) if self.env_settings.stats_episodes > 0 else None
        state = dataclasses.replace(
            state,
            extra={**state.extra, "gym": self.env_settings.to_extra(), "stats_env_steps": 0},
            extra_tensors={**state.extra_tensors, **(stats.to_tensors() if stats else {})},
        )
        return self.with_new_stats(state)

    def on_state_change(self, state: TorchESState) -> None:
        if "gym" not in state.extra:
            raise ValueError(
                "the server's training was not started by a GymWorker (its state has no "
                "gymnasium settings); join it with the worker class that started it"
            )
        shared = type(self.env_settings).from_extra(state.extra["gym"])
        if shared != self.env_settings:
            log.warning("adopting the training's gymnasium settings: %s", shared)
            self.env_settings = shared
            self._module = None
            self._envs, self._stats_envs, self._spaces = [], [], None
            self._vector_envs = {}
        super().on_state_change(state)

    def score(
        self, policy: PopulationPolicy, epoch: int, members: torch.Tensor
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        s = self.env_settings
        seeds = self.start_seeds(members.numpy())
        actor = PopulationActor(policy)
        if s.vectorized:
            result = self.vector_rollout(actor, seeds, self.obs_stats, reward_shift=s.reward_shift)
        else:
            result = self.rollout(
                self.envs(len(members)),
                actor,
                seeds,
                self.obs_stats,
                reward_shift=s.reward_shift,
            )
        self.last_lengths = result.lengths
        # The episode lengths travel with the rewards (per-member metrics): the trainer
        # counts exact env steps, also of members scored on other machines.
        return result.returns, {"env_steps": result.lengths}

    def start_seeds(self, members: np.ndarray) -> np.ndarray:
        """Seeds of the start states of `members`' training episodes in this epoch: one per
        antithetic pair (`pair_starts`), else one for the whole epoch. A pure function of the
        ES seed, the state's epoch and the member, so any worker scores a member alike."""
        if self.env_settings.pair_starts:
            return pair_seeds(self.config.seed, self.state.epoch, members)
        return np.full(len(members), train_seed(self.config.seed, self.state.epoch))

    def evaluation_seeds(self, n: int) -> np.ndarray:
        """Seeds of the center evaluation's (and play's) episodes: fixed."""
        return eval_seeds(n)

    def optimize(self, epoch: int, rewards: list[float]) -> TorchESState:
        shaped = self.shape_rewards(np.asarray(rewards, dtype=np.float64))
        return self.with_new_stats(super().optimize(epoch, list(shaped)))

    def with_new_stats(self, state: TorchESState) -> TorchESState:
        """`state` with its observation statistics updated from center-policy episodes.

        Every worker runs the same episodes (the new center, seeds from the state's epoch, on
        the CPU whatever its device), so workers of one kind of machine compute bit-identical
        statistics: nothing but the rewards crosses the wire, yet all workers normalise alike.
        The episodes themselves follow the CPU (the physics and the policy's matrix products
        round per SIMD path); a worker whose statistics come out different is caught by the
        state digest and handed the training's state before it evaluates again.
        """
        s = self.env_settings
        stats = ObsStats.from_tensors(state.extra_tensors)
        if s.stats_episodes <= 0 or stats is None:
            return state
        module = load_flat(self.make_policy(), state.params)
        seeds = stats_seeds(state.config.seed, state.epoch, s.stats_episodes)
        result = self.rollout(
            self.stats_envs(len(seeds)), module_actor(module), seeds, stats, record=True
        )
        stats = stats.update(np.concatenate(result.observations))
        extra = {**state.extra, "stats_env_steps": state.extra["stats_env_steps"] + result.steps}
        return dataclasses.replace(
            state, extra=extra, extra_tensors={**state.extra_tensors, **stats.to_tensors()}
        )

    # ------------------------------------------------------------------ evaluation and play
    def evaluate_episodes(self, policy: nn.Module, episodes: int) -> Rollouts:
        """The policy's true returns (no reward shift) on the fixed evaluation starts.

        The actions are pinned (`pinned_actor`): the default policies give the same returns on
        every CPU with the same simulator. One episode at a time: a policy torch runs rounds a
        batched forward differently for other batch sizes, and chaotic dynamics (MuJoCo) would
        turn that into different returns. With `vectorized`, all episodes at once (the same
        ones whatever the caller).
        """
        if self.env_settings.vectorized:
            seeds = self.evaluation_seeds(episodes)
            return self.vector_rollout(pinned_actor(policy), seeds, self.obs_stats)
        env = self.make_env()
        seeds = self.evaluation_seeds(episodes)
        try:
            stats = self.obs_stats
            results = [
                self.rollout([env], pinned_actor(policy), seeds[i : i + 1], stats)
                for i in range(episodes)
            ]
        finally:
            env.close()
        return Rollouts(
            np.concatenate([r.returns for r in results]),
            np.concatenate([r.lengths for r in results]),
        )

    def evaluate_center(self, policy: nn.Module) -> float:
        """The trainer's center score: mean true return over `eval_episodes` episodes."""
        return float(self.evaluate_episodes(policy, self.env_settings.eval_episodes).returns.mean())

    def play(
        self,
        policy: nn.Module,
        episodes: int | None = None,
        *,
        gif: Path | None = None,
        video: Path | None = None,
    ) -> float:
        """Prints the policy's returns on the evaluation starts (the trainer's center score
        for the same number of episodes) and renders episode 0 to a GIF and/or an MP4."""
        episodes = episodes or self.env_settings.eval_episodes
        result = self.evaluate_episodes(policy, episodes)
        print(f"returns: {' '.join(f'{r:.1f}' for r in result.returns)}")
        print(f"lengths: {' '.join(str(n) for n in result.lengths)}")
        print(f"mean return {result.returns.mean():.1f} over {episodes} episodes")
        for path in (gif, video):
            if path is not None:
                self.write_animation(policy, Path(path))
                print(f"wrote {path}")
        return float(result.returns.mean())

    def write_animation(self, policy: nn.Module, path: Path) -> None:
        """Renders evaluation episode 0 to a GIF or (any other suffix) a video."""
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
        # Headless Linux has no window system: MuJoCo renders off-screen through EGL.
        if sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
            os.environ.setdefault("MUJOCO_GL", "egl")
        env = self.make_env(render_mode="rgb_array")
        stats = self.obs_stats
        normalize = stats.normalize if stats is not None else _as_float32
        act = pinned_actor(policy)
        obs, _ = env.reset(seed=int(self.evaluation_seeds(1)[0]))
        frames = [env.render()]
        for _ in range(self.episode_steps):
            action = self.to_actions(act(np.arange(1), normalize(_flat(obs)[None])))[0]
            obs, _, terminated, truncated, _ = env.step(action)
            frames.append(env.render())
            if terminated or truncated:
                break
        fps = env.metadata.get("render_fps", 30)
        env.close()
        if video:
            imageio.mimsave(path, frames, fps=round(fps))
        else:
            imageio.mimsave(path, frames[::2], duration=2 / fps, loop=0)


def _flat(obs: Any) -> np.ndarray:
    return np.asarray(obs).reshape(-1)


def _as_float32(obs: np.ndarray) -> np.ndarray:
    return obs.astype(np.float32)
