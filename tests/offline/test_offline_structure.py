"""offline/'s shape: no import cycle between its modules (imports inside functions included), no
private name imported from another module, and every subcommand registered one way (its module's
`add_parser` sets `func`)."""
import argparse
import ast
from pathlib import Path

import stride_diffusion
from stride_diffusion.offline import cli

ROOT = Path(stride_diffusion.__file__).parent
OFFLINE = ROOT / "offline"


def offline_imports() -> dict:
    """module -> the offline modules it imports, from every import statement at any depth."""
    mods = {p.stem for p in OFFLINE.glob("*.py")}
    graph = {}
    for m in mods:
        out = set()
        for node in ast.walk(ast.parse((OFFLINE / f"{m}.py").read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level == 0 and not base.startswith("stride_diffusion.offline"):
                    continue
                base = base.removeprefix("stride_diffusion.offline").lstrip(".")
                out |= {a.name for a in node.names} if not base else {base.split(".")[0]}
            elif isinstance(node, ast.Import):
                out |= {a.name.split(".")[2] for a in node.names if a.name.startswith("stride_diffusion.offline.")}
        graph[m] = (out & mods) - {m}
    return graph


def cycle(graph: dict) -> list | None:
    state, stack = {}, []

    def visit(u):
        state[u] = "open"
        stack.append(u)
        for v in sorted(graph[u]):
            if state.get(v) == "open":
                return stack[stack.index(v):] + [v]
            if v not in state and (found := visit(v)):
                return found
        stack.pop()
        state[u] = "done"
        return None

    for u in sorted(graph):
        if u not in state and (found := visit(u)):
            return found
    return None


def test_offline_has_no_import_cycle():
    graph = offline_imports()
    assert {"fitting", "protocol", "argtypes"} <= set(graph)
    assert cycle(graph) is None, f"import cycle: {' -> '.join(cycle(graph))}"
    assert cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]  # the check itself finds one


def test_no_private_name_is_imported_across_modules():
    found = []
    for f in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("stride_diffusion")):
                found += [f"{f.relative_to(ROOT)}: {a.name}" for a in node.names
                          if a.name.startswith("_") and not a.name.startswith("__")]
    assert not found


def test_every_subcommand_sets_its_runner():
    p = cli.parser()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    assert list(sub.choices) == ["train", "train-classifier", "eval", "import", "search", "dode", "grids",
                                 "eval-guidance", "secant"]
    for name, sp in sub.choices.items():
        assert callable(sp.get_default("func")), name
