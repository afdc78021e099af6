#!/usr/bin/env bash
# The checks that need a CUDA host, in one bounded run; each step's log lands in OUTDIR.
#
#   bash bench/device_check.sh OUTDIR [STEP ...]     (default steps: env tests e2e transfer)
#
# Steps: env (versions, GPU), tests (pytest -m cuda), e2e (bench/e2e_bench.py, engine on cuda),
# e2e-short (the same without the server-path rows), e2e-device (e2e-short with every call on
# the GPU, SOFTGATE_HOST_MAX_TOKENS=0: no host compiles to wait for), compile
# (bench/compile_cost.py: one CPU build with dynamo and where its time goes, again with one
# inductor compile thread, and two CUDA builds, all at once), cuda-example
# (bench/cuda_compile_example.py: the compiled CUDA kernel built on its GPU example, on the
# CPU's 67 tokens, and eager), transfer (bench/transfer_bench.py), engine
# (bench/engine_bench.py --device cuda), profile (bench/latency_profile.py --device cuda: a 4k call
# on the GPU, profiled), crossover (the same timed from 4k to 1M tokens on the GPU, then on this
# host's CPU: where they meet is the right host_max_tokens), ladder
# (bench/latency_ladder.py --device cuda: a 4k call's gap to the echo, layer by layer), e2e-cpu
# (the e2e bench with the engine on this host's CPU cores), memory (bench/memory_bench.py
# --device cuda: the host memory the GPU overlay's limit is sized by). DEADLINE (seconds, default 330)
# bounds the whole run: a step gets what is left of it and is cut there. Each step runs in a
# session of its own; what it leaves running (a server still compiling) is killed when it ends.
#
# On a host without the project's packages but with torch (a bare GPU box that cannot reach a
# registry), carry the wheels in .whl/ (and allocator libraries in .whl/lib/; bench/device_wheels.sh
# fills both here): they are installed into /tmp/site and the project runs from its source tree.
set -u

session_pids() {  # session_pids SID: the live processes of session SID, from /proc (a bare box may lack ps)
    local f line fields
    for f in /proc/[0-9]*/stat; do
        { read -r line <"$f"; } 2>/dev/null || continue
        read -r -a fields <<<"${line##*) }"  # after the command name: state ppid pgrp session ...
        if [ "${fields[3]:-}" = "$1" ] && [ "${fields[0]:-}" != Z ]; then
            f=${f#/proc/}
            echo "${f%/stat}"
        fi
    done
}

kill_session() {  # kill_session SID: TERM what is left of session SID, KILL what is still there 5 s later
    local pids tries=10
    pids=$(session_pids "$1")
    [ -n "$pids" ] || return 0
    echo "== killing $(echo $pids | wc -w) process(es) left in the step's session" | tee -a "$OUTDIR/summary.log"
    kill -TERM $pids 2>/dev/null
    while [ -n "$pids" ] && [ $((tries -= 1)) -ge 0 ]; do
        sleep 0.5
        pids=$(session_pids "$1")
    done
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null
    return 0
}

STEP_SID=
step() {  # step NAME COMMAND...: run it with what is left of the deadline, log to OUTDIR/NAME.log
    local name=$1 left=$((DEADLINE - SECONDS))
    shift
    if [ "$left" -lt 20 ]; then
        echo "== $name: skipped, ${left}s left of ${DEADLINE}s" | tee -a "$OUTDIR/summary.log"
        return
    fi
    local t0=$SECONDS
    # in a session of its own, emptied when it ends: `timeout` stops its own process group, and
    # not even that once its child has exited, so a compiling `softgate serve` a step started ran
    # on into the next steps (an audit). A background job of this shell (no job control) is no
    # group leader, so setsid runs in place and $! is the session's id.
    setsid timeout -k 5 "$left" "$@" >"$OUTDIR/$name.log" 2>&1 </dev/null &
    STEP_SID=$!
    wait "$STEP_SID"
    local rc=$?
    kill_session "$STEP_SID"
    STEP_SID=
    echo "== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$OUTDIR/summary.log"
    tail -n 40 "$OUTDIR/$name.log"
}

# sourced (tests/test_bench_scripts.py): the functions above only
[ "${BASH_SOURCE[0]}" = "$0" ] || return 0

OUTDIR=${1:?usage: device_check.sh OUTDIR [STEP ...]}
shift
STEPS=${*:-env tests e2e transfer}
DEADLINE=${DEADLINE:-330}
cd "$(dirname "$0")/.."
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if compgen -G ".whl/lib/*.so*" >/dev/null && [ -w /usr/lib/x86_64-linux-gnu ]; then
    cp -n .whl/lib/*.so* /usr/lib/x86_64-linux-gnu/
fi
$PY -c "import softgate" 2>/dev/null || export PYTHONPATH=$PWD/server:$PWD/client${PYTHONPATH:+:$PYTHONPATH}

# Ctrl-C or a TERM: stop the running step's session too (it is outside this shell's group)
trap '[ -z "$STEP_SID" ] || kill_session "$STEP_SID"; exit 130' INT
trap '[ -z "$STEP_SID" ] || kill_session "$STEP_SID"; exit 143' TERM

for s in $STEPS; do
    case $s in
    env) step env bash -c "nvidia-smi; nproc; command -v gcc g++ || echo 'no gcc / g++: compiles fail, eager'; ldd /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4; $PY -c 'import torch, grpc, google.protobuf as pb, numpy
print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"-\")
print(\"grpc\", grpc.__version__, \"protobuf\", pb.__version__, \"numpy\", numpy.__version__)'" ;;
    tests) step tests $PY -m pytest -q -p no:cacheprovider -m cuda tests/test_engine.py tests/test_client.py ;;
    e2e) step e2e $PY bench/e2e_bench.py --device cuda --allocators tcmalloc --no-sweep --no-install \
        --json "$OUTDIR/e2e.json" ;;
    e2e-short) step e2e-short $PY bench/e2e_bench.py --device cuda --allocators tcmalloc --no-sweep --no-install \
        --no-server-path ;;
    e2e-device) step e2e-device env SOFTGATE_HOST_MAX_TOKENS=0 $PY bench/e2e_bench.py --device cuda \
        --allocators tcmalloc --no-sweep --no-install --no-server-path ;;
    compile) step compile bash -c "cc='timeout -k 5 200 $PY bench/compile_cost.py --fresh-cache --phases'
        \$cc --count 0 --dynamo >$OUTDIR/compile-cpu.log 2>&1 &
        TORCHINDUCTOR_COMPILE_THREADS=1 \$cc --count 0 --dynamo >$OUTDIR/compile-cpu-1thread.log 2>&1 &
        \$cc --device cuda --count 1 >$OUTDIR/compile-cuda.log 2>&1; wait
        grep -E 'compile_threads|rss|^(fullgraph_capture|compile_file|async_compile.wait|PyCodeCache.load_by_key_path|GraphLowering.codegen|Scheduler.codegen)[ ,]' $OUTDIR/compile-*.log" ;;
    cuda-example) step cuda-example $PY bench/cuda_compile_example.py ;;
    profile) step profile $PY bench/latency_profile.py --device cuda --host-max-tokens 0 ;;
    crossover) step crossover bash -c "for d in cuda cpu; do $PY bench/latency_profile.py --device \$d \
        --host-max-tokens 0 --top 0 --reps 100 --tokens 4096,16384,65536,262144,1048576; done" ;;
    ladder) step ladder $PY bench/latency_ladder.py --device cuda ;;
    transfer) step transfer $PY bench/transfer_bench.py ;;
    engine) step engine $PY bench/engine_bench.py --device cuda --no-memory ;;
    memory) step memory $PY bench/memory_bench.py --device cuda ;;
    e2e-cpu) step e2e-cpu $PY bench/e2e_bench.py --device cpu --allocators tcmalloc --no-sweep --no-install ;;
    *) echo "unknown step $s" >&2 ;;
    esac
done
