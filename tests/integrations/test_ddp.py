"""DistributedDataParallel with gloo in 2 processes: a compressed model trains as plain autograd
would, in float64.

Two worker processes (this file run as a script, ranks 0 and 1, a FileStore rendezvous in
tmp_path: no port to race for) each train every scenario for 2 SGD steps on their own half of
one batch and write their final weights. DDP averages the ranks' gradients, so

* at eps 1 the weights must equal one process's plain autograd on the whole batch (the mean
  of the two halves' mean losses is the whole batch's mean loss, equal halves);
* at eps 0.9 they must equal one process's compressed model that runs each half in turn and
  averages the two gradients (each rank factors its own half, as this reference does).

Scenarios: a conv net (no BatchNorm) and a Linear-only MLP on tokens (batch, 12, 16), compressed before the DDP wrap
(as docs/guides/integrations.md recommends) and compressed through the wrapper.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import actcomp

WORLD = 2
STEPS = 2
LR = 0.1
BATCH = 8  # 4 samples per rank
MODELS = ("conv", "mlp")
ORDERS = ("compress_then_wrap", "wrap_then_compress")
EPSES = (1.0, 0.9)
SCENARIOS = list(itertools.product(MODELS, ORDERS, EPSES))


def build(kind: str) -> nn.Module:
    """The scenario's model, float64, the same weights in every process (seed 0)."""
    torch.manual_seed(0)
    if kind == "conv":
        model = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(), nn.Conv2d(6, 8, 3, stride=2), nn.Tanh(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
        )
    else:
        model = nn.Sequential(nn.Linear(16, 24), nn.ReLU(), nn.Linear(24, 24), nn.Tanh(), nn.Linear(24, 3))
    return model.double()


def batches(kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (inputs, targets) batch of BATCH samples per step, the same in every process."""
    generator = torch.Generator().manual_seed(1)
    shape, target = ((BATCH, 3, 9, 9), (BATCH, 3)) if kind == "conv" else ((BATCH, 12, 16), (BATCH, 12, 3))
    return [
        (torch.randn(shape, generator=generator, dtype=torch.float64), torch.randn(target, generator=generator, dtype=torch.float64))
        for _ in range(STEPS)
    ]


def shard(t: torch.Tensor, rank: int) -> torch.Tensor:
    per_rank = t.shape[0] // WORLD
    return t[rank * per_rank : (rank + 1) * per_rank]


def loss_of(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(model(x), y)


def name(kind: str, order: str, eps: float) -> str:
    return f"{kind}-{order}-{eps}"


def worker(rank: int, store: str, out: Path) -> None:
    """One DDP rank: every scenario, 2 steps on this rank's half, weights written to out."""
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        for kind, order, eps in SCENARIOS:
            model = build(kind)
            if order == "compress_then_wrap":
                actcomp.compress(model, eps=eps)
                wrapped = DistributedDataParallel(model)
            else:
                wrapped = DistributedDataParallel(model)
                actcomp.compress(wrapped, eps=eps)
            optimizer = torch.optim.SGD(wrapped.parameters(), lr=LR)
            for x, y in batches(kind):
                optimizer.zero_grad()
                loss_of(wrapped, shard(x, rank), shard(y, rank)).backward()
                optimizer.step()
            ran = {n: s.method for n, s in actcomp.stats(model).items()}
            torch.save({"weights": model.state_dict(), "stats": ran}, out / f"{name(kind, order, eps)}-rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def plain_whole_batch(kind: str) -> dict[str, torch.Tensor]:
    """Plain autograd in one process on the whole batch (the reference at eps 1)."""
    model = build(kind)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for x, y in batches(kind):
        optimizer.zero_grad()
        loss_of(model, x, y).backward()
        optimizer.step()
    return model.state_dict()


def compressed_halves(kind: str, eps: float) -> dict[str, torch.Tensor]:
    """The compressed model in one process, each rank's half in turn, gradients averaged (the
    reference at eps < 1: what DDP computes when each rank factors its own half)."""
    model = actcomp.compress(build(kind), eps=eps)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for x, y in batches(kind):
        total = [torch.zeros_like(p) for p in model.parameters()]
        for rank in range(WORLD):
            model.zero_grad()
            loss_of(model, shard(x, rank), shard(y, rank)).backward()
            for t, p in zip(total, model.parameters()):
                t += p.grad
        for t, p in zip(total, model.parameters()):
            p.grad = t / WORLD
        optimizer.step()
    return model.state_dict()


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory) -> Path:
    """Run the two ranks once for every scenario; the directory their results are in."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not built")
    out = tmp_path_factory.mktemp("ddp")
    store = out / "store"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH")]))}
    children = [
        subprocess.Popen([sys.executable, __file__, str(rank), str(store), str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for rank in range(WORLD)
    ]
    deadline = time.monotonic() + 120
    try:
        logs = [child.communicate(timeout=max(1.0, deadline - time.monotonic()))[0] for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    for rank, (child, log) in enumerate(zip(children, logs)):
        assert child.returncode == 0, f"rank {rank} failed:\n{log[-4000:]}"
    return out


@pytest.mark.parametrize("kind, order, eps", SCENARIOS, ids=[name(*s) for s in SCENARIOS])
def test_ddp_two_processes_match_one_process(ddp_results, kind, order, eps):
    ranks = [torch.load(ddp_results / f"{name(kind, order, eps)}-rank{r}.pt") for r in range(WORLD)]
    reference = plain_whole_batch(kind) if eps == 1.0 else compressed_halves(kind, eps)
    layers = [n for n, m in build(kind).named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for rank, result in enumerate(ranks):
        # every layer ran its compressed kernel on each rank: at eps 1 each keeps x itself
        # ("plain"); at eps 0.9 the layers whose factors are smaller than x keep factors
        assert sorted(result["stats"]) == layers, (rank, result["stats"])
        methods = set(result["stats"].values())
        assert methods == {"plain"} if eps == 1.0 else ("hosvd" in methods and methods <= {"plain", "hosvd"}), result["stats"]
        assert result["weights"].keys() == reference.keys()
        for key, value in reference.items():
            err = (result["weights"][key] - value).abs().max().item()
            assert err <= 1e-10, f"rank {rank}, {key}: max |DDP - one process| = {err:.3g}"
    # the training moved the weights: the comparison is not of two untrained models
    untrained = build(kind).state_dict()
    assert any((reference[k] - untrained[k]).abs().max() > 1e-3 for k in reference)


if __name__ == "__main__":
    worker(int(sys.argv[1]), sys.argv[2], Path(sys.argv[3]))
