"""rcsr-flower: federated cross-modal retrieval with missing modalities (RCSR) on Flower.

The data path through the package is the path of the algorithm: ``data`` (corpus,
loaders, partition) -> ``backbones`` (frozen CLIP + adapters) -> ``task`` (client
training) -> the strategy -> ``splits``/``metrics`` (evaluation). Section numbers in
docstrings (§1–§6) cite the specification, docs/algorithm.md.
"""

__version__ = "0.1.0"
