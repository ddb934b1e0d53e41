"""The paper's ImageNet models and their ResNet baselines (state_dicts identical to torchvision's
models of the same name), and its CIFAR ResNeXt-29, all built from ResNeXtBlock."""

from torch import nn

from .modules import ResNeXtBlock


def _init_weights(model):
    # torchvision's initialisation, so that fresh models are statistically alike.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _stage(inplanes, planes, blocks, stride, groups, base_width, impl):
    """``blocks`` bottlenecks; the first changes width and stride, with a 1x1 projection shortcut."""
    downsample = None
    if stride != 1 or inplanes != planes * ResNeXtBlock.expansion:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * ResNeXtBlock.expansion, 1, stride=stride, bias=False),
            nn.BatchNorm2d(planes * ResNeXtBlock.expansion),
        )
    layers = [ResNeXtBlock(inplanes, planes, stride, downsample, groups, base_width, impl=impl)]
    inplanes = planes * ResNeXtBlock.expansion
    layers += [ResNeXtBlock(inplanes, planes, groups=groups, base_width=base_width, impl=impl)
               for _ in range(1, blocks)]
    return nn.Sequential(*layers), inplanes


class ResNeXt(nn.Module):
    """torchvision's ResNet layout (stem, four stages, pooled classifier) with ResNeXtBlock stages;
    groups=1, base_width=64 gives the plain ResNet."""

    def __init__(self, layers, groups, base_width, num_classes=1000, *, impl="auto"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for index, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stage, inplanes = _stage(inplanes, planes, blocks, 1 if index == 0 else 2, groups, base_width, impl)
            self.add_module(f"layer{index + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        _init_weights(self)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x).flatten(1))


class CifarResNeXt(nn.Module):
    """The paper's CIFAR ResNeXt-29: a 3x3 stem, three stages of three bottlenecks (outputs 256, 512,
    1024), group width ``base_width`` doubling per stage, global pooling and a linear classifier."""

    def __init__(self, groups, base_width, num_classes=10, *, impl="auto"):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        inplanes = 64
        for index, planes in enumerate((64, 128, 256)):
            stage, inplanes = _stage(inplanes, planes, 3, 1 if index == 0 else 2, groups, base_width, impl)
            self.add_module(f"layer{index + 1}", stage)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        _init_weights(self)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


def resnet50(num_classes=1000, impl="auto"):
    return ResNeXt((3, 4, 6, 3), 1, 64, num_classes, impl=impl)


def resnet101(num_classes=1000, impl="auto"):
    return ResNeXt((3, 4, 23, 3), 1, 64, num_classes, impl=impl)


def resnext50_32x4d(num_classes=1000, impl="auto"):
    return ResNeXt((3, 4, 6, 3), 32, 4, num_classes, impl=impl)


def resnext101_32x4d(num_classes=1000, impl="auto"):
    return ResNeXt((3, 4, 23, 3), 32, 4, num_classes, impl=impl)


def resnext101_32x8d(num_classes=1000, impl="auto"):
    return ResNeXt((3, 4, 23, 3), 32, 8, num_classes, impl=impl)


def resnext101_64x4d(num_classes=1000, impl="auto"):
    return ResNeXt((3, 4, 23, 3), 64, 4, num_classes, impl=impl)


def resnext29_8x64d(num_classes=10, impl="auto"):
    return CifarResNeXt(8, 64, num_classes, impl=impl)


def resnext29_16x64d(num_classes=10, impl="auto"):
    return CifarResNeXt(16, 64, num_classes, impl=impl)
