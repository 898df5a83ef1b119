"""benchmarks/gpu.sh at tiny sizes on the CPU (STRIDE_GPU_SMOKE=1): every step of the script and the
Python it calls runs, so the script a GPU session runs cannot rot."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_gpu_script_smoke(tmp_path):
    env = {**os.environ, "STRIDE_GPU_SMOKE": "1", "STRIDE_GPU_OUT": str(tmp_path), "PYTHON": sys.executable,
           "PYTHONPATH": ROOT}
    p = subprocess.run(["bash", "benchmarks/gpu.sh"], check=False, cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    names = {f.name for f in tmp_path.iterdir()}
    for stem in ("solver_update_fp32_cuda", "solver_update_bf16_cuda", "realsize_net_cuda", "realsize_service_cuda",
                 "realsize_service_cuda_service"):
        assert {f"{stem}.md", f"{stem}.json"} <= names, names
    net = json.loads((tmp_path / "realsize_net_cuda.json").read_text())
    assert [r["batch"] for r in net["network"]] == [1, 2] and all(r["gflop_per_image"] > 0 for r in net["network"])
    assert net["decode"][0]["image_shape"] == [3, 64, 64] and {r["format"] for r in net["encode"]} == \
        {"png", "jpeg", "webp", "json"}
    svc = json.loads((tmp_path / "realsize_service_cuda.json").read_text())
    assert [r["steps"] for r in svc["ceiling"]["rows"]] == [1, 2, 4, 8]
    (row,) = svc["service"]
    assert row["steps"] == "mixed" and row["errors"] == 0 and row["measured"] > 0 and row["ratio"] > 0
    assert set(row["split_ms_per_image"]) >= {"step: network + update", "decode + copy", "encode (pool, incl. wait)"}
