"""Swin Transformer backbone: checkpoint layout, numerical fidelity to the original, shapes, gradients."""
import math

import pytest
import torch
import torch.nn as nn

from helpers import make_config
from models import build_model
from models.swin_transformer import SwinTransformer

TINY_OPTS = ['MODEL.NUM_CLASSES', '0', 'MODEL.SPEC.DIM_EMBED', '24', 'MODEL.SPEC.DEPTHS', '[2, 2, 2, 2]',
             'MODEL.SPEC.NUM_HEADS', '[1, 2, 4, 8]']
W7_YAML = 'experiments/imagenet/swin/swin_tiny_patch4_window7_224.yaml'
W14_YAML = 'experiments/imagenet/swin/swin_tiny_patch4_window14_224.yaml'
HEAD_PREFIXES = ('head.', 'head_dense.')


def tiny_swin(yaml=W7_YAML, is_teacher=False, extra_opts=()):
    torch.manual_seed(0)
    return build_model(make_config(yaml, TINY_OPTS + list(extra_opts)), is_teacher=is_teacher)


def region_side(image_side, patch_size=4, num_stages=4):
    """Feature-map side after the patch embedding and the (ceil-)halving PatchMergings."""
    side = image_side // patch_size
    for _ in range(num_stages - 1):
        side = math.ceil(side / 2)
    return side


def assert_matches_reference(actual, expected, rel=1e-5):
    """Elementwise close relative to the expected tensor's scale (max |value|)."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


@pytest.mark.parametrize('arch', ['swin_tiny_w7', 'swin_tiny_w14', 'swin_small_w7', 'swin_base_w7'])
def test_state_dict_matches_original_checkpoint_layout(reference, arch):
    manifest = reference(f'state_dict_{arch}.json')
    expected = [(key[len('module.'):], shape) for key, shape in manifest['state_dict']]
    expected = [(key, shape) for key, shape in expected if not key.startswith(HEAD_PREFIXES)]
    with torch.device('meta'):
        model = build_model(make_config(manifest['config']['cfg'], ['MODEL.NUM_CLASSES', '0']))

    state = model.state_dict()
    assert [(key, list(t.shape)) for key, t in state.items()] == expected
    assert all(t.dtype == torch.int64 for key, t in state.items() if key.endswith('relative_position_index'))
    assert sum(p.numel() for p in model.parameters()) == manifest['backbone_params']
    assert model.num_features == manifest['structure']['head_in_dim']
    window_shift_heads = [[[b.window_size, b.shift_size, b.attn.num_heads] for b in stage.blocks]
                          for stage in model.layers]
    assert window_shift_heads == manifest['structure']['blocks_window_shift_as_constructed']
    layernorm_eps = {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}
    assert layernorm_eps == set(manifest['structure']['layernorm_eps'])


def test_classifier_head_only_with_classes():
    with torch.device('meta'):
        classifier = build_model(make_config(W7_YAML, TINY_OPTS + ['MODEL.NUM_CLASSES', '10']))
    assert isinstance(classifier.head, nn.Linear) and classifier.head.weight.shape == (10, 192)
    assert not any(key.startswith(HEAD_PREFIXES) for key in tiny_swin().state_dict())


def test_reproduces_original_outputs(reference):
    fidelity = reference('fidelity_swin_tiny.json')
    data = reference('fidelity_swin_tiny.pt')
    model = build_model(make_config(fidelity['cfg'], fidelity['opts']), is_teacher=True)
    model.load_state_dict(data['state_dict'], strict=True)
    model.eval()
    depths = fidelity['depths_passed_to_forward_return_n_last_blocks']
    with torch.no_grad():
        for size in ('224', '96'):  # 96: padded, unmasked windows and the mask of the padded map
            images = data[f'x{size}']
            pooled, dense = model.forward_features(images)
            assert_matches_reference(pooled, data[f'out{size}_pooled'])
            assert_matches_reference(dense, data[f'out{size}_dense'])
            # the original ignored return_patch_avgpool: its nlast4 is the feature without the patch mean
            nlast = model.forward_return_n_last_blocks(images, n=4, depths=depths)
            assert_matches_reference(nlast, data[f'out{size}_nlast4'])
            with_patch_mean = model.forward_return_n_last_blocks(images, n=4, return_patch_avgpool=True,
                                                                 depths=depths)
            expected = torch.cat([data[f'out{size}_nlast4'], data[f'out{size}_pooled']], dim=1)
            assert_matches_reference(with_patch_mean, expected)


@pytest.mark.parametrize('yaml, image_side', [(W7_YAML, 224), (W7_YAML, 96), (W7_YAML, 64), (W7_YAML, 32),
                                              (W7_YAML, 100), (W14_YAML, 96)])
def test_output_shapes(yaml, image_side):
    model = tiny_swin(yaml, is_teacher=True).eval()
    images = torch.randn(2, 3, image_side, image_side)
    side = region_side(image_side)
    with torch.no_grad():
        pooled, region = model.forward_features(images)
        assert model.num_features == 192
        assert pooled.shape == (2, 192) and region.shape == (2, side * side, 192)
        torch.testing.assert_close(pooled, region.mean(dim=1))
        torch.testing.assert_close(model(images), pooled)
        # last blocks across stages: 1 -> stage 3 (192); 3 -> stage 2 block 1 (96) + stage 3 (2 x 192)
        assert model.forward_return_n_last_blocks(images, n=1).shape == (2, 192)
        assert model.forward_return_n_last_blocks(images, n=3, depths=[2, 2, 2, 2]).shape == (2, 96 + 2 * 192)
        assert model.forward_return_n_last_blocks(images, n=4).shape == (2, 2 * 96 + 2 * 192)


def test_n_last_blocks_rejects_other_depths():
    with pytest.raises(ValueError):
        tiny_swin().forward_return_n_last_blocks(torch.randn(1, 3, 32, 32), n=1, depths=[2, 2, 6, 2])


def test_gradient_reaches_every_parameter():
    model = tiny_swin(is_teacher=True).train()  # no drop-path: no branch is dropped by chance
    pooled, region = model.forward_features(torch.randn(2, 3, 96, 96))
    (pooled.sum() + region.sum()).backward()
    no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not no_grad


def test_teacher_has_no_drop_path_student_follows_linear_rule():
    teacher, student = tiny_swin(is_teacher=True), tiny_swin()
    teacher_rates = [getattr(b.drop_path, 'drop_prob', 0.) for s in teacher.layers for b in s.blocks]
    student_rates = [getattr(b.drop_path, 'drop_prob', 0.) for s in student.layers for b in s.blocks]
    assert teacher_rates == [0.] * 8
    assert student_rates == pytest.approx(torch.linspace(0, 0.1, 8).tolist())


def test_attention_maps_are_probabilities_in_the_window_layout():
    model = tiny_swin(is_teacher=True).eval()
    images = torch.randn(2, 3, 96, 96)
    all_blocks = sum(model.depths)
    with torch.no_grad():
        maps = model.forward_attention_maps(images, n_last=all_blocks)
        tokens_explicit, _ = model._run_blocks(images, keep_last=all_blocks, with_attention=True)
        tokens_sdpa, _ = model._run_blocks(images)
    torch.testing.assert_close(tokens_explicit, tokens_sdpa, rtol=1e-5, atol=1e-5)

    assert len(maps) == all_blocks and len(model.forward_attention_maps(images)) == 1
    # stage 0 at 96 px: 24x24 map padded to 28x28 -> 16 windows of 7x7; block 1 is shifted by 3
    first, shifted = maps[0], maps[1]
    assert (first.window_size, first.shift_size, first.hw, first.padded_hw) == (7, 0, (24, 24), (28, 28))
    assert shifted.shift_size == 3
    for m in maps:
        windows = (m.padded_hw[0] // m.window_size) * (m.padded_hw[1] // m.window_size)
        assert m.probs.shape[0] == 2 * windows and m.probs.shape[2:] == (m.window_size ** 2,) * 2
        torch.testing.assert_close(m.probs.sum(-1), torch.ones(m.probs.shape[:-1]))
    # the last window of a shifted map mixes 4 wrapped-around regions: no attention across them
    corner = shifted.probs.view(2, 16, 1, 49, 49)[:, -1]
    rows = torch.arange(7).repeat_interleave(7)
    cols = torch.arange(7).repeat(7)
    region = (rows >= 4).long() * 2 + (cols >= 4).long()
    across = region[:, None] != region[None, :]
    assert corner[..., across].max() < 1e-30


def test_shift_masks_are_cached_per_resolution_outside_the_state_dict():
    model = tiny_swin(is_teacher=True).eval()
    keys = set(model.state_dict())
    with torch.no_grad():
        model.forward_features(torch.randn(1, 3, 64, 64))
        model.forward_features(torch.randn(1, 3, 96, 96))
    assert set(model.state_dict()) == keys
    shifted = model.layers[0].blocks[1]
    assert {key[:2] for key in shifted._shift_masks} == {(21, 21), (28, 28)}


def test_backbone_keys_sit_at_the_top_level_of_the_checkpoint():
    model = tiny_swin()
    assert isinstance(model, SwinTransformer) and model.flat_state_dict
