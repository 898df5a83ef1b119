"""Comments and docstrings speak of the code: no paths outside the repository, no ticket numbers.
A reader of a clone has neither the notes folder nor the tracker, so a reason is stated where it
applies (literature is cited by paper; an upstream bug as owner/repo#N, which does not match)."""
import ast
import io
import re
import subprocess
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE = re.compile(r"shared/research|\bresearch/\w+\.md|DESIGN\.md|\bissue #?\d+|(?<![\w/#])#\d+\b", re.IGNORECASE)
FOLDERS = ("stride_diffusion", "benchmarks", "scripts", "tests", "docker", "deploy", "docs")


def _files():
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", *FOLDERS, "compose.yaml",
                          "README.md"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in sorted(set(out.stdout.split())):
        p = ROOT / name
        if p.is_file() and (p.suffix in (".py", ".sh", ".yaml", ".yml", ".md") or p.name.startswith("Dockerfile")):
            yield p


def _prose(p: Path):
    """(line number, text) of what a reader reads as prose: comments and docstrings in Python, the
    text after '#' in shell and YAML, all of Markdown."""
    text = p.read_text()
    if p.suffix == ".md":
        yield from enumerate(text.splitlines(), 1)
    elif p.suffix == ".py":
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type == tokenize.COMMENT:
                yield tok.start[0], tok.string
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
                d = node.body[0]
                if isinstance(d, ast.Expr) and isinstance(d.value, ast.Constant) and isinstance(d.value.value, str):
                    for k, line in enumerate(d.value.value.splitlines()):
                        yield d.lineno + k, line
    else:
        for i, line in enumerate(text.splitlines(), 1):
            if "#" in line:
                yield i, line[line.index("#") + 1:]


def test_no_comment_points_outside_the_repository():
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()[:120]}"
            for p in _files() for i, line in _prose(p) if OUTSIDE.search(line)]
    assert not hits, "\n".join(hits)
