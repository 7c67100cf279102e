"""mpbench.models (CIFAR nets in timm's registry) and mpbench.sites (insertion sites)."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import copy

import pytest
import timm
import torch
from torch import nn

from mpbench.errors import IncompatibleError, UsageError
from mpbench.models import MODELS
from mpbench.sites import describe_sites, insert, list_sites, site_kinds, stage_outputs


class Scale(nn.Module):
    def __init__(self, s: float):
        super().__init__()
        self.s = nn.Parameter(torch.tensor(s))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.s


class Record(nn.Module):
    def __init__(self):
        super().__init__()
        self.mins: list[float] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.mins.append(float(x.detach().min()))
        return x


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.mark.parametrize("name", MODELS)
def test_builds_and_shapes(name):
    for chans in (1, 3):
        m = timm.create_model(name, num_classes=7, in_chans=chans).eval()
        with torch.no_grad():
            for size in (16, 32):
                x = torch.randn(2, chans, size, size)
                assert m(x).shape == (2, 7)
                assert m.forward_head(m.forward_features(x), pre_logits=True).shape == (2, m.num_features)
        assert m.get_classifier() is m.fc and m.num_features == m.fc.in_features
        assert [f["module"] for f in m.feature_info] == m.stage_names == stage_outputs(m)
        for path, mod in m.named_modules():   # "BatchNorm and classifier" keys are identifiable by name
            assert "bn" in path.rpartition(".")[2] if isinstance(mod, nn.BatchNorm2d) else True
            assert path == "fc" if isinstance(mod, nn.Linear) else True


def test_tiny_input_and_reset_classifier():
    m = timm.create_model("vgg9", num_classes=3).eval()   # 5 pools: 8 -> 4 -> 2 -> 1 -> 1 -> 1
    assert m(torch.randn(1, 3, 8, 8)).shape == (1, 3)
    m.reset_classifier(5)
    assert m(torch.randn(1, 3, 8, 8)).shape == (1, 5) and m.num_classes == 5
    m.reset_classifier(0)
    assert m(torch.randn(1, 3, 8, 8)).shape == (1, m.num_features)


def test_kwargs_checked():
    with pytest.raises(UsageError, match="pretrained"):
        timm.create_model("resnet20", pretrained=True)
    with pytest.raises(UsageError, match="width"):
        timm.create_model("conv4", widht=32)
    assert timm.create_model("conv4", width=32).num_features == 32
    assert timm.list_models("resnet2*")[:2] == ["resnet20", "resnet26"]   # registered next to timm's own


def test_resnet_param_counts_and_sites():
    # He et al. 2016, Table 6: ResNet-20 has 0.27M parameters; exactly 269,722 with option-A shortcuts.
    r20 = timm.create_model("resnet20", num_classes=10)
    assert sum(p.numel() for p in r20.parameters()) == 269_722
    assert len(list_sites(r20, "block")) == 9 and len(list_sites(r20, "shortcut")) == 9
    assert len(list_sites(timm.create_model("resnet44"), "block")) == 21
    sites = list_sites(r20, "block")
    assert [s.channels for s in sites] == [16] * 3 + [32] * 3 + [64] * 3
    assert [s.stage for s in sites] == [0] * 3 + [1] * 3 + [2] * 3
    assert sites[0].name == "layer1.0.site" and site_kinds(r20) == {"block", "branch", "shortcut"}
    assert len(describe_sites(r20)) == 27
    plain = timm.create_model("conv6")
    assert site_kinds(plain) == {"block"} and list_sites(plain, "branch") == []
    with pytest.raises(UsageError):
        list_sites(plain, "blok")
    with pytest.raises(UsageError, match="did you mean"):
        insert(plain, "layer1.0.sit", nn.Identity(), key="x")


def test_insert_zero_in_plain_net_gives_bias_logits():
    m = timm.create_model("conv4", num_classes=5).eval()
    keys = set(m.state_dict())
    for s in list_sites(m):
        insert(m, s.name, Scale(0.0), key="zero")
    new = set(m.state_dict())
    assert keys < new and all(k.endswith(".zero.s") for k in new - keys) and len(new - keys) == 4
    out = m(torch.randn(3, 3, 16, 16))
    assert torch.allclose(out, m.fc.bias.expand(3, -1))
    with pytest.raises(ValueError):
        insert(m, list_sites(m)[0].name, Scale(1.0), key="zero")


def test_insert_at_residual_sites():
    m = timm.create_model("resnet20").eval()
    x = torch.randn(2, 3, 16, 16)
    ref = m(x)
    rec = Record()
    insert(m, "layer2.0.site", rec, key="rec")
    insert(m, "layer2.0.site", Scale(1.0), key="one")     # identity, applied after rec
    assert torch.equal(m(x), ref) and rec.mins[0] < 0      # before the final ReLU
    for s in list_sites(m, "shortcut"):
        insert(m, s.name, Scale(0.0), key="cut")
    assert not torch.allclose(m(x), ref)
    assert "layer1.0.shortcut.site.cut.s" in m.state_dict()


def test_generic_timm_resnet18_hooks():
    m = timm.create_model("resnet18", pretrained=False, num_classes=4).eval()
    sites = list_sites(m)
    assert [s.name for s in sites] == [f"layer{i}.{j}" for i in range(1, 5) for j in range(2)]
    assert [s.channels for s in sites] == [64, 64, 128, 128, 256, 256, 512, 512]
    assert [s.stage for s in sites] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert list_sites(m, "branch") == [] and stage_outputs(m) == ["layer1", "layer2", "layer3", "layer4"]
    assert "pre-hook" in describe_sites(m)[0]
    keys = set(m.state_dict())
    x = torch.randn(2, 3, 32, 32)
    rec = Record()
    insert(m, "layer2.0", rec, key="rec")                   # projection shortcut: can be negative
    m(x)
    assert rec.mins[0] < 0                                   # after the add, before the block's final ReLU
    for s in sites[-2:]:
        insert(m, s.name, Scale(0.0), key="zero")
    new = set(m.state_dict())
    assert keys < new and "layer4.1.mpbench_zero.s" in new
    assert torch.allclose(m(x), m.fc.bias.expand(2, -1))
    c = copy.deepcopy(m)                                     # hooks follow the copied modules
    c.layer4[1].mpbench_zero.s.data.fill_(1.0)
    c.layer4[0].mpbench_zero.s.data.fill_(1.0)
    assert torch.allclose(m(x), m.fc.bias.expand(2, -1)) and not torch.allclose(c(x), c.fc.bias.expand(2, -1))


def test_generic_other_timm_nets():
    mb = timm.create_model("mobilenetv3_small_050", num_classes=3, in_chans=1).eval()
    sites = list_sites(mb)
    assert sites and all(s.name.startswith("blocks.") for s in sites)
    insert(mb, sites[0].name, Scale(1.0), key="one")
    assert mb(torch.randn(1, 1, 32, 32)).shape == (1, 3)
    r10 = timm.create_model("resnet10t", num_classes=3)
    assert [s.channels for s in list_sites(r10)] == [64, 128, 256, 512]
    vgg = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(IncompatibleError):
        list_sites(vgg)
    assert site_kinds(vgg) == set()
