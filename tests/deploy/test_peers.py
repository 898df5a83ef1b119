"""benchmarks/peers.py at tiny size on the CPU, so that the side-by-side a GPU run makes cannot rot:
diffusers' DiTPipeline one request at a time, at its best batch and compiled as diffusers' guide
shows (fullgraph; dynamo's eager backend here), and stride's service on the same weights, with
images/s, p50/p99 and the ratio per row."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_peers_tiny_smoke(tmp_path):
    pytest.importorskip("diffusers")
    out = tmp_path / "peers.md"
    p = subprocess.run([sys.executable, "benchmarks/peers.py", "--tiny", "--seconds", "0.5", "--concurrency", "2",
                        "--duration", "1.5", "--warmup", "0.3", "--ceiling-seconds", "0.2", "--max-batch", "4",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False,
                       env={**os.environ, "PYTHONPATH": ROOT})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    r = json.loads((tmp_path / "peers.json").read_text())
    names = [row["peer"] for row in r["peers"]]
    assert names[0] == "diffusers DiTPipeline, one request at a time" and r["peers"][0]["batch"] == 1
    assert names[1] == "diffusers DiTPipeline, best batch of [1, 2]" and r["peers"][1]["batch"] == r["best_batch"]
    assert [row["batch"] for row in r["peers"][2:]] == sorted({1, r["best_batch"]})  # compiled: 1 and the best
    for row in r["peers"]:
        assert row["images_per_s"] > 0 and 0 < row["p50_ms"] <= row["p99_ms"] and row["stride_over_peer"] > 0
    assert all("fullgraph" in row["peer"] and row["compile_s"] > 0 for row in r["peers"] if "compiled" in row["peer"])
    (s,) = r["stride"]
    assert s["steps"] == 4 and s["guidance"] == "4" and s["concurrency"] == 2 and s["errors"] == 0
    assert s["images_per_s"] > 0 and s["p50_ms"] <= s["p99_ms"]
    md = out.read_text()
    assert "| stride serve (embedded, PNG) | c=2 |" in md and "stride / this" in md
