"""YACS configuration: ``from config import config, update_config``.

``update_config(config, args)`` merges, in order, the ``BASE:`` yamls (recursively, relative to
the file that names them), ``args.cfg`` itself, then ``args.opts`` (trailing ``KEY VALUE``
pairs), and freezes the result. A bad key or value raises :class:`ConfigError` with a one-line
message naming the key and where it came from.
"""
import ast
import os
import re

import yaml
from yacs.config import CfgNode as CN

from .default import _C
from .models import SPEC_SCHEMAS, spec_schema

config = _C.clone()

__all__ = ['config', 'update_config', 'save_config', 'get_default_config', 'ConfigError', 'SPEC_SCHEMAS']


class ConfigError(ValueError):
    """A configuration file or command-line override that cannot be applied."""


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


def update_config(config, args):
    """Fill ``config`` from ``args.cfg`` (may be empty) and ``args.opts``, then freeze it."""
    cfg_file = getattr(args, 'cfg', None)
    sources = _read_yaml_chain(cfg_file) if cfg_file else []
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
