"""Compilation: the segment-compiler protocol (base.py), the one compile path (document.py),
the self-aligned objective (objective.py), and the methods: per-document optimisation
(optimise.py) and the pretrained compiler (pretrained.py, trained by train.py)."""
