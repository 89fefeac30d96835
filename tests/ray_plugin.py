"""A compiler registered from outside lcc (CompilerSpec.plugin), for executor tests: it
compiles like `optimise`, but the first time any worker runs it, that worker's process
dies mid-unit (as a machine running out of memory would kill it)."""

import os
from pathlib import Path

from lcc_cli.compile.base import register
from lcc_cli.compile.optimise import OptimisingCompiler


class DiesOnce(OptimisingCompiler):
    name = "dies-once"

    def compile(self, segment, cfg, progress):
        marker = Path(os.environ["LCC_TEST_DIE_MARKER"])
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return super().compile(segment, cfg, progress)
        os.close(fd)
        os._exit(1)

    def describe(self):
        return {"name": "optimise"}


register("dies-once")(lambda spec, loaded: DiesOnce(loaded))
