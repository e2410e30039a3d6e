"""DuckDB over caches, run logs and evals: views with fixed names, the named queries of ``sql/``, the report.
"""
