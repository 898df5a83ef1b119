"""benchmarks/gpu.sh on the CPU, so that the script a GPU run uses cannot rot: the smoke run
(STRIDE_GPU_SMOKE=1: every part, tiny sizes, the Triton kernel interpreted, every correctness check
of benchmarks/gpu_check.py) must pass part by part; the dry run (the GPU run's control flow: the
offline pip command, time limits) must record a failing part, a hanging part cut at its limit, and
go on to the next."""
import json
import os
import subprocess
import sys
import tarfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PARTS = ["setup", "check", "update-fp32", "update-bf16", "network", "service", "fp8", "compile", "peers"]


def gpu_sh(*args, **env):
    own = ("STRIDE_GPU_SMOKE", "STRIDE_GPU_OUT", "STRIDE_GPU_FAIL", "STRIDE_GPU_HANG", "STRIDE_GPU_WHEELHOUSE",
           "STRIDE_UPDATE")
    env = {**{k: v for k, v in os.environ.items() if k not in own}, "PYTHON": sys.executable, "PYTHONPATH": ROOT,
           **env}
    return subprocess.run(["bash", "benchmarks/gpu.sh", *args], check=False, cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)


def summary(out) -> dict:
    s = json.loads((out / "summary.json").read_text())
    return {p["part"]: p for p in s["parts"]}


@pytest.mark.slow
def test_gpu_script_smoke(tmp_path):
    p = gpu_sh(STRIDE_GPU_SMOKE="1", STRIDE_GPU_OUT=str(tmp_path))
    log = p.stdout[-4000:] + p.stderr[-3000:]
    assert p.returncode == 0, log
    parts = summary(tmp_path)
    assert list(parts) == PARTS and all(v["status"] == "PASS" for v in parts.values()), parts
    table = (tmp_path / "summary.md").read_text()
    assert "| part | status | seconds | note |" in table and all(f"| {n} | PASS |" in table for n in PARTS)
    assert "| service | PASS |" in p.stdout  # the table ends the run's output too
    names = {f.name for f in tmp_path.iterdir()}
    for stem in ("check", "solver_update_fp32_cuda", "solver_update_bf16_cuda", "realsize_net_cuda",
                 "realsize_service_cuda", "realsize_service_cuda_service", "fp8_cuda", "realsize_compile_cuda",
                 "peers_cuda"):
        assert {f"{stem}.md", f"{stem}.json"} <= names, names
    assert {f"{n}.log" for n in PARTS} | {"env.txt", "summary.md"} <= names

    # correctness first: every check ran on the CPU with the kernel interpreted, and passed
    check = json.loads((tmp_path / "check.json").read_text())
    assert check["update"] == "triton" and check["failed"] == 0
    assert {r["check"] for r in check["rows"]} == {"kernel", "graphs", "served", "service"}
    assert all(r["status"] == "PASS" for r in check["rows"])
    kinds = " ".join(r["name"] for r in check["rows"] if r["check"] == "service")
    for kind in ("stride flow", "stride VP", "DiT, learned sigma", "UNet, v-prediction", "SiT"):
        assert kind in kinds, kinds
    assert {r["name"].split()[0] for r in check["rows"] if r["check"] == "served"} == {"bfloat16", "float32"}

    upd = json.loads((tmp_path / "solver_update_bf16_cuda.json").read_text())
    assert "triton kernel" in {r["impl"] for r in upd["rows"]}  # interpreted on the CPU
    net = json.loads((tmp_path / "realsize_net_cuda.json").read_text())
    assert [r["batch"] for r in net["network"]] == [1, 2] and all(r["gflop_per_image"] > 0 for r in net["network"])
    assert net["decode"][0]["image_shape"] == [3, 64, 64] and {r["format"] for r in net["encode"]} == \
        {"png", "jpeg", "webp", "json"}
    svc = json.loads((tmp_path / "realsize_service_cuda.json").read_text())
    assert [r["steps"] for r in svc["ceiling"]["rows"]] == [1, 2, 4, 8]
    assert all(r["network_ms_per_image"] > 0 and r["update_ms_per_image"] > 0 for r in svc["ceiling"]["rows"])
    # today's mixed row and the guided one as DiT users run it: PNG, w 1.5 or 4, p50/p99 per step count
    rows = {r["guidance"]: r for r in svc["service"]}
    assert set(rows) == {"1", "1.5/4"}, rows
    for row in rows.values():
        assert row["steps"] == "mixed" and row["format"] == "png" and row["errors"] == 0 and row["measured"] > 0
        assert row["ratio"] > 0
        assert set(row["split_ms_per_image"]) >= {"step: network + update", "decode + copy", "encode (pool, incl. wait)",
                                                  "network (ceiling)", "update (ceiling)"}
        assert row["by_steps"] and set(row["by_steps"]) <= {"1", "2", "4", "8"}, row["by_steps"]
        if row["measured"] >= 40:  # steps uniform over four counts: each is there (but for 4e-5 of runs)
            assert set(row["by_steps"]) == {"1", "2", "4", "8"}, row["by_steps"]
        assert sum(b["measured"] for b in row["by_steps"].values()) == row["measured"]
        assert all(b["measured"] > 0 and 0 < b["p50_ms"] <= b["p99_ms"] for b in row["by_steps"].values())
    md = (tmp_path / "realsize_service_cuda.md").read_text()
    assert "Latency of the mixed runs by each request's step count" in md and "| embedded | 1.5/4 | 2 |" in md

    # the whole step as one graph per bucket (eager on its buffers here) gives the network-graph step's states
    steps = [r for r in check["rows"] if r["check"] == "served" and "whole-step graph" in r["name"]]
    assert len(steps) == 2 and all(r["value"] == 0 for r in steps), steps
    # fp8: refused on the CPU, saying why; bf16 timed and its latents against fp32 beside it
    f8 = json.loads((tmp_path / "fp8_cuda.json").read_text())
    assert "compute capability 8.9+" in f8["refusal"] and {r["dtype"] for r in f8["network"]} == {"bf16"}
    assert 0 < f8["latents_rel_rms"]["bf16 vs fp32"] < 0.05
    assert "fp8 not run here: --dtype fp8:" in (tmp_path / "fp8_cuda.md").read_text()

    # the compiled network against eager on the same inputs, its attention checked; the decoders compiled
    comp = json.loads((tmp_path / "realsize_compile_cuda.json").read_text())
    compiled = [r for r in comp["network"] if r["mode"].startswith("compiled")]
    assert compiled and all(r["max_abs_diff"] < 1e-3 and r["compile_s"] > 0 and r["attention"] for r in compiled)
    assert {r["decoder"] for r in comp["decode"]} == {"vae", "tiny-compiled"}
    # the peer side by side, and stride over each of its rows in the summary
    peers = json.loads((tmp_path / "peers_cuda.json").read_text())
    assert len(peers["peers"]) >= 3 and all(r["stride_over_peer"] > 0 for r in peers["peers"])
    assert peers["stride"][0]["errors"] == 0
    assert "stride beside diffusers" in table and "| stride serve (embedded, PNG) |" in table


@pytest.mark.slow
def test_gpu_script_dry_run_records_failures_and_goes_on(tmp_path):
    """--dry-run: setup runs the GPU run's offline pip command (nothing to install here); a part that
    fails is FAIL, one that hangs is killed at its limit (TIMEOUT), the next part still runs, the
    summary says so, the exit status is 1, and the folder is archived."""
    out, archive = tmp_path / "run", tmp_path / "run.tar.gz"
    p = gpu_sh("--dry-run", "--only", "setup,update-fp32,update-bf16,network", "--out", str(out),
               "--archive", str(archive), STRIDE_GPU_FAIL="update-fp32", STRIDE_GPU_HANG="update-bf16")
    log = p.stdout[-4000:] + p.stderr[-3000:]
    assert p.returncode == 1, log
    parts = summary(out)
    assert {k: v["status"] for k, v in parts.items()} == {
        "setup": "PASS", "check": "SKIP", "update-fp32": "FAIL", "update-bf16": "TIMEOUT", "network": "PASS",
        "service": "SKIP", "fp8": "SKIP", "compile": "SKIP", "peers": "SKIP"}, log
    assert parts["update-bf16"]["seconds"] < 15
    setup = (out / "setup.log").read_text()
    assert "installing nothing" in setup and "pip install --dry-run --no-index" in setup
    assert "| update-fp32 | FAIL |" in p.stdout and "| update-bf16 | TIMEOUT |" in p.stdout
    assert (out / "realsize_net_cuda.json").exists()
    with tarfile.open(archive) as t:
        assert "run/summary.md" in t.getnames()
