"""lcc: compile documents into memory cartridges that a frozen language model reads instead.

    import lcc

    model = lcc.load_model()
    reader = model.reader(model.compile("examples/harbor.md", ratio=8))
    print(reader.ask("Who designed the lighthouse?").text)

The API lives in `lcc_cli.api` (docs/python.md); this package is the name users import.
"""

from lcc_cli._version import __version__
from lcc_cli.api import *  # noqa: F401,F403
from lcc_cli.api import __all__ as _api

__all__ = ["__version__", *_api]
