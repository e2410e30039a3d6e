"""Models: load a reference or a policy (folder, GGUF, Hub id, 4/8-bit, adapters: ``load``, ``policy``), and the
log-prob kernel every stage shares (``kernel``: chunked output head; ``packing``: prefix sharing;
``pairs``: a batch of pairs through the kernel).
"""
