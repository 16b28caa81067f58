#!/usr/bin/env bash
# One-shot GPU check of radixkv on a lent GPU machine. Through the device tool, from the repository
# root, carrying the git-ignored wheels and model that bench/gpu_check.py's docstring says how to
# make (`python bench/gpu_check.py prepare`, `pip download -d .whl ...`):
#
#     run(command="bash bench/gpu_check.sh", carry=[".whl", ".gpu/small.gguf"], timeout_s=540)
#
# Steps: 1 machine and versions, 2 install, 3 Triton kernel and CUDA graph tests on the GPU, 4
# greedy radixkv vs transformers, 5 throughput, 6 the multi-process Runtime, 7 the serving
# benchmark with and without CUDA graphs (bench/gpu_check.py says what each checks). Each step is cut off by a deadline, so the summary is always printed; log and summary
# go under $OUT (default /tmp/gpu_check).
#   GPU_CHECK_STEPS     steps to run (default "kernels greedy throughput runtime serving")
#   GPU_CHECK_DEADLINE  seconds for the whole script (default 450)
#   GPU_CHECK_MODEL     the GGUF to use (default .gpu/small.gguf)
#   GPU_CHECK_DEVICE    cuda (default), or cpu to try the script without a GPU, at small sizes
#   PYTHON              the interpreter (default python3)
set -u -o pipefail

OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STEPS=${GPU_CHECK_STEPS:-kernels greedy throughput runtime serving}
DEADLINE=${GPU_CHECK_DEADLINE:-450}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
MODEL=${GPU_CHECK_MODEL:-$PWD/.gpu/small.gguf}
SUMMARY="$OUT/summary.jsonl"
: >"$SUMMARY"
declare -a RESULTS=()

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export RADIXKV_CACHE_DIR=/tmp/radixkv-cache PIP_DISABLE_PIP_VERSION_CHECK=1

if [[ $DEVICE == cpu ]]; then  # small sizes: the structure, not the speed
    GREEDY_SIZES=(--new-tokens 4)
    SPEED_SIZES=(--layers 2 --batch 4 --context 64 --prompt-len 64 --steps 4)
    SERVING_SIZES=(--groups 2 --prompts-per-group 4 --system-len 256 --output-len 8)
else
    GREEDY_SIZES=()
    SPEED_SIZES=()
    SERVING_SIZES=()
fi

want() { [[ " $STEPS " == *" $1 "* ]]; }

# run_step NAME CAP CMD...: run CMD with a timeout of min(CAP, time left), record its exit code
run_step() {
    local name=$1 cap=$2; shift 2
    local left=$((DEADLINE - SECONDS - 10))
    local limit=$((cap < left ? cap : left))
    if ((limit < 20)); then
        echo "==== $name: SKIPPED (only ${left}s left before the ${DEADLINE}s deadline)"
        RESULTS+=("$name: skipped (deadline)")
        return
    fi
    echo "==== $name (limit ${limit}s, t=${SECONDS}s): $*"
    local start=$SECONDS
    GPU_CHECK_STEP_LIMIT=$limit timeout -k 10 "$limit" "$@"
    local rc=$?
    local note=""
    ((rc == 124 || rc == 137)) && note=" (TIMED OUT)"
    echo "==== $name: exit $rc$note after $((SECONDS - start))s"
    RESULTS+=("$name: exit $rc$note, $((SECONDS - start))s")
}

versions() {
    echo "==== 1. machine ($(date -u +%FT%TZ))"
    nvidia-smi || echo "nvidia-smi failed"
    uname -m; nproc; free -g | head -2
    "$PY" -c 'import sys, torch, triton, transformers, numpy
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print("python", sys.version.split()[0], sys.executable, "| numpy", numpy.__version__)
print("torch", torch.__version__, "cuda", torch.version.cuda, gpu)
print("triton", triton.__version__, "| transformers", transformers.__version__)' \
        || echo "version probe failed"
    git log -1 --format='tree at %h %s' 2>/dev/null || true
    git status --short 2>/dev/null | head -40 || true
}

# install: the carried wheels unless they import already, then radixkv editable (pyproject.toml maps
# radixkv.kernels -> kernels/ and radixkv.scheduler -> scheduler/) unless this tree imports so
install() {
    echo "==== 2. install (t=${SECONDS}s)"
    if "$PY" -c 'import zmq, msgspec, gguf' 2>/dev/null; then
        RESULTS+=("wheels: not needed")
    elif compgen -G ".whl/*.whl" >/dev/null && timeout 120 "$PY" -m pip install -q --no-index \
        --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl; then
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
        RESULTS+=("wheels: installed to /tmp/site")
    else
        RESULTS+=("wheels: INSTALL FAILED (are the .whl/*.whl carried?)")
    fi
    local here='import os, radixkv.kernels as k, radixkv.scheduler
assert k.__file__.startswith(os.getcwd() + "/"), k.__file__'
    if "$PY" -c "$here" 2>/dev/null; then
        RESULTS+=("radixkv: installed already")
    elif timeout 120 "$PY" -m pip install -q --no-deps --no-build-isolation --no-index -e . \
        && "$PY" -c "$here"; then
        RESULTS+=("radixkv: editable install")
    else
        RESULTS+=("radixkv: EDITABLE INSTALL FAILED")
    fi
    "$PY" -c 'import radixkv, radixkv.kernels, zmq, msgspec, gguf
print("radixkv", radixkv.__file__, "| kernels", radixkv.kernels.__file__)
print("zmq", zmq.__version__, "msgspec", msgspec.__version__, "gguf", gguf.__file__)' \
        || RESULTS+=("imports: FAILED (see log)")
}

main() {
    versions
    install
    ls -la "$MODEL" || MODEL=""
    RESULTS+=("model: ${MODEL:-NONE (steps 4 to 7 skipped)}")
    local check=("$PY" bench/gpu_check.py)
    local common=(--model "$MODEL" --device "$DEVICE" --summary "$SUMMARY")
    if want kernels; then
        # (without a GPU the module skips itself: pytest exits 5)
        run_step "3. triton kernel tests" 150 env TRITON_INTERPRET=0 \
            "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py \
            tests/test_decode_graphs.py
    fi
    if want greedy && [[ -n $MODEL ]]; then
        run_step "4. greedy vs transformers" 200 \
            "${check[@]}" greedy "${common[@]}" --budget 170 "${GREEDY_SIZES[@]}"
    fi
    if want throughput && [[ -n $MODEL ]]; then
        run_step "5. throughput (bf16)" 100 \
            "${check[@]}" throughput "${common[@]}" "${SPEED_SIZES[@]}"
    fi
    if want runtime && [[ -n $MODEL ]]; then
        run_step "6. Runtime processes" 90 "${check[@]}" runtime "${common[@]}" --budget 60
    fi
    if want serving && [[ -n $MODEL ]]; then
        run_step "7. serving benchmark" 120 \
            "${check[@]}" serving "${common[@]}" "${SERVING_SIZES[@]}"
    fi
    echo
    echo "==================== SUMMARY (t=${SECONDS}s) ===================="
    printf '%s\n' "${RESULTS[@]}"
    "$PY" -c 'import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print("%-5s %s: %s" % (r["status"], r["check"], r["detail"]))' "$SUMMARY"
    nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv 2>/dev/null || true
}

main "$@" 2>&1 | tee "$OUT/log"
