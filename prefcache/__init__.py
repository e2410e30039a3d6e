"""prefcache: preference optimisation with a precomputed, inspectable reference log-prob cache.

The heavy functions are imported on first use, so ``import prefcache`` (and ``prefcache --help``) stays fast.
"""

__version__ = "0.1.0"

_LAZY = {
    "precompute": ("prefcache.reference", "precompute"),
    "PrecomputeConfig": ("prefcache.config", "PrecomputeConfig"),
    "inspect_cache": ("prefcache.cache", "summary"),
    "verify_cache": ("prefcache.reference", "verify_cache"),
    "read_cache": ("prefcache.cache", "read_cache"),
    "token_logprobs": ("prefcache.logprobs", "token_logprobs"),
    "train": ("prefcache.trainer", "train"),
    "TrainConfig": ("prefcache.config", "TrainConfig"),
    "connect": ("prefcache.analysis", "connect"),
    "evaluate": ("prefcache.evaluation", "evaluate"),
    "score": ("prefcache.evaluation", "score"),
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'prefcache' has no attribute {name!r}")
