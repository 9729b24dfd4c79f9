"""HiSD's generator `Gen` as ID-Guard runs it (imlixinyang/HiSD `core/networks.py`), NCHW, written
from the facts.

Takes the port's flat configuration (ports.hisd.CELEBA_HQ_256 form). Attribute names reproduce
the official `gen_test` keys: encoder.{i}, decoder.{i}, extractors.model.{i},
translators.{t}.{model.{i}, style_to_params, features.0, masks.0},
mappers.{t}.{pre_model.{i}, post_models.{j}.{k}}.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _standardize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """(x - mean_HW) / (unbiased std_HW + eps), per image and channel."""
    flat = x.flatten(2)
    mean = flat.mean(-1, keepdim=True)
    std = flat.std(-1, keepdim=True)  # torch's default: unbiased (N - 1)
    return ((flat - mean) / (std + eps)).view_as(x)


class InstanceNorm(nn.Module):
    """HiSD's InstanceNorm2d: weight/bias (1, C, 1), eps on the std."""

    def __init__(self, c: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, c, 1))
        self.bias = nn.Parameter(torch.zeros(1, c, 1))

    def forward(self, x):
        y = _standardize(x, self.eps).flatten(2) * self.weight + self.bias
        return y.view_as(x)


class AdaIN(nn.Module):
    """Same statistics; weight and bias (B, C) are assigned by the translator before a forward."""

    def __init__(self, c: int, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.eps = c, eps
        self.weight = self.bias = None

    def forward(self, x):
        return _standardize(x, self.eps) * self.weight[:, :, None, None] \
            + self.bias[:, :, None, None]


def _act(x):
    return F.leaky_relu(x, 0.2)


class DownBlock(nn.Module):
    """avg-pool residual block; with `norm`, DownBlockIN (in1, in2 both in_dim)."""

    def __init__(self, in_dim: int, out_dim: int, norm: bool = False):
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, in_dim, 3, 1, 1)
        self.conv2 = nn.Conv2d(in_dim, out_dim, 3, 1, 1)
        if norm:
            self.in1, self.in2 = InstanceNorm(in_dim), InstanceNorm(in_dim)
        else:
            self.in1 = self.in2 = nn.Identity()
        self.sc = nn.Conv2d(in_dim, out_dim, 1, 1, 0, bias=False)

    def forward(self, x):
        residual = F.avg_pool2d(self.sc(x), 2)
        h = F.avg_pool2d(self.conv1(_act(self.in1(x))), 2)
        h = self.conv2(_act(self.in2(h)))
        return (residual + h) / math.sqrt(2)


class UpBlockIN(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, 1, 1)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, 1, 1)
        self.in1, self.in2 = InstanceNorm(in_dim), InstanceNorm(out_dim)
        self.sc = nn.Conv2d(in_dim, out_dim, 1, 1, 0, bias=False)

    def forward(self, x):
        residual = F.interpolate(self.sc(x), scale_factor=2, mode="nearest")
        h = F.interpolate(_act(self.in1(x)), scale_factor=2, mode="nearest")
        h = self.conv2(_act(self.in2(self.conv1(h))))
        return (residual + h) / math.sqrt(2)


class MiddleBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_dim, out_dim, 3, 1, 1)
        self.conv2 = nn.Conv2d(out_dim, out_dim, 3, 1, 1)
        self.adain1, self.adain2 = AdaIN(in_dim), AdaIN(out_dim)
        self.sc = nn.Conv2d(in_dim, out_dim, 1, 1, 0, bias=False)

    def forward(self, x):
        h = self.conv2(_act(self.adain2(self.conv1(_act(self.adain1(x))))))
        return (self.sc(x) + h) / math.sqrt(2)


class LinearBlock(nn.Module):
    """ReLU, then Linear (key `linear`)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)

    def forward(self, z):
        return self.linear(F.relu(z))


class Extractors(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        ch, self.num_tags = cfg["extractor_channels"], len(cfg["tags"])
        self.model = nn.Sequential(
            nn.Conv2d(cfg["input_dim"], ch[0], 1, 1, 0),
            *[DownBlock(ch[i], ch[i + 1]) for i in range(len(ch) - 1)],
            nn.AdaptiveAvgPool2d(1),
            nn.Conv2d(ch[-1], cfg["style_dim"] * self.num_tags, 1, 1, 0))

    def forward(self, x, tag: int):
        return self.model(x).view(x.size(0), self.num_tags, -1)[:, tag]


class Translator(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        ch = cfg["translator_channels"]
        self.model = nn.Sequential(
            nn.Conv2d(cfg["encoder_channels"][-1], ch[0], 1, 1, 0),
            *[MiddleBlock(ch[i], ch[i + 1]) for i in range(len(ch) - 1)])
        num_params = sum(2 * m.num_features for m in self.model.modules()
                         if isinstance(m, AdaIN))
        self.style_to_params = nn.Linear(cfg["style_dim"], num_params)
        self.features = nn.Sequential(nn.Conv2d(ch[-1], cfg["decoder_channels"][0], 1, 1, 0))
        self.masks = nn.Sequential(nn.Conv2d(ch[-1], cfg["decoder_channels"][0], 1, 1, 0),
                                   nn.Sigmoid())

    def forward(self, e, s):
        p = self.style_to_params(s)
        for m in self.model.modules():  # module order: block1.adain1, block1.adain2, block2...
            if isinstance(m, AdaIN):
                c = m.num_features
                m.bias, m.weight = p[:, :c], p[:, c:2 * c] + 1
                p = p[:, 2 * c:]
        mid = self.model(e)
        m = self.masks(mid)
        return self.features(mid) * m + e * (1 - m)


class Mapper(nn.Module):
    def __init__(self, cfg: dict, num_attributes: int):
        super().__init__()
        pre, post = cfg["mapper_pre_channels"], cfg["mapper_post_channels"]
        self.pre_model = nn.Sequential(
            nn.Linear(cfg["noise_dim"], pre[0]),
            *[LinearBlock(pre[i], pre[i + 1]) for i in range(len(pre) - 1)])
        self.post_models = nn.ModuleList([nn.Sequential(
            *[LinearBlock(post[i], post[i + 1]) for i in range(len(post) - 1)],
            nn.Linear(post[-1], cfg["style_dim"])) for _ in range(num_attributes)])

    def forward(self, z, attribute: int):
        return self.post_models[attribute](self.pre_model(z))


class Gen(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        enc, dec = cfg["encoder_channels"], cfg["decoder_channels"]
        self.encoder = nn.Sequential(
            nn.Conv2d(cfg["input_dim"], enc[0], 1, 1, 0),
            *[DownBlock(enc[i], enc[i + 1], norm=True) for i in range(len(enc) - 1)])
        self.decoder = nn.Sequential(
            *[UpBlockIN(dec[i], dec[i + 1]) for i in range(len(dec) - 1)],
            nn.Conv2d(dec[-1], cfg["input_dim"], 1, 1, 0))
        self.extractors = Extractors(cfg)
        self.translators = nn.ModuleList([Translator(cfg) for _ in cfg["tags"]])
        self.mappers = nn.ModuleList([Mapper(cfg, len(attrs)) for _, attrs in cfg["tags"]])

    def encode(self, x):
        return self.encoder(x)

    def reference_guided(self, x, reference, tag: int):
        """ID-Guard's Gen.forward(img, ref, tag): decode(translate(encode(x), extract(ref)))."""
        return self.decoder(self.translators[tag](self.encode(x), self.extractors(reference, tag)))

    def latent_guided(self, x, z, tag: int, attribute: int):
        style = self.mappers[tag](z, attribute)
        return self.decoder(self.translators[tag](self.encode(x), style))


@torch.no_grad()
def randomize_norms_(gen: Gen, generator: torch.Generator) -> Gen:
    """Move every InstanceNorm weight/bias off 1/0 (they would hide a dropped or swapped key)."""
    for m in gen.modules():
        if isinstance(m, InstanceNorm):
            m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=generator))
            m.bias.copy_(0.2 * torch.randn(m.bias.shape, generator=generator))
    return gen
