"""Maps the yaml's ``MODEL.NAME`` (a family, or a torchvision ResNet name) to a backbone builder; what an
``--arch`` name means is config/archs.py's.

Every registered builder has the signature ``builder(config, is_teacher=False)`` (the teacher is built
without stochastic depth) and returns a backbone that honours the shared forward contract, whether or not
the training uses the region-level head:

- ``forward_features(x) -> (pooled [B, C], region tokens [B, N, C])``
- ``forward_return_n_last_blocks(x, n=1, return_patch_avgpool=False, depths=()) -> [B, D]``: the pooled
  outputs of the last ``n`` blocks (a ResNet: its pooled map, whatever ``n``); ``return_patch_avgpool``
  appends the mean of the normed last-stage map tokens, giving ``[B, D + C]``
- ``num_features`` (C above)
- optionally ``set_epoch(epoch, epochs)``, called by the trainer before each epoch (ViL's mode switch)
- optionally ``forward_return_n_last_block_tokens(x, n=1) -> [[B, L_i, C_i], ...]`` (Swin), the token maps of
  the last ``n`` blocks, for the segmentation probe's ``--n_last_blocks``
- optionally ``forward_attention_maps(images, n_last)`` for the analysis, and ``has_class_token = True`` when
  the first global token of those maps is a ViT's [CLS] token
- ``flat_state_dict = True`` when the original checkpoint keeps the backbone's keys at the top level
"""

_BUILDERS = {}

class ModelError(ValueError):
    """A configuration the models cannot build: an architecture name that no builder is registered for or
    that contradicts the yaml, or a ``MODEL.SPEC`` a builder does not support. The message is one line."""


def register_model(*names):
    """Decorator: register ``builder`` under each of ``names`` (a ``MODEL.NAME`` or torchvision arch)."""
    def decorator(builder):
        for name in names:
            _BUILDERS[name] = builder
        return builder
    return decorator


def registered_models():
    return sorted(_BUILDERS)


def build_model(config, is_teacher=False):
    """Build the backbone named by ``config.MODEL.NAME`` (the teacher gets drop-path 0)."""
    name = config.MODEL.NAME
    if name not in _BUILDERS:
        raise ModelError(f"unknown MODEL.NAME {name!r}; known: {', '.join(registered_models())}")
    return _BUILDERS[name](config, is_teacher=is_teacher)
