"""Fine-tuning runs: model and data by name, layer choice or a plan under a budget, metrics,
checkpoints and exact resume. The engine behind ``actcomp finetune``, ``measure`` and ``plan``.

Nothing a run wrote is lost: an existing run directory is refused unless the run resumes it or
is told to overwrite it, every file is replaced atomically (temp + fsync + rename, see
:mod:`actcomp.core.files`), and checkpoints hold plain data only (tensors, numbers, strings), loaded
with ``weights_only=True``, so a crafted checkpoint cannot run code.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn
from tqdm import tqdm

from actcomp.core.config import CompressionConfig
from actcomp.methods import method_class, method_names
from actcomp.optim.factory import OPTIMIZER_NAMES, make_optimizer
from actcomp.app.data import digits, image_folder, split
from actcomp.app.files import check_output_dir
from actcomp.core.files import DirectoryLock, atomic_torch_save, atomic_write_text, load_plain, temporaries
from actcomp.attach import compress, layer_state, select_layers, stats
from actcomp.memory import count_saved
from actcomp.memory.fit import FittedStep, fit
from actcomp.memory.plan import Plan, parse_bytes, plan
from actcomp.app.models import TinyMobileNet, train_only
from actcomp.app.torch_device import torch_device

BUILTIN_MODELS = ("tiny_mobilenet",)
OPTIMIZERS = OPTIMIZER_NAMES  # see actcomp.optim.factory.make_optimizer
RUN_FILES = ("config.json", "plan.json", "fit.txt", "metrics.csv", "metrics.json", "checkpoint.pt", "model.pt")
CHECKPOINT_KEYS = ("model", "optimizer", "rng", "layers", "metrics", "epoch")


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
    # googlenet and inception_v3 return their auxiliary heads' outputs too in training: the
    # loss takes the main output, so they are built without (and with the initialisation
    # chosen, which they otherwise warn about)
    options = {"aux_logits": False, "init_weights": True} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **options)
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


DIGITS_5_TO_9 = 896  # images of scikit-learn's digits 5-9


def _memory_bytes() -> int | None:
    """This machine's physical memory in bytes (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # pragma: no cover - not POSIX
        return None


def _check_fits_in_memory(count: int, channels: int, size: int, what: str) -> None:
    """ValueError, before any image is decoded, when ``count`` images of ``size`` x ``size``
    (float32) would not fit in this machine's memory."""
    needed, available = count * channels * size * size * 4, _memory_bytes()
    if available is not None and needed > available:
        raise ValueError(
            f"--size {size}: {what} would take {needed / 2**30:.1f} GiB as float32 tensors, more than this machine's "
            f"{available / 2**30:.1f} GiB of memory; give a smaller --size"
        )


def load_data(data: str, size: int = 32, seed: int = 0) -> Dataset:
    """``"digits"``: scikit-learn's digits 5-9 (the new task after pretraining on 0-4), or the
    path of an ImageFolder directory (one sub-directory per class), resized to size x size;
    70/30 seeded train/test split."""
    check_size(size)
    if data == "digits":
        _check_fits_in_memory(DIGITS_5_TO_9, 1, size, "the digits")
        images, labels = digits(classes=(5, 6, 7, 8, 9), size=size)
        return Dataset(*split(images, labels, 0.3, seed), num_classes=5)
    images, labels, classes = image_folder(data, size, check=lambda n: _check_fits_in_memory(n, 3, size, f"the {n} images of '{data}'"))
    return Dataset(*split(images, labels, 0.3, seed), num_classes=len(classes))


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything a run depends on; stored in the output directory as config.json
    (:meth:`as_dict`). ``method_settings``: the method's own settings given for the run, as
    (name, value) pairs (``(("patch", 2),)`` for gradient_filter); the method's defaults fill
    in the others (:meth:`compression_config`)."""

    model: str = "tiny_mobilenet"
    data: str = "digits"
    size: int = 32
    layers: str = "last:4"  # "last:N", "all", "re:...", or comma-separated names
    method: str = "hosvd"
    eps: float = 0.99
    method_settings: tuple[tuple[str, Any], ...] = ()
    budget: str | None = None
    target: str | None = None  # a device profile (actcomp.devices): plan for its budget
    fit: str | None = None  # a device budget for the whole step: actcomp.fit chooses the levers
    freeze_batchnorm: bool = False  # with fit: BatchNorm on running statistics (micro-batching exact)
    epochs: int = 5
    batch_size: int = 32
    lr: float = 3e-3
    optimizer: str = "adam"
    seed: int = 0
    weights: str | None = None

    def validate(self) -> None:
        """Raise ValueError naming the first setting that cannot work (before any work is done)."""
        self.compression_config()
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
        check_size(self.size)
        check_seed(self.seed)
        smallest = MIN_SIZE.get(self.model)
        if smallest is not None and self.size < smallest:
            raise ValueError(f"model {self.model!r} takes images of at least {smallest}x{smallest} pixels; give --size {smallest} or more")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a positive finite number, got {self.lr!r}")
        if self.budget is not None and self.target is not None:
            raise ValueError("give a budget or a target device profile, not both")
        if self.budget is not None:
            parse_budget(self.budget)
        if self.fit is not None:
            if self.budget is not None or self.target is not None:
                raise ValueError("give --fit (the device total of a step) or --budget/--target (a plan of what autograd keeps), not both")
            parse_budget(self.fit)
        if self.freeze_batchnorm and self.fit is None:
            raise ValueError("--freeze-batchnorm applies to the step that --fit makes; give --fit too")
        selector(self.layers)
        if self.weights is not None and not Path(self.weights).is_file():
            raise ValueError(f"weights file '{self.weights}' does not exist")

    def compression_config(self) -> CompressionConfig:
        """The compression these settings ask for (ValueError when it cannot work)."""
        return CompressionConfig(self.method, self.eps, method_settings=self.method_settings)

    def as_dict(self) -> dict[str, Any]:
        """The settings as config.json stores them: one flat object, the method's own settings
        (given or default, e.g. ``"patch"`` for gradient_filter) in place of ``method_settings``."""
        out: dict[str, Any] = {}
        for f in fields(self):
            if f.name == "method_settings":
                out.update(dict(self.compression_config().method_settings))
            else:
                out[f.name] = getattr(self, f.name)
        return out

    @staticmethod
    def from_dict(data: object, where: str = "config") -> "FinetuneConfig":
        """The config stored in a run directory's config.json (:meth:`as_dict`). Runs written
        before the profile option was renamed store it as ``device``; that key is read as
        ``target``. Runs written before methods declared their own settings store ``patch``
        whatever the method; a setting that only other methods declare is dropped."""
        if not isinstance(data, dict):
            raise ValueError(f"{where} does not hold a JSON object")
        data = dict(data)
        if "device" in data and "target" not in data:
            data["target"] = data.pop("device")
        own = {s.name for s in method_class(data.get("method", FinetuneConfig.method)).own_settings}
        others = {s.name for name in method_names() for s in method_class(name).own_settings} - own
        settings = tuple((k, data.pop(k)) for k in list(data) if k in own)
        known = {f.name for f in fields(FinetuneConfig)} - {"method_settings"}
        for k in others - known:
            data.pop(k, None)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown setting(s) {', '.join(map(repr, unknown))}")
        return FinetuneConfig(**data, method_settings=settings)


MAX_SIZE = 4096  # image side in pixels: beyond it the data of any real data set outgrows a machine
MAX_SEED = 2**32 - 1
MIN_SIZE = {"inception_v3": 75}  # torchvision models whose convolutions need larger images than --size's default


def check_size(size: int, option: str = "--size") -> None:
    """ValueError unless ``size`` is a whole number of pixels in 1..MAX_SIZE."""
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_SIZE:
        raise ValueError(f"{option} must be a whole number of pixels in 1..{MAX_SIZE}, got {size!r}")


def check_seed(seed: int, option: str = "--seed") -> None:
    """ValueError unless ``seed`` is a whole number in 0..2**32-1 (every seed derived from it
    then fits torch's 64-bit generators)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ValueError(f"{option} must be a whole number in 0..{MAX_SEED}, got {seed!r}")


def parse_budget(budget: int | float | str) -> int:
    """:func:`actcomp.memory.plan.parse_bytes`, with a budget too large for an integer number
    of bytes (``1e400``) a ValueError instead of an OverflowError."""
    try:
        return parse_bytes(budget)
    except OverflowError:
        shown = repr(budget) if len(str(budget)) <= 40 else f"'{str(budget)[:20]}...' ({len(str(budget))} characters)"
        raise ValueError(f"budget {shown} is too large to be a number of bytes") from None


def selector(layers: str) -> str | list[str]:
    """``--layers`` as :func:`actcomp.compress` takes it: ``"all"``, ``"last:N"``,
    ``"re:<pattern>"`` (the pattern checked to compile) or a list from comma-separated names."""
    if layers.startswith("re:"):
        try:
            re.compile(layers[3:])
        except re.error as error:
            raise ValueError(f"layers {layers!r}: invalid regular expression ({error})") from None
        return layers
    if layers == "all" or layers.startswith("last:"):
        return layers
    return [name.strip() for name in layers.split(",") if name.strip()]


def load_weights(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state_dict saved with ``torch.save(model.state_dict(), path)`` into ``model``.

    The file is read with ``weights_only=True`` (nothing in it runs). Raises ValueError naming
    the file when it is not a torch.save file, does not hold a state_dict (a mapping from names
    to tensors), or does not fit the model (missing or unexpected names, other shapes).
    """
    state = load_plain(path, "weights file")
    if not isinstance(state, Mapping) or not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()):
        held_type = type(state).__name__
        raise ValueError(
            f"weights file '{path}' holds a {held_type}, not a state_dict (names to tensors); "
            "save one with torch.save(model.state_dict(), path)"
        )
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    reshaped = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in state and state[k].shape != own[k].shape]
    problems = [
        f"{label} {', '.join(items[:3])}{', ...' if len(items) > 3 else ''}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("other shapes:", reshaped))
        if items
    ]
    if problems:
        raise ValueError(f"weights file '{path}' does not fit model {type(model).__name__}: {'; '.join(problems)}")
    model.load_state_dict(state)
    return model


def prepare(config: FinetuneConfig, data: Dataset, device: str | torch.device | None = None) -> tuple[nn.Module, Plan | None]:
    """Build the model on the torch ``device`` (default CPU), freeze all but the chosen layers
    and compress them (or apply a plan for the budget or target profile, calibrated there)."""
    config.validate()
    device = torch_device(device)
    torch.manual_seed(config.seed)
    model = build_model(config.model, data.num_classes, data.in_channels)
    if config.weights:
        load_weights(model, config.weights)
    model.to(device)
    sample = data.train_x[:1].to(device)
    _probe(model, sample, config)  # materialise lazy modules; a model that cannot take the inputs fails here
    names = select_layers(model, selector(config.layers), sample=sample)
    chosen: Plan | None = None
    if config.budget is not None or config.target is not None:
        calib = [(data.train_x[: config.batch_size].to(device), data.train_y[: config.batch_size].to(device))]
        with explain_model_errors(config):
            chosen = plan(
                model, calib, budget=config.budget, device=config.target, candidates=names,
                method=config.method, loss_fn=nn.functional.cross_entropy,
            )
        chosen.apply(model)
        return model, chosen
    train_only(model, names)
    if config.fit is None:  # with fit, fit() compresses (and applies the other levers) itself, on the trained layers
        compress(model, names, config=config.compression_config())
    return model, None


def _probe(model: nn.Module, sample: Tensor, config: FinetuneConfig) -> None:
    """One forward of one sample in eval mode without gradients: lazy modules take their
    shapes, and nothing is learnt (BatchNorm in training could not normalise one sample of a 1x1
    map, and its running statistics are left alone). A model that cannot take inputs of this
    size raises ValueError naming the model and --size."""
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(sample)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError) as error:
        raise ValueError(
            f"model {config.model!r} cannot run on inputs of shape {tuple(sample.shape[1:])} (--size {config.size}): "
            f"{_first_line(error)}; give a larger --size"
        ) from None
    finally:
        model.train(training)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class explain_model_errors:
    """Turn torch's BatchNorm error for a batch of one sample on a 1x1 map ("Expected more
    than 1 value per channel when training") into one naming the settings that cause it."""

    def __init__(self, config: FinetuneConfig) -> None:
        self.config = config

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, _tb: object) -> bool:
        if isinstance(error, ValueError) and "Expected more than 1 value per channel" in str(error):
            c = self.config
            raise ValueError(
                f"model {c.model!r} at --size {c.size}: a BatchNorm layer sees one value per channel (a 1x1 map of one "
                f"sample), which it cannot normalise in training; give --batch-size 2 or more (now {c.batch_size}) "
                "or a larger --size"
            ) from None
        return False


def batch_starts(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each batch of an epoch over ``n`` samples; a last batch of one sample
    is joined to the one before (BatchNorm in training cannot normalise a single sample of a
    1x1 map, as torchvision models have at small sizes)."""
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


def _layer_states(model: nn.Module) -> dict[str, dict]:
    """Every compressed layer's state as plain data (settings and asi's tracked subspaces)."""
    return {n: s.state_dict() for n, m in model.named_modules() if (s := layer_state(m)) is not None}


def _restore_layers(model: nn.Module, layers: object, where: Path) -> None:
    """Put back every compressed layer's state (settings, asi's subspaces) from a checkpoint's
    ``layers`` (plain data: see :meth:`actcomp.LayerState.state_dict`)."""
    modules = dict(model.named_modules())
    if not isinstance(layers, dict):
        raise ValueError(f"checkpoint '{where}': 'layers' is not a mapping")
    for name, data in layers.items():
        state = layer_state(modules[name]) if name in modules else None
        if state is None or not isinstance(data, dict):
            raise ValueError(f"checkpoint '{where}': the state of layer {name!r} does not fit this run")
        try:
            state.load_state_dict(data)
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"checkpoint '{where}': the state of layer {name!r} does not fit this run ({error})") from None


def _evaluate(model: nn.Module, x: Tensor, y: Tensor, batch_size: int, device: torch.device) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(y), batch_size):
            xb, yb = x[start : start + batch_size].to(device), y[start : start + batch_size].to(device)
            correct += int((model(xb).argmax(1) == yb).sum())
    model.train()
    return correct / max(1, len(y))


def _stored_config(out: Path) -> FinetuneConfig:
    path = out / "config.json"
    try:
        return FinetuneConfig.from_dict(json.loads(path.read_text()), f"'{path}'")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, TypeError) as error:
        raise ValueError(f"cannot resume: '{path}' is missing or unreadable ({type(error).__name__}: {error})") from None


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """A checkpoint written by :func:`run_finetune`, loaded with ``weights_only=True`` onto
    ``device``; ValueError when it is refused, damaged or lacks one of its parts."""
    state = load_plain(path, "checkpoint", map_location=device)
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS):
        missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
        raise ValueError(f"checkpoint '{path}' is not an actcomp finetune checkpoint (missing {', '.join(missing)})")
    epoch = state["epoch"]
    if not (isinstance(epoch, int) and not isinstance(epoch, bool) and isinstance(state["metrics"], list) and isinstance(state["rng"], Tensor)):
        raise ValueError(f"checkpoint '{path}' is not an actcomp finetune checkpoint (epoch, metrics or rng of the wrong type)")
    if epoch < 1 or len(state["metrics"]) != epoch:
        raise ValueError(f"checkpoint '{path}' is damaged: it is at epoch {epoch} with {len(state['metrics'])} epoch(s) of metrics")
    return state


def _existing_run(out: Path) -> list[str]:
    return [name for name in RUN_FILES if (out / name).exists()] + [p.name for p in temporaries(out / "checkpoint.pt")]


def resumed_epochs(out_dir: str | Path) -> int | None:
    """The epochs of the run stored in ``out_dir`` (its config.json), None when there is none
    readable: ``--resume`` without ``--epochs`` finishes the run as it was started."""
    try:
        return int(json.loads((Path(out_dir) / "config.json").read_text())["epochs"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return None


def run_finetune(
    config: FinetuneConfig,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    after_epoch: Callable[[int], None] | None = None,
    *,
    overwrite: bool = False,
    device: str | torch.device | None = None,
) -> list[dict]:
    """Fine-tune as ``config`` says on the torch ``device`` (default CPU), writing to
    ``out_dir``: config.json, plan.json (with a budget or target), metrics.csv and metrics.json
    (one row per epoch), checkpoint.pt (after every epoch: model, optimizer, RNG and
    subspace-tracker state, as plain data) and model.pt (final weights, on the CPU).

    ``resume=True`` continues from checkpoint.pt with no loss of progress: batches are drawn
    from a generator seeded by (seed, epoch) and every piece of state is restored, so the final
    weights equal those of an uninterrupted run with the same seed on the same device. A
    directory that already holds a run is refused unless ``resume`` or ``overwrite`` (which
    deletes that run's files once the new run is ready to start) is given. One process writes a
    run directory at a time: it is claimed with a lock file (:class:`actcomp.core.files.DirectoryLock`)
    before anything in it is checked, and a second writer is refused naming the holder (a lock
    left by a killed run is taken over). On resume, ``config.epochs`` may differ from the
    stored run's (config.json is updated); a checkpoint beyond it is refused. The settings and the
    output directory are checked before any training. Every file is replaced atomically.
    ``after_epoch`` is called with the epoch number after each checkpoint (tests use it to
    interrupt a run).
    """
    device = torch_device(device)
    config.validate()
    if resume and overwrite:
        raise ValueError("give --resume or --overwrite, not both")
    out = check_output_dir(out_dir)
    with DirectoryLock(out, "run directory", hint="wait for that run to finish, or give another --out"):
        return _run_locked(config, out, resume, overwrite, progress, after_epoch, device)


def _run_locked(
    config: FinetuneConfig, out: Path, resume: bool, overwrite: bool, progress: bool,
    after_epoch: Callable[[int], None] | None, device: torch.device,
) -> list[dict]:
    """:func:`run_finetune` in ``out``, which this process holds (:class:`DirectoryLock`): no
    other writer can check, write or delete a file there meanwhile, and any temporary file
    there is one a killed writer left."""
    checkpoint_path = out / "checkpoint.pt"
    for name in RUN_FILES:  # left by a killed writer (this process holds the directory)
        for leftover in temporaries(out / name):
            leftover.unlink(missing_ok=True)
    existing = _existing_run(out)
    checkpoint: dict | None = None
    if resume:
        if not checkpoint_path.exists():
            raise ValueError(f"nothing to resume: '{checkpoint_path}' does not exist")
        stored = _stored_config(out)
        stored_settings, settings = stored.as_dict(), config.as_dict()
        if stored_settings != settings:
            changed = [k for k in {**stored_settings, **settings} if stored_settings.get(k) != settings.get(k)]
            if changed != ["epochs"]:
                raise ValueError(f"cannot resume with different settings: {', '.join(changed)} differ from {out / 'config.json'}")
        checkpoint = load_checkpoint(checkpoint_path, device)
        if checkpoint["epoch"] > config.epochs:
            raise ValueError(
                f"checkpoint '{checkpoint_path}' is at epoch {checkpoint['epoch']}, beyond the run's {config.epochs} epochs; "
                f"give --epochs {checkpoint['epoch']} or more"
            )
    elif existing and not overwrite:
        raise ValueError(
            f"'{out}' already holds a run ({', '.join(existing)}); give --resume to continue it, "
            "--overwrite to replace it, or another --out"
        )
    data = load_data(config.data, config.size, config.seed)
    model, chosen = prepare(config, data, device)
    optimizer = make_optimizer(config.optimizer, model, config.lr)
    metrics: list[dict] = []
    start_epoch = 0
    if checkpoint is not None:
        try:
            model.load_state_dict(checkpoint["model"])
            optimizer.load_state_dict(checkpoint["optimizer"])
            torch.set_rng_state(checkpoint["rng"].cpu())
            if device.type == "cuda" and "cuda_rng" in checkpoint:
                torch.cuda.set_rng_state(checkpoint["cuda_rng"].cpu(), device)
        except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"checkpoint '{checkpoint_path}' does not fit this run ({str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__})") from None
        _restore_layers(model, checkpoint["layers"], checkpoint_path)
        metrics, start_epoch = list(checkpoint["metrics"]), int(checkpoint["epoch"])
        if _stored_config(out).epochs != config.epochs:  # config.json says what the run now is
            atomic_write_text(out / "config.json", json.dumps(config.as_dict(), indent=2))
    else:
        for name in existing:  # only with overwrite=True: the old run goes once the new one is ready
            (out / name).unlink()
        atomic_write_text(out / "config.json", json.dumps(config.as_dict(), indent=2))
        if chosen is not None:
            atomic_write_text(out / "plan.json", chosen.to_json())
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    fitted: FittedStep | None = None
    if config.fit is not None:  # the levers fit() measures best for the device budget, calibrated on the first batch
        first = data.train_x[: config.batch_size].to(device), data.train_y[: config.batch_size].to(device)
        # a resumed run keeps the levers it was fitted with (a new search could time others fastest)
        levers = checkpoint.get("fit") if checkpoint is not None else None
        with explain_model_errors(config):
            fitted = fit(model, optimizer, config.fit, first, loss_fn, method=config.method, levers=levers, freeze_batchnorm=config.freeze_batchnorm)
        atomic_write_text(out / "fit.txt", f"{fitted.report}\n")
    n = len(data.train_y)
    for epoch in range(start_epoch, config.epochs):
        generator = torch.Generator().manual_seed(config.seed * 1_000_003 + epoch)
        order = torch.randperm(n, generator=generator)
        losses, step_ms, saved_bytes = [], [], 0
        batches = batch_starts(n, config.batch_size)
        for i, (start, stop) in enumerate(tqdm(batches, desc=f"epoch {epoch + 1}/{config.epochs}", leave=False, disable=not progress)):
            index = order[start:stop]
            xb, yb = data.train_x[index].to(device), data.train_y[index].to(device)
            begin = time.perf_counter()
            if fitted is not None:  # forward, backward and update as fit chose (the budget checked on a measured step)
                with explain_model_errors(config):
                    loss = fitted(xb, yb)
            else:
                optimizer.zero_grad()
                with explain_model_errors(config):
                    if i == 0:  # measure what autograd keeps on the epoch's first step
                        with count_saved(model) as saved:
                            loss = loss_fn(model(xb), yb)
                        saved_bytes = saved.saved_bytes
                    else:
                        loss = loss_fn(model(xb), yb)
                loss.backward()
                optimizer.step()
            losses.append(loss.item())  # the host sync ends the step on an asynchronous device
            step_ms.append((time.perf_counter() - begin) * 1e3)
        layer_bytes = sum(s.kept_bytes for s in stats(model).values())
        metrics.append({
            "epoch": epoch + 1,
            "train_loss": statistics.fmean(losses),
            "test_accuracy": _evaluate(model, data.test_x, data.test_y, config.batch_size, device),
            "step_ms": statistics.median(step_ms),
            "saved_bytes": saved_bytes,
            "layer_bytes": layer_bytes,
            **({"device_total_bytes": fitted.report.measured_total_bytes} if fitted is not None else {}),
        })
        optimizer_state = fitted.optimizer_state_dict() if fitted is not None else optimizer.state_dict()
        state = {
            "model": model.state_dict(), "optimizer": optimizer_state, "rng": torch.get_rng_state(),
            "layers": _layer_states(model) if fitted is None else {}, "metrics": metrics, "epoch": epoch + 1,
        }
        if fitted is not None:
            state["fit"] = fitted.report.chosen.levers()
        if device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(device)
        atomic_torch_save(state, checkpoint_path)  # a kill leaves the previous checkpoint whole
        _write_metrics(out, metrics)
        if after_epoch is not None:
            after_epoch(epoch + 1)
    if fitted is not None:
        fitted.remove()  # the model as it was: plain modules, no hooks
    atomic_torch_save({k: v.detach().cpu() for k, v in model.state_dict().items()}, out / "model.pt")
    _write_metrics(out, metrics)
    if hasattr(optimizer, "remove_hooks"):  # SINGD, HyLo: detach their hooks from the model
        optimizer.remove_hooks()
    return metrics


def _write_metrics(out: Path, metrics: list[dict]) -> None:
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=2))
    if metrics:
        table = io.StringIO(newline="")
        writer = csv.DictWriter(table, fieldnames=list(metrics[0]))
        writer.writeheader()
        writer.writerows(metrics)
        atomic_write_text(out / "metrics.csv", table.getvalue())
