#!/usr/bin/env bash
# The GPU checks of issue #10 in one prepared run: `gfn-jax bench` (the train step phase by
# phase: MFU against the device's bf16 peak, and the sampler's decode step against the
# memory-bandwidth roofline) for
#   1. a Llama-3.2-1B shape (random weights, bfloat16), full fine-tuning: the standard 6·N MFU;
#   2. the same shape with LoRA r = 64 on q, k, v, o (the paper's kind of run);
#   3. a Llama-3-8B shape (bfloat16, LoRA r = 8) on one device.
# Every run is the continuation task (SubTB, LM-likelihood reward of every prefix) on a
# synthetic prompt file (a random model uses the byte-level tokenizer: one byte = one
# token), 4 prompts x 16 samples, prompts of PROMPT_LEN tokens, trajectories of <= 32 tokens.
#
# Device machine (the image has jax, flax, optax, orbax but not ml_collections, gguf or
# tensorboardX: carry their wheels, see benchmarks/README.md), from the repository root:
#     OUT=$OUT bash benchmarks/gpu_check.sh            # about 5-8 minutes on an H200
# CPU smoke of exactly these commands with tiny shapes (minutes):
#     SMOKE=1 OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
# Each run writes $OUT/<name>.json and its report to $OUT/<name>.md; a failing run is
# reported and the next one still runs; the exit status is the number of failed runs.
set -uo pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
PROMPT_LEN=${PROMPT_LEN:-64}
STEPS=${STEPS:-5}

if [ "$SMOKE" = 1 ]; then
    # name d_model layers heads kv_heads d_ff vocab lora(0|rank)
    SHAPES=("llama1b_full 64 2 4 2 128 1024 0" "llama1b_lora64 64 2 4 2 128 1024 64"
            "llama8b_lora8 64 2 4 2 128 2048 8")
    STEPS=2
else
    SHAPES=("llama1b_full 2048 16 32 8 8192 128256 0"
            "llama1b_lora64 2048 16 32 8 8192 128256 64"
            "llama8b_lora8 4096 32 32 8 14336 128256 8")
fi

# synthetic prompts: PROMPT_LEN bytes each (BOS is added by the tokenizer)
"$PY" - "$OUT/prompts.txt" "$PROMPT_LEN" <<'EOF'
import random, sys
path, n = sys.argv[1], int(sys.argv[2]) - 1
words = "the a of to in and on at for with by from over under story river city night".split()
rng = random.Random(0)
with open(path, "w") as f:
    for _ in range(200):
        s = ""
        while len(s) < n:
            s += rng.choice(words) + " "
        f.write(s[:n - 1] + " \n")
EOF

"$PY" -c "import jax; print('jax', jax.__version__, jax.devices())" | tee "$OUT/env.txt"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version \
    --format=csv | tee -a "$OUT/env.txt"

failed=0
for spec in "${SHAPES[@]}"; do
    read -r name D L H KV F V R <<<"$spec"
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
        continue  # ONLY="llama1b_full llama8b_lora8": a subset of the runs
    fi
    lora=(--config.lora.enabled=False)
    if [ "$R" != 0 ]; then
        lora=(--config.lora.enabled=True --config.lora.rank="$R" --config.lora.alpha=16.0
              --config.lora.dropout=0.0
              "--config.lora.targets=('layers/attn/(q|k|v|o)/kernel',)")
    fi
    echo "=== $name: d_model $D, $L layers, $H heads ($KV kv), d_ff $F, vocab $V, LoRA $R"
    start=$(date +%s)
    "$PY" -m gfn_jax.cli bench --config configs/continuation.py --steps "$STEPS" --warmup 1 \
        --json "$OUT/$name.json" \
        --config.model.spec=random --config.model.random.family=llama \
        --config.model.random.d_model="$D" --config.model.random.n_layers="$L" \
        --config.model.random.n_heads="$H" --config.model.random.n_kv_heads="$KV" \
        --config.model.random.d_ff="$F" --config.model.random.vocab_size="$V" \
        --config.model.random.max_seq_len=$((PROMPT_LEN + 64)) \
        --config.model.dtype=bfloat16 --config.model.param_dtype=bfloat16 \
        --config.model.remat_policy=full \
        --config.task.data_path="$OUT/prompts.txt" --config.task.num_prompts=200 \
        --config.task.num_eval=10 --config.task.max_len=32 --config.task.diversity_encoder= \
        --config.data.max_prompt_len="$PROMPT_LEN" \
        --config.train.prompts_per_batch=4 --config.train.samples_per_prompt=16 \
        --config.train.grad_accum=1 --config.mesh.data=1 "${lora[@]}" \
        > "$OUT/$name.md" 2> "$OUT/$name.log"
    rc=$?
    echo "$name: exit $rc, $(( $(date +%s) - start )) s"
    cat "$OUT/$name.md"
    if [ $rc != 0 ]; then
        failed=$((failed + 1))
        tail -n 20 "$OUT/$name.log"
    fi
done
exit $failed
