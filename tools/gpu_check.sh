#!/usr/bin/env bash
# The device check, one command on the device machine (nvidia-h200), in at most 8 minutes: install the carried
# wheels, run the CUDA tests, then bench_wbflow.py --gpu section by section. Every stage has its own time limit
# and all of them one deadline, so a slow stage cannot eat the rest; each benchmark row is kept as soon as it is
# measured. Into $OUT (7 files): gpu_check.log (everything printed), environment.txt, stage_times.txt,
# pip_check.txt, pytest_cuda.xml, bench_results.jsonl, bench_table.md.
#
# Here first: bash tools/download_wheels.sh   (fills .whl/, about 25 MiB); then the device tool's call:
#   run(command="bash tools/gpu_check.sh", carry=[".whl"], timeout_s=540)
# A rerun of some sections only, e.g. on a machine still warm: GPU_CHECK_TESTS=0 GPU_CHECK_SECTIONS="euler" bash ...
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$(mktemp -d)}"  # the device tool sets OUT; elsewhere a new temporary folder
SECONDS_FOR_STAGES="${GPU_CHECK_SECONDS:-455}"  # the 8 minutes, less the environment, the table and a margin

stage() {  # stage NAME SECONDS COMMAND...: run COMMAND under min(SECONDS, time left), log its exit code and time
    local name=$1 limit=$2 left=$((DEADLINE - SECONDS)) started=$SECONDS status
    shift 2
    ((left < limit)) && limit=$left
    if ((limit < 10)); then
        echo "== $name: not run, the deadline is reached" | tee -a "$OUT/stage_times.txt"
        return
    fi
    echo "== $name (at most ${limit} s): $*"
    timeout -k 10 "$limit" "$@"
    status=$?
    echo "== $name: exit code $status$( ((status == 124)) && echo ' (time limit)'), $((SECONDS - started)) s" \
        | tee -a "$OUT/stage_times.txt"
}

section_seconds() {  # each --gpu section's limit: about twice what it should take on an H200
    case $1 in train) echo 200 ;; profile) echo 60 ;; inception) echo 45 ;; fire) echo 90 ;; *) echo 150 ;; esac
}

main() {
    export PYTHONUNBUFFERED=1 WANDB_MODE=offline WANDB_SILENT=true
    # torchcfm imports POT, whose jax and cupy backends would otherwise start on the GPU
    export POT_BACKEND_DISABLE_JAX=1 POT_BACKEND_DISABLE_CUPY=1 POT_BACKEND_DISABLE_TENSORFLOW=1
    { nvidia-smi; python3 --version; python3 -c "import os, torch; print('torch', torch.__version__, 'CUDA',
torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else 'absent', 'cores',
len(os.sched_getaffinity(0)))"; } > "$OUT/environment.txt" 2>&1
    cat "$OUT/environment.txt"
    DEADLINE=$((SECONDS + SECONDS_FOR_STAGES))
    stage install 60 python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
    python3 -m pip check > "$OUT/pip_check.txt" 2>&1  # for the record: torchcfm lacks its unused needs on purpose
    if [[ "${GPU_CHECK_TESTS:-1}" == 1 ]]; then
        stage cuda-tests 150 python3 -m pytest -v test_gpu.py -k on_cuda -rs --durations=0 \
            --junitxml="$OUT/pytest_cuda.xml"
    fi
    for section in ${GPU_CHECK_SECTIONS:-train profile inception fire euler}; do  # euler's float32 row: the slowest
        stage "bench-$section" "$(section_seconds "$section")" python3 bench_wbflow.py --gpu "$section" \
            --results "$OUT/bench_results.jsonl"
    done
    python3 - "$OUT/bench_results.jsonl" > "$OUT/bench_table.md" <<'EOF'
import json, sys
from pathlib import Path
import torch
import bench_wbflow
path = Path(sys.argv[1])
rows = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
print(bench_wbflow.format_gpu_table(rows, bench_wbflow.bf16_peak_flops("cuda") if torch.cuda.is_available() else None))
EOF
    cat "$OUT/stage_times.txt" "$OUT/bench_table.md"
}

if ! compgen -G ".whl/*.whl" > /dev/null; then
    echo "gpu_check.sh: no wheels in .whl/: run bash tools/download_wheels.sh first, and carry .whl" >&2
    exit 1
fi
mkdir -p "$OUT"
main 2>&1 | tee "$OUT/gpu_check.log"
echo "gpu_check.sh: the log and the table are in $OUT"
