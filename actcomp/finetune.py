"""Fine-tuning runs: model and data by name, layer choice or a plan under a budget, metrics,
checkpoints and exact resume. The engine behind ``actcomp finetune``, ``measure`` and ``plan``.
"""

from __future__ import annotations

import csv
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from actcomp.config import CompressionConfig
from actcomp.data import digits, split
from actcomp.hooks import compress, layer_state, select_layers, stats
from actcomp.memory import count_saved
from actcomp.memory.plan import Plan, plan
from actcomp.models import TinyMobileNet

BUILTIN_MODELS = ("tiny_mobilenet",)
OPTIMIZERS = ("sgd", "momentum", "adam", "singd", "hylo")


def build_model(name: str, num_classes: int, in_channels: int) -> nn.Module:
    """A built-in model (``tiny_mobilenet``) or a torchvision classification model by name,
    with random weights (nothing is downloaded); grey inputs are repeated to 3 channels for
    torchvision models."""
    if name == "tiny_mobilenet":
        return TinyMobileNet(num_classes=num_classes, in_channels=in_channels)
    try:
        import torchvision
    except ImportError:  # pragma: no cover - the [vision] extra is missing
        raise ValueError(f"model {name!r} needs torchvision (pip install 'actcomp[vision]')") from None
    available = set(torchvision.models.list_models(module=torchvision.models))
    if name not in available:
        raise ValueError(f"unknown model {name!r}; built-in: {', '.join(BUILTIN_MODELS)}; or a torchvision classifier such as mobilenet_v2, resnet18")
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if in_channels == 1:
        return nn.Sequential(_Repeat3(), model)
    return model


class _Repeat3(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.expand(-1, 3, -1, -1)


@dataclass(frozen=True)
class Dataset:
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int

    @property
    def in_channels(self) -> int:
        return int(self.train_x.shape[1])


def load_data(data: str, size: int = 32, seed: int = 0) -> Dataset:
    """``"digits"``: scikit-learn's digits 5-9 (the new task after pretraining on 0-4), or the
    path of an ImageFolder directory (one sub-directory per class), resized to size x size;
    70/30 seeded train/test split."""
    if data == "digits":
        images, labels = digits(classes=(5, 6, 7, 8, 9), size=size)
        return Dataset(*split(images, labels, 0.3, seed), num_classes=5)
    path = Path(data)
    if not path.is_dir():
        raise ValueError(f"data directory '{data}' does not exist (use 'digits' or an ImageFolder directory)")
    from torchvision import datasets, transforms

    folder = datasets.ImageFolder(str(path), transform=transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor()]))
    if len(folder) == 0:
        raise ValueError(f"data directory '{data}' holds no images")
    images = torch.stack([folder[i][0] for i in range(len(folder))])
    labels = torch.tensor(folder.targets)
    return Dataset(*split(images, labels, 0.3, seed), num_classes=len(folder.classes))


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything a run depends on; stored in the output directory as config.json."""

    model: str = "tiny_mobilenet"
    data: str = "digits"
    size: int = 32
    layers: str = "last:4"  # "last:N", "all", "re:...", or comma-separated names
    method: str = "hosvd"
    eps: float = 0.8
    patch: int = 4
    budget: str | None = None
    device: str | None = None
    epochs: int = 5
    batch_size: int = 32
    lr: float = 3e-3
    optimizer: str = "adam"
    seed: int = 0
    weights: str | None = None

    def validate(self) -> None:
        CompressionConfig(self.method, self.eps, self.patch)
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.optimizer == "singd":
            try:
                from actcomp.optim import SINGD  # noqa: F401
            except ImportError as error:
                raise ValueError(str(error)) from None
        for name in ("epochs", "batch_size", "size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.budget is not None and self.device is not None:
            raise ValueError("give a budget or a device, not both")
        if self.weights is not None and not Path(self.weights).is_file():
            raise ValueError(f"weights file '{self.weights}' does not exist")


def _selector(layers: str) -> str | list[str]:
    if layers == "all" or layers.startswith(("last:", "re:")):
        return layers
    return [name.strip() for name in layers.split(",") if name.strip()]


def _optimizer(name: str, params: list[nn.Parameter], lr: float, model: nn.Module) -> torch.optim.Optimizer:
    if name in ("singd", "hylo"):  # second-order, statistics from the stored factors
        from actcomp.optim.compare import make_optimizer

        return make_optimizer(name, model, lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9 if name == "momentum" else 0.0)


def prepare(config: FinetuneConfig, data: Dataset) -> tuple[nn.Module, Plan | None]:
    """Build the model, freeze all but the chosen layers and compress them (or apply a plan)."""
    config.validate()
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.num_classes, data.in_channels)
    if config.weights:
        model.load_state_dict(torch.load(config.weights, map_location="cpu", weights_only=True))
    sample = data.train_x[:1]
    model(sample)  # materialise lazy modules
    names = select_layers(model, _selector(config.layers), sample=sample)
    chosen: Plan | None = None
    if config.budget is not None or config.device is not None:
        calib = [(data.train_x[: config.batch_size], data.train_y[: config.batch_size])]
        chosen = plan(
            model, calib, budget=config.budget, device=config.device, candidates=names,
            method=config.method, loss_fn=nn.functional.cross_entropy,
        )
        chosen.apply(model)
        return model, chosen
    model.requires_grad_(False)
    modules = dict(model.named_modules())
    for name in names:
        modules[name].requires_grad_(True)
    compress(model, names, config=CompressionConfig(config.method, config.eps, config.patch))
    return model, None


def _layer_states(model: nn.Module) -> dict[str, dict]:
    """Every compressed layer's state as plain data (settings and asi's tracked subspaces)."""
    return {n: s.state_dict() for n, m in model.named_modules() if (s := layer_state(m)) is not None}


def _evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            correct += int((model(x[start : start + batch_size]).argmax(1) == y[start : start + batch_size]).sum())
    model.train()
    return correct / max(1, len(y))


def run_finetune(
    config: FinetuneConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    after_epoch: Callable[[int], None] | None = None,
) -> list[dict]:
    """Fine-tune as ``config`` says, writing to ``out_dir``: config.json, plan.json (with a
    budget), metrics.csv and metrics.json (one row per epoch), checkpoint.pt (after every epoch:
    model, optimizer, RNG and subspace-tracker state) and model.pt (final weights).

    ``resume=True`` continues from checkpoint.pt with no loss of progress: batches are drawn
    from a generator seeded by (seed, epoch) and every piece of state is restored, so the final
    weights equal those of an uninterrupted run with the same seed. ``after_epoch`` is called
    with the epoch number after each checkpoint (tests use it to interrupt a run).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    checkpoint_path = out / "checkpoint.pt"
    if resume:
        if not checkpoint_path.exists():
            raise ValueError(f"nothing to resume: '{checkpoint_path}' does not exist")
        stored = FinetuneConfig(**json.loads((out / "config.json").read_text()))
        if asdict(stored) != asdict(config):
            changed = [f.name for f in fields(config) if getattr(config, f.name) != getattr(stored, f.name)]
            if changed != ["epochs"]:
                raise ValueError(f"cannot resume with different settings: {', '.join(changed)} differ from {out / 'config.json'}")
    data = load_data(config.data, config.size, config.seed)
    model, chosen = prepare(config, data)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _optimizer(config.optimizer, params, config.lr, model)
    metrics: list[dict] = []
    start_epoch = 0
    if resume:
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        modules = dict(model.named_modules())
        for name, layer_data in state["layers"].items():
            layer_state(modules[name]).load_state_dict(layer_data)
        metrics, start_epoch = state["metrics"], state["epoch"]
    else:
        (out / "config.json").write_text(json.dumps(asdict(config), indent=2))
        if chosen is not None:
            chosen.save(out / "plan.json")
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    n = len(data.train_y)
    for epoch in range(start_epoch, config.epochs):
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=generator)
        losses, step_ms, saved_bytes = [], [], 0
        batches = range(0, n, config.batch_size)
        for i, start in enumerate(tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=not progress)):
            index = order[start : start + config.batch_size]
            xb, yb = data.train_x[index], data.train_y[index]
            begin = time.perf_counter()
            optimizer.zero_grad()
            if i == 0:  # measure what autograd keeps on the epoch's first step
                with count_saved(model) as saved:
                    loss = loss_fn(model(xb), yb)
                saved_bytes = saved.saved_bytes
            else:
                loss = loss_fn(model(xb), yb)
            loss.backward()
            optimizer.step()
            step_ms.append((time.perf_counter() - begin) * 1e3)
            losses.append(loss.item())
        layer_bytes = sum(s.kept_bytes for s in stats(model).values())
        metrics.append({
            "epoch": epoch + 1,
            "train_loss": statistics.fmean(losses),
            "test_accuracy": _evaluate(model, data.test_x, data.test_y, config.batch_size),
            "step_ms": statistics.median(step_ms),
            "saved_bytes": saved_bytes,
            "layer_bytes": layer_bytes,
        })
        state = {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": torch.get_rng_state(),
            "layers": _layer_states(model), "metrics": metrics, "epoch": epoch + 1,
        }
        torch.save(state, out / "checkpoint.tmp")
        os.replace(out / "checkpoint.tmp", checkpoint_path)  # atomic: a kill never leaves half a checkpoint
        _write_metrics(out, metrics)
        if after_epoch is not None:
            after_epoch(epoch + 1)
    torch.save(model.state_dict(), out / "model.pt")
    _write_metrics(out, metrics)
    if hasattr(optimizer, "remove_hooks"):  # SINGD, HyLo: detach their hooks from the model
        optimizer.remove_hooks()
    return metrics


def _write_metrics(out: Path, metrics: list[dict]) -> None:
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if metrics:
        with open(out / "metrics.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(metrics[0]))
            writer.writeheader()
            writer.writerows(metrics)
