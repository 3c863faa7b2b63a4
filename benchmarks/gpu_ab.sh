#!/usr/bin/env bash
# The next GPU run of issue #10, prepared: why decoding and the train step sit below their
# goals (docs/performance.md, "GPU checks of issue #10 on one NVIDIA H200"), as variants of
# benchmarks/gpu_check.sh's runs measured one after another on the same card:
#   1. the 1B full fine-tuning run, traced (--trace-dir): each phase's kernels, the share of
#      the wall with a kernel running (launch and host-sync gaps show as the rest);
#   2. the same with model.decode_chunk=8 (the decode loop tests "all rows done?" once per 8
#      steps: fewer device-to-host waits), and the 8B LoRA run with it;
#   3. the 1B run with XLA's command buffers (CUDA graphs) extended to while loops and
#      conditionals;
#   4. the 1B run with the vocabulary log-softmax unchunked (model.logits_chunk=-1);
#   5. the 8B LoRA run with model.decode_layers=scanned (the decode loop scans the stacked
#      weights instead of a per-layer copy: its peak memory, 28.1 GiB on 2026-12-04 against
#      16.1 GiB for the train step, and what the scan costs per decode step).
# The baselines without variants are the 2026-12-04 figures (docs/gpu/); run 1 repeats the
# 1B one (its timings are taken before the traced call).
#
# Device machine, from the repository root, with ml_collections' wheel carried (see
# benchmarks/README.md); about 6 minutes on an H200 (an estimate: it has never run):
#     OUT=$OUT bash benchmarks/gpu_ab.sh
# CPU smoke with tiny shapes:
#     SMOKE=1 OUT=/tmp/gpu_ab bash benchmarks/gpu_ab.sh
# Writes at most 8 files into $OUT (the device's return channel): ab.log (every report),
# the three traces of run 1, and results.tar.gz (every run's JSON, report and stderr).
set -uo pipefail
OUT=${OUT:-gpu_ab_out}
mkdir -p "$OUT"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_ab.XXXXXX")
HERE=$(cd "$(dirname "$0")" && pwd)
CMDBUF="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
failed=0

variant() {  # variant TAG ONLY [VAR=VALUE ...]: one gpu_check.sh pass
    local tag=$1 only=$2
    shift 2
    echo "##### variant ${tag:-baseline}: $only $*" | tee -a "$OUT/ab.log"
    env "$@" TAG="$tag" ONLY="$only" OUT="$WORK" bash "$HERE/gpu_check.sh" 2>&1 \
        | tee -a "$OUT/ab.log"
    failed=$((failed + PIPESTATUS[0]))
    tar -czf "$OUT/results.tar.gz.tmp" -C "$WORK" --exclude=./traces --exclude=./prompts.txt . \
        && mv "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
}

: >"$OUT/ab.log"
variant "_traced" "llama1b_full" TRACE=1
variant "_chunk8" "llama1b_full llama8b_lora8" EXTRA="--config.model.decode_chunk=8"
if [ "${SMOKE:-0}" != 1 ]; then  # a GPU flag: XLA:CPU would reject it
    variant "_cmdbuf" "llama1b_full" XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }$CMDBUF"
fi
variant "_nochunk" "llama1b_full" EXTRA="--config.model.logits_chunk=-1"
variant "_scanned" "llama8b_lora8" EXTRA="--config.model.decode_layers=scanned"

for phase in sampling reward train_step; do  # run 1's traces, one file each
    f=$(find "$WORK/traces" -path "*/$phase/*" -name "*.trace.json.gz" 2>/dev/null | head -n 1)
    [ -n "$f" ] && cp "$f" "$OUT/llama1b_full_traced.$phase.trace.json.gz"
done
grep -h -E "^(##### |=== |\| (sampling|reward|train step)|decode:|- (sampling|reward|train step):)" \
    "$OUT/ab.log" | cut -c1-400
echo "every run's files: $WORK"
exit $failed
