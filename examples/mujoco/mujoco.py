"""MuJoCo locomotion (HalfCheetah, Hopper, Walker2d, Ant, Humanoid) with distributed ES.

    python -m examples.mujoco HalfCheetah-v5                       # embedded server + 2 workers
    python -m examples.mujoco Hopper-v5 --es.seed 1 --run.env-steps 3000000
    python -m examples.mujoco Walker2d-v5/ars                      # another strategy's preset
    python -m examples.mujoco HalfCheetah-v5 --run.resume runs/HalfCheetah-v5-s0
    evochi-torch play examples.mujoco:HalfCheetah runs/HalfCheetah-v5-s0 --episodes 10 --gif a.gif
    evochi-torch worker examples.mujoco:HalfCheetah --server HOST:PORT --devices all

Read top to bottom: the per-environment defaults, the worker (the library's `GymWorker` does
the rollouts, observation normalisation, common random numbers and evaluation; this file adds
ARS's top-k pairs), then the training: the library's `Trainer` writes runs/<env>-s<seed>/
(checkpoints, metrics.csv, curve.png, config.json; a later run of the same name gets its start
time appended, `--run.resume` continues a run, `--run.overwrite` replaces one), and the final
center policy is evaluated on 10 fixed episodes.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field

import mujoco
import tyro

from evochi_torch import ESConfig, get_strategy
from evochi_torch.gym import GymSettings, GymWorker
from evochi_torch.harness import RunConfig, RunResult, Trainer, offline_worker


def _mujoco_warning(message: str) -> None:
    # gymnasium's HalfCheetah model uses an attribute that MuJoCo 3.3+ deprecates: the
    # warning would be printed for every env built, in every worker. Pass on the others.
    if "settotalmass" not in message:
        print(f"MuJoCo warning: {message}", file=sys.stderr)


mujoco.set_mju_user_warning(_mujoco_warning)


# --------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class MuJoCoSettings(GymSettings):
    """GymSettings with one center episode per epoch. Plain data in the shared state: joining
    workers adopt it."""

    eval_episodes: int = 1
    """center-policy episodes per epoch (the curve; not counted in env steps)"""


# Published starting points: es-torch's HalfCheetah (MLP 64-64 tanh, lr 0.04, sigma 0.025,
# weight decay 0.0025, antithetic, centered rank), OpenAI ES (Adam, observation
# normalisation) and ARS (smaller populations, many epochs, survival bonus removed).
# The populations are smaller than es-torch's 100 because the budget here is 1e7 steps:
# more, cheaper epochs learn faster per env step. Measured results:
# benchmarks/results/mujoco/NOTES.md.
_ES = ESConfig(population_size=40, sigma=0.02, learning_rate=0.02, optimizer="adam",
               weight_decay=0.0025, antithetic=True, fitness_shaping="centered_rank")  # fmt: skip
SETTINGS = {
    "HalfCheetah-v5": MuJoCoSettings("HalfCheetah-v5", episode_steps=1000),
    "Hopper-v5": MuJoCoSettings("Hopper-v5", episode_steps=1000, reward_shift=1.0),
    # With the survival bonus removed (reward_shift=1) the initial Walker2d, which falls
    # within ~10 steps, earns more by falling at once: training stayed there for 1,700
    # epochs. So Walker2d keeps its bonus.
    "Walker2d-v5": MuJoCoSettings("Walker2d-v5", episode_steps=1000),
    # Ant-v5's observation appends 78 contact forces (cfrc_ext) to the 27 joint positions and
    # velocities. Half of them vary by a few hundredths, so the observation normalisation
    # amplifies them 30-100x. With them, 2 of 3 sep-CMA-ES seeds learned gaits that flip in
    # 3-4 of 10 evaluation episodes; without them (Ant-v4's default observation) see
    # benchmarks/results/mujoco/NOTES.md.
    "Ant-v5": MuJoCoSettings(
        "Ant-v5",
        episode_steps=1000,
        reward_shift=1.0,
        env_kwargs={"include_cfrc_ext_in_observation": False},
    ),
    # Humanoid-v5's survival bonus is 5 per step: ARS removes it (reward_shift=5), as the
    # paper did for Humanoid-v1.
    "Humanoid-v5": MuJoCoSettings("Humanoid-v5", episode_steps=1000, reward_shift=5.0),
}


# --------------------------------------------------------------------------- the worker
class MuJoCoES(GymWorker):
    """One episode per member; the settings in the state say which env, so any subclass
    joins any MuJoCo training (the subclasses only pick defaults for new trainings)."""

    settings = SETTINGS["HalfCheetah-v5"]
    default_config = _ES


class HalfCheetah(MuJoCoES):
    settings = SETTINGS["HalfCheetah-v5"]


class Hopper(MuJoCoES):
    settings = SETTINGS["Hopper-v5"]


class Walker2d(MuJoCoES):
    settings = SETTINGS["Walker2d-v5"]


class Ant(MuJoCoES):
    settings = SETTINGS["Ant-v5"]


class Humanoid(MuJoCoES):
    settings = SETTINGS["Humanoid-v5"]


WORKERS: dict[str, type[MuJoCoES]] = {
    "HalfCheetah-v5": HalfCheetah, "Hopper-v5": Hopper, "Walker2d-v5": Walker2d, "Ant-v5": Ant,
    "Humanoid-v5": Humanoid,
}  # fmt: skip


# --------------------------------------------------------------------------- training
@dataclass
class Args:
    """Train a MuJoCo locomotion policy with distributed ES on this machine."""

    env: MuJoCoSettings
    """the task: env id, policy size, episode length, reward shift, statistics, top-k"""
    es: ESConfig = _ES
    """the ES hyper-parameters (every ESConfig field)"""
    run: RunConfig = field(default_factory=lambda: RunConfig(max_epochs=None, env_steps=10_000_000))
    """workers, budget (env steps: training + statistics episodes), run directory, loggers"""
    final_episodes: int = 10
    """center-policy episodes at the end (the reported return)"""


# The strategies on these envs. Gradient-style ones (openai_es above, pgpe, snes, sep_cma,
# cem) keep the example's population and initial sigma and take their own defaults (learning
# rate, optimizer, fitness shaping; see docs/strategies.md). ARS runs as published (Mania et
# al. 2018, V2-t: linear policy, survival bonus removed, per-env directions N, top b, step
# alpha, noise nu from the paper's hyper-parameter table).
STRATEGIES = ("openai_es", "pgpe", "snes", "sep_cma", "ars", "cem")
ARS_PAPER = {  # env: (N, b, alpha, nu)
    "HalfCheetah-v5": (32, 4, 0.02, 0.03),
    "Hopper-v5": (8, 4, 0.01, 0.025),
    "Walker2d-v5": (40, 30, 0.03, 0.025),
    "Ant-v5": (60, 20, 0.015, 0.025),
    "Humanoid-v5": (230, 230, 0.02, 0.0075),
}
# Where this example departs from the paper's table. Ant-v5 with alpha 0.015 ended at a median
# of 2866 over 3 seeds at 1e7 steps, with 0.025 at 3148 (benchmarks/results/mujoco/NOTES.md): every
# seed first learns to end its episodes at once, and the larger step climbs faster after.
ARS_STEP = {"Ant-v5": 0.025}
# The survival bonus ARS removes during training: 1 per step, 5 for Humanoid.
ARS_SHIFT = {"Humanoid-v5": 5.0}


def preset(env: str, strategy: str = "openai_es") -> Args:
    """The defaults of `python -m examples.mujoco ENV[/STRATEGY]`."""
    settings = SETTINGS[env]
    if strategy == "openai_es":
        return Args(settings)
    if strategy == "ars":
        n, b, alpha, nu = ARS_PAPER[env]
        alpha = ARS_STEP.get(env, alpha)
        es = ESConfig(population_size=2 * n, strategy="ars", sigma=nu, learning_rate=alpha,
                      strategy_options={"top_directions": b})  # fmt: skip
        return Args(settings.replace(hidden=(), reward_shift=ARS_SHIFT.get(env, 1.0)), es)
    # The strategy's options spelled out, so that `--help` lists them as flags.
    options = dataclasses.asdict(get_strategy(strategy).Options())
    es = ESConfig(population_size=_ES.population_size, sigma=_ES.sigma, strategy=strategy,
                  strategy_options={k: v for k, v in options.items() if v is not None})  # fmt: skip
    return Args(settings, es)


def _ars_title(env: str) -> str:
    if env in ARS_STEP:
        return f"ARS V2-t as published, but step {ARS_STEP[env]} (paper: {ARS_PAPER[env][2]})"
    return "ARS V2-t as published"


PRESETS = {env: (f"{env}, OpenAI-ES with Adam", preset(env)) for env in SETTINGS} | {
    f"{env}/{s}": (
        f"{env}, " + (_ars_title(env) if s == "ars" else f"{s}, its defaults"),
        preset(env, s),
    )
    for env in SETTINGS
    for s in STRATEGIES[1:]
}


def run_name(env: str, strategy: str, seed: int) -> str:
    """The run directory's default name: `Walker2d-v5-s0`, `Walker2d-v5-ars-s0`."""
    return f"{env}{'' if strategy == 'openai_es' else '-' + strategy}-s{seed}"


def run(args: Args) -> tuple[RunResult, float]:
    """Trains; returns the run and the final center return. Used by main(), tests, benchmarks."""
    worker = WORKERS.get(args.env.env_id, MuJoCoES)
    name = args.run.name or run_name(args.env.env_id, args.es.strategy, args.es.seed)
    run_config = dataclasses.replace(args.run, name=name)
    result = Trainer(worker, args.es, run_config, {"settings": args.env}).fit()
    evaluator = offline_worker(worker, result.state)
    final = evaluator.evaluate_episodes(evaluator.center_policy(), args.final_episodes)
    print(f"return={final.returns.mean():.1f} (center policy, {args.final_episodes} episodes)")
    return result, float(final.returns.mean())


def main(argv: list[str] | None = None) -> int:
    try:
        result, _ = run(tyro.extras.overridable_config_cli(PRESETS, args=argv))
    except (ValueError, FileNotFoundError) as exc:  # e.g. a taken --run.run-dir: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the trainer said what the run directory kept
        return 130
    return 1 if result.crashed else 0


if __name__ == "__main__":
    sys.exit(main())
