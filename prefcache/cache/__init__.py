"""The reference cache: Parquet shards and their metadata (``store``), whether a cache fits this
tokenisation and mapping (``compat``), and the id → value tables the trainer and ``score`` join on (``lookup``).
"""
