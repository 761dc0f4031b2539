"""DINOHead against the original's outputs; the multi-crop wrapper's row order and checkpoint layout."""
import torch
import torch.nn as nn

from models import DINOHead, MultiCropOutput, MultiCropWrapper
from models.resnet import ResNetBackbone


def test_dinohead_reproduces_original(reference):
    meta = reference('fidelity_dinohead.json')
    data = reference('fidelity_dinohead.pt')
    head = DINOHead(in_dim=192, out_dim=64, use_bn=False, norm_last_layer=False, nlayers=3, hidden_dim=128,
                    bottleneck_dim=32).eval()
    assert [[k, list(v.shape)] for k, v in head.state_dict().items()] == meta['state_dict_keys']
    head.load_state_dict(data['state_dict'], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(head(data['in_cls']), data['out_cls'], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head(data['in_fea']), data['out_fea'], rtol=1e-5, atol=1e-5)


def test_norm_last_layer_freezes_gain():
    assert not DINOHead(8, 16, norm_last_layer=True).last_layer.weight_g.requires_grad
    head = DINOHead(8, 16, norm_last_layer=False, use_bn=True, hidden_dim=32, bottleneck_dim=4)
    assert head.last_layer.weight_g.requires_grad
    assert any(isinstance(m, nn.BatchNorm1d) for m in head.modules())
    out = head(torch.randn(5, 8))
    assert out.shape == (5, 16)
    # rows of the effective last-layer weight have norm g (= 1 at init)
    torch.testing.assert_close(head.last_layer.weight.norm(dim=1), torch.ones(16))


class TokenBackbone(nn.Module):
    """Contract stand-in: region tokens = 4x4 average-pooled patches projected to C, pooled = their mean."""
    flat_state_dict = True

    def __init__(self, c=6):
        super().__init__()
        self.proj = nn.Linear(3 * 16, c)
        self.num_features = c

    def forward_features(self, x):
        B = x.shape[0]
        patches = x.unfold(2, 4, 4).unfold(3, 4, 4)                 # B x 3 x h x w x 4 x 4
        patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(B, -1, 48)
        tokens = self.proj(patches)                                 # B x N x C
        return tokens.mean(1), tokens


def test_multicrop_rows_are_crop_major_then_batch_then_token():
    torch.manual_seed(0)
    backbone = TokenBackbone()
    wrapper = MultiCropWrapper(backbone, DINOHead(6, 10, hidden_dim=16, bottleneck_dim=4),
                               DINOHead(6, 10, hidden_dim=16, bottleneck_dim=4))
    B = 2
    crops = [torch.randn(B, 3, 16, 16) for _ in range(2)] + [torch.randn(B, 3, 8, 8) for _ in range(3)] \
        + [torch.randn(B, 3, 12, 12)]
    output = wrapper(crops)
    cls_out, region_out, fea, npatch = output  # unpacks as the original's 4-tuple
    assert isinstance(output, MultiCropOutput)
    assert output.view_logits is cls_out and output.region_logits is region_out
    assert output.region_features is fea and output.tokens_per_group is npatch
    assert npatch == [16, 4, 9]
    assert cls_out.shape == (6 * B, 10)
    assert fea.shape == (B * (2 * 16 + 3 * 4 + 9), 6) and region_out.shape == (fea.shape[0], 10)
    expected_fea = torch.cat([backbone.forward_features(c)[1].flatten(0, 1) for c in crops])
    torch.testing.assert_close(fea, expected_fea)
    expected_cls = wrapper.head(torch.cat([backbone.forward_features(c)[0] for c in crops]))
    torch.testing.assert_close(cls_out, expected_cls)
    torch.testing.assert_close(region_out, wrapper.head_dense(fea))
    # without a region head, only the view-level output
    assert MultiCropWrapper(backbone, wrapper.head)(crops).shape == (6 * B, 10)


def test_flat_state_dict_layout_round_trip():
    wrapper = MultiCropWrapper(TokenBackbone(), DINOHead(6, 10, hidden_dim=16, bottleneck_dim=4),
                               DINOHead(6, 10, hidden_dim=16, bottleneck_dim=4))
    keys = list(wrapper.state_dict())
    assert keys[:2] == ['proj.weight', 'proj.bias']
    assert all(k.startswith(('proj.', 'head.', 'head_dense.')) for k in keys)
    other = MultiCropWrapper(TokenBackbone(), DINOHead(6, 10, hidden_dim=16, bottleneck_dim=4),
                             DINOHead(6, 10, hidden_dim=16, bottleneck_dim=4))
    other.load_state_dict(wrapper.state_dict(), strict=True)
    torch.testing.assert_close(other.backbone.proj.weight, wrapper.backbone.proj.weight)
    # nested in another module (as under DDP) the prefix is kept
    holder = nn.Module()
    holder.module = wrapper
    assert all(k.startswith('module.') and not k.startswith('module.backbone.') for k in holder.state_dict())


def test_resnet50_matches_original_checkpoint_layout(reference):
    manifest = reference('state_dict_resnet50.json')
    with torch.device('meta'):
        wrapper = MultiCropWrapper(ResNetBackbone('resnet50'), DINOHead(2048, 65536, norm_last_layer=False),
                                   DINOHead(2048, 65536, norm_last_layer=False))
    ours = [[f'module.{k}', list(v.shape)] for k, v in wrapper.state_dict().items()]
    assert ours == manifest['state_dict']
    backbone_params = sum(p.numel() for n, p in wrapper.named_parameters() if n.startswith('backbone.'))
    assert backbone_params == manifest['backbone_params']


def test_resnet_contract_shapes():
    backbone = ResNetBackbone('resnet18')
    for size, tokens in ((224, 49), (96, 9), (64, 4)):
        pooled, region = backbone.forward_features(torch.randn(2, 3, size, size))
        assert pooled.shape == (2, 512) and region.shape == (2, tokens, 512)
        torch.testing.assert_close(pooled, region.mean(1))
    assert backbone.forward_return_n_last_blocks(torch.randn(1, 3, 64, 64), 4).shape == (1, 512)
