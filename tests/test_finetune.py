"""actcomp finetune: outputs, and --resume after an interruption gives the same final weights."""

import json

import pytest
import torch

from actcomp.cli import main
from actcomp.finetune import FinetuneConfig, run_finetune


class Interrupted(Exception):
    pass


def interrupt_after(epoch):
    def hook(done):
        if done == epoch:
            raise Interrupted

    return hook


@pytest.mark.parametrize("method", ["hosvd", "asi"])
def test_resume_after_interruption_equals_uninterrupted_run(tmp_path, method):
    config = FinetuneConfig(method=method, epochs=2, batch_size=64, layers="last:3", optimizer="momentum", lr=0.02)
    run_finetune(config, tmp_path / "straight", progress=False)
    with pytest.raises(Interrupted):
        run_finetune(config, tmp_path / "broken", progress=False, after_epoch=interrupt_after(1))
    assert not (tmp_path / "broken" / "model.pt").exists()
    metrics = run_finetune(config, tmp_path / "broken", resume=True, progress=False)
    assert [m["epoch"] for m in metrics] == [1, 2]
    a = torch.load(tmp_path / "straight" / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "broken" / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "straight" / "metrics.json").read_text())[1]["train_loss"] == metrics[1]["train_loss"]


def test_outputs_and_budget_plan(tmp_path):
    out = tmp_path / "run"
    argv = ["finetune", "--epochs", "1", "--batch-size", "64", "--budget", "1MiB", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    for name in ("config.json", "plan.json", "metrics.csv", "metrics.json", "checkpoint.pt", "model.pt"):
        assert (out / name).exists(), name
    row = json.loads((out / "metrics.json").read_text())[0]
    assert row["saved_bytes"] <= 2**20 and 0 <= row["test_accuracy"] <= 1
    assert (out / "metrics.csv").read_text().splitlines()[0].startswith("epoch,train_loss,test_accuracy")


def test_resume_refuses_other_settings(tmp_path):
    run_finetune(FinetuneConfig(epochs=1, batch_size=128, layers="last:1"), tmp_path, progress=False)
    with pytest.raises(ValueError, match="cannot resume with different settings: eps"):
        run_finetune(FinetuneConfig(epochs=2, batch_size=128, layers="last:1", eps=0.5), tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="nothing to resume"):
        run_finetune(FinetuneConfig(), tmp_path / "empty", resume=True, progress=False)


def test_imagefolder_data(tmp_path):
    """An ImageFolder directory (one sub-directory per class) trains like the bundled digits."""
    from PIL import Image

    rng = torch.Generator().manual_seed(0)
    for c, name in enumerate(("cats", "dogs", "owls")):
        (tmp_path / "images" / name).mkdir(parents=True)
        for i in range(6):
            pixels = (torch.rand(12, 12, 3, generator=rng) * 80 + 80 * c).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(tmp_path / "images" / name / f"{i}.png")
    argv = [
        "finetune", "--data", str(tmp_path / "images"), "--size", "16", "--epochs", "2", "--batch-size", "4",
        "--layers", "last:2", "--out", str(tmp_path / "run"), "--no-progress",
    ]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(metrics) == 2 and metrics[-1]["saved_bytes"] > 0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["data"] == str(tmp_path / "images")
