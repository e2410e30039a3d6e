"""Preference data in: read files, ``datasets`` folders and Hub ids (``formats``) → map columns and render
templates (``columns``) → validate and give each example a stable id → tokenise as TRL does (``pairs`` for
pairs, ``unpaired`` for KTO-style examples). ``options`` holds the data options every command shares.
"""
