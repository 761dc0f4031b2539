"""What the backbones share: the relative-position index, the explicit-softmax attention maps, the
patch-average eval feature, meta-device builds and the configuration errors."""
import pytest
import torch
import torch.nn.functional as F

from helpers import make_config
from models import ModelError, build_model
from models.cvt_transformer import WindowAttention as CvtWindowAttention
from models.layers import attention_probs
from models.swin_transformer import WindowAttention as SwinWindowAttention
from models.vision_longformer import FullAttention


def brute_force_relative_position_index(height, width):
    """index[i, j] for the tokens i, j of a row-major height x width grid: their offset (dy, dx) as a row-major
    index into the (2 height - 1) x (2 width - 1) table."""
    coords = [(y, x) for y in range(height) for x in range(width)]
    return torch.tensor([[(yi - yj + height - 1) * (2 * width - 1) + (xi - xj + width - 1) for yj, xj in coords]
                         for yi, xi in coords])


@pytest.mark.parametrize('window', [1, 2, 3, 7, 12])
def test_window_relative_position_index_known_answer(window):
    expected = brute_force_relative_position_index(window, window)
    swin = SwinWindowAttention(8, window, 2).relative_position_index
    cvt = CvtWindowAttention(8, 2, True, 3, 1, window, rel_pos_embed=True).rel_pos_idx
    for index in (swin, cvt):
        assert index.dtype == torch.int64 and torch.equal(index, expected)


@pytest.mark.parametrize('grid', [(1, 3), (3, 1), (2, 5), (5, 2), (4, 7), (7, 7)])
def test_grid_relative_position_index_known_answer_non_square(grid):
    index = FullAttention(8, 2, num_global=1, rpe=True, grid=grid).relative_position_index
    assert index.dtype == torch.int64 and torch.equal(index, brute_force_relative_position_index(*grid))


@pytest.mark.parametrize('arch', ['swin_tiny', 'vil_2262'])
def test_relative_position_buffers_equal_the_originals(reference, arch):
    """The index buffers a fresh build registers are the original's, value for value (they are in the
    checkpoints)."""
    meta = reference(f'fidelity_{arch}.json')
    saved = reference(f'fidelity_{arch}.pt')['state_dict']
    model = build_model(make_config(meta['cfg'], meta['opts']), is_teacher=True)
    buffers = {key: t for key, t in model.state_dict().items() if key.endswith('relative_position_index')}
    assert buffers
    for key, index in buffers.items():
        assert index.dtype == saved[key].dtype and torch.equal(index, saved[key]), key


@pytest.mark.parametrize('with_bias', [True, False])
def test_attention_probs_is_the_softmax_that_sdpa_applies(with_bias):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 3, 5, 4), torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4)
    bias = None
    if with_bias:  # additive bias with masked keys (-inf); key 0 stays visible to every query
        masked = (torch.rand(1, 3, 5, 6) < 0.3) & (torch.arange(6) > 0)
        bias = torch.randn(1, 3, 5, 6).masked_fill(masked, float('-inf'))
    probs = attention_probs(q, k, bias, scale=0.3)
    scores = (q * 0.3) @ k.transpose(-2, -1)
    assert torch.equal(probs, (scores if bias is None else scores + bias).softmax(dim=-1))  # in place: same bits
    torch.testing.assert_close(probs @ v, F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=0.3))
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 3, 5))


SWIN_TINY = ('experiments/imagenet/swin/swin_tiny_patch4_window7_224.yaml',
             ['MODEL.NUM_CLASSES', '0', 'MODEL.SPEC.DIM_EMBED', '24', 'MODEL.SPEC.DEPTHS', '[2, 2, 2, 2]',
              'MODEL.SPEC.NUM_HEADS', '[1, 2, 4, 8]'])
CVT_TINY = ('experiments/cpu/cvt_tiny_cpu.yaml', [])
VIL_TINY = 'experiments/cpu/vil_tiny_cpu.yaml'
VIL_ARCH = ('l1,h1,d16,n1,s1,g1,p4,f4,a0_l2,h2,d32,n1,s1,g1,p2,f4,a0_'
            'l3,h4,d64,n1,s0,g1,p2,f4,a0_l4,h8,d128,n1,s0,g{},p2,f4,a0')  # last stage: {} global tokens
# family -> (yaml, opts, leading global tokens among forward_features' region tokens)
FAMILIES = {
    'swin': (*SWIN_TINY, 0),
    'cvt': (*CVT_TINY, 0),
    'vil_last_stage_g0': (VIL_TINY, ['MODEL.SPEC.MSVIT.ARCH', VIL_ARCH.format(0)], 0),
    'vil_last_stage_g1': (VIL_TINY, ['MODEL.SPEC.MSVIT.ARCH', VIL_ARCH.format(1)], 0),
    'vil_last_stage_g2': (VIL_TINY, ['MODEL.SPEC.MSVIT.ARCH', VIL_ARCH.format(2)], 1),  # region = tokens after the 1st
    'vil_avg_pool_g1': (VIL_TINY, ['MODEL.SPEC.MSVIT.ARCH', VIL_ARCH.format(1), 'MODEL.SPEC.AVG_POOL', 'True'], 1),
    'resnet': (None, ['MODEL.NAME', 'resnet18'], 0),
}


def build_family(family, is_teacher=True):
    yaml, opts, _ = FAMILIES[family]
    torch.manual_seed(0)
    return build_model(make_config(yaml, opts), is_teacher=is_teacher)


@pytest.mark.parametrize('family', FAMILIES)
def test_patch_avgpool_appends_the_mean_of_the_normed_last_stage_map_tokens(family):
    model = build_family(family).eval()
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    runs = []
    first_conv.register_forward_hook(lambda *args: runs.append(1))
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        plain = model.forward_return_n_last_blocks(images, n=2)
        runs.clear()
        with_mean = model.forward_return_n_last_blocks(images, n=2, return_patch_avgpool=True)
        assert len(runs) == 1  # one pass of the backbone
        pooled, region = model.forward_features(images)
    D = plain.shape[1]
    assert with_mean.shape == (2, D + model.num_features)
    assert torch.equal(with_mean[:, :D], plain)
    skip = FAMILIES[family][2]
    assert torch.equal(with_mean[:, D:], region[:, skip:].mean(dim=1))
    if family.endswith('g1') or family.endswith('g2'):  # pooled is the global token, the patch mean is not
        assert not torch.allclose(with_mean[:, D:], pooled)
    if family == 'resnet':  # no tokens besides the pooled map: the same pooled mean twice
        assert torch.equal(with_mean, torch.cat([pooled, pooled], dim=1))


BAD_CONFIGS = {  # (yaml, opts, a word of the message)
    'swin stage lists': (SWIN_TINY[0], SWIN_TINY[1] + ['MODEL.SPEC.NUM_HEADS', '[1, 2, 4]'], 'NUM_HEADS'),
    'cvt shift': (CVT_TINY[0], ['MODEL.SPEC.SHIFT', '[True, True, True, True]'], 'SHIFT'),
    'cvt stage lists': (CVT_TINY[0], ['MODEL.SPEC.DEPTH', '[1, 1, 1]'], 'NUM_STAGES'),
    'cvt init': (CVT_TINY[0], ['MODEL.SPEC.INIT', 'xavier'], 'INIT'),
    'vil sw_exact': (VIL_TINY, ['MODEL.SPEC.MSVIT.SW_EXACT', '1'], 'SW_EXACT'),
    'vil with_se': (VIL_TINY, ['MODEL.SPEC.MSVIT.WITH_SE', 'SE'], 'WITH_SE'),
    'vil attn_type': (VIL_TINY, ['MODEL.SPEC.MSVIT.ATTN_TYPE', 'performer'], 'ATTN_TYPE'),
    'vil arch field': (VIL_TINY, ['MODEL.SPEC.MSVIT.ARCH', 'l1,h1,x3'], 'bad field'),
    'vil arch stage label': (VIL_TINY, ['MODEL.SPEC.MSVIT.ARCH', 'l1,h1_l3,h1'], 'labelled'),
    'vil arch pooled keys': (VIL_TINY, ['MODEL.SPEC.MSVIT.ARCH', 'l1,h1,r2'], 'pooled keys'),
    'vil mode': (VIL_TINY, ['MODEL.SPEC.MSVIT.MODE', '-2'], 'MODE'),
    'vil only_global': (VIL_TINY, ['MODEL.SPEC.MSVIT.ONLY_GLOBAL', 'True', 'MODEL.SPEC.MSVIT.ARCH', 'l1,h1,g0'],
                        'ONLY_GLOBAL'),
    'unknown model': (None, ['MODEL.NAME', 'no_such_model'], 'no_such_model'),
}


@pytest.mark.parametrize('case', BAD_CONFIGS)
def test_bad_configs_raise_one_line_model_errors(case):
    yaml, opts, word = BAD_CONFIGS[case]
    with pytest.raises(ModelError, match=word) as error, torch.device('meta'):
        build_model(make_config(yaml, opts))
    assert isinstance(error.value, ValueError) and '\n' not in str(error.value)


META_BUILDS = {  # every family, with the options that add parameters or buffers
    'swin': SWIN_TINY,
    'swin_ape': (SWIN_TINY[0], SWIN_TINY[1] + ['MODEL.SPEC.USE_APE', 'True']),
    'cvt': CVT_TINY,
    'cvt_rpe_res_stem': (CVT_TINY[0], ['MODEL.SPEC.REL_POS_EMBED', 'True', 'MODEL.SPEC.RES_STEM', 'True']),
    'vil': (VIL_TINY, ['MODEL.SPEC.MSVIT.ARCH', VIL_ARCH.format(1)]),
    'vil_ape_unshared': (VIL_TINY, ['MODEL.SPEC.MSVIT.ARCH', VIL_ARCH.format(1).replace('a0', 'a1'),
                                    'MODEL.SPEC.MSVIT.SHARE_W', 'False']),
    'resnet': (None, ['MODEL.NAME', 'resnet18']),
}


@pytest.mark.parametrize('case', META_BUILDS)
def test_every_backbone_builds_on_the_meta_device(case):
    """No storage is allocated, and the checkpoint layout is that of a real build."""
    config = make_config(*META_BUILDS[case])
    with torch.device('meta'):
        model = build_model(config)
    state = model.state_dict()
    assert all(t.is_meta for t in state.values())
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    real = build_model(config).state_dict()
    assert [(k, t.shape, t.dtype) for k, t in state.items()] == [(k, t.shape, t.dtype) for k, t in real.items()]
