"""lcc: compile documents into memory cartridges that a frozen language model reads instead.

The typed Python API lives in `lcc_cli.api` (imports are lazy, so `import lcc_cli` stays cheap):

    from lcc_cli import api
    from lcc_cli.config import CompileConfig
    api.compile_file("doc.md", "doc.lcc", CompileConfig(ratio=16))
    api.ask(["Who founded it?"], ["doc.lcc"])[0].text
"""

from ._version import __version__

__all__ = ["__version__"]
