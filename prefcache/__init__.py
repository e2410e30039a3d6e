"""prefcache: preference optimisation with a precomputed, inspectable reference log-prob cache.

The heavy functions are imported on first use, so ``import prefcache`` (and ``prefcache --help``) stays fast.
"""

__version__ = "0.1.0"

_LAZY = {
    "precompute": ("prefcache.reference.shards", "precompute"),
    "PrecomputeConfig": ("prefcache.reference.config", "PrecomputeConfig"),
    "inspect_cache": ("prefcache.cache.store", "summary"),
    "verify_cache": ("prefcache.reference.shards", "verify_cache"),
    "read_cache": ("prefcache.cache.store", "read_cache"),
    "token_logprobs": ("prefcache.model.kernel", "token_logprobs"),
    "train": ("prefcache.training.loop", "train"),
    "TrainConfig": ("prefcache.training.config", "TrainConfig"),
    "connect": ("prefcache.analysis.views", "connect"),
    "evaluate": ("prefcache.evaluation.lmeval", "evaluate"),
    "score": ("prefcache.evaluation.rewards", "score"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'prefcache' has no attribute {name!r}")
