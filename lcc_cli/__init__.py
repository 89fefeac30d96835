"""lcc: compile documents into memory cartridges that a frozen language model reads instead.

The small Python API (imports are lazy, so `import lcc_cli` stays cheap):

    from lcc_cli import compile_file, ask, load_cartridge
    compile_file("doc.md", "doc.lcc", CompileConfig(ratio=16))
    ask("Who founded it?", ["doc.lcc"])["answer"]
"""

__version__ = "0.1.0"


def compile_file(*args, **kwargs):
    from .engine import compile_file as fn

    return fn(*args, **kwargs)


def ask(*args, **kwargs):
    from .engine import ask as fn

    return fn(*args, **kwargs)


def load_cartridge(path):
    from .cartridge import load_cartridge as fn

    return fn(path)
