"""rcsr-flower: federated cross-modal retrieval with missing modalities (RCSR) on Flower.

The data path through the package is the path of the algorithm (SPEC.md):
``data`` (corpus, loaders, partition) -> ``backbones`` (frozen CLIP + adapters) ->
``task`` (client training and evaluation) -> the strategy -> ``metrics``.
"""

__version__ = "0.1.0"
