"""YACS configuration of the backbone: what ``--arch``, ``--cfg`` and trailing ``KEY VALUE`` pairs build.

    config = load_config(args)   # args.arch, args.cfg, args.opts -> a frozen, checked config
    save_config(config, path)

``load_config`` picks the original's yaml for a sized ``--arch`` given without ``--cfg`` (``swin_small``), then
``update_config`` merges, in order, the ``BASE:`` yamls (recursively, relative to the file that names them), the
yaml itself, then ``args.opts``. The result is checked against ``--arch`` (family and size) and built once on
the meta device, so that a bad key, value or architecture is a :class:`ConfigError` with a one-line message
before any data is read. Only ``MODEL.*`` and ``TRAIN.IMAGE_SIZE`` are read from a yaml; the original's yamls
also carry supervised-training keys (``TRAIN.LR``, ``AUG.*``, ...), listed once in a note.
"""
import ast
import os
import re
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml
from yacs.config import CfgNode as CN

import utils
from models import ModelError, build_model, registered_models
from .archs import ARCHS, VIT_FAMILY, Arch, sized_arch_of
from .default import _C
from .specs import SPEC_SCHEMAS, spec_schema

REPO_ROOT = Path(__file__).resolve().parents[1]
DEMO_CFG = str(REPO_ROOT / 'experiments' / 'cpu' / 'swin_demo.yaml')  # the demo model, from any directory
READ_KEYS = ('MODEL.', 'TRAIN.IMAGE_SIZE', 'BASE', 'NAME')  # what this project reads from a yaml
COMMAND_LINE_FLAGS = {  # yaml keys of the original's supervised training -> the flag that decides here
    'TRAIN.LR': '--lr', 'TRAIN.BATCH_SIZE_PER_GPU': '--batch_size_per_gpu', 'TRAIN.END_EPOCH': '--epochs',
    'TRAIN.WD': '--weight_decay', 'TRAIN.OPTIMIZER': '--optimizer', 'TRAIN.CLIP_GRAD_NORM': '--clip_grad',
    'WORKERS': '--num_workers', 'PRINT_FREQ': '--print_freq', 'AMP.ENABLED': '--use_fp16',
}

__all__ = ['config', 'load_config', 'update_config', 'save_config', 'get_default_config', 'ConfigError',
           'SPEC_SCHEMAS', 'DEMO_CFG', 'REPO_ROOT', 'ARCHS']

config = _C.clone()


class ConfigError(utils.UserError, ValueError):
    """A configuration file, command-line override or architecture that cannot be applied."""


def get_default_config():
    """A fresh, unfrozen copy of the defaults."""
    return _C.clone()


def _decode(value):
    """Strings are Python literals when they parse as one (as in yacs): '5e-4' -> 0.0005, 'None' -> None."""
    if isinstance(value, dict):
        return value
    if isinstance(value, str):
        try:
            return ast.literal_eval(value)
        except (ValueError, SyntaxError):
            return value
    return value


def _coerce(value, default, full_key, source):
    if default is None or value is None or type(value) is type(default):
        return value
    if isinstance(default, float) and type(value) is int:
        return float(value)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    raise ConfigError(f"{source}: config key {full_key} expects {type(default).__name__} "
                      f"(default {default!r}), got {type(value).__name__} {value!r}")


def _merge(node, updates, source, prefix=''):
    if not isinstance(updates, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the file'} must be a mapping, got {updates!r}")
    for key, raw in updates.items():
        full_key = prefix + str(key)
        value = _decode(raw)
        if key not in node:
            if not node.is_new_allowed():
                raise ConfigError(f"{source}: unknown config key {full_key}")
            node[key] = CN(value, new_allowed=True) if isinstance(value, dict) else value
        elif isinstance(node[key], CN):
            _merge(node[key], value, source, full_key + '.')
        else:
            node[key] = _coerce(value, node[key], full_key, source)


def _read_yaml_chain(cfg_file):
    """[(path, dict)] for ``cfg_file`` preceded by its BASE files, recursively, in merge order."""
    if not os.path.isfile(cfg_file):
        raise ConfigError(f"config file not found: {cfg_file}")
    try:
        with open(cfg_file) as f:
            content = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{cfg_file}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{cfg_file}: expected a mapping of config keys at the top level")
    chain = []
    for base in content.get('BASE', ['']) or []:
        if base:
            chain += _read_yaml_chain(os.path.join(os.path.dirname(cfg_file), base))
    return chain + [(cfg_file, content)]


_KEY = re.compile(r'[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*')


def _opts_to_dict(opts):
    if len(opts) % 2:
        raise ConfigError(f"command line: config overrides must be KEY VALUE pairs, got an odd list {opts}")
    nested = {}
    for key, value in zip(opts[0::2], opts[1::2]):
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise ConfigError(f"command line: {key!r} is not a config key (expected e.g. MODEL.NUM_CLASSES)")
        *parents, leaf = key.split('.')
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"command line: {key} overrides a value set earlier on the command line")
        node[leaf] = value
    return nested


def _model_name(sources, default):
    name = default
    for _, content in sources:
        model = content.get('MODEL')
        if isinstance(model, dict) and 'NAME' in model:
            name = str(_decode(model['NAME']))
    return name


def update_config(config, args, sources=None):
    """Fill ``config`` from ``args.cfg`` (may be empty) and ``args.opts``, then freeze it; ``sources``: the yaml
    chain of ``args.cfg`` when already read."""
    cfg_file = getattr(args, 'cfg', None)
    sources = list(sources) if sources is not None else (_read_yaml_chain(cfg_file) if cfg_file else [])
    opts = [o for o in (getattr(args, 'opts', None) or []) if o != '--']
    sources.append(('command line', _opts_to_dict(opts)))

    config.defrost()
    config.MODEL.SPEC = spec_schema(_model_name(sources, config.MODEL.NAME))
    for source, content in sources:
        _merge(config, content, source)
    if cfg_file:
        config.NAME = os.path.splitext(os.path.basename(cfg_file))[0] + config.NAME
    config.freeze()
    return config


def save_config(cfg, path):
    """Write the merged config as yaml (atomically), so a run can be reproduced from its output dir."""
    tmp = f"{path}.tmp"
    with open(tmp, 'w') as f:
        f.write(cfg.dump())
    os.replace(tmp, path)


def _flat_keys(content, prefix=''):
    for key, value in content.items():
        if isinstance(value, dict):
            yield from _flat_keys(value, f'{prefix}{key}.')
        else:
            yield f'{prefix}{key}'


def unread_keys_note(cfg_file, sources):
    """One line naming the keys the yaml chain sets that nothing here reads (the original's supervised-training
    keys), with the flags that decide instead; None when there are none."""
    unread = {key for _, content in sources for key in _flat_keys(content) if not key.startswith(READ_KEYS)}
    if not unread:
        return None
    decided = [f"{key} ({flag})" for key, flag in COMMAND_LINE_FLAGS.items() if key in unread]
    return (f"note: {os.path.basename(cfg_file)} sets {len(unread)} keys of the original's supervised training, "
            f"unread here (a yaml gives MODEL.* and TRAIN.IMAGE_SIZE)"
            + (f"; the command line decides {', '.join(decided)}" if decided else ''))


def _arch_error(arch):
    sized = [name for name, a in ARCHS.items() if a.size]
    families = [name for name, a in ARCHS.items() if not a.size]
    resnets = [name for name in registered_models() if name.startswith(('resnet', 'resnext', 'wide_resnet'))]
    return ConfigError(f"unknown --arch {arch!r}; known: {', '.join(sized)}; with --cfg: {', '.join(families)}; "
                       f"torchvision: {', '.join(resnets)}")


def load_config(args):
    """The checked, frozen config of ``args.arch`` / ``args.cfg`` / ``args.opts``.

    A sized ``--arch`` without ``--cfg`` builds the original's yaml for that size (printed); a family name
    (``swin``) needs ``--cfg``. The merged ``MODEL.NAME`` must be the family of ``--arch``, and its
    ``MODEL.SPEC`` may not be another named size of it (``--arch swin_small`` with a Swin-T yaml); a size of
    its own (the CPU demo's small Swin, smaller test models) is accepted. A ViT (``deit_small``) has no yaml, as
    in the original: its size, ``args.patch_size`` (default 16) and ``MODEL.NUM_CLASSES 0`` build it, and trailing
    opts may change them (``MODEL.SPEC.EMBED_DIM 48``)."""
    arch_name = getattr(args, 'arch', None)
    arch = ARCHS.get(arch_name) if arch_name else None
    is_vit = arch is not None and arch.family == VIT_FAMILY
    opts = list(getattr(args, 'opts', None) or [])
    cfg_file = getattr(args, 'cfg', None)
    if arch_name and arch is None:
        if arch_name not in registered_models() or arch_name in {a.family for a in ARCHS.values()}:
            raise _arch_error(arch_name)
        arch = Arch(arch_name)  # a torchvision ResNet: MODEL.NAME is its name; no spec, no yaml needed
        if cfg_file is None:
            opts = ['MODEL.NAME', arch_name] + opts
    elif arch is not None and cfg_file is None:
        if arch.size is None:
            raise ConfigError(f"--arch {arch_name} names a family, not a size: add --cfg with its yaml, or use "
                              + ', '.join(n for n, a in ARCHS.items() if a.family == arch.family and a.size))
        if arch.cfg is None:  # a ViT: no yaml, as the original
            opts = ['MODEL.NAME', arch.family, 'MODEL.NUM_CLASSES', '0'] + _spec_opts(arch.size) + opts
        else:
            cfg_file = str(REPO_ROOT / arch.cfg)
            print(f"--arch {arch_name}: building {arch.cfg}")
    elif arch_name is None and cfg_file is None:
        raise ConfigError("no architecture given: pass --arch (e.g. swin_tiny) or --cfg with a yaml")
    if is_vit:  # --patch_size, unless a trailing opt sets it
        opts = _spec_opts({'PATCH_SIZE': getattr(args, 'patch_size', None) or 16}) + opts
    sources = _read_yaml_chain(cfg_file) if cfg_file else []
    merged = update_config(get_default_config(), SimpleNamespace(cfg=cfg_file, opts=opts), sources)
    if is_vit:
        spec = merged.MODEL.SPEC
        print(f"--arch {arch_name}: a ViT of EMBED_DIM {spec.EMBED_DIM}, DEPTH {spec.DEPTH}, NUM_HEADS "
              f"{spec.NUM_HEADS}, PATCH_SIZE {spec.PATCH_SIZE}")
    if arch is not None:
        check_arch(merged, arch_name, arch, cfg_file)
    try:
        with torch.device('meta'):  # every check of the builders, without allocating weights
            build_model(merged)
    except ModelError as e:
        raise ConfigError(f"{os.path.basename(cfg_file) if cfg_file else 'command line'}: {e}") from None
    note = unread_keys_note(cfg_file, sources) if cfg_file else None
    if note:
        print(note)
    return merged


def _spec_opts(values):
    """Trailing-opt pairs ``MODEL.SPEC.KEY value`` of ``values``."""
    return [item for key, value in values.items() for item in (f'MODEL.SPEC.{key}', str(value))]


def check_arch(merged, arch_name, arch, cfg_file):
    source = os.path.basename(cfg_file) if cfg_file else 'the command line'
    if merged.MODEL.NAME != arch.family:
        raise ConfigError(f"--arch {arch_name} is a {arch.family} model but {source} has MODEL.NAME "
                          f"{merged.MODEL.NAME or '(none)'}")
    if arch.size:
        built = sized_arch_of(merged.MODEL.SPEC, arch.family)
        if built is not None and built != arch_name:
            raise ConfigError(f"--arch {arch_name} but {source} builds a {built} "
                              f"({', '.join(f'{k} {v}' for k, v in ARCHS[built].size.items())}): "
                              + (f"pass the yaml of {arch_name} or " if arch.cfg else "pass ") + f"--arch {built}")
