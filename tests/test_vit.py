"""ViT / DeiT backbone (--arch deit_tiny | deit_small | vit_base, --patch_size): the original's checkpoint layout,
initialisation and outputs, the position-embedding resize, attention maps, training, the linear-probe feature
and the [CLS] attention pictures of run_analysis.py."""
import json
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import eval_linear
import run_analysis
from analysis.attention import attention_views, block_attentions
from analysis.drawing import panel_grid_size
from analysis.run import analyze
from config import ConfigError, load_config
from engine import build_trainer as build_engine_trainer
from engine import parse_args
from evaluation import linear, parse_eval_args
from evaluation.backbone import build_frozen_backbone
from helpers import build_trainer
from models import build_model
from models.vision_transformer import VisionTransformer, resize_position_embedding

# a 2-block ViT, 48 wide with 3 heads, patch 16 on 64 px images (a 4 x 4 grid; local crops of 32 px: 2 x 2)
TINY_OPTS = ['MODEL.SPEC.EMBED_DIM', '48', 'MODEL.SPEC.DEPTH', '2', 'MODEL.SPEC.NUM_HEADS', '3',
             'TRAIN.IMAGE_SIZE', '[64, 64]']


def vit_config(arch='deit_small', patch_size=16, opts=()):
    """The config main_esvit.py builds for ``--arch ARCH --patch_size P OPTS``."""
    return load_config(parse_args(['--arch', arch, '--patch_size', str(patch_size), *opts]))


def tiny_vit(is_teacher=True):
    torch.manual_seed(0)
    return build_model(vit_config(opts=TINY_OPTS), is_teacher=is_teacher).eval()


def reduced_config(fidelity):
    """The reduced deit_small of fidelity_vit_small: --arch deit_small --patch_size 16 with its overrides."""
    sizes = fidelity['reduced_overrides']
    return vit_config(fidelity['arch'], fidelity['builder_kwargs']['patch_size'], [
        'MODEL.SPEC.EMBED_DIM', str(sizes['embed_dim']), 'MODEL.SPEC.DEPTH', str(sizes['depth']),
        'MODEL.SPEC.NUM_HEADS', str(sizes['num_heads'])])


def assert_matches_reference(actual, expected, rel=1e-4):
    """Elementwise close relative to the expected tensor's scale (max |value|)."""
    assert actual.shape == expected.shape
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale)


# ---------------------------------------------------------------- the original's outputs, weights and layout
@pytest.mark.parametrize('size', ['224', '96'])  # 96: the position embedding resized from 14 x 14 to 6 x 6
def test_reproduces_original_outputs(reference, size):
    fidelity, data = reference('fidelity_vit_small.json'), reference('fidelity_vit_small.pt')
    model = build_model(reduced_config(fidelity), is_teacher=True)
    model.load_state_dict(data['state_dict'], strict=True)
    model.eval()
    images = data[f'x{size}']
    depths = fidelity['depths_passed_to_forward_return_n_last_blocks']
    with torch.no_grad():
        pooled, dense = model.forward_features(images)
        assert_matches_reference(pooled, data[f'out{size}_pooled'])
        assert_matches_reference(dense, data[f'out{size}_dense'])
        nlast4 = model.forward_return_n_last_blocks(images, n=4, return_patch_avgpool=True, depths=depths)
        assert_matches_reference(nlast4, data[f'out{size}_nlast4'])
        nlast2 = model.forward_return_n_last_blocks(images, n=2, return_patch_avgpool=False, depths=depths)
        assert_matches_reference(nlast2, data[f'out{size}_nlast2'])
        assert torch.equal(model(images), pooled)


def test_init_reproduces_the_original(reference):
    """Seed-0 init plus the file's documented perturbation gives exactly its saved weights."""
    fidelity = reference('fidelity_vit_small.json')
    saved = reference('fidelity_vit_small.pt')['state_dict']
    torch.manual_seed(0)
    model = build_model(reduced_config(fidelity), is_teacher=True)
    noise = torch.Generator().manual_seed(1234)
    state = model.state_dict()
    assert [[k, list(t.shape), str(t.dtype).replace('torch.', '')] for k, t in state.items()] == \
        fidelity['state_dict_keys']
    for key, tensor in state.items():
        expected = tensor + 0.02 * torch.randn(tensor.shape, generator=noise)
        torch.testing.assert_close(expected, saved[key], rtol=0, atol=1e-7, msg=key)


def meta_trainer(patch_size):
    """The Trainer main_esvit.py builds for the manifest's command line, on the meta device."""
    args = parse_args(['--arch', 'deit_small', '--patch_size', str(patch_size), '--use_dense_prediction', 'True',
                       '--norm_last_layer', 'false', '--out_dim', '65536', '--precision', 'fp32'])
    args.device = torch.device('meta')
    config = load_config(args)
    with torch.device('meta'):
        return build_engine_trainer(args, config, steps_per_epoch=1)


def test_checkpoint_layout_matches_the_original(reference):
    """What Trainer.state_dict writes: every key and shape of the original's student (under module.) and teacher
    (bare: no BatchNorm), in order, for --arch deit_small --patch_size 16; patch 8 changes two shapes only."""
    manifest = reference('state_dict_deit_small.json')
    structure = manifest['structure']
    trainer = meta_trainer(16)
    state = trainer.state_dict(epoch=0)
    assert [[k, list(t.shape)] for k, t in state['student'].items()] == manifest['state_dict']
    assert [[k, list(t.shape)] for k, t in state['teacher'].items()] == manifest['teacher_state_dict']
    backbone = trainer.student.backbone
    assert sum(p.numel() for p in backbone.parameters()) == manifest['backbone_params']
    assert backbone.num_features == structure['head_in_dim']
    assert {m.eps for m in backbone.modules() if isinstance(m, nn.LayerNorm)} == set(structure['layernorm_eps'])
    for network, name in ((trainer.student, 'student'), (trainer.teacher, 'teacher')):
        rates = [getattr(block.drop_path1, 'drop_prob', 0.) for block in network.backbone.blocks]
        assert rates == pytest.approx(structure[f'{name}_drop_path_per_block'], abs=1e-6)

    patch8 = {k: list(t.shape) for k, t in meta_trainer(8).state_dict(epoch=0)['teacher'].items()}
    expected = dict(manifest['teacher_state_dict'])
    expected.update({'pos_embed': [1, 1 + 28 * 28, 384], 'patch_embed.proj.weight': [384, 3, 8, 8]})
    assert patch8 == expected


def test_released_checkpoint_loads_for_evaluation(reference, tmp_path):
    """The fidelity weights saved as an original checkpoint (teacher bare, student under module. with heads)
    load into the evaluation's frozen backbone, which then gives the original's outputs."""
    fidelity, data = reference('fidelity_vit_small.json'), reference('fidelity_vit_small.pt')
    weights = data['state_dict']
    heads = {'head.last_layer.weight_v': torch.zeros(4, 3), 'head_dense.mlp.0.bias': torch.zeros(3)}
    path = tmp_path / 'released.pth'
    torch.save({'teacher': weights, 'student': {f'module.{k}': v for k, v in {**weights, **heads}.items()}}, path)
    for key in ('teacher', 'student'):
        backbone = build_frozen_backbone(reduced_config(fidelity), str(path), key)
        with torch.no_grad():
            assert_matches_reference(backbone.forward_features(data['x96'])[0], data['out96_pooled'])


# ---------------------------------------------------------------- configuration
def test_arch_and_patch_size_select_the_model(capsys):
    for arch, dim, heads, patch in (('deit_tiny', 192, 3, 16), ('deit_small', 384, 6, 8), ('vit_base', 768, 12, 8)):
        config = vit_config(arch, patch)
        spec = config.MODEL.SPEC
        assert (spec.EMBED_DIM, spec.DEPTH, spec.NUM_HEADS, spec.PATCH_SIZE) == (dim, 12, heads, patch)
        assert config.MODEL.NAME == 'vision_transformer' and config.MODEL.NUM_CLASSES == 0
    assert 'a ViT of EMBED_DIM 768, DEPTH 12, NUM_HEADS 12, PATCH_SIZE 8' in capsys.readouterr().out
    # the parsers' defaults: 16 for training and evaluation, 8 for run_analysis.py (as the original's)
    assert load_config(parse_args(['--arch', 'deit_small'])).MODEL.SPEC.PATCH_SIZE == 16
    assert load_config(run_analysis.parse_args(['--arch', 'deit_small'])).MODEL.SPEC.PATCH_SIZE == 8
    # a trailing opt overrides --patch_size
    assert vit_config(opts=['MODEL.SPEC.PATCH_SIZE', '8']).MODEL.SPEC.PATCH_SIZE == 8


@pytest.mark.parametrize('opts, message', [
    (['MODEL.SPEC.EMBED_DIM', '192', 'MODEL.SPEC.NUM_HEADS', '3'], 'builds a deit_tiny'),
    (['MODEL.SPEC.EMBED_DIM', '50'], 'multiple of NUM_HEADS'),
    (['MODEL.SPEC.PATCH_SIZE', '300'], 'smaller than one patch'),
    (['MODEL.SPEC.QK_SCALE', '0.1'], 'unknown config key MODEL.SPEC.QK_SCALE'),
])
def test_bad_vit_configs_are_one_line_errors(opts, message):
    with pytest.raises(ConfigError, match=message) as error:
        vit_config(opts=opts)
    assert '\n' not in str(error.value)


# ---------------------------------------------------------------- position embedding, forward, attention
def test_position_embedding_resize_is_the_originals_scale_factor_interpolation():
    torch.manual_seed(0)
    for side0 in (14, 28, 4):
        pos_embed = torch.randn(1, 1 + side0 * side0, 8)
        assert resize_position_embedding(pos_embed, (side0, side0), (side0, side0)) is pos_embed
        for side in (2, 3, 6, 7, 12, 20, 41):
            # the original: nn.functional.interpolate(..., scale_factor=math.sqrt(npatch / N), mode='bicubic')
            grid = pos_embed[:, 1:].reshape(1, side0, side0, 8).permute(0, 3, 1, 2)
            resized = F.interpolate(grid, scale_factor=math.sqrt(side * side / (side0 * side0)), mode='bicubic')
            expected = torch.cat([pos_embed[:, :1], resized.permute(0, 2, 3, 1).reshape(1, -1, 8)], dim=1)
            assert torch.equal(resize_position_embedding(pos_embed, (side0, side0), (side, side)), expected)
    # where the original's floor(14 x scale) falls one short (29 a side), and a non-square grid
    pos_embed = torch.randn(1, 1 + 14 * 14, 8)
    assert resize_position_embedding(pos_embed, (14, 14), (29, 29)).shape == (1, 1 + 29 * 29, 8)
    assert resize_position_embedding(pos_embed, (14, 14), (6, 9)).shape == (1, 1 + 6 * 9, 8)


def test_shapes_and_gradients_at_global_and_local_sizes():
    model = tiny_vit(is_teacher=True).train()  # the teacher: no drop-path, every branch is used
    assert isinstance(model, VisionTransformer) and model.flat_state_dict and model.num_features == 48
    for side, grid in ((64, 4), (32, 2), (96, 6), (48, 3)):
        model.zero_grad()
        pooled, region = model.forward_features(torch.randn(2, 3, side, side))
        assert pooled.shape == (2, 48) and region.shape == (2, grid * grid, 48)
        (pooled.sum() + region.pow(2).sum()).backward()
        no_grad = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
        assert not no_grad, side
    non_square = model.forward_features(torch.randn(1, 3, 64, 32))[1]
    assert non_square.shape == (1, 4 * 2, 48)


def test_n_last_blocks_takes_the_normed_cls_tokens_of_the_last_blocks():
    model = tiny_vit()
    images = torch.randn(2, 3, 64, 64)
    outputs = []
    hooks = [block.register_forward_hook(lambda module, args, out: outputs.append(out)) for block in model.blocks]
    with torch.no_grad():
        features = model.forward_return_n_last_blocks(images, n=2, return_patch_avgpool=True, depths=[])
        last_only = model.forward_return_n_last_blocks(images, n=1, depths=[2])
        region = model.forward_features(images)[1]
    for hook in hooks:
        hook.remove()
    expected = torch.cat([F.layer_norm(outputs[0][:, 0], (48,), model.norm.weight, model.norm.bias, 1e-6),
                          F.layer_norm(outputs[1][:, 0], (48,), model.norm.weight, model.norm.bias, 1e-6),
                          region.mean(dim=1)], dim=1)  # 2 x (2 + 1) * 48
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last_only, features[:, 48:96])
    for n, depths in ((3, []), (0, []), (1, [12])):
        with pytest.raises(ValueError):
            model.forward_return_n_last_blocks(images, n=n, depths=depths)


def test_attention_maps_are_the_softmax_the_blocks_apply():
    model = tiny_vit()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3)  # far from uniform attention
    images = torch.randn(2, 3, 64, 48)  # a 4 x 3 grid
    block_inputs = []
    hooks = [b.register_forward_pre_hook(lambda module, args: block_inputs.append(args[0])) for b in model.blocks]
    with torch.no_grad():
        maps = model.forward_attention_maps(images, n_last=2)
        for hook in hooks:
            hook.remove()
        x = block_inputs[-1]
        assert len(maps) == 2 and maps[-1].num_global == 1 and maps[-1].hw == (4, 3)
        # by hand: the last block's q, k from its weights, softmax(q k^T / sqrt(16)) per head
        block = model.blocks[-1]
        q, k, v = F.linear(block.norm1(x), block.attn.qkv.weight, block.attn.qkv.bias).view(2, 13, 3, 3, 16).unbind(2)
        probs = (torch.einsum('bqhd,bkhd->bhqk', q, k) / 4).softmax(dim=-1)
        torch.testing.assert_close(maps[-1].probs, probs, rtol=1e-5, atol=1e-6)
        attended = block.attn.proj((probs @ v.transpose(1, 2)).transpose(1, 2).reshape(2, 13, 48))
        after = x + attended
        torch.testing.assert_close(after + block.mlp(block.norm2(after)), block(x), rtol=1e-4, atol=1e-5)
        assert probs[:, :, 0].max() > 0.5  # sharpened: some head of the [CLS] query concentrates its mass

        # what run_analysis draws: the [CLS] row over the grid, named as such
        blocks = block_attentions(model, images[:1], n_last=5)
    assert [(b.stage, b.block, b.grid, b.class_token) for b in blocks] == [(0, 0, (4, 3), True), (0, 1, (4, 3), True)]
    assert blocks[-1].layout == 'full attention + [CLS] token' and blocks[-1].covers_map
    views = {slug: maps for slug, _, maps, _ in attention_views(blocks[-1], [(0.5, 0.5)], 48)}
    assert set(views) == {'query_r2_c1', 'whole_map', 'cls_token'}
    torch.testing.assert_close(views['cls_token'], probs[0, :, 0, 1:].reshape(3, 4, 3))


# ---------------------------------------------------------------- training, evaluation, analysis
def test_view_and_region_training_lowers_the_loss(tmp_path):
    trainer = build_trainer('deit_small', None, tmp_path, ('--head_hidden_dim', '128', '--head_bottleneck_dim',
                                                           '64', '--patch_size', '16', *TINY_OPTS))
    assert trainer.args.use_dense_prediction
    g = torch.Generator().manual_seed(1)
    crops = [torch.randn(4, 3, 64, 64, generator=g) for _ in range(2)] + \
            [torch.randn(4, 3, 32, 32, generator=g) for _ in range(2)]
    output = trainer.student(crops)
    assert output.tokens_per_group == [16, 4] and output.region_features.shape == (2 * 4 * 16 + 2 * 4 * 4, 48)
    losses = [trainer.step(crops, epoch=1, it=8 + i) for i in range(4)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses


def test_linear_probe_feature_is_n_last_blocks_times_dim_plus_dim_with_patch_tokens(tiny_data, tmp_path):
    """DINO's ViT probe: n_last_blocks x dim, + dim with --avgpool_patchtokens True."""
    data = tmp_path / 'data'
    data.mkdir()
    for split in ('train', 'val'):
        (data / split).symlink_to(tiny_data)
    for flag, blocks in (('False', 2), ('True', 3)):
        out = tmp_path / flag
        linear.eval_linear(parse_eval_args(eval_linear.get_args_parser(), [
            '--arch', 'deit_small', '--patch_size', '8', '--data_path', str(data), '--image_size', '32',
            '--num_workers', '0', '--batch_size_per_gpu', '16', '--n_last_blocks', '2', '--epochs', '1',
            '--cache_features', 'True', '--avgpool_patchtokens', flag, '--output_dir', str(out), '--print_freq', '100',
            *TINY_OPTS[:-2], 'TRAIN.IMAGE_SIZE', '[32, 32]']))
        saved = torch.load(out / linear.CHECKPOINT_NAME, weights_only=True)
        assert saved['state_dict']['linear.weight'].shape == (4, blocks * 48)


def test_run_analysis_draws_the_cls_attention_maps(tmp_path, capsys):
    torch.save({'teacher': tiny_vit().state_dict()}, tmp_path / 'checkpoint.pth')
    photo = tmp_path / 'photo.png'
    Image.radial_gradient('L').convert('RGB').resize((80, 64)).save(photo)
    analyze(run_analysis.parse_args([
        '--arch', 'deit_small', '--patch_size', '16', '--pretrained_weights', str(tmp_path / 'checkpoint.pth'),
        '--image_path', str(photo), '--output_dir', str(tmp_path / 'out'), '--image_size', '64',
        '--vis_attention', 'True', '--n_last_blocks', '1', '--query_point', '0.5,0.5', *TINY_OPTS]))
    assert 'Loaded the backbone' in capsys.readouterr().out
    folder = tmp_path / 'out' / 'photo'
    index = {entry['file']: entry['title'] for entry in json.loads((folder / 'index.json').read_text())}
    assert set(index) == {'image.png'} | {f'attention_stage0_block1_{view}{mask}.png' for mask in ('', '_mask60')
                                          for view in ('cls_token', 'whole_map', 'query_r2_c2')}
    assert '[CLS] token' in index['attention_stage0_block1_cls_token.png']
    with Image.open(folder / 'attention_stage0_block1_cls_token.png') as picture:
        assert picture.size == panel_grid_size(3 + 2, 160)  # input, mean of heads, 3 heads
