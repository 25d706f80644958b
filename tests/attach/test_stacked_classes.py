"""restore() keeps the classes another library stacked on a compressed module after compress
(FSDP2's fully_shard makes FSDP<Class>(FSDPModule, <Class>)), in either order."""

import pytest
import torch
import torch.distributed as dist
from torch import nn

import actcomp


class Sharded:
    """A mixin stacked on the module's current class, as FSDP2 stacks FSDPModule."""

    def unshard(self):
        return "unsharded"


def stack(module):
    module.__class__ = type(f"Stacked{type(module).__name__}", (Sharded, type(module)), {})


def test_restore_keeps_a_class_stacked_after_compress():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    actcomp.compress(model, eps=0.9)
    for module in (model[0], model[2], model):
        stack(module)
    actcomp.restore(model)
    assert actcomp.compressed_layers(model) == {}
    for module, own in ((model[0], nn.Linear), (model[2], nn.Linear), (model, nn.Sequential)):
        assert isinstance(module, Sharded) and isinstance(module, own) and module.unshard() == "unsharded"
        assert not any(cls.__name__.startswith("Compressed") for cls in type(module).__mro__[1:])
    model(torch.randn(3, 4)).sum().backward()


def test_restore_after_a_class_stacked_before_compress():
    model = nn.Sequential(nn.Linear(4, 2))
    stack(model[0])
    stacked = type(model[0])
    actcomp.compress(model, eps=0.9)
    actcomp.restore(model)
    assert type(model[0]) is stacked


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not built")
@pytest.mark.parametrize("compress_first", [True, False])
def test_restore_keeps_fsdp2_classes_in_either_order(tmp_path, compress_first):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        if compress_first:
            actcomp.compress(model, eps=0.9)
        fully_shard(model[0], mesh=mesh)
        fully_shard(model, mesh=mesh)
        if not compress_first:
            actcomp.compress(model, eps=0.9)
        model(torch.randn(3, 4)).sum().backward()
        actcomp.restore(model)
        assert isinstance(model[0], FSDPModule) and isinstance(model, FSDPModule)
        assert actcomp.compressed_layers(model) == {}
        assert not any(cls.__name__.startswith("Compressed") for cls in type(model[0]).__mro__[1:])
        model(torch.randn(3, 4)).sum().backward()
    finally:
        dist.destroy_process_group()
