"""CvT-v4 backbone: checkpoint layout, numerical fidelity to the original, shapes, gradients."""
import pytest
import torch
from timm.layers import DropPath

from helpers import make_config
from models import ModelError, build_model
from models.cvt_transformer import WindowAttention

S1 = 'experiments/imagenet/cvt_v4/s1.yaml'
TINY = 'experiments/cpu/cvt_tiny_cpu.yaml'


def reduced_config(reference):
    """The reduced cvt_tiny the fidelity file was made with."""
    meta = reference('fidelity_cvt_tiny.json')
    return make_config(meta['cfg'], meta['opts']), meta


def token_grid(size):
    """Side of the last-stage map for a square input (7x7/4 embedding, then three 3x3/2)."""
    side = (size + 2 * 2 - 7) // 4 + 1
    for _ in range(3):
        side = (side + 2 - 3) // 2 + 1
    return side


def test_state_dict_matches_original_checkpoint_layout(reference):
    manifest = reference('state_dict_cvt_tiny.json')
    expected = {key.removeprefix('module.'): shape for key, shape in manifest['state_dict']
                if not key.startswith(('module.head.', 'module.head_dense.'))}
    with torch.device('meta'):
        model = build_model(make_config(S1))
    assert {key: list(t.shape) for key, t in model.state_dict().items()} == expected
    assert sum(p.numel() for p in model.parameters()) == manifest['backbone_params'] == 29303616
    assert model.state_dict()['stage0.1.layers.0.0.fn.qkv.bn.num_batches_tracked'].dtype == torch.int64
    assert model.num_features == 768


def test_rel_pos_embed_adds_a_table_and_index_per_block():
    with torch.device('meta'):
        model = build_model(make_config('experiments/imagenet/cvt_v4/s1_rpe.yaml'))
    state = model.state_dict()
    assert state['stage3.1.layers.1.0.fn.rel_pos_bias_table'].shape == (13 * 13, 12)
    assert state['stage0.1.layers.0.0.fn.rel_pos_idx'].shape == (49, 49)
    assert sum(key.endswith('rel_pos_bias_table') for key in state) == 12


def test_init_reproduces_the_original(reference):
    """Seed-0 init plus the file's documented perturbation gives exactly its saved weights."""
    config, _ = reduced_config(reference)
    saved = reference('fidelity_cvt_tiny.pt')['state_dict']
    torch.manual_seed(0)
    model = build_model(config, is_teacher=True)
    noise = torch.Generator().manual_seed(1234)
    for key, tensor in model.state_dict().items():
        if not tensor.is_floating_point():
            continue
        n = 0.02 * torch.randn(tensor.shape, generator=noise)
        if key.endswith('running_var'):
            expected = 1 + 10 * n.abs()
        elif key.endswith('running_mean'):
            expected = 10 * n
        else:
            expected = tensor + n
        torch.testing.assert_close(expected, saved[key], rtol=0, atol=1e-7, msg=key)


@pytest.mark.parametrize('size', [224, 96])
def test_fidelity_to_original_outputs(reference, size):
    config, meta = reduced_config(reference)
    data = reference('fidelity_cvt_tiny.pt')
    model = build_model(config, is_teacher=True)
    model.load_state_dict(data['state_dict'], strict=True)
    model.eval()
    x = data[f'x{size}']
    with torch.no_grad():
        pooled, dense = model.forward_features(x)
        depths = meta['depths_passed_to_forward_return_n_last_blocks']
        # the original ignored return_patch_avgpool: its nlast4 is the feature without the patch mean
        nlast4 = model.forward_return_n_last_blocks(x, n=4, depths=depths)
        with_patch_mean = model.forward_return_n_last_blocks(x, n=4, return_patch_avgpool=True, depths=depths)
        assert torch.equal(model(x), pooled)
    for name, out in (('pooled', pooled), ('dense', dense), ('nlast4', nlast4)):
        torch.testing.assert_close(out, data[f'out{size}_{name}'], rtol=1e-4, atol=1e-4, msg=name)
    expected = torch.cat([data[f'out{size}_nlast4'], data[f'out{size}_pooled']], dim=1)
    torch.testing.assert_close(with_patch_mean, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('rel_pos_embed', [False, True])
@pytest.mark.parametrize('size', [224, 96, 64, 32])
@torch.no_grad()
def test_output_shapes(size, rel_pos_embed):
    model = build_model(make_config(TINY, ['MODEL.SPEC.REL_POS_EMBED', str(rel_pos_embed)]))
    x = torch.randn(2, 3, size, size)
    pooled, dense = model.forward_features(x)
    assert pooled.shape == (2, 64)
    assert dense.shape == (2, token_grid(size) ** 2, 64)
    assert torch.isfinite(dense).all()
    assert model.forward_return_n_last_blocks(x, n=4, depths=[1, 1, 1, 1]).shape == (2, 16 + 32 + 48 + 64)
    assert model.forward_return_n_last_blocks(x, n=1).shape == (2, 64)
    with pytest.raises(ValueError):
        model.forward_return_n_last_blocks(x, n=4, depths=[2, 2, 6, 2])


def test_backward_reaches_every_parameter():
    model = build_model(make_config(TINY, ['MODEL.SPEC.REL_POS_EMBED', 'True']))
    model.train()
    pooled, dense = model.forward_features(torch.randn(2, 3, 64, 64))
    torch.manual_seed(0)
    ((pooled * torch.randn_like(pooled)).sum() + (dense * torch.randn_like(dense)).sum()).backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_teacher_has_no_drop_path_and_student_follows_the_decay_rule():
    config = make_config(S1)
    with torch.device('meta'):
        teacher = build_model(config, is_teacher=True)
        student = build_model(config)
    teacher_rates = [m.drop_prob for m in teacher.modules() if isinstance(m, DropPath)]
    student_rates = [m.drop_prob for m in student.modules() if isinstance(m, DropPath)]
    assert len(teacher_rates) == 12 and set(teacher_rates) == {0.0}
    assert student_rates == pytest.approx(torch.linspace(0, 0.1, 12).tolist())


def test_relative_position_bias_attention_matches_the_original_formula():
    """One full 7x7 window: softmax(q k^T / sqrt(dim) + table[rel_pos_idx]) v, as the original."""
    torch.manual_seed(0)
    dim, heads = 12, 3
    attention = WindowAttention(dim, heads, True, 3, 1, 7, rel_pos_embed=True).eval()
    x = torch.randn(2, dim, 7, 7)
    q, k, v = (t.reshape(2, heads, dim // heads, 49).transpose(2, 3) for t in attention.qkv(x).chunk(3, dim=1))
    bias = attention.rel_pos_bias_table[attention.rel_pos_idx.view(-1)].view(49, 49, heads).permute(2, 0, 1)
    weights = (torch.einsum('bhid,bhjd->bhij', q, k) * dim ** -0.5 + bias).softmax(-1)
    expected = attention.proj_out((weights @ v).transpose(2, 3).reshape(2, dim, 7, 7))
    torch.testing.assert_close(attention(x), expected, rtol=1e-5, atol=1e-6)


def test_smaller_windows_use_the_table_entries_of_their_relative_offsets():
    attention = WindowAttention(8, 2, True, 3, 1, 7, rel_pos_embed=True)
    rows, cols = torch.meshgrid(torch.arange(5), torch.arange(5), indexing='ij')
    dy = rows.flatten()[:, None] - rows.flatten()[None, :]
    dx = cols.flatten()[:, None] - cols.flatten()[None, :]
    assert torch.equal(attention.bias_index(5), (dy + 6) * 13 + (dx + 6))


def test_res_stem_replaces_the_stage0_embedding():
    model = build_model(make_config(TINY, ['MODEL.SPEC.RES_STEM', 'True']))
    assert model.state_dict()['stage0.0.stem.6.weight'].shape == (16, 16, 3, 3)
    assert not any(key.startswith('stage0.0.proj') for key in model.state_dict())
    assert model.forward_features(torch.randn(2, 3, 64, 64))[1].shape == (2, 4, 64)


def test_shift_is_rejected():
    with pytest.raises(ModelError, match='SHIFT'):
        build_model(make_config(TINY, ['MODEL.SPEC.SHIFT', '[True, True, True, True]']))
