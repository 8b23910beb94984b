"""ES outside RL: a small classifier for scikit-learn's bundled handwritten digits.

    python -m examples.digits                        # embedded server + 2 worker processes
    python -m examples.digits --es.population-size 128 --run.max-epochs 600
    evochi-torch play examples.digits:Digits runs/digits-s0        # test accuracy

Any `nn.Module` and any score work: each member is scored by its negative cross-entropy on
the epoch's minibatch (the same minibatch for every member, so that the ranking compares
parameters, not data), and the center evaluation is the test accuracy, no gradients anywhere.
The 1,797 8x8 images ship with scikit-learn: nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
import tyro
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from evochi_torch import ESConfig, PopulationPolicy, TorchESWorker
from evochi_torch.harness import RunConfig, RunResult, Trainer


@functools.cache
def dataset() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train x, train y, test x, test y); a fixed split, pixels scaled to [0, 1]."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(
        x / 16.0, y, test_size=0.25, random_state=0, stratify=y
    )
    as_x = functools.partial(torch.as_tensor, dtype=torch.float32)
    return as_x(x_train), torch.as_tensor(y_train), as_x(x_test), torch.as_tensor(y_test)


class Digits(TorchESWorker):
    default_config = ESConfig(population_size=64, sigma=0.05, learning_rate=0.03, seed=0)
    batch_size = 256

    def make_policy(self) -> nn.Module:
        return nn.Sequential(nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))

    def score(self, policy: PopulationPolicy, epoch: int, members: torch.Tensor) -> torch.Tensor:
        x, y, _, _ = dataset()
        # The minibatch is a function of the state's epoch: every worker picks the same one.
        rng = np.random.default_rng([self.config.seed, self.state.epoch])
        index = torch.as_tensor(rng.choice(len(x), self.batch_size, replace=False))
        xb, yb = x[index], y[index]
        logits = policy(xb.expand(len(members), *xb.shape))  # [members, batch, 10]
        loss = nn.functional.cross_entropy(
            logits.transpose(1, 2), yb.expand(len(members), -1), reduction="none"
        )
        return -loss.mean(dim=1)  # higher is better

    def evaluate_center(self, policy: nn.Module) -> float:
        """Test accuracy of the center classifier."""
        _, _, x_test, y_test = dataset()
        with torch.no_grad():
            return float((policy(x_test).argmax(-1) == y_test).float().mean())


@dataclass
class Args:
    """Train a digits classifier with distributed ES on this machine."""

    es: ESConfig = Digits.default_config
    """the ES hyper-parameters (every ESConfig field)"""
    run: RunConfig = field(default_factory=lambda: RunConfig(max_epochs=300, eval_every=10))
    """workers, epochs, run directory, loggers; the center score is the test accuracy"""


def run(args: Args) -> RunResult:
    name = args.run.name or f"digits-s{args.es.seed}"
    return Trainer(Digits, args.es, dataclasses.replace(args.run, name=name)).fit()


def main(argv: list[str] | None = None) -> int:
    try:
        result = run(tyro.cli(Args, args=argv))
    except (ValueError, FileNotFoundError) as exc:  # e.g. a taken --run.run-dir: one line
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the trainer said what the run directory kept
        return 130
    print(f"test accuracy {result.last['center_score']:.4f} after {result.last['epoch']} epochs "
          f"({result.last['seconds']:.1f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
