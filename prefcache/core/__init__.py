"""The shared layer under every stage: whole-file writes, directory locks, Arrow schemas of every table,
Hub id resolution, data-parallel helpers, the CPU allocator, library noise, YAML option files and option checks.
Nothing here imports a stage.
"""
