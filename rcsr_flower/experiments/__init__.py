"""The experiment suite: settings × methods × seeds through the real Flower path.

``python -m rcsr_flower.experiments run --suite NAME`` runs every cell of
``experiments/NAME.toml`` as a ``flwr run`` simulation through the project's launcher
(``suite`` reads the file, ``runner`` runs the cells); ``... report --suite NAME``
writes ``docs/results/NAME/results.md`` and its figures (``report``, ``stats``, and
``rcsr_flower.experiments.plot`` for the drawing). docs/experiments.md explains it all.
"""
