"""docs/results.md and the README's headline table are what scripts/results_doc.py generates from the
artifacts' eval.json, their secant files and benchmarks/results/*.json: a re-measurement or an edit
of scripts/results_template.md that is not followed by `python scripts/results_doc.py --write`
fails here, so the documents cannot drift from the measurements."""
import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def gen():
    spec = importlib.util.spec_from_file_location("results_doc", ROOT / "scripts" / "results_doc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_results_md_is_the_generated_document(gen):
    committed = (ROOT / "docs" / "results.md").read_text()
    assert committed == gen.render(), "docs/results.md is stale: run python scripts/results_doc.py --write"


def test_readme_headline_table_is_generated(gen):
    readme = (ROOT / "README.md").read_text()
    assert gen.HEAD_BEGIN in readme and gen.HEAD_END in readme
    assert readme == gen.readme_with_headline(readme), \
        "the README's headline table is stale: run python scripts/results_doc.py --write"
    block = readme.split(gen.HEAD_BEGIN)[1].split(gen.HEAD_END)[0]
    # one row per step count the demo models' eval.json has a pick for, naming that pick
    for a in gen.MODELS:
        for n, best in gen.ev(a)["best"].items():
            row = re.search(rf"^\| {n} \|.*$", block, re.MULTILINE)
            assert row and f"`{best['solver']}`" in row.group(0), (a, n)


def test_every_placeholder_is_filled_and_every_table_is_well_formed(gen):
    doc = gen.render()
    assert "{{" not in doc and "}}" not in doc
    tables = 0
    for block in re.split(r"\n(?!\|)", doc):  # runs of lines that start with '|'
        rows = [r for r in block.splitlines() if r.startswith("|")]
        if len(rows) < 2:
            continue
        tables += 1
        widths = {r.count("|") - r.count("\\|") for r in rows}
        assert len(widths) == 1, f"ragged table:\n{block}"
    assert tables >= 20


def test_an_unknown_placeholder_is_an_error(gen, monkeypatch, tmp_path):
    t = tmp_path / "template.md"
    t.write_text("{{no_such_table artifacts/digits}}\n")
    monkeypatch.setattr(gen, "TEMPLATE", t)
    with pytest.raises(KeyError, match="no_such_table"):
        gen.render()


def test_check_mode_agrees(gen):
    assert gen.main(["--check"]) == 0
