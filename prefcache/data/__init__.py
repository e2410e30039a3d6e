"""Preference data in: read files, ``datasets`` folders and Hub ids (``formats``) → map columns and render
templates (``columns``) → validate, give each example a stable id and render its texts (``validate``) →
tokenise and truncate as TRL does (``tokens``); bad rows and their policy in ``badrows``. ``pairs`` reads pairs
whole or in blocks (and is where other stages import them from), ``unpaired`` KTO-style examples and their KL
partners. ``options`` holds the data options every command shares. Vision rows (TRL's ``images`` format):
``images`` reads images into content-addressed references, ``vision`` validates and renders the rows with the
model's processor, ``vision_pairs`` tokenises them (image tokens expanded) in blocks.
"""
