"""``MODEL.SPEC`` schema of each architecture family, keyed by the yaml's ``MODEL.NAME``.

The schema is installed before any yaml is merged, so a misspelt spec key or a value of the wrong
type is reported instead of silently ignored (the original accepted any key here).
"""
from yacs.config import CfgNode as CN

SWIN = CN()
SWIN.PATCH_SIZE = 4
SWIN.IN_CHANS = 3
SWIN.DIM_EMBED = 96
SWIN.DEPTHS = [2, 2, 6, 2]
SWIN.NUM_HEADS = [3, 6, 12, 24]
SWIN.WINDOW_SIZE = 7
SWIN.MLP_RATIO = 4.0
SWIN.QKV_BIAS = True
SWIN.QK_SCALE = None
SWIN.DROP_RATE = 0.0
SWIN.ATTN_DROP_RATE = 0.0
SWIN.DROP_PATH_RATE = 0.1
SWIN.USE_APE = False
SWIN.PATCH_NORM = True

CVT = CN()
CVT.INIT = 'trunc_norm'
CVT.NUM_STAGES = 4
CVT.REL_POS_EMBED = False
CVT.RES_STEM = False  # stage 0 embeds with a 3-conv ResNet-like stem instead of a 7x7 conv
CVT.SHIFT = [False, False, False, False]
CVT.DROP_PATH_RATE = 0.1
CVT.PATCH_SIZE = [7, 3, 3, 3]
CVT.PATCH_STRIDE = [4, 2, 2, 2]
CVT.PATCH_PADDING = [2, 1, 1, 1]
CVT.WINDOW_SIZE = [7, 7, 7, 7]
CVT.DIM_EMBED = [64, 192, 384, 768]
CVT.NUM_HEADS = [1, 3, 6, 12]
CVT.DEPTH = [2, 2, 6, 2]
CVT.MLP_RATIO = [4.0, 4.0, 4.0, 4.0]
CVT.QKV_BIAS = [True, True, True, True]
CVT.KERNEL_QKV = [3, 3, 3, 3]
CVT.PADDING_QKV = [1, 1, 1, 1]

VIL = CN()
VIL.AVG_POOL = False
VIL.DROP = 0.0
VIL.DROP_PATH = 0.1
VIL.NORM_EMBED = True
VIL.MSVIT = CN()
VIL.MSVIT.ARCH = 'l1,h3,d96,n1,s1,g1,p4,f7_l2,h3,d192,n2,s1,g1,p2,f7_l3,h6,d384,n8,s0,g1,p2,f7_l4,h12,d768,n1,s0,g0,p2,f7'
VIL.MSVIT.LN_EPS = 1e-6
VIL.MSVIT.SHARE_W = True
VIL.MSVIT.ATTN_TYPE = 'longformerhand'
VIL.MSVIT.SHARE_KV = True
VIL.MSVIT.ONLY_GLOBAL = False
VIL.MSVIT.SW_EXACT = 0
VIL.MSVIT.MODE = 0
VIL.MSVIT.VIL_MODE_SWITCH = 0.5
VIL.MSVIT.POOL_METHOD = None
VIL.MSVIT.WITH_SE = None
VIL.MSVIT.SE_MLP_RATIO = 0.0625
VIL.MSVIT.SE_MLP_BALANCE = False

VIT = CN()  # deit_small's values; --arch and --patch_size set the size (config/archs.py)
VIT.PATCH_SIZE = 16
VIT.IN_CHANS = 3
VIT.EMBED_DIM = 384
VIT.DEPTH = 12
VIT.NUM_HEADS = 6
VIT.MLP_RATIO = 4.0
VIT.QKV_BIAS = True
VIT.DROP_RATE = 0.0
VIT.ATTN_DROP_RATE = 0.0
VIT.DROP_PATH_RATE = 0.1  # the student's; the teacher has none

# torchvision ResNets take no spec: MODEL.NAME is the torchvision name (e.g. resnet50).
SPEC_SCHEMAS = {
    'swin_transformer': SWIN,
    'cvt_v4_transformer': CVT,
    'vision_longformer': VIL,
    'vision_transformer': VIT,
}


def spec_schema(model_name):
    """A fresh copy of the SPEC defaults for ``model_name`` (an empty node for spec-less models)."""
    schema = SPEC_SCHEMAS.get(model_name)
    return schema.clone() if schema is not None else CN()
