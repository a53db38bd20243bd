"""Frozen CLIP backbones (any Hugging Face CLIP checkpoint, or the embedded one) + adapters."""

from rcsr_flower.backbones.adapters import AdapterSet, BottleneckAdapter, adapted
from rcsr_flower.backbones.clip import Backbone, load_backbone

__all__ = ["AdapterSet", "Backbone", "BottleneckAdapter", "adapted", "load_backbone"]
