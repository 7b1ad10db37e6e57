"""AnomalyNet: every backbone and channel count, odd sizes via padding, FLOP budget, a tiny overfit."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from detector.model import BACKBONES, ModelConfig, build_model, count_flops
from detector.preprocess import pad_to_multiple


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny tensors: one thread avoids OpenMP barrier stalls when other processes share the cores."""
    import torch
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("channels", [1, 2])
def test_forward_backward_odd_size(backbone, channels):
    torch.manual_seed(0)
    context = (2, 4) if channels == 2 else ()   # the dilated context block on every backbone's deepest map
    m = build_model(ModelConfig(backbone=backbone, in_channels=channels, decoder_channels=16, topk=4,
                                context_dilations=context))
    x = torch.from_numpy(pad_to_multiple(np.random.rand(channels, 21, 45).astype(np.float32), 32))[None]
    assert x.shape[-2:] == (32, 64)
    heat, score = m(x)
    heat, score = heat.detach(), score.detach()
    assert heat.shape == (1, 1, 4, 8) and score.shape == (1,)
    assert 0 <= float(score) <= 1 and float(heat.min()) >= 0 and float(heat.max()) <= 1
    m.logits(x).mean().backward()
    first = next(c for c in m.backbone.modules() if isinstance(c, torch.nn.Conv2d))
    assert first.in_channels == channels and first.weight.grad is not None
    assert all(p.grad is not None for p in m.lateral.parameters())


def test_stride4_and_score_is_topk_mean():
    m = build_model(ModelConfig(in_channels=1, stride=4, decoder_channels=8, topk=3)).eval()
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        heat, score = m(x)
        z = m.logits(x)
    assert heat.shape == (2, 1, 16, 16)
    ref = torch.sigmoid(z.flatten(1).topk(3, 1).values.mean(1))
    assert torch.allclose(score, ref)


def test_default_flops_within_station_budget():
    from detector.config import load_config
    cfg = load_config(Path(__file__).parents[1] / "configs" / "default.yaml")
    m = build_model(cfg.model)
    # a 640x2400 px scan at 5 mm -> 320x1200 at the 10 mm model pitch, padded to 320x1216
    gflop = count_flops(m, cfg.model.in_channels, 320, 1216) / 1e9
    assert gflop <= 15.0, gflop


def test_tiny_model_overfits_a_few_crops():
    torch.manual_seed(0)
    m = build_model(ModelConfig(in_channels=1, decoder_channels=8, stage_blocks=1, topk=4))
    x = torch.rand(6, 1, 32, 64) * 0.3
    y = torch.tensor([0, 1, 0, 1, 0, 1], dtype=torch.float32)
    x[y == 1, :, 8:20, 30:42] += 1.5
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        z = m.logits(x)
        s = z.flatten(1).topk(4, 1).values.mean(1)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(s, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    m.eval()
    with torch.no_grad():
        _, score = m(x)
    assert losses[-1] < 0.3 * losses[0]
    assert float(score[y == 1].min()) > float(score[y == 0].max())


def test_built_model_starts_in_train_mode():
    # Lightning keeps submodule modes as found: a BatchNorm left in eval mode would never adapt
    m = build_model(ModelConfig(backbone="mobilenet_v3_large", in_channels=1, decoder_channels=8))
    assert all(mod.training for mod in m.modules())


def test_stage_blocks_per_stage_and_bad_counts():
    m = build_model({"in_channels": 2, "decoder_channels": 8, "stage_blocks": [1, 1, 2, 1], "backbone_stride": 16})
    layers = list(m.backbone.blocks)[1:]               # stem, layer1, layer2, layer3 (layer4 cut at stride 16)
    assert [len(layer) for layer in layers] == [1, 1, 2]
    heat, _ = m(torch.zeros(1, 2, 64, 96))
    assert heat.shape == (1, 1, 8, 12)
    for bad in ([1, 2], [1, 1, -1, 1]):
        with pytest.raises(ValueError, match="stage_blocks"):
            build_model({"in_channels": 2, "stage_blocks": bad})


def test_material_input_separates_organic_from_metal_at_any_thickness():
    from detector import physics
    from detector.model import MaterialInput
    mix = MaterialInput(10.0)
    for cm in (2.0, 10.0, 40.0):
        x = {m: torch.tensor(physics.attenuation(m, cm) / 4, dtype=torch.float32).view(1, 2, 1, 1)
             for m in ("cocaine", "plastic", "diesel", "rubber", "steel", "copper", "lead")}
        out = {m: mix(v).flatten() for m, v in x.items()}
        assert all(torch.equal(out[m][0], x[m].flatten()[0]) for m in out)   # channel 0: the high energy as is
        assert all(out[m][1] < 0 for m in ("cocaine", "plastic", "diesel", "rubber"))
        assert all(out[m][1] > 0 for m in ("steel", "copper", "lead"))
    # a package in a steel rail: the rail alone vs rail + package differ far more in the material channel
    rail, pkg = physics.attenuation("steel", 8.0), physics.attenuation("cocaine", 10.0)
    a, b = (mix(torch.tensor(v / 4, dtype=torch.float32).view(1, 2, 1, 1)).flatten() for v in (rail, rail + pkg))
    assert abs(float(b[1] - a[1])) / float(a[1]) > abs(float(b[0] - a[0])) / float(a[0])
    # invertible: (high, low) comes back from the two channels
    x = torch.rand(1, 2, 4, 4)
    y = mix(x)
    low = (y[:, :1] - y[:, 1:] / mix.gain) / mix.r_mid
    assert torch.allclose(low, x[:, 1:], atol=1e-5)


def test_material_gain_is_part_of_the_network_and_off_for_one_channel():
    torch.manual_seed(0)
    cfg = dict(decoder_channels=8, topk=2, stage_blocks=1, backbone_stride=16)
    two = build_model(ModelConfig(in_channels=2, material_gain=10.0, **cfg)).eval()
    one = build_model(ModelConfig(in_channels=1, material_gain=10.0, **cfg)).eval()
    assert two.material is not None and one.material is None
    x = torch.rand(1, 2, 64, 64)
    with torch.no_grad():
        z = two.logits(x)
        two.material = None                                   # the same weights on the raw pair differ
        assert not torch.allclose(z, two.logits(x))
    assert one(torch.rand(1, 1, 64, 64))[0].shape == (1, 1, 8, 8)
    with pytest.raises(ValueError, match="material_gain"):
        build_model(ModelConfig(in_channels=2, material_gain=-1.0, **cfg))


def test_width_scales_every_stage_and_quarters_the_flops():
    cfg = dict(in_channels=2, decoder_channels=16, topk=4, stage_blocks=1, backbone_stride=16,
               context_dilations=(2, 4))
    wide, narrow = build_model(ModelConfig(**cfg)), build_model(ModelConfig(width=32, **cfg))
    assert wide.backbone.tap_channels == [64, 128, 256] and narrow.backbone.tap_channels == [32, 64, 128]
    assert wide.backbone.tap_strides == narrow.backbone.tap_strides == [4, 8, 16]
    ratio = count_flops(narrow, 2, 320, 1216) / count_flops(wide, 2, 320, 1216)
    assert 0.2 < ratio < 0.35, ratio
    # torchvision's initialisation on the rebuilt stages (a default-init conv would have a far smaller spread)
    conv = narrow.backbone.blocks[2][0].conv1
    assert abs(float(conv.weight.detach().std()) - (2 / (conv.out_channels * 9)) ** 0.5) < 0.02
    narrow.train()
    x = torch.from_numpy(pad_to_multiple(np.random.rand(2, 37, 75).astype(np.float32), 32))[None]
    narrow.logits(x).mean().backward()
    assert all(p.grad is not None for p in narrow.backbone.parameters())


def test_width_only_for_resnets_without_weights(tmp_path):
    with pytest.raises(ValueError, match="width"):
        build_model(ModelConfig(backbone="efficientnet_b0", in_channels=1, width=32))
    weights = tmp_path / "resnet18.pt"
    weights.write_bytes(b"")   # never read: the width check comes first
    with pytest.raises(ValueError, match="width"):
        build_model(ModelConfig(in_channels=1, width=32, weights=str(weights)))


def test_local_weights_load_whole_or_are_refused_naming_the_file(tmp_path):
    import torchvision
    state = torchvision.models.resnet18(weights=None).state_dict()
    good = tmp_path / "resnet18.pth"
    torch.save(state, good)
    m = build_model(ModelConfig(in_channels=2, decoder_channels=8, weights=str(good)))
    assert torch.equal(m.backbone.blocks[1][0].conv1.weight, state["layer1.0.conv1.weight"])
    shallow = {k: v for k, v in state.items() if not k.startswith("layer4")}      # another depth or backbone
    wide = {**state, "layer1.0.conv1.weight": torch.zeros(32, 64, 3, 3)}       # another width
    files = {"shallow.pth": shallow, "wide.pth": wide, "junk.pth": {"a": 1}}
    for name, content in files.items():
        torch.save(content, tmp_path / name)
    (tmp_path / "text.pth").write_text("not a torch file")
    for name, why in (("shallow.pth", r"not a torchvision resnet18 state_dict \(missing 25 key"),
                      ("wide.pth", r"not a torchvision resnet18 state_dict \(other shapes in 1 key"),
                      ("junk.pth", "not a state_dict of tensors"), ("text.pth", "not a readable torch state_dict"),
                      ("absent.pth", "no such file")):
        with pytest.raises(ValueError, match=f"model.weights {tmp_path / name}: {why}"):
            build_model(ModelConfig(in_channels=2, weights=str(tmp_path / name)))
    with pytest.raises(ValueError, match="not a torchvision mobilenet_v3_large state_dict"):   # another backbone's
        build_model(ModelConfig(backbone="mobilenet_v3_large", in_channels=2, weights=str(good)))
