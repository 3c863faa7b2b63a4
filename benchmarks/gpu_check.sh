#!/usr/bin/env bash
# The GPU checks of issue #10 in one prepared run: `gfn-jax bench` (the train step phase by
# phase: MFU against the device's bf16 peak, and the sampler's decode step against the
# memory-bandwidth roofline) for
#   1. a Llama-3.2-1B shape (random weights, bfloat16), full fine-tuning: the standard 6·N MFU;
#   2. the same with 4x the batch (16 prompts x 16 samples), to show how the step's MFU
#      grows with the tokens per step;
#   3. a Llama-3-8B shape (bfloat16, LoRA r = 8) on one device;
#   4. the 1B shape with LoRA r = 64 on q, k, v, o (the paper's kind of run).
# The 1B runs keep every activation (remat none: they fit easily); the 8B run rematerialises
# each layer (remat full), whose recomputed forward the analytic FLOPs of the MFU do not count.
# Every run is the continuation task (SubTB, LM-likelihood reward of every prefix) on a
# synthetic prompt file (a random model uses the byte-level tokenizer: one byte = one
# token), 4 prompts x 16 samples (run 2: 16 x 16), prompts of PROMPT_LEN tokens,
# trajectories of <= 32 tokens.
#
# Before the runs it prints the versions, checks that `import gfn_jax` works with the
# repository alone on the path (no optional packages), and measures the device's own
# ceilings: a bfloat16 8192^3 matmul (TFLOP/s) and a 4 GiB float32 `x + 1` (GB/s, bytes read
# + written).
#
# Device machine (the image has jax, flax, optax, orbax but not ml_collections: carry its
# wheel, see benchmarks/README.md), from the repository root:
#     OUT=$OUT bash benchmarks/gpu_check.sh            # about 5-8 minutes on an H200
# CPU smoke of exactly these commands with tiny shapes (about a minute here):
#     SMOKE=1 OUT=/tmp/gpu_check bash benchmarks/gpu_check.sh
# TRACE=1 adds `--trace-dir $OUT/traces/<run>`: each phase is called once more under the
# profiler and the report lists its kernels. XLA_FLAGS passes through (A/B of XLA options);
# EXTRA adds config overrides to every run and TAG suffixes the runs' names (a variant's
# files beside the baseline's); benchmarks/gpu_ab.sh runs such a set of variants.
# Each run writes <run>.json, its report <run>.md and its stderr <run>.log into $OUT; with
# ARCHIVE=FILE.tar.gz set, $OUT is also packed into that file after each run (a device's
# return channel takes few files). A failing run is reported and the next one still runs;
# the exit status is the number of failed runs.
set -uo pipefail
OUT=${OUT:-gpu_check_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
REPO="$(pwd)"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
PROMPT_LEN=${PROMPT_LEN:-64}
STEPS=${STEPS:-5}
RUN_TIMEOUT=${RUN_TIMEOUT:-240}  # seconds per run: one hung run leaves time for the others

if [ "$SMOKE" = 1 ]; then
    # name d_model layers heads kv_heads d_ff vocab lora(0|rank) remat prompts_per_batch
    SHAPES=("llama1b_full 64 2 4 2 128 1024 0 none 4"
            "llama1b_full_b256 64 2 4 2 128 1024 0 none 16"
            "llama8b_lora8 64 2 4 2 128 2048 8 full 4"
            "llama1b_lora64 64 2 4 2 128 1024 64 none 4")
    STEPS=2
else
    SHAPES=("llama1b_full 2048 16 32 8 8192 128256 0 none 4"
            "llama1b_full_b256 2048 16 32 8 8192 128256 0 none 16"
            "llama8b_lora8 4096 32 32 8 14336 128256 8 full 4"
            "llama1b_lora64 2048 16 32 8 8192 128256 64 none 4")
fi

pack() {  # into a temporary file beside nothing it packs, then renamed over ARCHIVE
    if [ -n "${ARCHIVE:-}" ]; then
        local tmp
        tmp=$(mktemp "${TMPDIR:-/tmp}/gpu_check_pack.XXXXXX")
        tar -czf "$tmp" --exclude="./$(basename "$ARCHIVE")" -C "$OUT" . && mv "$tmp" "$ARCHIVE"
    fi
}

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

# versions; which optional packages are importable
"$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import importlib, platform
print("python", platform.python_version())
for name in ("jax", "jaxlib", "flax", "optax", "orbax.checkpoint", "numpy", "transformers",
             "ml_collections", "gguf", "tensorboardX", "tensorflow_datasets"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')}")
    except Exception as e:  # an optional package that is absent: say so
        print(f"{name}: not importable ({type(e).__name__})")
import jax
print("devices", jax.devices())
EOF
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee -a "$OUT/env.txt"
fi
# `import gfn_jax` with the repository alone on the path (the issue: no optional packages)
PYTHONPATH="$REPO" "$PY" -c "import gfn_jax; print('import gfn_jax', gfn_jax.__version__,
      'with the repository alone on the path: ok')" 2>&1 | tail -n 3 | tee -a "$OUT/env.txt"
# the device's own ceilings, measured (MFU is quoted against the vendor peak)
"$PY" - "$SMOKE" <<'EOF' 2>&1 | tee -a "$OUT/env.txt"
import sys, time
import jax, jax.numpy as jnp
n, gib = (512, 0.0625) if sys.argv[1] == "1" else (8192, 4.0)
a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.bfloat16)
x = jnp.zeros((int(gib * 2**30) // 4,), jnp.float32)
mm = jax.jit(lambda p, q: p @ q)
inc = jax.jit(lambda v: v + 1.0)
for name, f, args, work, unit, scale in (
        ("bf16 matmul %d^3" % n, mm, (a, a), 2 * n**3, "TFLOP/s", 1e12),
        ("float32 x + 1 over %g GiB (read + write)" % gib, inc, (x,), 2 * x.nbytes, "GB/s", 1e9)):
    f(*args).block_until_ready()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        f(*args).block_until_ready()
        best = min(best, time.perf_counter() - t)
    print(f"measured {name}: {work / best / scale:.1f} {unit} (best of 10: {best * 1e3:.3f} ms)")
EOF
pack

failed=0
for spec in "${SHAPES[@]}"; do
    read -r name D L H KV F V R REMAT PPB <<<"$spec"
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then
        continue  # ONLY="llama1b_full llama8b_lora8": a subset of the runs
    fi
    name="$name${TAG:-}"  # TAG=_chunk8: a variant's files beside the baseline's
    lora=(--config.lora.enabled=False)
    if [ "$R" != 0 ]; then
        lora=(--config.lora.enabled=True --config.lora.rank="$R" --config.lora.alpha=16.0
              --config.lora.dropout=0.0
              "--config.lora.targets=('layers/attn/(q|k|v|o)/kernel',)")
    fi
    echo "=== $name: d_model $D, $L layers, $H heads ($KV kv), d_ff $F, vocab $V, LoRA $R," \
         "remat $REMAT, $PPB prompts x 16 samples"
    read -r -a extra <<<"${EXTRA:-}"  # EXTRA="--config.model.decode_chunk=8": more overrides
    trace=()
    if [ "${TRACE:-0}" = 1 ]; then  # each phase once more under jax.profiler.trace
        trace=(--trace-dir "$OUT/traces/$name")
    fi
    start=$(date +%s)
    timeout "$RUN_TIMEOUT" "$PY" -m gfn_jax.cli bench --config configs/continuation.py \
        --steps "$STEPS" --warmup 1 --json "$OUT/$name.json" \
        --config.model.spec=random --config.model.random.family=llama \
        --config.model.random.d_model="$D" --config.model.random.n_layers="$L" \
        --config.model.random.n_heads="$H" --config.model.random.n_kv_heads="$KV" \
        --config.model.random.d_ff="$F" --config.model.random.vocab_size="$V" \
        --config.model.random.max_seq_len=$((PROMPT_LEN + 64)) \
        --config.model.dtype=bfloat16 --config.model.param_dtype=bfloat16 \
        --config.model.remat_policy="$REMAT" \
        --config.task.data_path="$OUT/prompts.txt" --config.task.num_prompts=200 \
        --config.task.num_eval=10 --config.task.max_len=32 --config.task.diversity_encoder= \
        --config.data.max_prompt_len="$PROMPT_LEN" \
        --config.train.prompts_per_batch="$PPB" --config.train.samples_per_prompt=16 \
        --config.train.grad_accum=1 --config.mesh.data=1 "${lora[@]}" "${trace[@]}" \
        "${extra[@]}" \
        > "$OUT/$name.md" 2> "$OUT/$name.log"
    rc=$?
    echo "$name: exit $rc, $(( $(date +%s) - start )) s"
    cat "$OUT/$name.md"
    if [ $rc != 0 ]; then
        failed=$((failed + 1))
        tail -n 20 "$OUT/$name.log"
    fi
    pack
done
exit $failed
