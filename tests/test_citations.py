"""The project cites only what a reader can open: its own files or public sources.

Notes kept outside the repository (the team's notes folder and its recipe, pitfall,
algorithm and performance notes) are not shipped, so a docstring or doc that points to
them is a dead end for a reader.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCANNED = ("llava_jax", "configs", "convert", "docs", "benchmarks", "tests", "tpu_scripts")
UNSHIPPED = re.compile(
    r"\b(?:recipes|pitfalls|algorithms|performance)\.md\b|shared/(?:reference|seeds)"
)


def _project_text_files():
    yield from (ROOT / name for name in ("README.md", "BENCHMARKS.md"))
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in {".py", ".md", ".sh", ".toml"} and path != Path(__file__).resolve():
                yield path


def test_no_citation_of_unshipped_notes():
    found = [
        f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
        for path in _project_text_files()
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if UNSHIPPED.search(line) and not (ROOT / UNSHIPPED.search(line).group(0)).exists()
    ]
    assert not found, "cite the public source instead of:\n" + "\n".join(found)
