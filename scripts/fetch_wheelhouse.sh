#!/usr/bin/env bash
# Download the wheels benchmarks/gpu.sh needs, for a GPU machine that reaches no package registry.
# Run it where a registry is reachable; carry the folder to the GPU machine and run
# `bash benchmarks/gpu.sh --wheelhouse DIR` there (docs/gpu.md).
#
#   bash scripts/fetch_wheelhouse.sh --no-torch .whl     # the usual: the GPU image has torch + triton
#   bash scripts/fetch_wheelhouse.sh .whl                # torch and triton too (CUDA torch: gigabytes)
#
# Options:
#   --no-torch            leave torch and triton out (a CUDA image ships its own; PyPI's are gigabytes)
#   --python-version V    the GPU machine's Python (default 3.12)
#   --glibc 2.N           the newest manylinux_2_N tag accepted (default 2.28); the machine's glibc
#                         must be at least this (`ldd --version` there)
#   --no-project          leave out setuptools + wheel (needed only to `pip install -e .` offline)
#   --skip a,b            remove these distributions' wheels after the download: the GPU machine has
#                         them (pip there uses what is installed when it satisfies the requirements)
#   --slim                --skip numpy,pillow,hf-xet,pyyaml,regex: large, and on every CUDA torch image
#                         (the device tool carries at most 64 MiB with the repository; the full set is
#                         about 42 MB, slim about 14 MB)
#
# Wheels only (--only-binary=:all:), for CPython on x86-64 Linux: nothing is built here or there.
# pip resolves the whole dependency tree, so the folder also holds packages the GPU image may
# already have (numpy, pillow, ...); gpu.sh installs only what its imports miss, and pip keeps what
# is installed when it satisfies the requirements.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
PYV=3.12 GLIBC=2.28 TORCH=1 PROJECT=1 DEST='' SKIP=''
while [ $# -gt 0 ]; do
    case $1 in
        --no-torch) TORCH=0 ;;
        --no-project) PROJECT=0 ;;
        --python-version) PYV=$2; shift ;;
        --glibc) GLIBC=$2; shift ;;
        --skip) SKIP=${SKIP:+$SKIP,}$2; shift ;;
        --slim) SKIP=${SKIP:+$SKIP,}numpy,pillow,hf-xet,pyyaml,regex ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) echo "unknown option $1 (see --help)" >&2; exit 2 ;;
        *) DEST=$1 ;;
    esac
    shift
done
DEST=${DEST:-.whl}
mkdir -p "$DEST"

reqs=()
while read -r line; do
    line=${line%%#*}
    line=$(echo "$line" | xargs)
    [ -n "$line" ] && reqs+=("$line")
done < benchmarks/gpu_requirements.txt
[ "$TORCH" = 1 ] && reqs+=("torch>=2.4" "triton>=3.0")
[ "$PROJECT" = 1 ] && reqs+=("setuptools>=68" "wheel")

# pip matches manylinux tags exactly: name every glibc from 2.17 (manylinux2014) to --glibc
max=${GLIBC#2.}
plats=(--platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64)
for ((n = 17; n <= max; n++)); do plats+=(--platform "manylinux_2_${n}_x86_64"); done

echo "downloading ${#reqs[@]} requirements and their dependencies for CPython $PYV, glibc >= 2.$max, into $DEST"
"$PY" -m pip download -q --only-binary=:all: --implementation cp --python-version "$PYV" "${plats[@]}" \
    -d "$DEST" "${reqs[@]}"
norm() { echo "$1" | tr 'A-Z.-' 'a-z__'; }
for name in ${SKIP//,/ }; do
    for w in "$DEST"/*.whl; do
        base=$(basename "$w")
        if [ "$(norm "${base%%-*}")" = "$(norm "$name")" ]; then echo "skipping $base (--skip)"; rm -f "$w"; fi
    done
done
n=$(ls "$DEST"/*.whl | wc -l)
echo "$n wheels, $(du -sh "$DEST" | cut -f1) in $DEST"
ls "$DEST"
