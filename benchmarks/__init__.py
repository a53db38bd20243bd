"""Speed and research benchmarks: each a script ending with one JSON line of its figures;
``python -m benchmarks`` records them and writes docs/benchmarks.md (``record.py``)."""
