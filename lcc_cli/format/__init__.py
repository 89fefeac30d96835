"""Bytes on disk: the cartridge and compiler-file formats, their checks, and safe writing.

Nothing in this package imports the model runtime or the compiler: reading, checking and
writing a file never needs a model (the `Buffer` type it shares with them is torch only).
"""
