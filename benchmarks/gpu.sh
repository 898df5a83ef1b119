#!/usr/bin/env bash
# Every GPU check in one run: correctness on the device first, then the CUDA benchmarks, each part
# on its own with a time limit, a summary table at the end. For an H100/H200 machine that may reach
# no package registry (--wheelhouse): the whole run stays within --budget, whatever fails.
#
#   bash benchmarks/gpu.sh                          # on the GPU machine, from anywhere
#   bash benchmarks/gpu.sh --wheelhouse .whl        # install what the imports miss from local wheels
#   bash benchmarks/gpu.sh --smoke                  # tiny sizes on the CPU, no installs (= STRIDE_GPU_SMOKE=1)
#   bash benchmarks/gpu.sh --dry-run                # the full run's control flow on the CPU at smoke sizes
#
# Parts, in order (each a process of its own under `timeout`; a failing part is recorded, the next runs):
#   setup        the imports the run needs (torch, triton, the service, diffusers, httpx); installs
#                only what is missing: from --wheelhouse (pip --no-index), else from a registry;
#                the GPU, the versions, redis-server (optional: without it the service runs embedded)
#   check        benchmarks/gpu_check.py: the Triton kernel vs torch on the device, CUDA graphs vs
#                eager, the served DiT on the device vs the CPU reference, one request per adapter kind
#                through the service                               -> check.{md,json}
#   update-fp32  the fused update kernel vs a device-to-device copy, fp32 model outputs
#   update-bf16  the same with bf16 model outputs                  -> solver_update_{fp32,bf16}_cuda.{md,json}
#   network      DiT-XL/2 step time by batch, eager vs CUDA graphs, fp32 (TF32) vs bf16, utilisation;
#                SD VAE decode; encode                             -> realsize_net_cuda.{md,json}
#   service      the executor's ceiling at 1/2/4/8 steps, and the service at concurrency 64: mixed
#                1/2/4/8 steps unguided, and guided (w 1.5 or 4 per request), PNG, p50/p99 per step
#                count (embedded; Redis too when redis-server is there)
#                                                                  -> realsize_service_cuda(_service).{md,json}
#   fp8          DiT-XL/2 with --dtype fp8 (torchao float8, row-wise) vs bf16: network call by batch
#                (CUDA graphs), final latents' RMS difference on the same seeds (4 steps, CFG 4);
#                needs sm_89+ and torchao (optional in setup)  -> fp8_cuda.{md,json}
#   compile      DiT-XL/2 bf16 compiled per bucket (inductor, fused q/k/v) + CUDA graphs against the
#                graphs-only rows, with compile time, the attention kernel checked and the largest
#                difference from eager; the SD VAE and a TAESD-layout tiny decoder, channels_last and
#                compiled                                          -> realsize_compile_cuda.{md,json}
#   peers        diffusers' DiTPipeline on the same DiT-XL/2 + SD VAE, DPM-Solver++ 2M, 4 steps, CFG 4:
#                one request at a time, its best batch, compiled as diffusers' guide shows (max-autotune,
#                fullgraph); and stride's service at concurrency 64 on the same weights, images/s
#                and p50/p99, stride / peer per row                -> peers_cuda.{md,json}
#
# Everything goes to one folder (--out; default benchmarks/results/gpu-<UTC date-time>): the
# reports above, <part>.log for each part, env.txt, summary.md and summary.json (part, status
# PASS/FAIL/TIMEOUT/SKIP, seconds); and, with --archive PATH (default <folder>.tar.gz on a GPU run),
# one .tar.gz of the folder. The exit status is 0 only when every selected part passed.
#
# Options:
#   --smoke            CPU, tiny sizes, no installs (STRIDE_GPU_SMOKE=1 too): the test suite's run
#   --dry-run          CPU, tiny sizes, but the GPU run's control flow: setup checks the imports and
#                      runs the offline pip command with --dry-run (against --wheelhouse, else an empty
#                      folder), installing nothing
#   --wheelhouse DIR   local wheels (scripts/fetch_wheelhouse.sh) for what the imports miss
#   --install-project  also `pip install --no-build-isolation --no-deps -e .` (the `stride` command);
#                      without it the project is imported from this checkout (PYTHONPATH)
#   --out DIR          the results folder (STRIDE_GPU_OUT too)
#   --archive PATH     write the folder as PATH (.tar.gz); --no-archive: none
#   --only a,b         run only these parts (the others are SKIP)
#   --limit part=s     that part's time limit in seconds (repeatable)
#   --budget s         the whole run's seconds (GPU run: 570, under a 10-minute command limit); a part
#                      gets at most what is left. A cold compile takes minutes: when compile and peers
#                      are cut, run them on their own: --only compile,peers
#   --verbose          show every part's output as it runs (always in <part>.log)
# Test hooks: STRIDE_GPU_FAIL=part[,part] makes those parts fail at once, STRIDE_GPU_HANG=part[,part]
# makes them hang until their limit (2 s) runs out.
# shellcheck disable=SC2054  # commas inside arguments (--batches 1,2) are no array separators
set -uo pipefail
CALLER=$PWD  # relative --out, --archive and --wheelhouse paths are the caller's
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
abs() { case $1 in /*) echo "$1" ;; *) echo "$CALLER/$1" ;; esac; }
export LC_NUMERIC=C  # a '.' in $EPOCHREALTIME

MODE=gpu
[ "${STRIDE_GPU_SMOKE:-0}" = 1 ] && MODE=smoke
OUT=${STRIDE_GPU_OUT:-}
WH=${STRIDE_GPU_WHEELHOUSE:-}
ARCHIVE=default ONLY='' BUDGET='' VERBOSE=0 INSTALL_PROJECT=0
PARTS=(setup check update-fp32 update-bf16 network service fp8 compile peers)
# seconds per part on a GPU; their sum exceeds the budget on purpose: a part that finishes early leaves
# its time to the later ones, and none starts with more than the budget has left
declare -A LIMIT=([setup]=60 [check]=90 [update-fp32]=30 [update-bf16]=30 [network]=90 [service]=150 [fp8]=60
                  [compile]=240 [peers]=300)
declare -A LIMIT_SET=()

usage() { sed -n '2,/^# shellcheck/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case $1 in
        --smoke) MODE=smoke ;;
        --dry-run) MODE=dry ;;
        --wheelhouse) WH=$2; shift ;;
        --install-project) INSTALL_PROJECT=1 ;;
        --out) OUT=$2; shift ;;
        --archive) ARCHIVE=$2; shift ;;
        --no-archive) ARCHIVE= ;;
        --only) ONLY=$2; shift ;;
        --limit) LIMIT_SET[${2%%=*}]=${2#*=}; shift ;;
        --budget) BUDGET=$2; shift ;;
        --verbose) VERBOSE=1 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ "$MODE" != gpu ]; then  # CPU: generous limits (2 shared cores), the parts run at tiny sizes
    for p in "${PARTS[@]}"; do LIMIT[$p]=300; done
    BUDGET=${BUDGET:-1800}
fi
BUDGET=${BUDGET:-570}
for p in "${!LIMIT_SET[@]}"; do
    [ -n "${LIMIT[$p]+x}" ] || { echo "--limit: no part '$p'; parts: ${PARTS[*]}" >&2; exit 2; }
    LIMIT[$p]=${LIMIT_SET[$p]}
done
if [ -n "$ONLY" ]; then
    for p in ${ONLY//,/ }; do
        [ -n "${LIMIT[$p]+x}" ] || { echo "--only: no part '$p'; parts: ${PARTS[*]}" >&2; exit 2; }
    done
fi

[ -n "$OUT" ] && OUT=$(abs "$OUT")
[ -n "$WH" ] && WH=$(abs "$WH")
case $ARCHIVE in default|'') ;; *) ARCHIVE=$(abs "$ARCHIVE") ;; esac
stamp=$(date -u +%Y%m%d-%H%M%S)
if [ -z "$OUT" ]; then
    if [ "$MODE" = gpu ]; then OUT=benchmarks/results/gpu-$stamp; else OUT=${TMPDIR:-/tmp}/stride-gpu-$MODE-$stamp; fi
fi
[ "$ARCHIVE" = default ] && { if [ "$MODE" = gpu ]; then ARCHIVE=$OUT.tar.gz; else ARCHIVE=; fi; }
mkdir -p "$OUT" || exit 2
OUT=$(cd "$OUT" && pwd)
if [ -n "$WH" ]; then
    [ -d "$WH" ] || { echo "--wheelhouse $WH: no such folder" >&2; exit 2; }
    WH=$(cd "$WH" && pwd)
fi

PY=${PYTHON:-python3}
# the project from this checkout, whether or not it is installed
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export MODE OUT WH PY ROOT INSTALL_PROJECT

T0=$EPOCHREALTIME
elapsed() { awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.0f", b - a }'; }
say() { echo "== $(elapsed) s: $*"; }

# -- the parts (each runs in a fresh bash under `timeout`, with the variables exported above) ------

part_setup() {
    reqs=("torch>=2.4" "triton>=3.0") opt=()
    while read -r line; do
        case $line in *"# optional"*) optional=1 ;; *) optional=0 ;; esac
        line=${line%%#*}; line=$(echo "$line" | xargs)
        [ -n "$line" ] || continue
        if [ "$optional" = 1 ]; then opt+=("$line"); else reqs+=("$line"); fi
    done < "$ROOT/benchmarks/gpu_requirements.txt"
    missing() {  # the requirements whose import fails or whose version is outside the range
        "$PY" - "$@" <<'EOF'
import importlib, importlib.metadata as md, re, sys
try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement
MODULE = {"pillow": "PIL", "prometheus-client": "prometheus_client", "pydantic-settings": "pydantic_settings"}
for spec in sys.argv[1:]:
    req = Requirement(spec)
    try:
        importlib.import_module(MODULE.get(req.name.lower(), req.name.replace("-", "_")))
        ok = not req.specifier or req.specifier.contains(re.sub(r"\+.*", "", md.version(req.name)), prereleases=True)
    except Exception:
        ok = False
    if not ok:
        print(spec)
EOF
    }
    echo "python: $("$PY" -c 'import sys; print(sys.version.split()[0], sys.executable)')"
    echo "pip: $("$PY" -m pip --version 2>&1)"
    need=$(missing "${reqs[@]}")
    if [ -z "$need" ]; then
        echo "every import works: installing nothing"
        if [ "$MODE" = dry ]; then  # the GPU run's offline command, resolving against what is installed
            idx=${WH:-$(mktemp -d)}
            echo "dry run: pip install --dry-run --no-index --find-links $idx (${#reqs[@]} requirements)"
            "$PY" -m pip install --dry-run --no-index --find-links "$idx" "${reqs[@]}" || exit 1
        fi
    else
        echo "missing or outside the required range: $(echo $need)"
        if [ "$MODE" = smoke ]; then
            echo "a smoke run installs nothing"; exit 1
        elif [ -n "$WH" ]; then
            echo "installing from the wheelhouse $WH (no index)"
            # shellcheck disable=SC2086
            "$PY" -m pip install -q --no-index --find-links "$WH" $need || exit 1
        elif [ "$MODE" = dry ]; then
            echo "dry run: nothing is installed; pass --wheelhouse DIR"; exit 1
        else
            echo "no --wheelhouse: installing from the package registry"
            # shellcheck disable=SC2086
            "$PY" -m pip install -q --retries 1 --timeout 15 $need || exit 1
        fi
        still=$(missing "${reqs[@]}")
        [ -z "$still" ] || { echo "still missing: $(echo $still)"; exit 1; }
    fi
    need=$(missing "${opt[@]}")  # optional: a part that needs one reports what is missing
    if [ -n "$need" ]; then
        echo "optional, missing: $(echo $need)"
        if [ "$MODE" = gpu ]; then
            # shellcheck disable=SC2086
            if [ -n "$WH" ]; then "$PY" -m pip install -q --no-index --find-links "$WH" $need
            else "$PY" -m pip install -q --retries 1 --timeout 15 $need; fi || echo "not installed (the part says so)"
        fi
    fi
    if [ "$INSTALL_PROJECT" = 1 ]; then
        if [ "$MODE" = dry ]; then
            "$PY" -m pip install --dry-run --no-index --no-build-isolation --no-deps -e "$ROOT" || exit 1
        else
            "$PY" -m pip install -q --no-index ${WH:+--find-links "$WH"} --no-build-isolation --no-deps -e "$ROOT" \
                || exit 1
        fi
    fi
    "$PY" -c "import stride_diffusion.solvers.executor, stride_diffusion.service.app, stride_diffusion.offline.importer, stride_diffusion.cli" || exit 1
    echo "the project imports from $ROOT"
    command -v redis-server >/dev/null && echo "redis-server: $(command -v redis-server)" \
        || echo "redis-server not found: the service part runs in embedded mode only"
    {
        echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')"
        echo "commit: $(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)"
        echo "mode: $MODE"
        echo "host: $(uname -srm), $(nproc) cores"
        "$PY" - <<'EOF'
import platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| CUDA", torch.version.cuda)
for m in ("triton", "diffusers", "fastapi", "pydantic", "numpy", "torchao"):
    try:
        print(m, __import__(m).__version__)
    except Exception as e:
        print(m, "missing:", e)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("GPU", p.name, f"{p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, capability {p.major}.{p.minor}")
else:
    print("GPU none visible to torch")
EOF
        command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
            --format=csv,noheader
    } > "$OUT/env.txt" 2>&1
    cat "$OUT/env.txt"
    if [ "$MODE" = gpu ]; then
        "$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" \
            || { echo "torch sees no CUDA device: the GPU parts cannot run"; exit 1; }
    fi
}

if [ "$MODE" = gpu ]; then
    DEV=(--device cuda)
    CHECK=()
    UPD=()
    NET=(--dits XL/2 --min-seconds 0.3 --batches-cuda 1,8,32,64,128 --decode-batches 1,8)
    # max batch 128 rows: 64 guided images (2 rows each) fit one call, as in the ceiling at occupancy 64
    SVC=(--concurrency 64 --duration 8 --warmup 3 --ceiling-seconds 2 --ceiling-occupancy 64 --max-batch 128)
    FP8=(--dit XL/2 --batches 8,64,128 --samples 16)
    COMP=(--dits XL/2 --dtypes bf16 --min-seconds 0.3 --batches-cuda 8,64,128 --decode-batches 1,8,32
          --decoders vae,vae-cl,vae-compiled,tiny,tiny-compiled)
    PEERS=(--batches 1,8,32,64 --seconds 4 --compile-batches 1,best --concurrency 64 --duration 8 --warmup 3)
else  # the same commands at tiny sizes on the CPU; the update runs the Triton kernel interpreted
    DEV=(--device cpu)
    CHECK=(--update triton --tiny)
    UPD=(--tiny --triton)
    NET=(--tiny --min-seconds 0.02 --batches 1,2)
    SVC=(--tiny --min-seconds 0.02 --concurrency 2 --duration 1 --warmup 0.3 --ceiling-seconds 0.3
         --ceiling-occupancy 2 --max-batch 4)
    FP8=(--tiny --batches 1,2 --samples 2 --min-seconds 0.02 --allow-refusal)  # refused off sm_89+: bf16 rows only
    COMP=(--tiny --min-seconds 0.02 --batches 2 --decode-batches 1,2 --decoders vae,tiny-compiled)
    PEERS=(--tiny --seconds 0.3 --concurrency 2 --duration 1 --warmup 0.3 --ceiling-seconds 0.2 --max-batch 4)
fi
# inductor's compiled code, kept between runs on this machine (a second run compiles in seconds)
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/stride-inductor}
MODES=embedded
if [ "$MODE" = gpu ] && command -v redis-server >/dev/null; then MODES=embedded,redis; fi

set_cmd() {  # CMD: the command line of a part
    case $1 in
        setup) CMD=(bash -c "$(declare -f part_setup); part_setup") ;;
        check) CMD=("$PY" benchmarks/gpu_check.py "${DEV[@]}" "${CHECK[@]}" --out "$OUT/check.md") ;;
        update-fp32) CMD=("$PY" benchmarks/solver_update.py "${DEV[@]}" "${UPD[@]}" --dtype float32 --ddtype float32
                          --out "$OUT/solver_update_fp32_cuda.md") ;;
        update-bf16) CMD=("$PY" benchmarks/solver_update.py "${DEV[@]}" "${UPD[@]}" --dtype float32 --ddtype bfloat16
                          --out "$OUT/solver_update_bf16_cuda.md") ;;
        network) CMD=("$PY" benchmarks/realsize.py "${DEV[@]}" "${NET[@]}" --parts network,decode,encode
                      --out "$OUT/realsize_net_cuda.md") ;;
        service) CMD=("$PY" benchmarks/realsize.py "${DEV[@]}" "${SVC[@]}" --parts ceiling,service --modes "$MODES"
                      --guidance 1,1.5/4 --out "$OUT/realsize_service_cuda.md") ;;
        fp8) CMD=("$PY" benchmarks/fp8.py "${DEV[@]}" "${FP8[@]}" --out "$OUT/fp8_cuda.md") ;;
        compile) CMD=("$PY" benchmarks/realsize.py "${DEV[@]}" "${COMP[@]}" --parts network,decode --compile --fuse-qkv
                      --out "$OUT/realsize_compile_cuda.md") ;;
        peers) CMD=("$PY" benchmarks/peers.py "${DEV[@]}" "${PEERS[@]}" --out "$OUT/peers_cuda.md") ;;
    esac
}

in_list() { case ",$2," in *",$1,"*) return 0 ;; *) return 1 ;; esac; }

NAMES=() STATUS=() SECS=() NOTES=()
record() { NAMES+=("$1"); STATUS+=("$2"); SECS+=("$3"); NOTES+=("$4"); }

run_part() {
    local name=$1 limit=${LIMIT[$1]} note='' rc=0 t0 secs left
    if [ -n "$ONLY" ] && ! in_list "$name" "$ONLY"; then record "$name" SKIP 0 "not in --only"; return; fi
    left=$(( BUDGET - $(elapsed) - 5 ))
    if [ "$left" -lt 5 ]; then
        record "$name" SKIP 0 "no time left in the ${BUDGET} s budget"; say "$name: SKIP (no time left)"; return
    fi
    if [ "$left" -lt "$limit" ]; then limit=$left; note="limit cut to ${left} s by the budget"; fi
    local cmd
    set_cmd "$name"
    cmd=("${CMD[@]}")
    if [ -n "${STRIDE_GPU_FAIL:-}" ] && in_list "$name" "$STRIDE_GPU_FAIL"; then
        cmd=(bash -c 'echo "failing on purpose (STRIDE_GPU_FAIL)"; exit 3'); note="STRIDE_GPU_FAIL"
    fi
    if [ -n "${STRIDE_GPU_HANG:-}" ] && in_list "$name" "$STRIDE_GPU_HANG"; then
        cmd=(sleep 600); limit=2; note="STRIDE_GPU_HANG"
    fi
    say "$name (limit ${limit} s)"
    t0=$EPOCHREALTIME
    if [ "$VERBOSE" = 1 ]; then
        timeout --kill-after=10 "$limit" "${cmd[@]}" 2>&1 | tee "$OUT/$name.log"
        rc=${PIPESTATUS[0]}
    else
        timeout --kill-after=10 "$limit" "${cmd[@]}" > "$OUT/$name.log" 2>&1
        rc=$?
    fi
    secs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    local status=PASS
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=TIMEOUT; note="${note:+$note; }killed after ${limit} s"
    elif [ "$rc" != 0 ]; then status=FAIL; note="${note:+$note; }exit status $rc"; fi
    record "$name" "$status" "$secs" "$note"
    if [ "$name" = check ]; then grep -E '^(PASS|FAIL) ' "$OUT/$name.log"; fi
    if [ "$status" != PASS ] && [ "$VERBOSE" != 1 ]; then
        echo "--- the last lines of $OUT/$name.log:"; tail -n 25 "$OUT/$name.log"; echo "---"
    fi
    say "$name: $status in $secs s"
}

say "stride GPU run ($MODE), results in $OUT, budget ${BUDGET} s"
for p in "${PARTS[@]}"; do run_part "$p"; done

# -- summary ---------------------------------------------------------------------------------------
total=$(awk -v a="$T0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
fail=0
{
    echo "# GPU run summary ($MODE)"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC'); total ${total} s of a ${BUDGET} s budget"
    echo "- folder: $OUT"
    echo
    echo "| part | status | seconds | note |"
    echo "|---|---|---:|---|"
    for i in "${!NAMES[@]}"; do
        echo "| ${NAMES[$i]} | ${STATUS[$i]} | ${SECS[$i]} | ${NOTES[$i]} |"
    done
    if [ -f "$OUT/peers_cuda.md" ]; then  # the side by side: stride's service over each peer row
        echo
        echo "stride beside diffusers (peers_cuda.md):"
        echo
        sed -n '/^| who /,/^$/p' "$OUT/peers_cuda.md"
    fi
} > "$OUT/summary.md"
{
    printf '{"mode": "%s", "total_seconds": %s, "budget_seconds": %s, "parts": [' "$MODE" "$total" "$BUDGET"
    for i in "${!NAMES[@]}"; do
        [ "$i" -gt 0 ] && printf ', '
        printf '{"part": "%s", "status": "%s", "seconds": %s, "note": "%s"}' \
            "${NAMES[$i]}" "${STATUS[$i]}" "${SECS[$i]}" "${NOTES[$i]//\"/\'}"
    done
    printf ']}\n'
} > "$OUT/summary.json"
for i in "${!NAMES[@]}"; do
    case ${STATUS[$i]} in
        FAIL|TIMEOUT) fail=1 ;;
        SKIP) [ "${NOTES[$i]}" = "not in --only" ] || fail=1 ;;
    esac
done
if [ -n "$ARCHIVE" ]; then
    mkdir -p "$(dirname "$ARCHIVE")"
    tar -czf "$ARCHIVE" -C "$(dirname "$OUT")" "$(basename "$OUT")" && echo "archive: $ARCHIVE"
fi
echo
cat "$OUT/summary.md"
exit $fail
