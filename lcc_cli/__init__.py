"""lcc: compile documents into memory cartridges that a frozen language model reads instead.

The Python API is `import lcc` (the module lcc_cli/api.py; docs/python.md):

    import lcc
    model = lcc.load_model()
    reader = model.reader(model.compile("doc.md", ratio=16))
    reader.ask("Who founded it?").text

`import lcc_cli` alone stays cheap: nothing heavy is imported until the API is.
"""

from ._version import __version__

__all__ = ["__version__"]
