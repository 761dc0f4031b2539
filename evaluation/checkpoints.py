"""Checkpoint files in every layout this project reads: which layout a file has, the backbone weights it holds,
the arguments a training run stored in it, and the model config those give (evaluation without --arch / --cfg).
Files are opened by ``utils.load_checkpoint`` (weights_only, an exact allowlist); the training state itself is
written and restored by ``engine.trainer.Trainer``.

    content = utils.load_checkpoint(path)
    checkpoint_layout(content, path)          # "the original's training checkpoint", "bare state dict (timm keys)", ...
    load_backbone_weights(backbone, path, checkpoint_key)   # strict, any layout below; a one-line description
    stored_args(content)                      # the run's arguments as a dict (the original's Namespace too), or None
    config = model_config(args)               # --arch / --cfg / opts, else those --pretrained_weights was trained with
    export_backbone(backbone, config, 'timm', 'swin.safetensors')   # timm's / torchvision's keys, or this project's

Layouts (``module.`` prefixes of DDP are ignored throughout):

- training checkpoints, ``student`` / ``teacher`` / ``optimizer`` / ``epoch`` / ``args`` / ``dino_loss``
  (/ ``fp16_scaler``): this project's (``args`` a dict) and the original's (``args`` an ``argparse.Namespace``,
  numpy lr and weight decay in the optimizer); ``teacher`` / ``student`` are the multi-crop wrapper's state:
  backbone keys at the top level (transformers) or under ``backbone.`` (ResNets), heads ``head.*`` /
  ``head_dense.*``;
- DINO-style: the same entries, every backbone key under one ``backbone.`` (DINO's wrapper);
- a classifier's checkpoint: ``model`` or ``state_dict`` (the Swin authors' release, timm's train.py);
- a bare state dict of tensors (``.pth`` or ``.safetensors``): this project's backbone keys, or timm's /
  torchvision's (scripts/export_backbone.py's output, or a file of those libraries).
"""
import argparse
import contextlib
import io
import os
from pathlib import Path
from types import SimpleNamespace

import safetensors
import torch

import utils
from config import DEMO_CFG, REPO_ROOT, load_config, save_config
from models.interop import BUFFERS_REBUILT_BY_THE_MODEL, build_twin, from_library, to_library, twin_call

HEAD_PREFIXES = ('head.', 'head_dense.')  # DINO heads, and a classifier: never part of the backbone's weights
WRAPPER_PREFIX = 'backbone.'
ENTRIES = ('teacher', 'student', 'model', 'state_dict')  # looked up in this order when no key is named
EXPORT_METADATA_KEY = 'esvit_export'  # scripts/export_backbone.py's .safetensors metadata: the key format


def is_state_dict(obj):
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def safetensors_metadata(path):
    """The str -> str metadata of a .safetensors file ({} for other files)."""
    if not utils.is_safetensors_file(path):
        return {}
    with safetensors.safe_open(path, 'pt') as f:
        return f.metadata() or {}


# ---------------------------------------------------------------------------------------------------------
# layouts
# ---------------------------------------------------------------------------------------------------------
def stored_args(content):
    """The arguments of the run that wrote a training checkpoint, as a dict (the original pickled an
    ``argparse.Namespace``, this project stores plain data), or None."""
    args = content.get('args') if isinstance(content, dict) else None
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return args if isinstance(args, dict) else None


def _library_keys(state_dict):
    readings = [name for name, _ in from_library(utils.strip_prefix(state_dict))]
    return f"{readings[0]} keys" if readings else "this project's keys"


def checkpoint_layout(content, path=''):
    """A phrase naming the layout of a loaded checkpoint ``content`` (``path``: its file, for metadata)."""
    if is_state_dict(content):
        exported = safetensors_metadata(path).get(EXPORT_METADATA_KEY) if path else None
        if exported:
            return f"backbone exported by scripts/export_backbone.py ({exported} keys)"
        return f"bare state dict ({_library_keys(content)})"
    if not isinstance(content, dict):
        return f"not a checkpoint (a {type(content).__name__})"
    if 'teacher' in content or 'student' in content:
        weights = utils.strip_prefix(content.get('teacher') or content.get('student') or {})
        if any(k.startswith(WRAPPER_PREFIX) for k in weights) and \
                not any(k.startswith(WRAPPER_PREFIX * 2) for k in weights):
            return "DINO-style training checkpoint"
        if isinstance(content.get('args'), dict):
            return "this project's training checkpoint"
        return "the original's training checkpoint"
    if 'state_dict' in content and {'optimizer', 'best_acc'} <= set(content):
        return "eval_linear.py's linear classifier"
    for key in ('model', 'state_dict'):
        if is_state_dict(content.get(key)):
            return f"a classifier's checkpoint ('{key}': {_library_keys(content[key])})"
    return f"unknown layout (entries: {', '.join(map(str, content))})"


def checkpoint_entry(content, checkpoint_key, path):
    """The state dict stored under ``checkpoint_key`` (None: the first of :data:`ENTRIES` that the file has), or
    the file itself when it is a bare state dict."""
    if not isinstance(content, dict) or not content:
        raise utils.UserError(f"checkpoint {path} holds no state dict")
    key = checkpoint_key or next((k for k in ENTRIES if k in content), None)
    if key in content:
        state_dict = content[key]
    elif is_state_dict(content):
        return content
    else:
        raise utils.UserError(f"checkpoint {path} has no '{checkpoint_key or ENTRIES[0]}' entry (it has: "
                              f"{', '.join(map(str, content))}); pass --checkpoint_key")
    if not is_state_dict(state_dict):
        raise utils.UserError(f"checkpoint {path}: '{key}' is not a state dict of tensors")
    return state_dict


def backbone_state_dict(state_dict, backbone_keys):
    """The backbone's weights within a wrapper's state dict: ``module.`` removed, the projection heads
    dropped, then ``backbone.`` removed for as long as it hides the backbone's own keys (DINO's wrapper
    nests ``backbone.<keys>``; the original's ResNet wrapper ``backbone.backbone.<torchvision keys>``,
    where ``backbone.<torchvision keys>`` are already the ResNet backbone's own keys)."""
    state_dict = utils.strip_prefix(state_dict, ('module.',))
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(HEAD_PREFIXES)}
    while not backbone_keys.intersection(state_dict) and any(k.startswith(WRAPPER_PREFIX) for k in state_dict):
        state_dict = utils.strip_prefix(state_dict, (WRAPPER_PREFIX,))
    return state_dict


def backbone_weights(state_dict, own):
    """(reading, weights) of the state dict of one checkpoint entry for a backbone whose state dict is ``own``:
    this project's (and the original's) keys, or timm's / torchvision's, whichever gives exactly the backbone's
    keys (else the closest reading, for the error message). A classifier is never loaded (the backbone's own
    ``head.*`` stays as it is); buffers the model rebuilds from its window size are taken from ``own``."""
    def fitted(weights):
        weights = {k: v for k, v in weights.items()
                   if not k.startswith('head.') and not (k.endswith(BUFFERS_REBUILT_BY_THE_MODEL) and k not in own)}
        weights.update({k: v for k, v in own.items()
                        if k not in weights and (k.startswith('head.') or k.endswith(BUFFERS_REBUILT_BY_THE_MODEL))})
        return weights
    readings = [("this project's", fitted(backbone_state_dict(state_dict, set(own))))]
    readings += [(name, fitted(weights)) for name, weights in from_library(utils.strip_prefix(state_dict))]
    return min(readings, key=lambda reading: len(set(reading[1]).symmetric_difference(own)))


def load_backbone_weights(backbone, path, checkpoint_key=None):
    """Load the backbone weights of the checkpoint file ``path`` (any layout above) into ``backbone``, strictly:
    a missing, unexpected or misshaped key is a :class:`utils.UserError` that lists them. Returns a description
    of what was loaded, e.g. "x.pth ('teacher', this project's keys, 173 tensors)"."""
    content = utils.load_checkpoint(path)
    state_dict = checkpoint_entry(content, checkpoint_key, path)
    key = checkpoint_key if checkpoint_key in content else next((k for k in ENTRIES if k in content), None)
    reading, weights = backbone_weights(state_dict, backbone.state_dict())
    where = f"'{key}', " if key else ''
    utils.load_state_dict_checked(backbone, weights, f"pretrained weights {path} ({where}{reading} keys)")
    return f"{path} ({where}{reading} keys, {len(weights)} tensors)"


# ---------------------------------------------------------------------------------------------------------
# the model a checkpoint was trained with
# ---------------------------------------------------------------------------------------------------------
def _repository_yaml(cfg):
    """This repository's yaml for a stored --cfg path that does not exist here: the same path below
    experiments/, else the one yaml of that name under experiments/."""
    parts = Path(cfg).parts
    if 'experiments' in parts:
        candidate = REPO_ROOT.joinpath(*parts[parts.index('experiments'):])
        if candidate.is_file():
            return str(candidate)
    same_name = sorted((REPO_ROOT / 'experiments').rglob(Path(cfg).name))
    return str(same_name[0]) if len(same_name) == 1 else None


def trained_model(path):
    """SimpleNamespace(arch, cfg, opts, patch_size, note) of the model the checkpoint ``path`` was trained with: its stored
    arguments, else the config.yaml beside it (scripts/export_backbone.py writes one); None when neither.
    A stored yaml that does not exist here (another machine's path) is replaced by this repository's yaml of
    that name, else by the config.yaml beside the checkpoint."""
    beside = os.path.join(os.path.dirname(os.path.abspath(path)), 'config.yaml')
    stored = stored_args(utils.load_checkpoint(path, mmap=True))
    if stored is None or not (stored.get('arch') or stored.get('cfg')):
        if not os.path.isfile(beside):
            return None
        return SimpleNamespace(arch=None, cfg=beside, opts=[], patch_size=None, note='the config.yaml beside it')
    arch, cfg, opts = stored.get('arch'), stored.get('cfg'), [str(o) for o in stored.get('opts') or []]
    patch_size = stored.get('patch_size')  # a ViT's patch is an argument, not a config key
    note = 'its stored arguments'
    if cfg and not os.path.isfile(cfg):
        found = _repository_yaml(cfg) or (beside if os.path.isfile(beside) else None)
        if found is None:
            raise utils.UserError(f"{path} was trained with --cfg {cfg}, which is not here, nor under experiments/ "
                                  f"nor as config.yaml beside it: pass --arch / --cfg")
        note += f"; its yaml {cfg} is not here, {_short(found)} is used"
        cfg = found
    return SimpleNamespace(arch=arch, cfg=cfg, opts=opts, patch_size=patch_size, note=note)


def _short(path):
    """``path`` relative to the working directory when it lies below it."""
    relative = os.path.relpath(path)
    return path if relative.startswith('..') else relative


def model_flags(model):
    """The command-line flags of a :func:`trained_model`."""
    flags = [f'--arch {model.arch}'] if model.arch else []
    flags += [f'--cfg {_short(model.cfg)}'] if model.cfg else []
    return ' '.join(flags + list(model.opts))


def _weight_defining(config):
    """MODEL.NAME and the MODEL.SPEC values that shape the weights (not the dropout / drop-path rates)."""
    spec = {k: v for k, v in config.MODEL.SPEC.items() if 'DROP' not in k}
    return {'MODEL.NAME': config.MODEL.NAME, **{f'MODEL.SPEC.{k}': v for k, v in spec.items()}}


def model_config(args):
    """The checked config of the backbone to evaluate (``args``: an evaluation script's). ``--arch`` / ``--cfg``
    / trailing opts when given: an error when they build another model than the one ``--pretrained_weights``
    was trained with. Without them: that model (one line says so; trailing opts still apply), else the demo
    model when ``args.demo`` (no --data_path either), else the error that no architecture was given."""
    weights = getattr(args, 'pretrained_weights', '')
    if args.arch is not None or args.cfg is not None:
        config = load_config(args)
        try:  # a checkpoint that cannot be read, or whose model cannot be built here, is left to the loading
            trained = trained_model(weights) if weights else None
            with contextlib.redirect_stdout(io.StringIO()):  # its notes were printed by the training run
                trained_config = load_config(trained) if trained else None
        except utils.UserError:
            trained_config = None
        if trained_config is not None:
            ours, theirs = _weight_defining(config), _weight_defining(trained_config)
            different = [f"{k} {ours.get(k)} here, {theirs.get(k)} there" for k in sorted(set(ours) | set(theirs))
                         if ours.get(k) != theirs.get(k)]
            if different:
                raise utils.UserError(f"--arch / --cfg build another model than {weights} was trained with "
                                      f"({model_flags(trained)}): {'; '.join(different[:3])}; drop --arch and "
                                      f"--cfg to use the checkpoint's")
        return config
    trained = trained_model(weights) if weights else None
    if trained is not None:
        print(f"Model of {weights} from {trained.note}: {model_flags(trained)}")
        args.arch, args.cfg, args.opts = trained.arch, trained.cfg, trained.opts + list(args.opts or [])
        if trained.patch_size is not None:
            args.patch_size = trained.patch_size
    elif getattr(args, 'demo', False):
        args.cfg = DEMO_CFG
    return load_config(args)


# ---------------------------------------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------------------------------------
EXPORT_FORMATS = ('timm', 'torchvision', 'state_dict')
VERIFY_TOLERANCE = 1e-4  # relative difference of the pooled features above which an export is refused


def verify_twin(backbone, twin, image_size, images=2):
    """Relative difference (Frobenius) between the pooled features of ``backbone`` and of the library's ``twin``
    on the same random images, both in eval mode, float32."""
    inputs = torch.randn(images, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = backbone.eval().forward_features(inputs)[0]
        theirs = twin.eval()(inputs)
    return ((theirs - ours).norm() / ours.norm()).item()


def export_backbone(backbone, config, fmt, output, metadata=None, verify=True):
    """Write the weights of ``backbone`` (built from ``config``) to ``output`` (``.safetensors`` or ``.pth``) in
    the keys of ``fmt``: 'timm' / 'torchvision' (the library's network of it loads the file with strict=True)
    or 'state_dict' (this project's keys), and the config beside it as config.yaml (an existing different
    config.yaml there is an error: nothing is written). ``verify``: the library's network, with the file's
    weights, must give this backbone's pooled features (:data:`VERIFY_TOLERANCE`) before anything is written.
    Returns a description of what was written and how to load it."""
    if fmt not in EXPORT_FORMATS:
        raise utils.UserError(f"--format {fmt}: one of {', '.join(EXPORT_FORMATS)}")
    if not output.endswith(('.safetensors', '.pth')):
        raise utils.UserError(f"--output {output}: name a .safetensors or a .pth file")
    state = {k: v.detach().cpu().clone().contiguous() for k, v in backbone.state_dict().items()}  # no shared memory
    if fmt != 'state_dict':
        try:
            state = to_library(config, state, fmt)
            call = twin_call(config, fmt)
        except ValueError as e:  # models.ModelError: no such twin
            raise utils.UserError(str(e)) from None
    folder = os.path.dirname(os.path.abspath(output))
    config_path = os.path.join(folder, 'config.yaml')
    config_text = config.dump()
    if os.path.isfile(config_path) and open(config_path).read() != config_text:
        raise utils.UserError(f"{config_path} describes another model: export to another folder (the config.yaml "
                              f"beside an export says how to rebuild it)")
    how = f"this project's models.build_model(config of {config_path}).load_state_dict(...)"
    if fmt != 'state_dict':
        load = f"safetensors.torch.load_file({output!r})" if output.endswith('.safetensors') else \
            f"torch.load({output!r}, weights_only=True)"
        how = f"model = {call}; model.load_state_dict({load})"
        if verify:
            twin = build_twin(config, fmt)
            twin.load_state_dict(state, strict=True)
            difference = verify_twin(backbone, twin, config.TRAIN.IMAGE_SIZE[0])
            if not difference <= VERIFY_TOLERANCE:
                raise utils.UserError(f"the {fmt} network of this backbone gives other features ({difference:.2e} "
                                      f"relative difference): nothing written")
            how += f" (checked: strict load, pooled features within {difference:.1e} of this backbone's)"
    os.makedirs(folder, exist_ok=True)
    metadata = {EXPORT_METADATA_KEY: fmt, 'load': how, **(metadata or {})}
    if output.endswith('.safetensors'):
        utils.save_checkpoint(state, output, metadata={k: str(v) for k, v in metadata.items() if v})
    else:
        utils.save_checkpoint(state, output)
    if not os.path.isfile(config_path):
        save_config(config, config_path)
    return f"{output}: {len(state)} tensors in {fmt} keys; {how}"
