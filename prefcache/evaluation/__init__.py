"""Evaluate checkpoints: lm-eval tasks (``prefcache eval``) and cached implicit rewards (``prefcache score``).
"""
