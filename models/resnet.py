"""torchvision ResNets (``--arch resnet50`` and friends) under the shared backbone contract.

The pooled vector is the usual global average of ``layer4``; the region tokens are the ``layer4``
map itself (``B x C x h x w -> B x (h w) x C``). Keys are ``backbone.<torchvision keys>`` without
``fc``, as in the original's ``ResNetWrapper``.
"""
import torch
import torch.nn as nn
from torchvision import models as tv_models

from .registry import register_model

RESNET_ARCHS = [name for name in ('resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152',
                                  'resnext50_32x4d', 'resnext101_32x8d', 'resnext101_64x4d',
                                  'wide_resnet50_2', 'wide_resnet101_2') if hasattr(tv_models, name)]


class ResNetBackbone(nn.Module):
    flat_state_dict = False

    def __init__(self, arch):
        super().__init__()
        self.backbone = getattr(tv_models, arch)(weights=None)
        self.num_features = self.backbone.fc.in_features
        self.backbone.fc = nn.Identity()

    def feature_map(self, x):  # B x 3 x H x W -> B x C x H/32 x W/32
        net = self.backbone
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        return net.layer4(net.layer3(net.layer2(net.layer1(x))))

    def forward_features(self, x):
        fmap = self.feature_map(x)
        pooled = fmap.mean(dim=(2, 3))                  # B x C
        region = fmap.flatten(2).transpose(1, 2)        # B x (h w) x C
        return pooled, region

    def forward_return_n_last_blocks(self, x, n=1, return_patch_avgpool=False, depths=()):
        """The linear-probe feature B x C: the pooled ``layer4`` map, whatever ``n`` and ``depths``.

        A ResNet has no patch tokens besides that map, so ``return_patch_avgpool`` appends the same pooled mean
        again (B x 2C): with the flag, every backbone's feature grows by ``num_features``.
        """
        pooled = self.forward_features(x)[0]
        return torch.cat([pooled, pooled], dim=-1) if return_patch_avgpool else pooled

    def forward(self, x):
        return self.forward_features(x)[0]


def _build_resnet(arch):
    def builder(config, is_teacher=False):  # no drop path: student and teacher are built alike
        return ResNetBackbone(arch)
    return builder


for _arch in RESNET_ARCHS:
    register_model(_arch)(_build_resnet(_arch))
