"""A method declares its own settings (``Compressor.own_settings``): CompressionConfig takes,
checks and stores them generically, layer records and a run's config.json keep them, and the
command line offers each as an option built from the registry."""

import json
import pickle
from dataclasses import FrozenInstanceError, replace

import pytest
import torch
from torch import nn

import actcomp
from actcomp.app.cli import build_parser, main
from actcomp.app.finetune import FinetuneConfig, run_finetune
from actcomp.methods import method_class
from actcomp.methods.base import _METHODS, Compressor, Setting, register_method


def test_gradient_filter_declares_patch():
    (patch,) = method_class("gradient_filter").own_settings
    assert (patch.name, patch.default) == ("patch", 4) and "patch size r" in patch.help
    assert all(method_class(m).own_settings == () for m in ("hosvd", "asi", "svd", "none"))


def test_config_keeps_its_api():
    config = actcomp.CompressionConfig("gradient_filter", patch=2)
    assert config.patch == 2 and config.method_settings == (("patch", 2),)
    assert actcomp.CompressionConfig("gradient_filter").patch == 4  # the declared default
    assert config == actcomp.CompressionConfig("gradient_filter", 0.99, patch=2) != actcomp.CompressionConfig("gradient_filter")
    assert hash(config) == hash(actcomp.CompressionConfig("gradient_filter", patch=2))
    assert actcomp.CompressionConfig() == actcomp.CompressionConfig("hosvd", 0.99) and actcomp.CompressionConfig().method_settings == ()
    assert repr(config) == "CompressionConfig(method='gradient_filter', eps=0.99, patch=2)"
    assert pickle.loads(pickle.dumps(config)) == config and replace(config, eps=0.5).patch == 2
    with pytest.raises(FrozenInstanceError):
        config.patch = 3  # type: ignore[misc]
    with pytest.raises(ValueError, match="patch must be a whole number >= 1"):
        actcomp.CompressionConfig("gradient_filter", patch=0)


@pytest.mark.parametrize("method, settings", [("hosvd", "eps"), ("none", "eps"), ("gradient_filter", "eps, patch")])
def test_a_setting_the_method_does_not_declare_is_refused(method, settings):
    with pytest.raises(ValueError, match=f"method '{method}' has no setting 'rank' \\(its settings: {settings}\\)"):
        actcomp.CompressionConfig(method, rank=3)
    if method != "gradient_filter":
        with pytest.raises(ValueError, match=f"method '{method}' has no setting 'patch'"):
            actcomp.CompressionConfig(method, patch=4)
        with pytest.raises(AttributeError, match="has no setting 'patch'"):
            actcomp.CompressionConfig(method).patch


@pytest.fixture
def stepped(monkeypatch):
    """A method registered for the test with a setting of its own, ``step`` (default 3)."""
    monkeypatch.setattr("actcomp.methods.base._METHODS", dict(_METHODS))

    def check(value):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"step must be >= 1, got {value!r}")
        return value

    @register_method
    class Stepped(Compressor):
        name = "stepped"
        settings = ("eps", "step")
        own_settings = (Setting("step", 3, check, "stepped: keep every step-th sample"),)

    return Stepped


def test_a_new_method_declares_a_setting_without_touching_config_or_cli(stepped, capsys):
    config = actcomp.CompressionConfig("stepped", 0.5, step=2)
    assert config.step == 2 and actcomp.CompressionConfig("stepped").step == 3
    with pytest.raises(ValueError, match="step must be >= 1"):
        actcomp.CompressionConfig("stepped", step=0)
    args = build_parser().parse_args(["finetune", "--method", "stepped", "--step", "5"])
    assert args.step == 5 and isinstance(args.step, int)
    with pytest.raises(SystemExit):
        main(["plan", "--help"])
    assert "stepped: keep every step-th sample (default 3)" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(ValueError, match="needs an identifier other than"):
        Setting("eps", 1, int, "clashes with eps")


def test_layer_records_keep_the_method_settings():
    conv = nn.Conv2d(3, 4, 3)
    actcomp.compress(conv, config=actcomp.CompressionConfig("gradient_filter", patch=2))
    state = actcomp.layer_state(conv)
    record = state.state_dict()
    assert record["patch"] == 2 and record["method"] == "gradient_filter"
    state.load_state_dict({**record, "patch": 3})
    assert state.config == actcomp.CompressionConfig("gradient_filter", patch=3)
    # a record written before methods declared their settings holds patch whatever the method
    state.load_state_dict({"kind": "layer", "method": "hosvd", "eps": 0.5, "patch": 4, "method_state": {}})
    assert state.config == actcomp.CompressionConfig("hosvd", 0.5)


def test_finetune_config_json_is_flat_and_reads_older_runs():
    config = FinetuneConfig(method="gradient_filter", method_settings=(("patch", 2),))
    stored = config.as_dict()
    assert stored["patch"] == 2 and "method_settings" not in stored
    assert list(stored)[list(stored).index("eps") + 1] == "patch"  # where the old field stood
    assert FinetuneConfig.from_dict(json.loads(json.dumps(stored))) == config
    older = {**FinetuneConfig().as_dict(), "patch": 4}  # every older config.json has patch
    assert FinetuneConfig.from_dict(older) == FinetuneConfig()
    assert FinetuneConfig(method="gradient_filter").as_dict()["patch"] == 4
    with pytest.raises(ValueError, match="method 'hosvd' has no setting 'patch'"):
        FinetuneConfig(method_settings=(("patch", 2),)).validate()


def test_cli_passes_given_settings_and_refuses_those_of_other_methods(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("actcomp.app.finetune.make_optimizer", lambda *a, **k: pytest.fail("finetune got to training before refusing"))
    assert main(["finetune", "--method", "hosvd", "--patch", "2", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "method 'hosvd' has no setting 'patch' (its settings: eps)" in err and err.count("\n") == 1
    assert main(["finetune", "--method", "gradient_filter", "--patch", "0", "--out", str(tmp_path / "r"), "--no-progress"]) == 2
    assert "patch must be a whole number >= 1" in capsys.readouterr().err


def test_gradient_filter_run_stores_patch_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["finetune", "--method", "gradient_filter", "--batch-size", "128", "--layers", "last:2", "--out", str(out), "--no-progress"]
    assert main([*argv, "--patch", "2", "--epochs", "1"]) == 0
    assert json.loads((out / "config.json").read_text())["patch"] == 2
    layers = torch.load(out / "checkpoint.pt", weights_only=True)["layers"]
    assert {s["patch"] for s in layers.values() if s["kind"] == "layer"} == {2}
    assert main([*argv, "--patch", "3", "--epochs", "2", "--resume"]) == 2
    assert "cannot resume with different settings: patch" in capsys.readouterr().err
    assert main([*argv, "--patch", "2", "--epochs", "2", "--resume"]) == 0
    assert [m["epoch"] for m in json.loads((out / "metrics.json").read_text())] == [1, 2]


def test_resume_with_the_default_setting_given_or_not(tmp_path):
    config = FinetuneConfig(method="gradient_filter", epochs=1, batch_size=128, layers="last:1")
    run_finetune(config, tmp_path, progress=False)
    explicit = replace(config, epochs=2, method_settings=(("patch", 4),))
    assert len(run_finetune(explicit, tmp_path, resume=True, progress=False)) == 2


def test_cli_checks_eps_with_the_one_eps_check(monkeypatch, capsys, tmp_path):
    seen = []

    def spy(eps):
        seen.append(eps)
        return actcomp.linalg.numerics.check_eps(eps)

    monkeypatch.setattr("actcomp.app.cli.check_eps", spy)
    monkeypatch.chdir(tmp_path)
    assert main(["demo", "--model", "vit", "--eps", "0.5", "--neighbour-eps", "2"]) == 2
    assert seen == [0.5, 2.0] and "eps must be a number in (0, 1]" in capsys.readouterr().err
