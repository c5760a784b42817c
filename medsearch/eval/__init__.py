"""What `medsearch eval` runs: retrieval (``retrieval``) and draft quality (``drafts``).

Inference never imports this package; metrics live in :mod:`medsearch.metrics`.
"""
