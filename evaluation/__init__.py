"""Evaluation of frozen backbones: the weighted k-NN (``knn``), the linear probe (``linear``), linear segmentation
(``segmentation``), and what they share
(``checkpoints``: checkpoint layouts, backbone weights and the model a checkpoint was trained with; ``backbone``:
the frozen backbone; ``features``: options, data, feature extraction)."""
from .backbone import build_frozen_backbone, load_pretrained_backbone
from .checkpoints import load_backbone_weights, model_config
from .features import backbone_args_parser, extract_features, parse_eval_args, probe_args_parser
from .knn import OnlineKNN, eval_knn, knn_accuracies
from .linear import eval_linear
from .segmentation import eval_segmentation

__all__ = ['build_frozen_backbone', 'load_pretrained_backbone', 'load_backbone_weights', 'model_config', 'backbone_args_parser', 'extract_features',
           'parse_eval_args', 'probe_args_parser', 'OnlineKNN', 'eval_knn', 'knn_accuracies', 'eval_linear', 'eval_segmentation']
