"""The `lcc` command line: the Typer app, the options commands share, and the one error handler.

The cli/ package parses flags, calls the API (api.py) and renders what it returns; it is the
only place that prints or exits. Engine code raises `LccError` subclasses naming config fields
(`ratio`), which `_errors` shows as the flags users type (`--ratio`), in one `lcc: error: ...`
line on stderr with the exit code from errors.py. Heavy modules (torch, transformers) are
imported inside commands, never at import time, so `lcc --help` stays fast.
"""

from __future__ import annotations

import functools
import os
import traceback

import typer
from rich.console import Console

from .._version import __version__
from ..config import DEFAULT_MODEL, DEVICE_ENV, MODEL_ENV, AskConfig, ReadConfig
from ..errors import (EXIT_CODES, EXIT_INTERRUPTED, EXIT_RESOURCES, EXIT_UNEXPECTED, EXIT_USAGE, LccError)
from .render import clean

app = typer.Typer(
    help="Compile documents into memory cartridges that a frozen language model reads instead of the document.",
    epilog="Exit codes: " + "; ".join(f"{code} {meaning}" for code, meaning in EXIT_CODES.items()) + ".",
    no_args_is_help=True,
    pretty_exceptions_enable=False,  # never dump locals (which hold document text) at users
    add_completion=False,
    rich_markup_mode="markdown",  # reflow docstring paragraphs instead of keeping their line breaks
)
out = Console(highlight=False)
err = Console(stderr=True, highlight=False)

ModelOpt = typer.Option(None, "--model", "-m", envvar=MODEL_ENV,
                        help=f"Base model: '{DEFAULT_MODEL}' (embedded) or a local Hugging Face model directory.")
DeviceOpt = typer.Option(None, "--device", envvar=DEVICE_ENV, help="auto | cpu | cuda (bf16 on CUDA).")
ThreadsOpt = typer.Option(None, "--threads", help="CPU math threads (default: the cores other programs leave "
                                                 "free, re-checked as work runs).")
DtypeOpt = typer.Option(None, "--dtype", help="Compute dtype: float32 (CPU default) | bfloat16 (CUDA default; "
                                             "2.3x faster on CPUs with AVX512-BF16).")
JsonOpt = typer.Option(False, "--json", help="Print machine-readable JSON instead of text.")
# Shared by ask and chat.
ContextOpt = typer.Option(None, "--context", "-c", help="Answer with this document in the prompt instead (baseline).")
MaxTokensOpt = typer.Option(AskConfig.max_new_tokens, "--max-new-tokens", help="Longest answer, in tokens.")
TemperatureOpt = typer.Option(AskConfig.temperature, "--temperature", help="0 decodes greedily.")
ForceReadOpt = typer.Option(False, "--force", help="Use a cartridge even if it was made for another model.")
# How a question reads indexed cartridges (ReadConfig), shared by ask and chat.
BudgetOpt = typer.Option(None, "--budget", metavar="K", help="Indexed cartridges: entries of pages (and gist) each "
                                                             "question reads (default: the compile's ratio of the "
                                                             "document).")
ReadRatioOpt = typer.Option(None, "--ratio", help="Indexed cartridges: a budget of the document's tokens / RATIO.")
SelectorOpt = typer.Option("bm25", "--selector", help="Indexed cartridges: how a question picks its pages: bm25 "
                                                      "(over the pages' text) | attention (its queries over their "
                                                      "key summaries) | fusion.")
RepairOpt = typer.Option(0, "--repair", metavar="N", help="Indexed cartridges: re-encode each page's first N tokens "
                                                          "after the pages before it (slower first token).")
ReencodeOpt = typer.Option(64, "--reencode", metavar="N", help="Indexed cartridges: re-encode the chosen pages "
                                                               "whole when they hold at most N entries together "
                                                               "(a short read answers better so; 0 = never).")
FloorOpt = typer.Option(ReadConfig.floor, "--floor", metavar="N", help="Indexed cartridges: entries a read may "
                                                                     "take whatever the budget: the best page whole "
                                                                     "up to N, a document of at most N whole.")
AnswerFormatOpt = typer.Option(ReadConfig.answer_format, "--answer-format",
                               help="Words after the question: plain (none) | words (\"Answer in a few words.\").")
PrefixOpt = typer.Option(True, "--prefix/--no-prefix", help="Read the model's reading prefix before the context (the "
                                                          "shipped one for the embedded model: answers with the "
                                                          "document's own short phrase).")
PrefixFileOpt = typer.Option(None, "--prefix-file", metavar="FILE", help="A reading prefix trained with `lcc "
                                                                         "train-prefix` for this model, instead "
                                                                         "of the shipped one.")
ShowPagesOpt = typer.Option(False, "--show-pages", help="Indexed cartridges: print the pages each answer read, "
                                                        "with their text.")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _errors(fn):
    """Map engine errors to one stderr line and the exit-code table. LCC_DEBUG=1 adds the traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except LccError as exc:
            message = exc.message
            field = getattr(exc, "field", None)
            if field and message.startswith(field + " "):  # config fields read as the flags users typed
                message = _flag(field) + message[len(field):]
            _fail(message, exc.exit_code, exc.hint)
        except KeyboardInterrupt:
            _fail("interrupted", EXIT_INTERRUPTED)
        except MemoryError:
            _fail("out of memory", EXIT_RESOURCES, "close other programs or use a smaller model")
        except RecursionError:
            _fail("input nested too deeply to process", EXIT_USAGE)
        except RuntimeError as exc:
            if "out of memory" in str(exc) or "can't allocate memory" in str(exc):  # torch's CUDA/CPU allocators
                _fail("out of memory", EXIT_RESOURCES, "use fewer --workers, a smaller --segment-tokens, or the CPU")
            _fail(f"unexpected {type(exc).__name__}: {exc}".splitlines()[0], EXIT_UNEXPECTED,
                  "set LCC_DEBUG=1 for the traceback")
        except Exception as exc:  # the last resort: still one line, still a distinct code
            _fail(f"unexpected {type(exc).__name__}: {exc}".splitlines()[0], EXIT_UNEXPECTED,
                  "set LCC_DEBUG=1 for the traceback")

    return wrapper


def _fail(message: str, code: int, hint: str | None = None):
    if os.environ.get("LCC_DEBUG"):
        traceback.print_exc()
    line = clean(f"lcc: error: {message}".replace("\n", " ") + (f" ({hint})" if hint else ""))
    err.print(line, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _version(value: bool):
    if value:
        out.print(f"lcc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Show the version and exit.")):
    """lcc: latent context compilation for a frozen language model."""


def _progress(quiet: bool):
    from .progress import RichProgress

    return RichProgress(err, quiet=quiet or not err.is_terminal)


def _run(model, device, threads, dtype=None, **extra):
    from ..config import RunOptions

    return RunOptions(model=model, device=device, threads=threads, dtype=dtype, **extra)


def main():
    # Before torch loads OpenMP: waiting threads sleep instead of spinning on a core that
    # another program needs (runtime/threads.py; measured in bench/results).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # Before anything imports tqdm (which reads this once): the GGUF de-quantiser's bars would
    # print a dozen lines on a first run; lcc draws its own progress.
    os.environ.setdefault("TQDM_DISABLE", "1")
    app()
