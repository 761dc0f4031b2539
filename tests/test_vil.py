"""Vision Longformer (MsViT) backbone: checkpoint layout, fidelity to the original, the sliding-chunk
attention against masked dense attention, attention modes, shapes, gradients."""
import json
import random

import pytest
import torch
import torch.nn as nn
from timm.layers import DropPath

from helpers import REFERENCE_DIR, make_config
from models import ModelError, build_model
from models.vision_longformer import ALL_NEIGHBOURS, LongformerAttention, MsViT, parse_arch

CPU_YAML = 'experiments/cpu/vil_tiny_cpu.yaml'
VIL_2262_YAML = 'experiments/imagenet/vil/vil_2262.yaml'
HEAD_PREFIXES = ('module.head.', 'module.head_dense.')
CPU_ARCH = ('l1,h1,d16,n1,s1,g1,p4,f4,a0_l2,h2,d32,n1,s1,g1,p2,f4,a0_'
            'l3,h4,d64,n1,s0,g1,p2,f4,a0_l4,h8,d128,n1,s0,g0,p2,f4,a0')  # as in CPU_YAML
APE_ARCH = CPU_ARCH.replace('a0', 'a1')
# The original's random draw (1..8) -> neighbour chunk offset (its SlidingChunk2D.mode_dict rolls by -offset).
DRAW_TO_OFFSET = {1: (-1, -1), 2: (-1, 0), 3: (-1, 1), 4: (0, -1), 5: (0, 1), 6: (1, -1), 7: (1, 0), 8: (1, 1)}


def tiny_vil(opts=(), is_teacher=True):
    torch.manual_seed(0)
    return build_model(make_config(CPU_YAML, list(opts)), is_teacher=is_teacher)


def longformer_modules(model):
    return [m for m in model.modules() if isinstance(m, LongformerAttention)]


def last_tokens(stage, feature_map):
    """Tokens after the last block of a stage, B x (1 + h*w) x C."""
    return stage(feature_map)[0][-1]


def to_map(tokens):
    """B x (1 + s*s) x C -> B x C x s x s without the global token (the next stage's input)."""
    side = int((tokens.shape[1] - 1) ** 0.5)
    return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], -1, side, side)


# ---------------------------------------------------------------- checkpoint layout


def test_state_dict_matches_original_checkpoint_layout(reference):
    manifest = reference('state_dict_vil_2262.json')
    expected = [(key[len('module.'):], shape) for key, shape in manifest['state_dict']
                if not key.startswith(HEAD_PREFIXES)]
    with torch.device('meta'):
        model = build_model(make_config(VIL_2262_YAML))

    state = model.state_dict()
    assert [(key, list(t.shape)) for key, t in state.items()] == expected
    assert sorted(key for key, t in state.items() if t.dtype == torch.int64) == sorted(manifest['buffer_keys'])
    assert sum(p.numel() for p in model.parameters()) == manifest['backbone_params']
    assert sum(t.numel() for t in state.values() if t.is_floating_point()) == \
        manifest['backbone_state_dict_param_numel_sum']
    assert model.num_features == manifest['structure']['head_in_dim']
    assert model.layer_cfgs == manifest['structure']['layer_cfgs']
    assert {m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)} == \
        set(manifest['structure']['layernorm_eps'])
    attention_kinds = [[name[:-len('.attn')], type(m).__name__] for name, m in model.named_modules()
                       if name.endswith('.attn')]
    original_names = {'Long2DSCSelfAttention': 'LongformerAttention', 'Attention': 'FullAttention'}
    assert attention_kinds == [[name, original_names[kind]] for name, kind, *_ in manifest['structure']['attn_blocks']]
    for key, twin in manifest['state_dict_aliases_same_storage']:  # SHARE_W: *_global are the same modules
        key, twin = key[len('module.'):], twin[len('module.'):]
        assert model.get_submodule(key.rsplit('.', 1)[0]) is model.get_submodule(twin.rsplit('.', 1)[0])


def test_shared_weights_alias_storage_and_unshared_do_not():
    state = tiny_vil().state_dict()
    assert state['layer1.1.attn.query_global.weight'].data_ptr() == state['layer1.1.attn.query.weight'].data_ptr()
    assert state['layer2.1.attn.kv_global.bias'].data_ptr() == state['layer2.1.attn.kv.bias'].data_ptr()
    unshared = tiny_vil(['MODEL.SPEC.MSVIT.SHARE_W', 'False'])
    assert list(unshared.state_dict()) == list(state)
    attn = unshared.layer1[1].attn
    assert attn.query_global is not attn.query and attn.proj_global is not attn.proj


@pytest.mark.parametrize('yaml, params_with_classifier', [
    ('experiments/imagenet/vil/vil_small/base.yaml', 24.6e6),  # ViL-Small (= vil_1281), absolute positions
    ('experiments/imagenet/vil/vil_1281.yaml', 24.6e6),
    ('experiments/imagenet/vil/vil_tiny/base.yaml', 6.7e6),    # ViL-Tiny
])
def test_published_vil_sizes(yaml, params_with_classifier):
    """The ViL paper's parameter counts (with a 1000-way linear classifier) of the yamls' default archs."""
    with torch.device('meta'):
        model = build_model(make_config(yaml))
    params = sum(p.numel() for p in model.parameters()) + (model.num_features + 1) * 1000
    assert round(params / 1e5) == round(params_with_classifier / 1e5)
    assert 'layer1.0.x_pos_embed' in model.state_dict()


@pytest.mark.parametrize('arch, depths, absolute_positions, mode', [
    ('vil_1281', [1, 2, 8, 1], True, 0), ('vil_2262', [2, 2, 6, 2], False, 1), ('vil_14121', [1, 4, 12, 1], False, 1)])
def test_arch_yamls(arch, depths, absolute_positions, mode):
    with torch.device('meta'):
        model = build_model(make_config(f'experiments/imagenet/vil/{arch}.yaml'))
    assert model.depths == depths and model.num_features == 768
    assert [cfg['a'] for cfg in model.layer_cfgs] == [int(absolute_positions)] * 4
    assert {m.mode for m in longformer_modules(model)} == {mode}


# ---------------------------------------------------------------- fidelity


@pytest.fixture(scope='module')
def fidelity_model():
    if not (REFERENCE_DIR / 'fidelity_vil_2262.pt').exists():
        pytest.skip(f'{REFERENCE_DIR}/fidelity_vil_2262.pt not found')
    meta = json.loads((REFERENCE_DIR / 'fidelity_vil_2262.json').read_text())
    data = torch.load(REFERENCE_DIR / 'fidelity_vil_2262.pt', map_location='cpu', weights_only=True)
    model = build_model(make_config(meta['cfg'], meta['opts']), is_teacher=True)
    model.load_state_dict(data['state_dict'], strict=True)
    return model.eval(), meta, data


@pytest.mark.parametrize('size', ['224', '96'])  # 96: padded chunks, resized full-attention bias
def test_reproduces_original_outputs(fidelity_model, size):
    model, meta, data = fidelity_model
    images = data[f'x{size}']
    with torch.no_grad():
        pooled, dense = model.forward_features(images)
        depths = meta['depths_passed_to_forward_return_n_last_blocks']
        # the original ignored return_patch_avgpool: its nlast4 is the feature without the patch mean
        nlast = model.forward_return_n_last_blocks(images, n=4, depths=depths)
        with_patch_mean = model.forward_return_n_last_blocks(images, n=4, return_patch_avgpool=True, depths=depths)
    for name, out in (('pooled', pooled), ('dense', dense), ('nlast4', nlast)):
        torch.testing.assert_close(out, data[f'out{size}_{name}'], rtol=1e-4, atol=1e-5)
    # the last stage has no global token: its pooled output is the mean of its normed tokens
    expected = torch.cat([data[f'out{size}_nlast4'], data[f'out{size}_pooled']], dim=1)
    torch.testing.assert_close(with_patch_mean, expected, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- sliding-chunk attention


def dense_reference(attn, x, hw, neighbours):
    """The same attention as plain dense softmax attention over all tokens with a band mask built from
    token coordinates: a local token sees the global tokens and the tokens whose chunk is one of
    ``neighbours`` of its own chunk; relative position bias from the coordinate differences."""
    B, N, C = x.shape
    G, H, W = attn.num_global, attn.num_heads, attn.window
    nx, ny = hw
    rows, cols = torch.meshgrid(torch.arange(nx), torch.arange(ny), indexing='ij')
    rows, cols = rows.flatten(), cols.flatten()
    chunk_dr = rows[None, :] // W - rows[:, None] // W  # key chunk - query chunk, L x L
    chunk_dc = cols[None, :] // W - cols[:, None] // W
    neighbour = 3 * (chunk_dr + 1) + (chunk_dc + 1)
    allowed = (chunk_dr.abs() <= 1) & (chunk_dc.abs() <= 1) & torch.isin(neighbour, torch.tensor(neighbours))
    local_bias = torch.zeros(H, N - G, N - G)
    g2l = torch.zeros(2, H, G)
    g2g = torch.zeros(H, G, G)
    if attn.rpe:
        index = (rows[:, None] - rows[None, :] + 2 * W - 1) * (4 * W - 1) + (cols[:, None] - cols[None, :] + 2 * W - 1)
        index = torch.where(allowed, index, 0)  # pairs further apart are masked below
        local_bias = attn.local_relative_position_bias_table[index].permute(2, 0, 1)
        g2l, g2g = attn.g2l_relative_position_bias, attn.g2g_relative_position_bias
    local_mask = torch.cat([g2l[1][:, None, :].expand(H, N - G, G),
                            local_bias.masked_fill(~allowed, float('-inf'))], dim=-1)  # H x L x N
    global_mask = torch.cat([g2g, g2l[0][:, :, None].expand(H, G, N - G)], dim=-1)  # H x G x N

    def attend(query, kv, mask):
        q = query.view(B, -1, H, C // H).transpose(1, 2)
        k, v = (t.reshape(B, N, H, C // H).transpose(1, 2) for t in kv.chunk(2, dim=-1))
        probs = ((q @ k.transpose(-2, -1)) * attn.scale + mask).softmax(dim=-1)
        return (probs @ v).transpose(1, 2).reshape(B, -1, C)

    local = attn.proj(attend(attn.query(x[:, G:]), attn.kv(x), local_mask))
    glob = attn.proj_global(attend(attn.query_global(x[:, :G]), attn.kv_global(x), global_mask))
    return torch.cat([glob, local], dim=1)


def make_attention(rpe=True, share=True, num_global=2):
    torch.manual_seed(0)
    attn = LongformerAttention(dim=8, num_heads=2, window=3, num_global=num_global, share_weights=share, rpe=rpe)
    with torch.no_grad():
        for p in attn.parameters():
            p.add_(0.3 * torch.randn_like(p))  # biases and position tables away from their init
    return attn


@pytest.mark.parametrize('rpe, share', [(True, True), (False, True), (True, False)])
@pytest.mark.parametrize('mode, neighbours', [(0, ALL_NEIGHBOURS), (-1, (4,))])
def test_sliding_chunk_equals_masked_dense_attention(rpe, share, mode, neighbours):
    attn = make_attention(rpe, share)
    attn.mode = mode
    hw = (8, 7)  # 3 x 3 chunks of 3 x 3 tokens, the last row/column of chunks zero-padded
    x = torch.randn(2, 2 + 8 * 7, 8, requires_grad=True)
    out = attn(x, hw)
    grads = torch.autograd.grad(out.square().sum(), [x, *attn.parameters()])
    expected = dense_reference(attn, x, hw, neighbours)
    expected_grads = torch.autograd.grad(expected.square().sum(), [x, *attn.parameters()])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for grad, expected_grad in zip(grads, expected_grads):  # (the key bias gradient is 0 up to rounding)
        torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-5 * expected_grads[0].abs().max().item())


@pytest.mark.parametrize('draw', sorted(DRAW_TO_OFFSET))
def test_random_neighbour_mode_attends_own_and_drawn_chunk(monkeypatch, draw):
    attn = make_attention().train()
    attn.mode = 1
    monkeypatch.setattr(random, 'randrange', lambda start, stop: draw)
    dr, dc = DRAW_TO_OFFSET[draw]
    x = torch.randn(2, 2 + 8 * 7, 8)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, (8, 7)), dense_reference(attn, x, (8, 7), (4, 3 * (dr + 1) + dc + 1)),
                                   rtol=1e-5, atol=1e-5)


def test_only_global_mode_attends_global_tokens_only():
    attn = LongformerAttention(dim=8, num_heads=2, window=3, num_global=2, share_weights=True, rpe=True,
                               only_global=True)
    x = torch.randn(1, 2 + 16, 8)
    out = attn(x, (4, 4))
    changed = x.clone()
    changed[:, 2:] += torch.randn(1, 16, 8)  # local keys changed; local queries unchanged for token 2
    changed[:, 2] = x[:, 2]
    assert torch.allclose(attn(changed, (4, 4))[:, 2], out[:, 2], atol=1e-6)


# ---------------------------------------------------------------- attention modes


def test_attention_modes_and_switch():
    model = tiny_vil()  # MODE 1, teacher (no drop path), DROP 0
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        full = model.eval()(images)
        model.train()
        random.seed(0)
        sampled = model(images)
        assert not torch.allclose(sampled, full, atol=1e-5)  # one random neighbour chunk per attention
        model.set_attention_mode(0)  # what the trainer does after VIL_MODE_SWITCH of the epochs
        torch.testing.assert_close(model(images), full)
        model.set_attention_mode(-1)
        own_chunk = model(images)
        assert not torch.allclose(own_chunk, full, atol=1e-5)
        torch.testing.assert_close(model.eval()(images), own_chunk)  # -1 holds in eval too
        model.set_attention_mode(1)
        torch.testing.assert_close(model(images), full)  # > 0: all chunks in eval
    assert all(m.mode == 1 for m in longformer_modules(model))
    with pytest.raises(ValueError):
        model.set_attention_mode(-2)


def test_random_mode_draws_once_per_attention_per_forward(monkeypatch):
    model = tiny_vil().train()
    draws = []
    monkeypatch.setattr(random, 'randrange', lambda start, stop: draws.append((start, stop)) or 5)
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    assert draws == [(1, 9)] * len(longformer_modules(model)) == [(1, 9)] * 2


# ---------------------------------------------------------------- shapes, gradients, drop path


@pytest.mark.parametrize('arch', ['relative', 'absolute'])
@pytest.mark.parametrize('size, side', [(224, 7), (96, 3), (64, 2), (32, 1)])
def test_output_shapes(arch, size, side):
    model = tiny_vil(['MODEL.SPEC.MSVIT.ARCH', {'relative': CPU_ARCH, 'absolute': APE_ARCH}[arch]]).eval()
    images = torch.randn(2, 3, size, size)
    with torch.no_grad():
        pooled, region = model.forward_features(images)
        assert pooled.shape == (2, model.num_features) == (2, 128)
        assert region.shape == (2, side * side, 128)
        assert model.forward_return_n_last_blocks(images, n=4, depths=[1, 1, 1, 1]).shape == (2, 16 + 32 + 64 + 128)


def test_forward_and_last_block_features():
    model = tiny_vil().eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled, region = model.forward_features(images)
        torch.testing.assert_close(model(images), pooled)
        torch.testing.assert_close(model.forward_return_n_last_blocks(images), pooled)  # last stage g0: mean
        layer3_cls = model.forward_return_n_last_blocks(images, n=2)[:, :64]
        tokens = last_tokens(model.layer3, to_map(last_tokens(model.layer2, to_map(last_tokens(model.layer1, images)))))
        torch.testing.assert_close(layer3_cls, tokens[:, 0])  # stage with a global token: that token
    with pytest.raises(ValueError):
        model.forward_return_n_last_blocks(images, n=4, depths=[2, 2, 6, 2])


def test_global_token_pooling():
    """Last stage with a global token: pooled = its normed first token, region = the tokens after it."""
    model = tiny_vil(['MODEL.SPEC.MSVIT.ARCH', 'l1,h1,d16,n1,p4,f4,a0_l2,h2,d32,n1,s0,g1,p2,a0']).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled, region = model.forward_features(images)
        tokens = model.norm(last_tokens(model.layer2, to_map(last_tokens(model.layer1, images))))
    assert region.shape == (2, 16, 32)
    torch.testing.assert_close(pooled, tokens[:, 0])
    torch.testing.assert_close(region, tokens[:, 1:])


def test_backward_reaches_every_parameter():
    """All but the global-to-global bias of each stage's last attention block: what that block computes for
    the global tokens is dropped at the end of the stage (in the original too)."""
    model = tiny_vil(['MODEL.SPEC.MSVIT.ARCH', CPU_ARCH.replace('n1', 'n2')], is_teacher=False).train()
    torch.manual_seed(1)
    loss = 0
    for size in (64, 32):
        pooled, region = model.forward_features(torch.randn(2, 3, size, size))
        loss = loss + (pooled * torch.randn_like(pooled)).sum() + (region * torch.randn_like(region)).sum()
    loss.backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == [f'layer{k}.3.attn.g2g_relative_position_bias' for k in (1, 2, 3)]
    assert model.layer1[1].attn.g2g_relative_position_bias.grad.abs().sum() > 0


def test_teacher_has_no_drop_path():
    opts = ['MODEL.SPEC.DROP_PATH', '0.3']
    student_rates = [m.drop_prob for m in tiny_vil(opts, is_teacher=False).modules() if isinstance(m, DropPath)]
    assert student_rates == pytest.approx([0.1, 0.1, 0.2, 0.2, 0.3, 0.3])  # linspace(0, .3, 4), attn + mlp
    assert not any(isinstance(m, DropPath) for m in tiny_vil(opts, is_teacher=True).modules())


# ---------------------------------------------------------------- configuration


def test_arch_parsing_and_unsupported_options():
    assert parse_arch('l1,h3,d96_l2')[1] == {'l': 2, 'h': 3, 'd': 192, 'n': 1, 's': 1, 'g': 1, 'p': 2, 'f': 7,
                                              'a': 1, 'r': 0}
    for arch in ('l2,h3', 'l1,x3', 'l1,r1'):
        with pytest.raises(ModelError):
            parse_arch(arch)
    for opts in (['MODEL.SPEC.MSVIT.SW_EXACT', '1'], ['MODEL.SPEC.MSVIT.ATTN_TYPE', 'linformer'],
                 ['MODEL.SPEC.MSVIT.WITH_SE', 'SE']):
        with pytest.raises(ModelError):
            tiny_vil(opts)


def test_full_attention_from_the_first_dense_stage_on():
    """As the original: once a stage is s0, later s1 stages use full attention too; ATTN_TYPE full: all."""
    model = MsViT('l1,h1,d8,n1,s0,p4,a0_l2,h1,d8,n1,s1,p2,a0', img_size=32)
    assert not longformer_modules(model)
    model = MsViT('l1,h1,d8,n1,s1,p4,a0_l2,h1,d8,n1,s1,p2,a0', img_size=32, attn_type='full')
    assert not longformer_modules(model)
