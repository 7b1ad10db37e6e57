"""AnomalyNet: a truncated torchvision backbone + a light FPN decoder -> anomaly heatmap + scan score.

The station runs this on 2 CPU cores, so the backbone is cut at `backbone_stride` (16 by default:
resnet18 without layer4) and the decoder is a narrow FPN to stride 8. Weights are never downloaded:
`weights` may name a local torchvision state_dict file.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

BACKBONES = ("resnet18", "resnet34", "mobilenet_v3_large", "efficientnet_b0")


@dataclass
class ModelConfig:
    backbone: str = "resnet18"
    in_channels: int = 2
    stride: int = 8              # heatmap stride: 4 or 8
    backbone_stride: int = 16    # deepest backbone stage used: 16 or 32
    decoder_channels: int = 64
    topk: int = 16               # score = sigmoid(mean of the top-k heatmap logits)
    weights: str | None = None   # optional LOCAL torchvision state_dict (never downloaded)
    init: str | None = None      # optional detector training checkpoint (RUN/best.ckpt) whose whole network this
                                 # run starts from: fine-tuning, with a fresh optimiser and schedule (train.py)
    prior: float = 0.01          # initial heatmap probability (bias of the last conv)
    stage_blocks: int | tuple[int, ...] = 0  # resnets: keep the first N blocks of each stage (0 = all; halves
                                             # FLOPs at 1), or one N per stage, e.g. (1, 1, 2, 1)
    context_dilations: tuple[int, ...] = ()  # dilated 3x3 branches on the deepest map (e.g. 2, 4, 8): metres of
                                             # context for a few % FLOPs (a wheel hub vs a steel block in cargo)
    width: int = 64              # resnets: channels of the first stage, doubled per stage (64 = torchvision's);
                                 # 32 quarters the FLOPs of every stage but the stem (halved). Not with `weights`
    material_gain: float = 0.0   # > 0 with 2 energies: the network sees (high, gain * (high - R_mid * low)), the
                                 # material signal amplified to the scale of the attenuation (MaterialInput);
                                 # ignored with 1 channel


BACKBONE_STRIDES = (8, 16, 32)   # the deepest stage kept; every backbone here reaches 32


def check_model_config(cfg: ModelConfig, pad_multiple: int | None = None) -> None:
    """ValueError naming the first setting the network cannot be built or run with: checked when a config is
    loaded, so a wrong one fails at once instead of after the scans are cached. `pad_multiple`: the station's
    padding (preprocessing.pad_multiple), which the deepest stride must divide, else the decoder's maps misalign."""
    resnet = cfg.backbone.startswith("resnet")
    problems = [
        (cfg.backbone not in BACKBONES, f"model.backbone {cfg.backbone!r} is not one of {', '.join(BACKBONES)}"),
        (cfg.stride not in (4, 8), f"model.stride must be 4 or 8, got {cfg.stride}"),
        (cfg.backbone_stride not in BACKBONE_STRIDES,
         f"model.backbone_stride must be one of {BACKBONE_STRIDES}, got {cfg.backbone_stride}"),
        (cfg.width != 64 and (not resnet or cfg.width < 8 or bool(cfg.weights)),
         f"model.width={cfg.width}: only resnets take a width (>= 8), and not with model.weights (a torchvision "
         f"state_dict has width 64)" + ("; set model.width=64" if not resnet or cfg.weights else "")),
        (not resnet and cfg.stage_blocks not in (0, ()),
         f"model.stage_blocks={cfg.stage_blocks!r}: only resnets take stage_blocks; set model.stage_blocks=0"),
        (bool(cfg.weights) and bool(cfg.init), "model.weights and model.init both name starting weights: keep one "
         "(model.init, a detector checkpoint, sets the whole network; model.weights a torchvision backbone)"),
        (cfg.topk < 1, f"model.topk must be >= 1, got {cfg.topk}"),
        (cfg.decoder_channels < 1, f"model.decoder_channels must be >= 1, got {cfg.decoder_channels}"),
        (any(d < 1 for d in cfg.context_dilations),
         f"model.context_dilations must be >= 1, got {cfg.context_dilations}"),
        (not 0 < cfg.prior < 1, f"model.prior must be in (0, 1), got {cfg.prior}"),
        (cfg.material_gain < 0, f"model.material_gain must be >= 0, got {cfg.material_gain}"),
        (pad_multiple is not None and cfg.backbone_stride in BACKBONE_STRIDES and pad_multiple % cfg.backbone_stride,
         f"preprocessing.pad_multiple ({pad_multiple}) must be a multiple of model.backbone_stride "
         f"({cfg.backbone_stride}), the network's deepest stride"),
    ]
    for bad, message in problems:
        if bad:
            raise ValueError(message)
    blocks = cfg.stage_blocks
    if resnet and (isinstance(blocks, int) and blocks < 0
                   or not isinstance(blocks, int) and (len(blocks) != 4 or any(n < 0 for n in blocks))):
        raise ValueError(f"model.stage_blocks must be one count or 4 counts >= 0, got {blocks!r}")


def _first_conv(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding the first conv and its attribute name."""
    if name.startswith("resnet"):
        return model, "conv1"
    return model.features[0], "0"


def _load_weights(net: nn.Module, name: str, path: str) -> None:
    """Load a LOCAL torchvision `name` state_dict into `net`, every key and shape matching: a partial load (another
    backbone's file, another depth) would silently train from random weights. ValueError names the file."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"model.weights {path}: no such file") from None
    except Exception as e:  # a directory, a text file, a pickle that is not plain tensors, a cut file
        raise ValueError(f"model.weights {path}: not a readable torch state_dict ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None
    state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"model.weights {path}: not a state_dict of tensors")
    # torchvision's own older files lack BatchNorm's num_batches_tracked, which load_state_dict fills in
    what = state_mismatch(net.state_dict(), state, optional=lambda k: k.endswith("num_batches_tracked"))
    if what:
        raise ValueError(f"model.weights {path}: not a torchvision {name} state_dict ({what})")
    net.load_state_dict(state, strict=False)   # checked above; only num_batches_tracked may be absent


def state_mismatch(own: dict, state: dict, optional=lambda key: False) -> str:
    """What keeps `state` from loading into a module whose state_dict is `own` ('' when nothing): keys missing (less
    the `optional` ones), unexpected, or of other shapes, a count and an example of each."""
    missing = sorted(k for k in set(own) - set(state) if not optional(k))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    return "; ".join(f"{n} {len(ks)} key(s), e.g. {ks[0]}" for n, ks in
                     (("missing", missing), ("unexpected", unexpected), ("other shapes in", shapes)) if ks)


def _adapt_first_conv(model: nn.Module, name: str, in_channels: int) -> None:
    """Replace the RGB stem conv by one taking `in_channels`, keeping (averaged) weights."""
    parent, attr = _first_conv(model, name)
    old = getattr(parent, attr)
    if isinstance(old, nn.Sequential):  # mobilenet/efficientnet: Conv2dNormActivation
        parent, attr, old = old, "0", old[0]
    new = nn.Conv2d(in_channels, old.out_channels, old.kernel_size, old.stride, old.padding,
                    bias=old.bias is not None)
    with torch.no_grad():
        new.weight.copy_(old.weight.mean(1, keepdim=True).expand(-1, in_channels, -1, -1) * 3 / in_channels)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    setattr(parent, attr, new)


def _narrow_resnet(model: nn.Module, width: int) -> None:
    """Rebuild a torchvision ResNet with `width` stem channels (2x per stage), same blocks and init."""
    counts = [len(getattr(model, f"layer{i}")) for i in range(1, 5)]
    block = type(model.layer1[0])
    model.inplanes = width
    model.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
    model.bn1 = nn.BatchNorm2d(width)
    for i, n in enumerate(counts):
        setattr(model, f"layer{i + 1}", model._make_layer(block, width * 2 ** i, n, stride=1 if i == 0 else 2))
    for m in model.modules():  # torchvision's ResNet initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _blocks(model: nn.Module, name: str, stage_blocks: int | tuple[int, ...] = 0) -> list[nn.Module]:
    """The backbone as a flat list of sequential blocks (classifier dropped)."""
    if name.startswith("resnet"):
        stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool)
        layers = [model.layer1, model.layer2, model.layer3, model.layer4]
        keep = (stage_blocks,) * 4 if isinstance(stage_blocks, int) else tuple(stage_blocks)
        if len(keep) != 4 or any(n < 0 for n in keep):
            raise ValueError(f"model.stage_blocks must be one count or 4 counts >= 0, got {stage_blocks!r}")
        layers = [nn.Sequential(*list(layer)[:n]) if n else layer for layer, n in zip(layers, keep)]
        return [stem, *layers]
    return list(model.features)


class Backbone(nn.Module):
    """Runs the blocks up to `max_stride` and returns the last feature map of each stride >= 4."""

    def __init__(self, name: str, in_channels: int, max_stride: int, weights: str | None,
                 stage_blocks: int | tuple[int, ...] = 0, width: int = 64) -> None:
        super().__init__()
        if name not in BACKBONES:
            raise ValueError(f"unknown backbone {name!r}; choose one of {BACKBONES}")
        if width != 64 and (not name.startswith("resnet") or width < 8 or weights):
            raise ValueError(f"model.width={width}: only resnets take a width (>= 8), and not with model.weights "
                             f"(a torchvision state_dict has width 64)")
        net = getattr(torchvision.models, name)(weights=None)
        if width != 64:
            _narrow_resnet(net, width)
        if weights:
            _load_weights(net, name, weights)
        _adapt_first_conv(net, name, in_channels)
        blocks = _blocks(net, name, stage_blocks)
        # find each block's output stride and channels with a dummy pass
        x, strides, chans = torch.zeros(1, in_channels, 64, 64), [], []
        net.eval()
        with torch.no_grad():
            for b in blocks:
                x = b(x)
                strides.append(64 // x.shape[-1])
                chans.append(x.shape[1])
        net.train()  # the dummy pass ran in eval mode; Lightning keeps submodule modes as found
        keep = [i for i, s in enumerate(strides) if s <= max_stride]
        self.blocks = nn.ModuleList(blocks[: keep[-1] + 1])
        last = {strides[i]: i for i in keep if strides[i] >= 4}  # last block of each stride
        self.taps = sorted(last.values())
        self.tap_strides = [strides[i] for i in self.taps]
        self.tap_channels = [chans[i] for i in self.taps]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for i, b in enumerate(self.blocks):
            x = b(x)
            if i in self.taps:
                feats.append(x)
        return feats


class Context(nn.Module):
    """Parallel dilated 3x3 convs (ASPP-like, no pooling so any size exports), concatenated and projected."""

    def __init__(self, channels: int, out: int, dilations: tuple[int, ...]) -> None:
        super().__init__()
        mid = max(32, channels // 4)
        self.reduce = nn.Sequential(nn.Conv2d(channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True))
        self.branches = nn.ModuleList(
            nn.Sequential(nn.Conv2d(mid, mid, 3, padding=d, dilation=d, bias=False), nn.BatchNorm2d(mid),
                          nn.ReLU(inplace=True)) for d in dilations)
        self.project = nn.Conv2d(mid * (len(dilations) + 1), out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.reduce(x)
        return self.project(torch.cat([r, *(b(r) for b in self.branches)], 1))


class MaterialInput(nn.Module):
    """Dual-energy input in a material basis: (high, gain * (high - R_mid * low)), a fixed invertible mix.

    The second channel is gain * A_low * (R - R_mid) with R = A_high / A_low, which is ~0.69 for organic
    matter and ~0.78 for steel whatever the thickness (detector.physics); R_mid lies between the two, so
    its sign says organic or metal, and an organic package in a steel rail pulls it down where the rail
    alone pushes it up. In the raw pair that signal is a few-% difference of two nearly equal channels,
    which the first conv learns slowly; here it has a channel of its own at the scale of the first. Nothing
    is lost (the mix is invertible), and it runs inside the exported graph: the station still sends the
    preprocessed (high, low) attenuation. Off by default: on the synthetic scans it measured no better, the
    difference of two noisy energies hiding as much as it shows (docs/experiments.md)."""

    def __init__(self, gain: float, r_mid: float | None = None) -> None:
        super().__init__()
        if r_mid is None:
            from detector.physics import dual_energy_ratio, material
            r_mid = float(sum(dual_energy_ratio(*material(m).mu) for m in ("cocaine", "steel")) / 2)
        self.gain, self.r_mid = float(gain), float(r_mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        high, low = x[:, :1], x[:, 1:2]
        return torch.cat([high, (high - low * self.r_mid) * self.gain], 1)


class AnomalyNet(nn.Module):
    """Backbone + FPN decoder; forward -> (heatmap probs (N,1,H/s,W/s), score (N,))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        check_model_config(cfg)
        self.cfg = cfg
        # single-energy data (one channel, 8-bit images) has no material signal: the raw input is used
        self.material = MaterialInput(cfg.material_gain) if cfg.material_gain and cfg.in_channels == 2 else None
        self.backbone = Backbone(cfg.backbone, cfg.in_channels, cfg.backbone_stride, cfg.weights, cfg.stage_blocks,
                                 cfg.width)
        used = [(s, c) for s, c in zip(self.backbone.tap_strides, self.backbone.tap_channels) if s >= cfg.stride]
        self.n_skip = len(self.backbone.taps) - len(used)
        d = cfg.decoder_channels
        self.lateral = nn.ModuleList(nn.Conv2d(c, d, 1) for _, c in used)
        if cfg.context_dilations:  # the deepest lateral becomes the context block
            self.lateral[-1] = Context(used[-1][1], d, tuple(cfg.context_dilations))
        self.head = nn.Sequential(
            nn.Conv2d(d, d, 3, padding=1, bias=False), nn.BatchNorm2d(d), nn.ReLU(inplace=True),
            nn.Conv2d(d, 1, 1))
        nn.init.constant_(self.head[-1].bias, float(torch.logit(torch.tensor(cfg.prior))))

    @property
    def stride(self) -> int:
        return self.cfg.stride

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Heatmap logits (N,1,H/s,W/s); H and W must be multiples of 32."""
        if self.material is not None:
            x = self.material(x)
        feats = self.backbone(x)[self.n_skip:]
        p = self.lateral[-1](feats[-1])
        for lat, f in zip(reversed(self.lateral[:-1]), reversed(feats[:-1])):
            p = F.interpolate(p, scale_factor=2.0, mode="nearest") + lat(f)
        return self.head(p)

    def score_from_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """sigmoid(mean of the top-k logits): a few confident cells flag the scan (ONNX: TopK)."""
        flat = logits.flatten(1)
        k = min(self.cfg.topk, flat.shape[1])
        return torch.sigmoid(flat.topk(k, dim=1).values.mean(1))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.logits(x)
        return torch.sigmoid(z), self.score_from_logits(z)


def nhwc(x: torch.Tensor) -> torch.Tensor:
    """A tensor in channels-last layout: oneDNN's fast conv layout, for a model moved to channels-last."""
    return x.contiguous(memory_format=torch.channels_last)


def build_model(cfg: ModelConfig | dict) -> AnomalyNet:
    """AnomalyNet from a ModelConfig (or its dict)."""
    if isinstance(cfg, dict):
        blocks = cfg.get("stage_blocks", 0)
        cfg = ModelConfig(**{**cfg, "context_dilations": tuple(cfg.get("context_dilations") or ()),
                             "stage_blocks": blocks if isinstance(blocks, int) else tuple(blocks)})
    return AnomalyNet(cfg)


def count_flops(model: nn.Module, channels: int, height: int, width: int) -> float:
    """Forward FLOPs (2 per multiply-add) of one (channels, height, width) input."""
    from torch.utils.flop_counter import FlopCounterMode

    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, channels, height, width))
    return float(fc.get_total_flops())
