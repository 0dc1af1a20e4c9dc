"""The embedded corpus: the running Python's own standard-library `.py` source.

No model or data set can be downloaded on the machines this project runs on, but every
machine with Python carries ~12 MB of real, varied, human-written code in its stdlib. That is
the default corpus for the CPU demo (parent training, BLD, scoring, GKD).

What is in it (decided here, on purpose):
  * every `*.py` file under `sysconfig.get_paths()["stdlib"]`, walked in sorted order;
  * EXCLUDED: `site-packages`/`dist-packages` (third-party, differs per machine),
    `__pycache__`, the test suites (any directory named `test`, `tests` or `idle_test`:
    `test/`, `idlelib/idle_test`, `lib2to3/tests`, `ctypes/test`, `unittest/test`,
    `tkinter/test`, `distutils/tests`), `_sysconfigdata_*.py` and `config-*/` (generated at
    build time with the build machine's paths), and any file that does not decode as UTF-8.
    Test suites are excluded because Debian/Ubuntu ship them in a separate package (so the
    corpus would differ between two machines with the same Python version) and because they
    hold deliberately odd data (bad encodings, Python 2 fixtures, megabyte-long generated
    literals). `include_tests=True` puts them back (~2.3x more text) for a bigger corpus.
  * Split: document-level, by a stable hash (sha256) of the POSIX relative path, so the
    assignment depends neither on filesystem order nor on the machine; ~2% held out.

The Python version is part of the corpus identity (3.11.7's stdlib is not 3.12's);
`stdlib_stats()` records it together with a content fingerprint, and anything trained on this
corpus should store that record.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import sysconfig
from functools import lru_cache
from pathlib import Path
from typing import Iterator

# 200 of 10000 hash buckets -> 2% of files held out.
HELDOUT_BUCKETS = 200
TOTAL_BUCKETS = 10_000
SPLITS = ("train", "heldout", "all")

_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}
_TEST_DIRS = {"test", "tests", "idle_test"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def python_version() -> str:
    return platform.python_version()


def heldout_bucket(key: str) -> int:
    """Stable bucket in [0, TOTAL_BUCKETS) for a document key (relative path or content)."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") % TOTAL_BUCKETS


def is_heldout(key: str) -> bool:
    return heldout_bucket(key) < HELDOUT_BUCKETS


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _excluded_dir(name: str, include_tests: bool) -> bool:
    if name in _SKIP_DIRS or name.startswith("config-"):
        return True
    if not include_tests and name in _TEST_DIRS:
        return True
    return False


@lru_cache(maxsize=8)
def _scan(root: str, include_tests: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(kept relative paths, skipped-as-non-UTF-8 relative paths), both sorted.

    Cached per process: the scan reads every file once (~50 ms for 12 MB) to apply the
    UTF-8 rule, and callers ask for several splits.
    """
    rootp = Path(root)
    kept: list[str] = []
    skipped: list[str] = []
    for dirpath, dirnames, filenames in os.walk(rootp):
        rel_dir = Path(dirpath).relative_to(rootp)
        # Prune in place so os.walk never descends into excluded trees; sort for determinism
        # (the final list is sorted anyway, this just makes the walk itself reproducible).
        dirnames[:] = sorted(d for d in dirnames if not _excluded_dir(d, include_tests))
        for fn in sorted(filenames):
            if not fn.endswith(".py") or fn.startswith("_sysconfigdata_"):
                continue
            rel = (rel_dir / fn).as_posix()
            try:
                (rootp / rel).read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                skipped.append(rel)
                continue
            except OSError:  # dangling symlink, permission: not part of the corpus
                skipped.append(rel)
                continue
            kept.append(rel)
    return tuple(sorted(kept)), tuple(sorted(skipped))


def stdlib_relpaths(split: str = "train", *, include_tests: bool = False, root: str | os.PathLike | None = None) -> list[str]:
    """Sorted POSIX paths relative to the stdlib root for one split ("train"|"heldout"|"all")."""
    _check_split(split)
    kept, _ = _scan(str(root or stdlib_root()), include_tests)
    if split == "all":
        return list(kept)
    want_heldout = split == "heldout"
    return [r for r in kept if is_heldout(r) == want_heldout]


def stdlib_files(split: str = "train", *, include_tests: bool = False, root: str | os.PathLike | None = None) -> list[Path]:
    """Absolute paths of the corpus files of one split, sorted by relative path."""
    base = Path(root or stdlib_root())
    return [base / r for r in stdlib_relpaths(split, include_tests=include_tests, root=root)]


def iter_stdlib_texts(split: str = "train", *, include_tests: bool = False, root: str | os.PathLike | None = None) -> Iterator[str]:
    """The text of each corpus file of one split, in sorted relative-path order."""
    for p in stdlib_files(split, include_tests=include_tests, root=root):
        yield p.read_bytes().decode("utf-8")


def stdlib_stats(split: str = "all", *, include_tests: bool = False, root: str | os.PathLike | None = None,
                 fingerprint: bool = True) -> dict:
    """Size and identity of (one split of) the embedded corpus.

    `fingerprint` is sha256 over (relative path, file sha256) in order: two machines have the
    same corpus iff they have the same fingerprint. Store this dict with anything derived
    from the corpus (tokenizer, prepared data, parent checkpoint).
    """
    base = Path(root or stdlib_root())
    rels = stdlib_relpaths(split, include_tests=include_tests, root=root)
    _, skipped = _scan(str(base), include_tests)
    h = hashlib.sha256()
    nbytes = 0
    for r in rels:
        data = (base / r).read_bytes()
        nbytes += len(data)
        if fingerprint:
            h.update(r.encode("utf-8", "surrogateescape") + b"\0" + hashlib.sha256(data).digest())
    return {
        "corpus": "python-stdlib",
        "python_version": python_version(),
        "python_implementation": platform.python_implementation(),
        "split": split,
        "include_tests": include_tests,
        "heldout_fraction": HELDOUT_BUCKETS / TOTAL_BUCKETS,
        "files": len(rels),
        "bytes": nbytes,
        "skipped_non_utf8": len(skipped),
        "fingerprint": h.hexdigest() if fingerprint else None,
        "root": str(base),  # informational only: not part of the identity
    }


if __name__ == "__main__":  # quick look: python -m megapuzzle.data.corpus
    import json

    for s in SPLITS:
        print(json.dumps(stdlib_stats(s), indent=None))
    print(sys.version)
