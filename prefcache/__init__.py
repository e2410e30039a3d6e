"""prefcache: preference optimisation with a precomputed, inspectable reference log-prob cache.

The heavy functions are imported on first use, so ``import prefcache`` (and ``prefcache --help``) stays fast.
"""

__version__ = "0.1.0"

_LAZY = {
    "precompute": ("prefcache.precompute.shards", "precompute"),
    "PrecomputeConfig": ("prefcache.train.config", "PrecomputeConfig"),
    "inspect_cache": ("prefcache.cache.store", "summary"),
    "verify_cache": ("prefcache.precompute.shards", "verify_cache"),
    "read_cache": ("prefcache.cache.store", "read_cache"),
    "token_logprobs": ("prefcache.model.kernel", "token_logprobs"),
    "train": ("prefcache.train.loop", "train"),
    "TrainConfig": ("prefcache.train.config", "TrainConfig"),
    "connect": ("prefcache.analyze.views", "connect"),
    "evaluate": ("prefcache.evaluate.evaluation", "evaluate"),
    "score": ("prefcache.evaluate.evaluation", "score"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'prefcache' has no attribute {name!r}")
