"""The typed Python API: the workflows behind each command, in one import. The CLI calls
these and renders what they return; nothing here prints or exits.

    from lcc_cli import api
    result = api.compile_file("doc.md", "doc.lcc", {"ratio": 16})   # settings over the quality preset
    print(api.ask(["Who founded it?"], ["doc.lcc"])[0].text)

Each workflow lives in workflows/ (one module per family of commands): only those modules
combine the file formats (format/), the model at run time (runtime/), the compile path
(compile/) and the executors (backends/).
"""

from __future__ import annotations

from .compile.choice import resolve as resolve_compiler, settle
from .config import RunOptions
from .workflows.asking import MAX_QUESTION_CHARS, Reader, ask, check_question, read_questions
from .workflows.common import load
from .workflows.compiling import (BatchItem, BatchResult, CompileResult, compile_file, compile_paths,
                                  estimate_seconds)
from .workflows.evaluating import eval_methods, run_eval
from .workflows.files import export_cartridge, import_adapter, inspect, verify
from .workflows.library import index_folder
from .workflows.serving import serve
from .workflows.training import train_compiler, train_prefix

__all__ = ["BatchItem", "BatchResult", "CompileResult", "MAX_QUESTION_CHARS", "Reader", "RunOptions", "ask",
           "check_question", "compile_file", "compile_paths", "estimate_seconds", "eval_methods", "export_cartridge",
           "import_adapter", "index_folder", "inspect", "load", "read_questions", "resolve_compiler", "run_eval", "serve", "settle",
           "train_compiler", "train_prefix", "verify"]
