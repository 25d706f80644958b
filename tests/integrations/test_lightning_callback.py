"""The Lightning Callback: a fit of a small LightningModule compresses it, logs what each batch
kept and the whole-step ratio against plain (measured on the first batch), and warns, naming
them, about trained layers compression leaves out."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import actcomp

L = pytest.importorskip("lightning.pytorch")

from actcomp.integrations import ActcompLightningCallback  # noqa: E402
from actcomp.integrations.monitor import LeftOutLayersWarning  # noqa: E402


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def loader():
    generator = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(8, 3, 12, 12, generator=generator), torch.randint(0, 3, (8,), generator=generator))
    return torch.utils.data.DataLoader(data, batch_size=4)


def fit(module, callback):
    trainer = L.Trainer(max_steps=2, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, loader())
    return trainer


def test_lightning_callback_compresses_and_logs_the_whole_step_ratio():
    torch.manual_seed(0)
    module = Classifier()
    callback = ActcompLightningCallback(eps=0.9)
    trainer = fit(module, callback)
    assert set(actcomp.compressed_layers(module)) == {"net.0", "net.2", "net.6"}
    history = callback.monitor.history
    assert len(history) == 2
    assert 0 < history[0]["saved_bytes"] < history[0]["plain_saved_bytes"]
    assert history[1]["whole_step_ratio"] == history[1]["saved_bytes"] / history[0]["plain_saved_bytes"]
    assert "actcomp/whole_step_ratio" in trainer.callback_metrics


def test_lightning_callback_names_trained_layers_left_out():
    module = Classifier()
    with pytest.warns(LeftOutLayersWarning, match=r"'net.6'"):
        fit(module, ActcompLightningCallback(layers="re:^net\\.[02]$", eps=0.9))
