"""The listing of compile methods: importing this module registers every one of them
(compile/base.py looks methods up through it). A new method is one module here."""

from . import am, optimise, pretrained, truncate  # noqa: F401
