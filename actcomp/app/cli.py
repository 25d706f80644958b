"""The ``actcomp`` command: demo, finetune, measure, plan, compare, export, devices.

Errors in the user's input (unknown model, missing data directory, budget too small, eps out
of range, a damaged or crafted file, an output path that cannot be written, ...) print one
line on stderr and exit with code 2, without a traceback; they are found before any training.
A failure of the machine while working (disk full) prints one line and exits with code 1.

``--device`` is the torch device to train and measure on (cpu, cuda, cuda:N, mps);
``--target`` the device profile to plan for (stm32h743, a .toml file). The old spelling
``--device <profile>`` still works, with a warning: a value that ``torch.device`` does not
accept cannot be a torch device, so it is read as a profile.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from actcomp.core.config import CompressionConfig
from actcomp.linalg.numerics import check_eps
from actcomp.memory.fit import BudgetExceededError
from actcomp.methods import method_class, method_names
from actcomp.methods.base import Setting
from actcomp.app.files import check_output_dir, check_output_file
from actcomp.core.files import atomic_write_text
from actcomp.optim.factory import OPTIMIZER_NAMES


def _resolve_devices(args: argparse.Namespace, cpu_only: bool = False) -> None:
    """Split ``--device`` into the torch device (``args.torch_device``) and, for the deprecated
    spelling ``--device <profile>``, the profile (``args.target``), with a warning on stderr."""
    from actcomp.app.torch_device import is_torch_device, torch_device

    spec = args.device
    if spec is not None and not is_torch_device(spec):
        if not hasattr(args, "target"):
            raise ValueError(f"--device {spec!r} is not a torch device; give cpu, cuda, cuda:N or mps")
        if args.target is not None:
            raise ValueError(f"--device {spec!r} names a device profile and --target {args.target!r} another; give the profile once, with --target")
        print(
            f"actcomp {args.command}: warning: --device {spec} names a device profile; that spelling is deprecated, "
            f"use --target {spec} (--device now chooses the torch device: cpu, cuda, cuda:N, mps)",
            file=sys.stderr,
        )
        args.target, spec = spec, None
    args.torch_device = torch_device(spec)
    if cpu_only and args.torch_device.type != "cpu":
        raise ValueError(f"actcomp {args.command} runs on the CPU; --device {spec} is not supported here")


def _check_budget(budget: str | None) -> None:
    from actcomp.app.finetune import parse_budget

    if budget is not None:
        parse_budget(budget)


def _demo_vit(args: argparse.Namespace) -> int:
    from actcomp.app.demo_tokens import format_token_table, run_token_demo, token_rows_as_dicts

    mobilenet_only = (
        ("--layers", args.layers), ("--budget", args.budget), ("--every-eps", args.every_eps), ("--no-every", args.no_every or None),
        ("--fit", args.fit),
    )
    for option, value in mobilenet_only:
        if value is not None:
            raise ValueError(f"{option} applies to --model mobilenet; the vit demo fine-tunes every layer")
    _resolve_devices(args, cpu_only=True)
    _check_training_numbers(args)
    eps = 0.9 if args.eps is None else args.eps
    neighbour_eps = 0.99 if args.neighbour_eps is None else args.neighbour_eps
    check_eps(eps)  # a bad eps fails here, before any training
    check_eps(neighbour_eps)
    out = check_output_dir(args.out)
    rows = run_token_demo(
        eps=eps, neighbour_eps=neighbour_eps, pretrain_epochs=args.pretrain_epochs if args.pretrain_epochs is not None else 20,
        finetune_epochs=args.epochs if args.epochs is not None else 10, batch_size=args.batch_size, seed=args.seed,
        progress=not args.no_progress,
    )
    print("Fine-tuning a TinyViT (2x2 patches as tokens) on digits 5-9 after pretraining on 0-4 (scikit-learn digits, 8x8)")
    print(format_token_table(rows))
    atomic_write_text(out / "demo_vit.json", json.dumps(token_rows_as_dicts(rows), indent=2))
    print(f"\nwrote {out / 'demo_vit.json'}")
    return 0


def _demo(args: argparse.Namespace) -> int:
    from actcomp.app.demo import check_layers, format_table, rows_as_dicts, run_demo
    from actcomp.app.plots import plot_demo

    if args.model == "vit":
        return _demo_vit(args)
    if args.neighbour_eps is not None:
        raise ValueError("--neighbour-eps applies to --model vit")
    args.layers = 4 if args.layers is None else args.layers
    args.budget = "2.5MiB" if args.budget is None else args.budget
    args.eps = CompressionConfig().eps if args.eps is None else args.eps  # compress()'s default
    args.epochs = 6 if args.epochs is None else args.epochs
    args.pretrain_epochs = 6 if args.pretrain_epochs is None else args.pretrain_epochs
    args.every_eps = CompressionConfig().eps if args.every_eps is None else args.every_eps
    _resolve_devices(args)
    check_eps(args.eps)  # bad settings and outputs fail here, before any training
    check_eps(args.every_eps)
    _check_budget(args.budget)
    _check_budget(args.fit)
    if args.fit is not None and args.no_every:
        raise ValueError("--fit sets the budget of the every-layer fit run, which --no-every skips")
    if args.layers < 1:
        raise ValueError(f"--layers must be at least 1, got {args.layers}")
    if args.seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {args.seeds}")
    check_layers(args.layers)
    _check_training_numbers(args)
    out = check_output_dir(args.out)
    rows, chosen = run_demo(
        layers=args.layers, eps=args.eps, budget=args.budget, pretrain_epochs=args.pretrain_epochs,
        finetune_epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
        device=args.torch_device, whole_step=not args.no_every, every_eps=args.every_eps, fit_budget=args.fit, seeds=args.seeds,
    )
    print("Fine-tuning TinyMobileNet on digits 5-9 after pretraining on 0-4 (scikit-learn digits, 32x32)")
    print(format_table(rows))
    print(f"\nPlan for {args.budget}:\n{chosen}")
    atomic_write_text(out / "demo.json", json.dumps(rows_as_dicts(rows), indent=2))
    atomic_write_text(out / "plan.json", chosen.to_json())
    print(f"\nwrote {plot_demo(rows, out / 'demo.png')}, {out / 'demo.json'}, {out / 'plan.json'}")
    return 0


def _check_training_numbers(args: argparse.Namespace) -> None:
    from actcomp.app.finetune import check_seed

    for name in ("epochs", "pretrain_epochs", "batch_size"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if getattr(args, "seed", None) is not None:
        check_seed(args.seed)


def _method_setting_options() -> dict[str, tuple[Setting, tuple[str, ...]]]:
    """Every setting the registered methods declare (``own_settings``), by name, with the
    methods declaring it: each is the command line option ``--name``."""
    options: dict[str, tuple[Setting, tuple[str, ...]]] = {}
    for method in method_names():
        for setting in method_class(method).own_settings:
            first, methods = options.get(setting.name, (setting, ()))
            options[setting.name] = (first, (*methods, method))
    return options


def _given_method_settings(args: argparse.Namespace) -> tuple[tuple[str, object], ...]:
    """The method settings given on the command line, as (name, value) pairs (those not given
    take the method's defaults; one the chosen method does not declare is refused)."""
    return tuple((name, getattr(args, name)) for name in _method_setting_options() if getattr(args, name) is not None)


def _finetune_config(args: argparse.Namespace):
    from actcomp.app.finetune import FinetuneConfig

    _resolve_devices(args)
    config = FinetuneConfig(
        model=args.model, data=args.data, size=args.size, layers=args.layers, method=args.method, eps=args.eps,
        method_settings=_given_method_settings(args), budget=args.budget, target=args.target, fit=args.fit,
        freeze_batchnorm=args.freeze_batchnorm,
        epochs=getattr(args, "epochs", 1),
        batch_size=args.batch_size, lr=getattr(args, "lr", 3e-3), optimizer=getattr(args, "optimizer", "adam"),
        seed=args.seed, weights=args.weights,
    )
    config.validate()
    return config


def _finetune(args: argparse.Namespace) -> int:
    from actcomp.app.finetune import resumed_epochs, run_finetune

    if args.epochs is None:  # --resume without --epochs finishes the run as it was started
        args.epochs = (resumed_epochs(args.out) if args.resume else None) or 5
    config = _finetune_config(args)
    metrics = run_finetune(
        config, args.out, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress, device=args.torch_device
    )
    for row in metrics:
        print(
            f"epoch {row['epoch']}: loss {row['train_loss']:.4f}, test accuracy {100 * row['test_accuracy']:.1f}%, "
            f"{row['step_ms']:.1f} ms/step, kept {row['saved_bytes']} bytes"
        )
    print(f"wrote {args.out}/metrics.csv, metrics.json, checkpoint.pt, model.pt")
    return 0


def _measure(args: argparse.Namespace) -> int:
    from torch import nn

    from actcomp.app.finetune import explain_model_errors, load_data, prepare
    from actcomp.memory import measure

    config = _finetune_config(args)
    data = load_data(config.data, config.size, config.seed)
    model, _ = prepare(config, data, args.torch_device)
    x, y = data.train_x[: config.batch_size].to(args.torch_device), data.train_y[: config.batch_size].to(args.torch_device)
    with explain_model_errors(config):
        report = measure(model, x, y, nn.functional.cross_entropy)
    print(report.to_json() if args.json else report)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from actcomp.app.finetune import load_data, prepare

    config = _finetune_config(args)
    if args.budget is None and args.target is None and args.fit is None:
        raise ValueError("give --budget (e.g. 512KiB), --target (a device profile, see 'actcomp devices') or --fit (a device total, e.g. 256MiB)")
    if args.out:
        check_output_file(args.out)
    data = load_data(config.data, config.size, config.seed)
    model, chosen = prepare(config, data, args.torch_device)
    if config.fit is not None:  # the levers for the whole step within the device total, measured; no update is taken
        return _plan_fit(args, config, model, data)
    print(chosen)
    if args.out:
        atomic_write_text(args.out, chosen.to_json())
        print(f"wrote {args.out}")
    return 0


def _plan_fit(args: argparse.Namespace, config, model, data) -> int:
    from torch import nn

    from actcomp.app.finetune import explain_model_errors
    from actcomp.memory.fit import fit
    from actcomp.optim.factory import make_optimizer

    optimizer = make_optimizer(config.optimizer, model, config.lr)
    batch = data.train_x[: config.batch_size].to(args.torch_device), data.train_y[: config.batch_size].to(args.torch_device)
    with explain_model_errors(config):
        step = fit(model, optimizer, config.fit, batch, nn.functional.cross_entropy, method=config.method, freeze_batchnorm=config.freeze_batchnorm)
    print(step.report)
    if args.out:
        atomic_write_text(args.out, json.dumps({"budget": config.fit, "levers": step.report.chosen.levers()}, indent=2))
        print(f"wrote {args.out}")
    step.remove()
    return 0


def _compare_peft(args: argparse.Namespace) -> int:
    from actcomp.app.compare import format_peft_table, run_peft_compare, write_csv
    from actcomp.app.plots import plot_compare

    check_eps(args.eps)
    if args.max_layers < 1:
        raise ValueError(f"--max-layers must be at least 1, got {args.max_layers}")
    if args.reflections < 2 or args.reflections % 2:
        raise ValueError(f"--reflections must be a positive even number (they start in equal pairs), got {args.reflections}")
    _check_compare_numbers(args)
    out = check_output_dir(args.out)
    points = run_peft_compare(
        max_layers=args.max_layers, reflections=args.reflections, eps=args.eps, lr=args.lr, pretrain_epochs=args.pretrain_epochs,
        finetune_epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
    )
    print(format_peft_table(points))
    title = "SVD-parametrised vs plain fine-tuning (labels: layers fine-tuned)"
    print(f"wrote {write_csv(points, out / 'peft.csv')}, {plot_compare(points, out / 'peft.png', title)}")
    return 0


def _compare_optimizers(args: argparse.Namespace) -> int:
    from actcomp.app.compare import write_csv
    from actcomp.app.optim_compare import check_optimizer_names, format_points, run_optimizer_compare

    names = tuple(n.strip() for n in args.optimizers.split(","))
    check_eps(args.eps)
    check_optimizer_names(names)
    if args.max_layers < 1:
        raise ValueError(f"--max-layers must be at least 1, got {args.max_layers}")
    _check_compare_numbers(args)
    out = check_output_dir(args.out)
    points = run_optimizer_compare(
        optimizers=names, layers=args.max_layers, eps=args.eps, pretrain_epochs=args.pretrain_epochs,
        finetune_epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
    )
    print(f"Optimizers on the last {args.max_layers} layers, hosvd eps {args.eps:g} (same activation memory for all)")
    print(format_points(points))
    print(f"wrote {write_csv(points, out / 'optimizers.csv')}")
    return 0


def _check_compare_numbers(args: argparse.Namespace) -> None:
    """Epochs, batch size, seed and --max-layers of a comparison, before any training."""
    from actcomp.app.demo import check_layers

    _check_training_numbers(args)
    check_layers(args.max_layers, "--max-layers")


def _compare(args: argparse.Namespace) -> int:
    from actcomp.app.compare import run_compare, variants, write_csv
    from actcomp.app.plots import plot_compare

    _resolve_devices(args, cpu_only=args.peft or bool(args.optimizers))
    if args.peft:
        return _compare_peft(args)
    if args.optimizers:
        return _compare_optimizers(args)

    methods = tuple(m.strip() for m in args.methods.split(","))
    try:
        patches = tuple(int(p) for p in args.patches.split(","))
    except ValueError:
        raise ValueError(f"--patches must be comma-separated whole numbers, got {args.patches!r}") from None
    variants(methods, args.eps, patches)  # bad methods and settings fail here, before any training
    if args.max_layers < 1:
        raise ValueError(f"--max-layers must be at least 1, got {args.max_layers}")
    _check_compare_numbers(args)
    out = check_output_dir(args.out)
    points = run_compare(
        methods=methods, max_layers=args.max_layers, eps=args.eps, patches=patches, pretrain_epochs=args.pretrain_epochs,
        finetune_epochs=args.epochs, batch_size=args.batch_size, seed=args.seed, progress=not args.no_progress,
        device=args.torch_device,
    )
    for p in points:
        print(f"{p.method:<22} N={p.layers}  {p.layer_bytes / 1024:10.1f} KiB  {100 * p.accuracy:5.1f}%")
    print(f"wrote {write_csv(points, out / 'compare.csv')}, {plot_compare(points, out / 'compare.png')}")
    return 0


def _export(args: argparse.Namespace) -> int:
    import torch

    from actcomp.devices import load_device
    from actcomp.export import export_bundle, graph_memory_plan, onnx_inference
    from actcomp.export.bundle import check_bundle_dir
    from actcomp.core.files import DirectoryLock, atomic_write_text
    from actcomp.app.finetune import build_model, check_seed, check_size, load_data, load_weights, selector

    _resolve_devices(args, cpu_only=True)
    if args.target is not None:
        load_device(args.target)  # an unknown profile fails here, before the export
    for name in ("batch_size", "size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    check_size(args.size)
    check_seed(args.seed)
    if args.step:
        from actcomp.export.bundle import check_step_settings

        check_step_settings(max_rank=args.max_rank, eps=args.eps, momentum=args.momentum, lr=args.lr)
        train_layers = selector(args.train)
    if args.weights and not Path(args.weights).is_file():
        raise ValueError(f"weights file '{args.weights}' does not exist")
    out = check_output_dir(args.out)
    if args.step:
        check_bundle_dir(out, overwrite=args.overwrite)  # a trained bundle or other files there fail here, before the export
    elif (out / "manifest.json").exists():
        raise ValueError(f"--out '{out}' holds a fine-tuning bundle; write the inference graph to another directory")
    data = load_data(args.data, args.size, args.seed)
    torch.manual_seed(args.seed)
    model = build_model(args.model, data.num_classes, data.in_channels)
    if args.weights:
        load_weights(model, args.weights)
    if not args.step:
        with DirectoryLock(out, "--out"):
            result = onnx_inference(model, data.train_x[: args.batch_size], out / "model.onnx")
            plan = graph_memory_plan(result.path)
            atomic_write_text(out / "memory_plan.json", plan.to_json())
        print(f"wrote {result.path} ({result.size_bytes} bytes; onnxruntime vs eager max abs error {result.max_abs_error:.2g})")
        print(plan)
        if args.target:
            print(plan.verdict(args.target))
        return 0
    from actcomp.app.models import train_only
    from actcomp.attach import select_layers

    train_only(model, select_layers(model, train_layers, sample=data.train_x[:1]))
    if not args.weights:
        print(
            f"actcomp export: warning: no --weights, so the bundle starts from random weights; with only the --train "
            f"layers ({args.train}) trainable on random frozen features it can hardly learn. Pass trained weights "
            "(e.g. OUT/model.pt of 'actcomp finetune')",
            file=sys.stderr,
        )
    batch = (data.train_x[: args.batch_size], data.train_y[: args.batch_size])
    manifest = export_bundle(
        model, batch, out, data=(data.train_x, data.train_y), device=args.target,
        max_rank=args.max_rank, eps=args.eps, momentum=args.momentum, lr=args.lr, overwrite=args.overwrite,
    )
    print(f"wrote the bundle to {out}: step.onnx ({manifest['step_bytes']} bytes), model.onnx, state.npz, initial_state.npz, data.npz, manifest.json, runner.py")
    print(f"step verified against eager PyTorch: max abs error {manifest['verified_max_abs_error']:.2g}")
    plan = manifest["memory_plan"]
    print(f"step memory plan: peak {plan['peak_bytes']} bytes, weights {plan['weights_bytes']} bytes" + (f"; {plan['verdict']}" if "verdict" in plan else ""))
    print(f"fine-tune on the device: python {out / 'runner.py'} --steps 20")
    return 0


def _devices(args: argparse.Namespace) -> int:
    from actcomp.devices import list_devices, load_device
    from actcomp.memory import format_bytes
    from actcomp.memory.format import aligned_table

    devices = [load_device(args.file)] if args.file else list_devices()
    header = ("name", "kind", "RAM", "flash", "reserve", "budget", "peak", "title")
    rows = [
        (
            d.name, d.kind, format_bytes(d.ram_bytes), format_bytes(d.flash_bytes), format_bytes(d.reserve_bytes),
            format_bytes(d.budget_bytes), f"{d.peak_ops_per_s / 1e9:g} G/s {d.peak_precision}", d.title,
        )
        for d in devices
    ]
    print(aligned_table(header, rows))
    if args.sources:
        for d in devices:
            print(f"{d.name}: {d.source}")
    return 0


def _add_run_options(p: argparse.ArgumentParser, training: bool) -> None:
    p.add_argument("--model", default="tiny_mobilenet", help="tiny_mobilenet or a torchvision classifier name (random weights)")
    p.add_argument("--weights", metavar="PATH", help="initial weights: a state_dict saved with torch.save")
    p.add_argument("--data", default="digits", help="'digits' (bundled, classes 5-9) or an ImageFolder directory")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--layers", default="last:4", help="last:N, all, re:<pattern> or comma-separated names (default last:4)")
    p.add_argument("--method", default="hosvd", choices=list(method_names()))
    p.add_argument("--eps", type=float, default=0.99, help="explained variance kept, in (0, 1] (default 0.99)")
    for name, (setting, _) in _method_setting_options().items():  # gradient_filter's --patch, ...
        p.add_argument(f"--{name.replace('_', '-')}", type=type(setting.default), default=None, help=f"{setting.help} (default {setting.default})")
    p.add_argument("--budget", help="plan eps per layer for this many bytes kept by autograd (e.g. 512KiB)")
    p.add_argument("--target", metavar="PROFILE", help="plan for a device profile's budget: a name from 'actcomp devices' or a .toml file")
    p.add_argument("--fit", metavar="BUDGET", help="fit the whole step (weights, gradients, optimizer state, activations) into this "
                   "device total with actcomp.fit's levers (e.g. 256MiB); instead of --budget/--target")
    p.add_argument("--freeze-batchnorm", action="store_true", help="with --fit: BatchNorm on its running statistics (the usual "
                   "fine-tuning setting; micro-batches are then exact)")
    _add_device_option(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    if training:
        p.add_argument("--epochs", type=int, default=None, help="epochs (default 5; with --resume, the run's own)")
        p.add_argument("--lr", type=float, default=3e-3)
        p.add_argument("--optimizer", default="adam", choices=list(OPTIMIZER_NAMES),
                       help="sgd (momentum 0), momentum (0.9), adam; singd and hylo build their curvature from the stored factors (see README)")


def _add_device_option(p: argparse.ArgumentParser, cpu_only: bool = False) -> None:
    where = "export traces on the CPU: only cpu" if cpu_only else "cpu (default), cuda, cuda:N, mps"
    p.add_argument(
        "--device", metavar="TORCH_DEVICE",
        help=f"torch device to run on: {where}. A device profile here (--device stm32h743) is the deprecated spelling of --target",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="actcomp",
        description="Fine-tune PyTorch models on devices by keeping low-rank factors of activations.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser(
        "demo",
        help="transfer a small CNN (or with --model vit a small ViT) from digits 0-4 to 5-9 with compression (offline, ~1 min)",
        description="Pretrain a TinyMobileNet on scikit-learn's digits 0-4, fine-tune its last N layers on "
        "digits 5-9 with plain autograd, HOSVD and the per-layer eps planned for a budget; print bytes kept, "
        "peak, accuracy and step time, and write a plot. With --model vit: a TinyViT on 2x2 patches as tokens, "
        "all layers fine-tuned plain, with every Linear compressed, and with the whole step compressed; "
        "prints what autograd keeps and the peak against plain autograd, and accuracy.",
    )
    demo.add_argument("--model", default="mobilenet", choices=["mobilenet", "vit"], help="mobilenet (default) or vit (tokens)")
    demo.add_argument("--layers", type=int, default=None, help="mobilenet: fine-tune the last N Conv/Linear layers (default 4)")
    demo.add_argument("--eps", type=float, default=None, help="explained variance kept, in (0, 1] (default: mobilenet 0.99 as compress(), vit 0.9)")
    demo.add_argument("--neighbour-eps", type=float, default=None, help="vit: eps of the whole step's packed tensors (default 0.99)")
    demo.add_argument("--budget", default=None, help="mobilenet: budget for the planned run, bytes kept by autograd (default 2.5MiB)")
    demo.add_argument("--every-eps", type=float, default=None, help="mobilenet: eps of the run that fine-tunes every layer (default 0.99, as compress())")
    demo.add_argument("--no-every", action="store_true", help="mobilenet: skip the three runs that fine-tune every layer")
    demo.add_argument("--fit", metavar="BUDGET", help="mobilenet: device budget of the fit run (default a quarter of plain's device total)")
    demo.add_argument("--epochs", type=int, default=None, help="fine-tuning epochs (default 6; vit 10)")
    demo.add_argument("--pretrain-epochs", type=int, default=None, help="pretraining epochs (default 6; vit 20)")
    demo.add_argument("--batch-size", type=int, default=64)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--seeds", type=int, default=3,
                      help="mobilenet: fine-tuning seeds per run (seed, seed+1, ...); accuracy is their mean (lowest-highest) (default 3)")
    demo.add_argument("--out", default="actcomp-demo", help="directory for demo.png, demo.json, plan.json (vit: demo_vit.json)")
    demo.add_argument("--device", metavar="TORCH_DEVICE", help="mobilenet: torch device to train and measure on: cpu (default), cuda, cuda:N, mps")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(run=_demo)

    finetune = sub.add_parser("finetune", help="fine-tune a model with compressed activations; metrics, checkpoints, --resume")
    _add_run_options(finetune, training=True)
    finetune.add_argument("--out", default="actcomp-run", help="output directory (default actcomp-run)")
    finetune.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    finetune.add_argument("--overwrite", action="store_true", help="replace the run already in OUT (refused otherwise)")
    finetune.add_argument("--no-progress", action="store_true")
    finetune.set_defaults(run=_finetune)

    measure = sub.add_parser("measure", help="print the memory report of one training step of a model/method")
    _add_run_options(measure, training=False)
    measure.add_argument("--json", action="store_true", help="print the report as JSON")
    measure.set_defaults(run=_measure)

    plan = sub.add_parser("plan", help="print the plan (layers, eps) for a budget or a device")
    _add_run_options(plan, training=False)
    plan.add_argument("--out", metavar="PATH", help="also write the plan as JSON (with --fit: the budget and the levers chosen)")
    plan.add_argument("--optimizer", default="adam", choices=list(OPTIMIZER_NAMES), help="with --fit: the optimizer whose state counts (default adam)")
    plan.set_defaults(run=_plan)

    compare = sub.add_parser("compare", help="accuracy vs activation memory for none, svd, hosvd, gradient_filter; PNG + CSV")
    compare.add_argument("--methods", default="none,svd,hosvd,gradient_filter")
    compare.add_argument("--max-layers", type=int, default=4, help="fine-tune the last N = 1..K layers (default 4)")
    compare.add_argument("--eps", type=float, default=0.8)
    compare.add_argument("--patches", default="2,4,7", help="gradient_filter patch sizes (default 2,4,7)")
    compare.add_argument("--epochs", type=int, default=6)
    compare.add_argument("--pretrain-epochs", type=int, default=6)
    compare.add_argument("--batch-size", type=int, default=64)
    compare.add_argument("--seed", type=int, default=0)
    compare.add_argument("--out", default="actcomp-compare", help="directory for compare.png and compare.csv")
    compare.add_argument("--device", metavar="TORCH_DEVICE", help="torch device to train on: cpu (default), cuda, cuda:N, mps")
    compare.add_argument("--no-progress", action="store_true")
    compare.add_argument("--peft", action="store_true", help="instead: SVD-parametrised fine-tuning (actcomp.peft) vs full and last-N; peft.csv, peft.png")
    compare.add_argument("--reflections", type=int, default=8, help="--peft: Householder reflections per layer (default 8)")
    compare.add_argument("--lr", type=float, default=3e-3, help="--peft: Adam learning rate of every run (default 3e-3, the demo's)")
    compare.add_argument(
        "--optimizers", metavar="LIST",
        help="compare optimizers instead (momentum,adam,singd,hylo; sgd is plain SGD): hosvd at --eps on the last --max-layers layers; writes optimizers.csv",
    )
    compare.set_defaults(run=_compare)

    export = sub.add_parser(
        "export",
        help="export to ONNX: the inference graph, or with --step a fine-tuning bundle (step graph, state, runner)",
        description="Without --step: the verified inference graph and its static memory plan. With --step: "
        "a bundle that fine-tunes the --train layers (the rest frozen) with onnxruntime and numpy only.",
    )
    export.add_argument("--model", default="tiny_mobilenet")
    export.add_argument("--weights", metavar="PATH", help="a state_dict saved with torch.save (e.g. OUT/model.pt of finetune)")
    export.add_argument("--data", default="digits", help="'digits' or an ImageFolder directory: shapes, classes, bundle data")
    export.add_argument("--size", type=int, default=32)
    export.add_argument("--batch-size", type=int, default=1, help="static batch of the graphs (default 1)")
    export.add_argument("--seed", type=int, default=0)
    export.add_argument("--step", action="store_true", help="write the fine-tuning bundle instead of the inference graph")
    export.add_argument("--train", default="last:2", help="layers the bundle trains: last:N (execution order), re:..., names (default last:2)")
    export.add_argument("--eps", type=float, default=0.9, help="explained variance kept by the step's compression")
    export.add_argument("--max-rank", type=int, default=8, help="static rank of the step's factorisations (default 8)")
    export.add_argument("--momentum", type=float, default=0.0)
    export.add_argument("--lr", type=float, default=0.05)
    export.add_argument("--target", metavar="PROFILE", help="also check the memory plan against a device profile")
    _add_device_option(export, cpu_only=True)
    export.add_argument("--out", default="actcomp-export", help="output directory")
    export.add_argument("--overwrite", action="store_true", help="--step: replace a bundle whose runner has trained (its state.npz is lost)")
    export.set_defaults(run=_export)

    devices = sub.add_parser("devices", help="list the device profiles (RAM, flash, budget, peak compute)")
    devices.add_argument("--file", metavar="PATH", help="check and show your own profile file instead")
    devices.add_argument("--sources", action="store_true", help="also print each profile's datasheet source")
    devices.set_defaults(run=_devices)
    return parser


def _one_line(error: BaseException) -> str:
    """The first line of the error's message, control characters (terminal escapes) escaped."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in line)


def main(argv: list[str] | None = None) -> int:
    """Entry point: errors in the user's input are one line on stderr and exit code 2; a
    failure of the machine (disk full, I/O error) is one line and exit code 1."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"actcomp {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except BudgetExceededError as error:  # a fitted step measured above its --fit budget
        print(f"actcomp {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"actcomp {args.command}: error: {_one_line(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
