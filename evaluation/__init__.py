"""Evaluation of frozen backbones: the weighted k-NN (``knn``), the linear probe (``linear``), and what they share
(``backbone``: the frozen backbone from any checkpoint layout; ``features``: options, data, feature extraction)."""
from .backbone import build_frozen_backbone, load_pretrained_backbone
from .features import backbone_args_parser, extract_features, parse_eval_args
from .knn import OnlineKNN, eval_knn, knn_accuracies
from .linear import eval_linear

__all__ = ['build_frozen_backbone', 'load_pretrained_backbone', 'backbone_args_parser', 'extract_features',
           'parse_eval_args', 'OnlineKNN', 'eval_knn', 'knn_accuracies', 'eval_linear']
