"""What an ``--arch`` name builds: its backbone family (the yaml's ``MODEL.NAME``) and, for a name that gives a
size (``swin_small``), the ``MODEL.SPEC`` values of that size and the original's yaml for it. The ViTs
(``deit_small``) have no yaml in the original: their size and ``--patch_size`` alone build them.

    arch = ARCHS['swin_small']  # Arch(family='swin_transformer', cfg='experiments/.../swin_small_...w7.yaml',
                                #      size={'DIM_EMBED': 96, 'DEPTHS': [2, 2, 18, 2], 'NUM_HEADS': [3, 6, 12, 24]})
    sized_arch_of(spec, family) # the sized name whose values the merged MODEL.SPEC has, or None (a custom size)

torchvision ResNet names (``resnet50``) are not listed: for them ``MODEL.NAME`` is the name itself.
"""
from typing import NamedTuple


class Arch(NamedTuple):
    family: str           # MODEL.NAME of the yamls of this family
    cfg: str = None       # the yaml (relative to the repository) built when --cfg is not given; None with a
                          # size: no yaml, the size's values (and --patch_size) build it
    size: dict = None     # MODEL.SPEC values that make this size; None: a family name, any size


def _swin(embed_dim, depths, num_heads, name):
    return Arch('swin_transformer', f'experiments/imagenet/swin/swin_{name}_patch4_window7_224.yaml',
                {'DIM_EMBED': embed_dim, 'DEPTHS': depths, 'NUM_HEADS': num_heads})


VIT_FAMILY = 'vision_transformer'  # its sizes take --patch_size (MODEL.SPEC.PATCH_SIZE)


def _vit(embed_dim, depth, num_heads):
    return Arch(VIT_FAMILY, None, {'EMBED_DIM': embed_dim, 'DEPTH': depth, 'NUM_HEADS': num_heads})


def _vil(name):
    yaml = f'experiments/imagenet/vil/{name}.yaml'
    blocks = name.split('_')[1]  # vil_2262: 2, 2, 6, 2 blocks per stage (1281: 1, 2, 8, 1; 14121: 1, 4, 12, 1)
    return Arch('vision_longformer', yaml, {'MSVIT.BLOCKS': {'2262': [2, 2, 6, 2], '1281': [1, 2, 8, 1],
                                                            '14121': [1, 4, 12, 1]}[blocks]})


ARCHS = {
    'swin': Arch('swin_transformer'),
    'swin_tiny': _swin(96, [2, 2, 6, 2], [3, 6, 12, 24], 'tiny'),
    'swin_small': _swin(96, [2, 2, 18, 2], [3, 6, 12, 24], 'small'),
    'swin_base': _swin(128, [2, 2, 18, 2], [4, 8, 16, 32], 'base'),
    'swin_large': _swin(192, [2, 2, 18, 2], [6, 12, 24, 48], 'large'),
    'cvt_tiny': Arch('cvt_v4_transformer', 'experiments/imagenet/cvt_v4/s1.yaml',
                     {'DIM_EMBED': [64, 192, 384, 768], 'DEPTH': [2, 2, 6, 2]}),
    'cvt_small': Arch('cvt_v4_transformer'),  # the original names it but publishes no yaml for it
    'vil': Arch('vision_longformer'),
    'vil_2262': _vil('vil_2262'),
    'vil_1281': _vil('vil_1281'),
    'vil_14121': _vil('vil_14121'),
    'deit_tiny': _vit(192, 12, 3),
    'deit_small': _vit(384, 12, 6),
    'vit_base': _vit(768, 12, 12),
}


def spec_values(spec, keys):
    """{key: value} of ``spec`` (a MODEL.SPEC node) for the keys of a size; ``MSVIT.BLOCKS`` is the block count
    of each ViL stage, read from ``MSVIT.ARCH`` (its ``n`` fields)."""
    values = {}
    for key in keys:
        if key == 'MSVIT.BLOCKS':
            stages = spec.MSVIT.ARCH.split('_')
            values[key] = [int(next((f[1:] for f in s.split(',') if f.startswith('n')), 1)) for s in stages]
        else:
            values[key] = list(spec[key]) if isinstance(spec[key], (list, tuple)) else spec[key]
    return values


def sized_arch_of(spec, family):
    """The sized ``--arch`` name of ``family`` whose values ``spec`` has, or None (a size of one's own)."""
    for name, arch in ARCHS.items():
        if arch.family == family and arch.size and spec_values(spec, arch.size) == arch.size:
            return name
    return None
