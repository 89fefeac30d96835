"""Many documents and many workers: batch compile, the Ray executor, worker deaths."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from conftest import DOC, fast_config, run_opts
from lcc_cli import api
from lcc_cli.cli import app
from lcc_cli.compile.base import CompilerSpec
from lcc_cli.format.cartridge import load_cartridge
from lcc_cli.progress import Progress

runner = CliRunner()
LONG = "\n\n".join(f"Paragraph {i}: the tower number {i} was painted red in 18{i}0 by the engineer Ada. "
                   f"It is {i}1 metres tall." for i in range(3))
FAST = ["--steps", "1", "--ratio", "8", "--compiler", "none"]


def same(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.buffer.keys + a.buffer.values, b.buffer.keys + b.buffer.values))


@pytest.fixture
def library(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.md").write_text(DOC)
    (docs / "b.txt").write_text("The tower is 41 metres tall and painted in red and white bands.")
    (docs / "sub" / "c.txt").write_text("The lamp burned oil. It was replaced in 1923. It was automated in 1987.")
    (docs / "broken.txt").write_bytes(b"\x00\x01binary\x00" * 20)
    (docs / ".hidden.md").write_text("never compiled")
    return docs


def test_batch_compile_writes_good_documents_reports_bad_ones_and_skips_finished(library, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    args = ["compile", str(library), "-o", f"{out}/", "--model", str(tiny_model_dir), "--json", *FAST]
    first = runner.invoke(app, args)
    assert first.exit_code == 10, first.stderr
    summary = json.loads(first.stdout)
    status = {Path(d["source"]).name: d for d in summary["documents"]}
    assert summary["counts"] == {"done": 3, "skipped": 0, "failed": 1}
    assert ".hidden.md" not in status and "binary" in status["broken.txt"]["reason"]
    assert sorted(p.name for p in out.iterdir()) == ["a.lcc", "b.lcc", "c.lcc"]
    a_bytes = (out / "a.lcc").read_bytes()

    again = json.loads(runner.invoke(app, args).stdout)
    assert again["counts"] == {"done": 0, "skipped": 3, "failed": 1}
    assert (out / "a.lcc").read_bytes() == a_bytes  # untouched

    (library / "a.md").write_text(DOC + " It has a red roof.")
    changed = json.loads(runner.invoke(app, args).stdout)
    assert {Path(d["source"]).name: d["status"] for d in changed["documents"]}["a.md"] == "failed"
    assert (out / "a.lcc").read_bytes() == a_bytes  # never overwritten without --force
    forced = json.loads(runner.invoke(app, args + ["--force"]).stdout)
    assert forced["counts"] == {"done": 3, "skipped": 0, "failed": 1}
    assert (out / "a.lcc").read_bytes() != a_bytes


def test_batch_table_and_exit_code_without_json(library, tmp_path, tiny_model_dir):
    result = runner.invoke(app, ["compile", str(library / "a.md"), str(library / "broken.txt"), "-o",
                                 str(tmp_path / "o"), "--model", str(tiny_model_dir), *FAST])
    assert result.exit_code == 10 and "done" in result.stdout and "failed" in result.stdout


@pytest.fixture(scope="module")
def ray_session():
    """One private Ray instance for this module; its workers can import tests/ray_plugin.py."""
    ray = pytest.importorskip("ray")
    import logging

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    marker_dir = tempfile.mkdtemp(prefix="lcc-ray-test")
    tests_dir = str(Path(__file__).resolve().parent)
    ray.init(address="local", num_cpus=2, include_dashboard=False, object_store_memory=128 * 1024**2,
             log_to_driver=False, logging_level=logging.ERROR, _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"),
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([tests_dir, os.environ.get("PYTHONPATH", "")]),
                                       "LCC_TEST_DIE_MARKER": os.path.join(marker_dir, "died")}})
    try:
        yield Path(marker_dir) / "died"
    finally:
        ray.shutdown()


@pytest.fixture
def long_doc(tmp_path):
    p = tmp_path / "long.txt"
    p.write_text(LONG)
    return p


def cfg():
    return fast_config(segment_tokens=80, ratio=4, steps=2)


def test_ray_and_in_process_give_the_same_cartridge(ray_session, long_doc, tmp_path, tiny_model_dir):
    """Both sides use one math thread per compile, so the floats are the same to the bit
    (the tolerance is zero): a Ray actor runs the very same code on the same CPU."""
    threads = torch.get_num_threads()
    try:
        api.compile_file(long_doc, tmp_path / "local.lcc", cfg(), run=run_opts(tiny_model_dir, threads=1))
        api.compile_file(long_doc, tmp_path / "ray.lcc", cfg(),
                         run=run_opts(tiny_model_dir, threads=1, backend="ray", workers=1))
    finally:
        torch.set_num_threads(threads)
    a, b = load_cartridge(tmp_path / "local.lcc"), load_cartridge(tmp_path / "ray.lcc")
    assert a.manifest["buffer"] == b.manifest["buffer"] and same(a, b)


class Notes(Progress):
    def __init__(self):
        self.lines = []

    def note(self, text):
        self.lines.append(text)


def test_a_worker_killed_mid_unit_is_retried_and_nothing_is_lost(ray_session, long_doc, tmp_path, tiny_model_dir):
    notes = Notes()
    spec = CompilerSpec("dies-once", plugin="ray_plugin")
    api.compile_file(long_doc, tmp_path / "ref.lcc", cfg(), compiler="none", run=run_opts(tiny_model_dir, threads=1))
    api.compile_file(long_doc, tmp_path / "ray.lcc", cfg(), compiler=spec, progress=notes,
                     run=run_opts(tiny_model_dir, threads=1, backend="ray", workers=1))
    assert ray_session.exists()  # a worker really died
    assert sum("retrying" in line and "worker died" in line for line in notes.lines) == 1
    got, ref = load_cartridge(tmp_path / "ray.lcc"), load_cartridge(tmp_path / "ref.lcc")
    assert len(got.segments) == 3 and got.manifest["buffer"] == ref.manifest["buffer"]
    assert same(got, ref)


def test_ray_batch_from_the_command_line(ray_session, library, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    result = runner.invoke(app, ["compile", str(library / "a.md"), str(library / "b.txt"), "-o", f"{out}/",
                                 "--backend", "ray", "--workers", "2", "--threads", "1", "--model",
                                 str(tiny_model_dir), "--json", *FAST])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["counts"] == {"done": 2, "skipped": 0, "failed": 0}
    assert load_cartridge(out / "a.lcc").slots > 0 and load_cartridge(out / "b.lcc").slots > 0
