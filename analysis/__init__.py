"""Analysis of trained backbones: attention maps, view-to-view token correspondences, their pictures.

``attention_figure(backbone, image) -> H x W x 3 uint8`` draws the last block's attention for TensorBoard,
e.g. of ``image = datasets.normalize(network_input(PIL image, size))``; ``analyze(args)`` (analysis.run) is what
``run_analysis.py`` runs (see README, "Analysis").
"""
from .correspondence import network_input
from .drawing import attention_figure

__all__ = ['attention_figure', 'network_input']
