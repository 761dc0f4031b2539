"""Maps the yaml's ``MODEL.NAME`` (or a torchvision ``--arch``) to a backbone builder.

Every registered builder has the signature ``builder(config, is_teacher=False)`` (the teacher is built
without stochastic depth) and returns a backbone that honours the shared forward contract, whether or not
the training uses the region-level head:

- ``forward_features(x) -> (pooled [B, C], region tokens [B, N, C])``
- ``forward_return_n_last_blocks(x, n=1, return_patch_avgpool=False, depths=()) -> [B, D]``: the pooled
  outputs of the last ``n`` blocks (a ResNet: its pooled map, whatever ``n``); ``return_patch_avgpool``
  appends the mean of the normed last-stage map tokens, giving ``[B, D + C]``
- ``num_features`` (C above)
- optionally ``set_epoch(epoch, epochs)``, called by the trainer before each epoch (ViL's mode switch)
- ``flat_state_dict = True`` when the original checkpoint keeps the backbone's keys at the top level
"""

_BUILDERS = {}

# --arch names of the yaml-configured families (the original's choices) -> MODEL.NAME of their yamls.
ARCH_FAMILIES = {
    **dict.fromkeys(['swin', 'swin_tiny', 'swin_small', 'swin_base', 'swin_large'], 'swin_transformer'),
    **dict.fromkeys(['cvt_tiny', 'cvt_small'], 'cvt_v4_transformer'),
    **dict.fromkeys(['vil', 'vil_1281', 'vil_2262', 'vil_14121'], 'vision_longformer'),
}


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


def model_name_for_arch(arch, model_name=''):
    """The ``MODEL.NAME`` to build for ``--arch`` given the yaml's ``MODEL.NAME`` (may be empty).

    Raises :class:`ModelError` when the arch is unknown or belongs to another family.
    """
    family = ARCH_FAMILIES.get(arch) or (arch if arch in _BUILDERS else None)
    if arch and family is None:
        known = sorted(ARCH_FAMILIES) + [name for name in registered_models() if name not in ARCH_FAMILIES.values()]
        raise ModelError(f"unknown --arch {arch!r}; known: {', '.join(known)}")
    if not model_name:
        if family is None:
            raise ModelError("no architecture given: pass --arch or a --cfg yaml with MODEL.NAME")
        return family
    if family is not None and family != model_name:
        raise ModelError(f"--arch {arch} is a {family} model but the yaml's MODEL.NAME is {model_name}")
    if model_name not in _BUILDERS:
        raise ModelError(f"unknown MODEL.NAME {model_name!r}; known: {', '.join(registered_models())}")
    return model_name


def build_model(config, is_teacher=False):
    """Build the backbone named by ``config.MODEL.NAME`` (the teacher gets drop-path 0)."""
    name = config.MODEL.NAME
    if name not in _BUILDERS:
        raise ModelError(f"unknown MODEL.NAME {name!r}; known: {', '.join(registered_models())}")
    return _BUILDERS[name](config, is_teacher=is_teacher)
