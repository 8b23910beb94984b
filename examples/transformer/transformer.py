"""A transformer trained from scratch by distributed ES with low-rank perturbations.

    python -m examples.transformer                               # embedded server + 2 workers
    python -m examples.transformer --es.rank 4 --run.max-epochs 2000
    python -m examples.transformer --es.perturbation full        # full-rank ES, same model
    python -m examples.transformer --backprop                    # the Adam reference
    evochi-torch worker examples.transformer:Reverse --server HOST:PORT   # join from elsewhere

The task is sequence reversal: ``LENGTH`` digits in, the same digits reversed out, generated on
the fly from the state's epoch (every worker draws the same batch). A member's reward is the
negative cross-entropy of its predictions, the center's score the exact-match accuracy on a
fixed test set. With ``perturbation="lowrank"`` every weight matrix (attention projections,
MLP blocks, token and position embeddings, head) moves by a rank-r product per member, and the
population's forward pass reads each shared weight once for all members
(:class:`evochi_torch.lowrank_policy.LowRankPolicy`).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import tyro
from torch import nn

from evochi_torch import ESConfig, PopulationPolicy, TorchESWorker
from evochi_torch.harness import RunConfig, RunResult, Trainer
from evochi_torch.lowrank_policy import LowRankPolicy

VOCAB = 10
LENGTH = 8


class SequenceModel(nn.Module):
    """Token + position embeddings, a bidirectional transformer encoder, a linear head."""

    def __init__(self, d_model: int = 128, layers: int = 6, heads: int = 4) -> None:
        super().__init__()
        self.tokens = nn.Embedding(VOCAB, d_model)
        self.positions = nn.Embedding(LENGTH, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, VOCAB)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        where = torch.arange(seq.shape[-1], device=seq.device)
        return self.head(self.encoder(self.tokens(seq) + self.positions(where)))


def batch(seed: int, epoch: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``size`` random digit sequences and their reversals, a pure function of the arguments."""
    rng = np.random.default_rng([seed, epoch])
    x = torch.as_tensor(rng.integers(0, VOCAB, (size, LENGTH)))
    return x, x.flip(-1)


def test_set() -> tuple[torch.Tensor, torch.Tensor]:
    return batch(2**31 - 1, 0, 1000)


def exact_match(model: nn.Module) -> float:
    x, y = test_set()
    with torch.no_grad():
        return float((model(x).argmax(-1) == y).all(-1).float().mean())


class Reverse(TorchESWorker):
    default_config = ESConfig(
        population_size=256, sigma=0.01, learning_rate=0.003, perturbation="lowrank", rank=1
    )
    batch_size = 16

    def make_policy(self) -> nn.Module:
        return SequenceModel().eval()

    def score(
        self, policy: PopulationPolicy | LowRankPolicy, epoch: int, members: torch.Tensor
    ) -> torch.Tensor:
        x, y = batch(self.config.seed, self.state.epoch, self.batch_size)
        logits = policy(x.expand(len(members), *x.shape))  # [members, batch, LENGTH, VOCAB]
        loss = nn.functional.cross_entropy(
            logits.reshape(-1, VOCAB), y.repeat(len(members), 1).reshape(-1), reduction="none"
        )
        return -loss.view(len(members), -1).mean(dim=1)

    def evaluate_center(self, policy: nn.Module) -> float:
        """Exact-match accuracy on 1,000 fixed test sequences."""
        return exact_match(policy.eval())


def backprop(steps: int, batch_size: int, seed: int, every: int) -> list[tuple[int, float, float]]:
    """The same model trained by backprop with Adam: (step, seconds, test exact match)."""
    torch.manual_seed(seed)
    model = SequenceModel()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    start = time.perf_counter()
    curve = []
    for step in range(1, steps + 1):
        x, y = batch(seed, step, batch_size)
        loss = nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            curve.append((step, time.perf_counter() - start, exact_match(model.eval())))
            model.train()
            print(f"backprop step {step}: loss {loss.item():.4f} exact match {curve[-1][2]:.3f}")
    return curve


@dataclass
class Args:
    """Train a sequence-reversal transformer with distributed low-rank ES on this machine."""

    es: ESConfig = Reverse.default_config
    """the ES hyper-parameters (every ESConfig field)"""
    run: RunConfig = field(default_factory=lambda: RunConfig(max_epochs=1000, eval_every=25))
    """workers, epochs, run directory, loggers; the center score is the exact-match accuracy"""
    backprop: bool = False
    """train the same model with backprop + Adam instead (the reference), for --steps steps"""
    steps: int = 2000
    """backprop steps (with --backprop)"""


def run(args: Args) -> RunResult:
    tag = "lowrank" if args.es.perturbation == "lowrank" else "full"
    name = args.run.name or f"reverse-{tag}-s{args.es.seed}"
    return Trainer(Reverse, args.es, dataclasses.replace(args.run, name=name)).fit()


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(Args, args=argv)
    if args.backprop:
        backprop(args.steps, Reverse.batch_size, args.es.seed, every=100)
        return 0
    try:
        result = run(args)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the trainer said what the run directory kept
        return 130
    print(f"exact match {result.last['center_score']:.4f} after {result.last['epoch']} epochs "
          f"({result.last['seconds']:.1f} s)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
