"""A torchvision-style ResNet (an ordinary ``nn.Module``, unmodified) trained with PB on CIFAR-10.

The classes below follow ``torchvision.models.resnet`` (BasicBlock with ``out += identity`` and
``nn.ReLU(inplace=True)``, a ``downsample`` branch, ``norm_layer``); the only addition is ``width`` (64 in
torchvision) so the example runs quickly on a CPU. GroupNorm replaces BatchNorm: at batch size one,
batch statistics do not exist. pipeprop captures the forward with ``torch.export`` and cuts it into one
stage per convolution (the skip connections travel with the activations).

    PYTHONPATH=src python examples/resnet_torchvision_style.py --steps 300
"""

from __future__ import annotations

import argparse
import time
from functools import partial
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pipeprop


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: Optional[nn.Module] = None,
                 norm_layer: Optional[Callable[[int], nn.Module]] = None) -> None:
        super().__init__()
        norm_layer = norm_layer or nn.BatchNorm2d
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = norm_layer(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    def __init__(self, block: type[BasicBlock], layers: list[int], num_classes: int = 1000,
                 norm_layer: Optional[Callable[[int], nn.Module]] = None, width: int = 64) -> None:
        super().__init__()
        self._norm_layer = norm_layer or nn.BatchNorm2d
        self.inplanes = width
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = self._norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, width, layers[0])
        self.layer2 = self._make_layer(block, 2 * width, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def _make_layer(self, block: type[BasicBlock], planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        norm_layer = self._norm_layer
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride), norm_layer(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample, norm_layer)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, norm_layer=norm_layer))
        return nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        x = self.bn1(x)
        x = self.relu(x)
        x = self.maxpool(x)
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


def resnet18(num_classes: int = 10, width: int = 16) -> ResNet:
    """ResNet-18 layout with GroupNorm (groups of up to 8 channels... capped at the channel count)."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, norm_layer=partial(_group_norm), width=width)


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(8, channels), channels)


def cifar10_batches(steps: int, data_dir: Optional[str], seed: int = 0):
    from pipeprop.data import load_dataset

    ds = load_dataset("cifar10", data_dir=data_dir)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(ds.train), (steps,), generator=g)
    for i in idx.tolist():
        yield ds.normalize(ds.train.images[i : i + 1]), ds.train.labels[i : i + 1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--method", default="pb+sc+lwp")
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--width", type=int, default=16)
    ap.add_argument("--data-dir", default="../shared/data")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = resnet18(width=args.width)
    batches = list(cifar10_batches(args.steps, args.data_dir))
    part = pipeprop.partition(model, "layer", example_input=batches[0][0])
    print(part.summary().splitlines()[-1])
    sim = pipeprop.build_simulator(part, F.cross_entropy, method=args.method, lr=args.lr, momentum=args.momentum)
    t0 = time.perf_counter()
    losses = [sim.step(x, y) for x, y in batches]
    dt = (time.perf_counter() - t0) / len(batches)
    k = max(1, len(losses) // 10)
    print(f"{args.method}: loss {sum(losses[:k]) / k:.3f} (first {k}) -> {sum(losses[-k:]) / k:.3f} (last {k}), {1e3 * dt:.1f} ms/step")


if __name__ == "__main__":
    main()
