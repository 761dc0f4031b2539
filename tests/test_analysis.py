"""run_analysis.py and analysis/: attention maps of every backbone against their forward passes, masks,
entropies, token correspondences on synthetic images, the pictures and files each mode writes."""
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms.functional as TF
from PIL import Image

import run_analysis
from analysis.run import analyze
import utils
from analysis import attention_figure
from analysis.attention import (block_attentions, entropy, entropy_order, mass_masks, window_attention_to_dense)
from analysis.correspondence import (FlipPair, ViewPair, match_tokens, measure_correspondence, mirrored_index,
                                     pair_scores, region_features, top_pairs)
from analysis.drawing import correspondence_figure_size, panel_grid_size
from helpers import make_config
from datasets import build_dataset
from models import build_model
from models.swin_transformer import window_partition
from models.cvt_transformer import windows_to_map
from models.vision_longformer import FullAttention, LongformerAttention

TINY_YAMLS = {'swin_tiny': 'experiments/cpu/swin_demo.yaml', 'cvt_tiny': 'experiments/cpu/cvt_tiny_cpu.yaml',
              'vil_2262': 'experiments/cpu/vil_tiny_cpu.yaml'}


def tiny(arch):
    torch.manual_seed(0)
    return build_model(make_config(TINY_YAMLS[arch]), is_teacher=True).eval()


def sharpen(model):
    """Scale the attention logits up (query/key weights x4) so that maps are far from uniform."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(('qkv.weight', 'query.weight', 'kv.weight', 'qkv.dw.weight', 'qkv.pw.weight')):
                p.mul_(4)
    return model


def asymmetric_image(size=64, seed=0):
    """An RGB image whose colour encodes the position (red grows to the right, green downwards) plus noise:
    left-right asymmetric, every patch distinct."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing='ij')
    rgb = torch.stack([xs, ys, 0.5 + 0.3 * torch.sin(6 * xs + 2 * ys)]) * 0.8 + 0.1
    rgb = (rgb + 0.05 * torch.rand(3, size, size, generator=g)).clamp(0, 1)
    return Image.fromarray((rgb.permute(1, 2, 0).numpy() * 255).astype(np.uint8))


def png_size(path):
    with Image.open(path) as image:
        return image.size


# ---------------------------------------------------------------- attention maps of the backbones
def test_swin_dense_attention_places_each_window_probability_at_its_map_tokens():
    model = sharpen(tiny('swin_tiny'))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        maps = model.forward_attention_maps(images, n_last=sum(model.depths))
    shifted = maps[1]  # stage 0, block 1: 16x16 map, 4x4 windows shifted by 2
    assert (shifted.hw, shifted.window_size, shifted.shift_size) == ((16, 16), 4, 2)
    for image_index in (0, 1):
        dense = window_attention_to_dense(shifted, image_index)  # heads x 256 x 256
        # independent layout: roll the token-index map as the block rolls its features, cut it into windows
        index_map = torch.roll(torch.arange(256).view(1, 16, 16, 1), shifts=(-2, -2), dims=(1, 2))
        window_tokens = window_partition(index_map, 4)[..., 0]  # 16 windows x 16 map indices
        probs = shifted.probs.view(2, 16, *shifted.probs.shape[1:])[image_index]
        expected = torch.zeros_like(dense)
        for w, tokens in enumerate(window_tokens):
            expected[:, tokens[:, None], tokens[None, :]] = probs[w]
        torch.testing.assert_close(dense, expected, rtol=0, atol=0)
        torch.testing.assert_close(dense.sum(-1), torch.ones(dense.shape[:2]))


def test_cvt_attention_maps_reproduce_the_attention_output():
    model = sharpen(tiny('cvt_tiny'))
    x = torch.randn(2, 16, 24, 24)  # stage-0 width; 24x24 is padded to 28x28 for 7x7 windows
    attention = model.stage0[1].layers[0][0].fn
    with torch.no_grad():
        maps = attention.attention_maps(x)
        _, _, v, _, _ = attention.windowed_qkv(x)
        out = windows_to_map(maps.probs @ v, 2, 28, 28)
        torch.testing.assert_close(attention.proj_out(out[:, :, :24, :24]), attention(x), rtol=1e-5, atol=1e-5)
    assert (maps.window_size, maps.shift_size, maps.hw, maps.padded_hw) == (7, 0, (24, 24), (28, 28))
    dense = window_attention_to_dense(maps, 1)
    assert dense.shape == (1, 576, 576)
    assert (dense.sum(-1) <= 1 + 1e-6).all()
    row = dense[0, 0].view(24, 24)  # token (0, 0) attends its 7x7 window only
    assert (row[:7, :7] > 0).all() and (row[7:] == 0).all() and (row[:, 7:] == 0).all()


def vil_attention_output(attn, maps, x):
    """The attention output recomputed from the dense probabilities: proj(probs @ v) (global rows: proj_global)."""
    B, N, C = x.shape
    H, G = attn.num_heads, attn.num_global
    if isinstance(attn, FullAttention):
        v = attn.qkv(x).view(B, N, 3, H, C // H)[:, :, 2].transpose(1, 2)
        return attn.proj((maps.probs @ v).transpose(1, 2).reshape(B, N, C))
    v = attn.kv(x).chunk(2, dim=-1)[1].view(B, N, H, C // H).transpose(1, 2)
    out = (maps.probs @ v).transpose(1, 2).reshape(B, N, C)
    if G:
        v_global = attn.kv_global(x).chunk(2, dim=-1)[1].view(B, N, H, C // H).transpose(1, 2)
        out_global = (maps.probs[:, :, :G] @ v_global).transpose(1, 2).reshape(B, G, C)
        return torch.cat([attn.proj_global(out_global), attn.proj(out[:, G:])], dim=1)
    return attn.proj(out)


@pytest.mark.parametrize('num_global, share, only_global, mode', [
    (2, True, False, 0), (2, False, False, 0), (0, True, False, 0), (1, True, False, -1), (2, True, True, 0)])
def test_vil_longformer_dense_attention_reproduces_forward(num_global, share, only_global, mode):
    torch.manual_seed(0)
    attn = LongformerAttention(dim=8, num_heads=2, window=3, num_global=num_global, share_weights=share, rpe=True,
                               mode=mode, only_global=only_global).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.5 * torch.randn_like(p))
        x = torch.randn(2, num_global + 8 * 7, 8)  # 8x7 map: 3x3 chunks of 3x3, the last ones padded
        maps = attn.attention_maps(x, (8, 7))
        torch.testing.assert_close(vil_attention_output(attn, maps, x), attn(x, (8, 7)), rtol=1e-5, atol=1e-5)
    assert maps.probs.shape == (2, 2, num_global + 56, num_global + 56)
    torch.testing.assert_close(maps.probs.sum(-1), torch.ones(2, 2, num_global + 56))
    if not only_global:
        # local token (0, 0) attends the global tokens and chunks (0..1, 0..1) only: 6x6 tokens at most
        row = maps.probs[0, 0, num_global]
        assert ((row[num_global:].view(8, 7) > 0).nonzero().max(dim=0).values <= torch.tensor([5, 5])).all()
        if mode == -1:  # own chunk only
            assert (row[num_global:].view(8, 7)[3:] == 0).all() and (row[num_global:].view(8, 7)[:, 3:] == 0).all()


def test_vil_full_attention_maps_reproduce_forward():
    torch.manual_seed(0)
    attn = FullAttention(dim=8, num_heads=2, num_global=1, rpe=True, grid=(4, 4)).eval()
    x = torch.randn(2, 1 + 16, 8)
    with torch.no_grad():
        maps = attn.attention_maps(x, (4, 4))
        torch.testing.assert_close(vil_attention_output(attn, maps, x), attn(x, (4, 4)), rtol=1e-5, atol=1e-5)
    assert maps.num_global == 1 and maps.hw == (4, 4)


@pytest.mark.parametrize('arch', ['cvt_tiny', 'vil_2262'])
def test_forward_attention_maps_of_the_last_blocks_leave_no_hooks(arch):
    model = tiny(arch)
    with torch.no_grad():
        maps = model.forward_attention_maps(torch.randn(1, 3, 64, 64), n_last=3)
        blocks = block_attentions(model, torch.randn(1, 3, 64, 64), n_last=3)
    assert len(maps) == 3 and not any(m._forward_pre_hooks for m in model.modules())
    assert [(b.stage, b.block, b.grid) for b in blocks] == [(1, 0, (8, 8)), (2, 0, (4, 4)), (3, 0, (2, 2))]
    assert blocks[-1].covers_map  # the last stage's 2x2 map lies in one window / full attention
    for block in blocks:
        assert block.probs.shape[1:] == (block.num_global + block.grid[0] * block.grid[1],) * 2


# ---------------------------------------------------------------- masks and entropies
def test_mass_masks_keep_the_fewest_tokens_holding_the_threshold():
    torch.manual_seed(0)
    maps = torch.rand(5, 6, 7) ** 4
    for threshold in (0.1, 0.6, 0.95):
        masks = mass_masks(maps, threshold)
        for head in range(5):
            values, mask = maps[head].flatten(), masks[head].flatten()
            kept = values[mask]
            assert kept.sum() >= threshold * values.sum() - 1e-6
            assert kept.sum() - kept.min() < threshold * values.sum()  # one token fewer would not do
            assert kept.min() >= values[~mask].max() if (~mask).any() else True  # the largest values are kept


def test_entropy_orders_heads_from_focused_to_uniform():
    uniform = torch.full((4, 4), 1 / 16)
    peaked = torch.zeros(4, 4)
    peaked[1, 2] = 1
    half = torch.zeros(4, 4)
    half[:2] = 1 / 8
    maps = torch.stack([uniform, peaked, half])
    torch.testing.assert_close(entropy(maps), torch.tensor([4.0, 0.0, 3.0]))
    assert entropy_order(maps) == [1, 2, 0]


# ---------------------------------------------------------------- correspondences
def test_an_image_matches_itself_exactly():
    model = tiny('swin_tiny')
    images = torch.rand(2, 3, 128, 128) * 4 - 2  # noise: every token distinct
    with torch.no_grad():
        features = region_features(model, images).flatten(1, 2)  # 2 x 16 x C
    similarity, match = match_tokens(features, features)
    pairs = top_pairs(similarity, 10)
    accuracy, error, sim = pair_scores(match, similarity, pairs, torch.arange(16), (4, 4), 128)
    assert pairs.shape == (2, 10)
    assert accuracy.tolist() == [1.0, 1.0] and error.tolist() == [0.0, 0.0]
    torch.testing.assert_close(sim, torch.ones(2))


class PatchColourBackbone(nn.Module):
    """Region tokens = the mean colour of each 8x8 patch (and a constant): features that say where in the scene
    a patch is, for an image whose colours encode the position."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))

    def forward_features(self, images):
        patches = F.avg_pool2d(images, 8)  # B x 3 x h x w
        tokens = torch.cat([patches, torch.full_like(patches[:, :1], 3.0)], dim=1).flatten(2).transpose(1, 2)
        return tokens.mean(dim=1) * self.scale, tokens * self.scale


def synthetic_folder(root, count=3, size=64):
    for i in range(count):
        (root / 'class0').mkdir(parents=True, exist_ok=True)
        asymmetric_image(size, seed=i).save(root / 'class0' / f'image{i}.png')
    return str(root)


def test_a_flipped_view_is_matched_to_the_mirrored_positions(tmp_path):
    dataset = build_dataset(synthetic_folder(tmp_path), FlipPair(64, jitter=False))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)
    results = measure_correspondence(PatchColourBackbone(), loader, torch.device('cpu'), top_k=10)
    assert results['images'] == 3 and len(results['per_image']) == 3
    assert results['accuracy'] == 1.0 and results['position_error_px'] == 0.0
    # the same matches scored against unflipped positions are wrong: the score sees the flip
    view, flipped = dataset[0][0]
    backbone = PatchColourBackbone()
    f1, f2 = (region_features(backbone, v[None]).flatten(1, 2) for v in (view, flipped))
    similarity, match = match_tokens(f1, f2)
    pairs = top_pairs(similarity, 10)
    accuracy, error, _ = pair_scores(match, similarity, pairs, torch.arange(64), (8, 8), 64)
    assert accuracy.item() == 0 and error.item() >= 8
    assert mirrored_index((2, 3)).tolist() == [2, 1, 0, 5, 4, 3]


def test_true_tokens_follow_the_crop_and_the_flip():
    # a source image whose two channels hold each pixel's (y, x): view 2 tells where it comes from
    height, width, size, crop = 90, 120, 64, (20, 30, 50, 60)  # crop: top, left, height, width
    ys, xs = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing='ij')
    source = torch.stack([ys, xs]).float()
    centres = torch.stack(torch.meshgrid(torch.arange(8) * 8 + 4.0, torch.arange(8) * 8 + 4.0, indexing='ij'), -1)
    view1_source = centres.view(-1, 2) * torch.tensor([height / size, width / size])  # view-1 token centres
    for flipped in (False, True):
        view2 = TF.resized_crop(source, *crop, [size, size], interpolation=TF.InterpolationMode.BILINEAR)
        view2 = TF.hflip(view2) if flipped else view2
        pair = ViewPair(torch.zeros(3, size, size), view2, crop, (height, width), flipped)
        true_rc, inside = pair.true_tokens((8, 8))
        in_crop = ((view1_source[:, 0] >= 20) & (view1_source[:, 0] < 70) & (view1_source[:, 1] >= 30)
                   & (view1_source[:, 1] < 90))
        assert inside.tolist() == in_crop.tolist() and 0 < inside.sum() < 64
        shown = view2[:, true_rc[:, 0] * 8 + 4, true_rc[:, 1] * 8 + 4].T  # 64 x 2 source (y, x) at the true tokens
        token_extent = torch.tensor([50 / 8, 60 / 8])  # a view-2 token in source pixels
        assert ((shown - view1_source)[inside].abs() <= token_extent).all()


# ---------------------------------------------------------------- the command line
def analysis_args(tmp_path, arch, *flags):
    argv = ['--arch', arch, '--output_dir', str(tmp_path / 'out'), '--image_size', '64', '--seed', '0',
            '--num_workers', '0', *flags]
    if arch in TINY_YAMLS:
        argv += ['--cfg', TINY_YAMLS[arch]]
    return run_analysis.parse_args(argv + ['MODEL.NUM_CLASSES', '0'])


@pytest.fixture(scope='module')
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp('photo') / 'synthetic.png'
    asymmetric_image(96).resize((96, 72)).save(path)  # not square: the input is resized to 64x64
    return str(path)


@pytest.mark.parametrize('arch, heads', [('swin_tiny', 8), ('cvt_tiny', 4), ('vil_2262', 8)])
def test_attention_and_correspondence_pictures_are_written_and_indexed(tmp_path, photo, capsys, arch, heads):
    torch.save({'teacher': tiny(arch).state_dict()}, tmp_path / 'checkpoint.pth')
    args = analysis_args(tmp_path, arch, '--image_path', photo, '--vis_attention', 'True', '--vis_correspondence',
                         'True', '--n_last_blocks', '2', '--query_point', '0.5,0.5', '--top_k', '3',
                         '--pretrained_weights', str(tmp_path / 'checkpoint.pth'))
    analyze(args)
    assert 'Loaded the backbone' in capsys.readouterr().out
    folder = tmp_path / 'out' / 'synthetic'
    index = json.loads((folder / 'index.json').read_text())
    files = {entry['file'] for entry in index}
    assert files == {str(p.relative_to(folder)) for p in folder.rglob('*.png')}
    assert (folder / 'index.html').read_text().count('<img') == len(files)
    assert png_size(folder / 'image.png') == (64, 64)
    # the last stage (2x2 tokens at 64 px) lies in one window: a whole-map picture; a query picture per block
    last_stage = 'stage3_block1' if arch == 'swin_tiny' else 'stage3_block0'
    assert f'attention_{last_stage}_whole_map.png' in files
    assert f'attention_{last_stage}_query_r1_c1_mask60.png' in files
    assert png_size(folder / f'attention_{last_stage}_whole_map.png') == panel_grid_size(heads + 2, 160)
    assert ('attention_stage2_block0_global_token.png' in files) == (arch == 'vil_2262')
    assert png_size(folder / 'seed0' / 'view2.png') == (64, 64)
    assert png_size(folder / 'seed0' / 'correspondence0.png') == correspondence_figure_size(64)
    record = json.loads((folder / 'seed0' / 'correspondence.json').read_text())
    assert len(record['pairs']) == 3 and record['grid'] == [2, 2]


def test_resnet_attention_is_a_clear_message_and_a_feature_norm_map(tmp_path, photo, capsys):
    analyze(analysis_args(tmp_path, 'resnet18', '--image_path', photo, '--vis_attention', 'True'))
    assert 'has no attention maps' in capsys.readouterr().out
    folder = tmp_path / 'out' / 'synthetic'
    assert png_size(folder / 'feature_norm.png') == panel_grid_size(2, 160)
    assert [e['file'] for e in json.loads((folder / 'index.json').read_text())] == ['feature_norm.png', 'image.png']


@pytest.mark.parametrize('arch', ['swin_tiny', 'cvt_tiny', 'vil_2262'])
def test_measure_correspondence_writes_means_and_per_image_scores(tmp_path, capsys, arch):
    synthetic_folder(tmp_path / 'data' / 'val', count=2)  # the original's DATA/val layout
    args = analysis_args(tmp_path, arch, '--data_path', str(tmp_path / 'data'), '--measure_correspondence',
                         'True', '--batch_size_per_gpu', '2')
    analyze(args)
    results = json.loads((tmp_path / 'out' / 'data' / 'measure_correspondence.json').read_text())
    assert results['images'] == 2 and results['top_k'] == 10
    assert 0 <= results['accuracy'] <= 1 and results['position_error_px'] >= 0 and -1 <= results['similarity'] <= 1
    images = sorted(str(p) for p in (tmp_path / 'data' / 'val' / 'class0').iterdir())
    assert sorted(r['path'] for r in results['per_image']) == images
    assert math.isclose(results['accuracy'], sum(r['accuracy'] for r in results['per_image']) / 2)
    assert f"{results['accuracy']:.4f}" in capsys.readouterr().out


@pytest.mark.parametrize('flags, message', [
    ([], 'nothing to do'),
    (['--vis_attention', 'True'], '--image_path is required'),
    (['--vis_attention', 'True', '--image_path', '/no/such.png'], 'is not an image file'),
    (['--measure_correspondence', 'True'], 'needs --data_path'),
])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        utils.run_main(analyze, analysis_args(tmp_path, 'swin_tiny', *flags))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- the TensorBoard picture
@pytest.mark.parametrize('arch', ['swin_tiny', 'vil_2262'])
def test_attention_figure_is_an_rgb_array_and_keeps_the_training_mode(arch):
    model = tiny(arch).train()
    picture = attention_figure(model, torch.randn(3, 64, 64))
    width, height = panel_grid_size(8 + 2, 160)  # both have 8 heads in the last block
    assert picture.dtype == np.uint8 and picture.shape == (height, width, 3)
    assert picture.std() > 0 and model.training


def test_attention_figure_of_a_resnet_shows_feature_norms():
    model = build_model(make_config(None, ['MODEL.NAME', 'resnet18']))
    picture = attention_figure(model, torch.randn(1, 3, 64, 64))
    assert picture.shape == (panel_grid_size(2, 160)[1], panel_grid_size(2, 160)[0], 3)
