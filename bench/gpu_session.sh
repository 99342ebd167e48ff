#!/usr/bin/env bash
# Every GPU benchmark of issues 3 and 6, in priority order, on one GPU host, as one background job.
#
#   setsid nohup bash bench/gpu_session.sh /root/results > /root/results/session.log 2>&1 < /dev/null &
#
# A device call may last 10 minutes, but a process in its own session outlives the call, so this runs the whole
# list while watching calls (`sleep 500; cat /root/results/session.log; cp /root/results/* $OUT/`) copy the
# results out. Make the watching calls back to back: the machine goes back after ~30 s without a call, and
# the job, the installed stack and the results go with it. Each benchmark appends its tables to
# RESULTS/BENCHMARKS.add.md (merged into BENCHMARKS.md by hand) and logs to RESULTS/NN-name.log; a failing or
# timed-out step is logged and the next one starts. SKIP=name1,name2 skips steps already measured; ONLY=name1,name2
# runs just those (in this file's order).
# Expects the offline stack in /tmp/site and the SmolLM2 GGUF in /root/models
# (../shared/tools/offline_wheels.py --smollm2, then its offline_install.sh).
set -u
RESULTS=${1:-/root/results}
mkdir -p "$RESULTS"
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export ALIGNSWEEP_SMOLLM2_GGUF=${ALIGNSWEEP_SMOLLM2_GGUF:-/root/models/SmolLM2-135M-Instruct.Q4_1.gguf}
ADD="$RESULTS/BENCHMARKS.add.md"
n=0
step() {  # step NAME SECONDS CMD...
  local name=$1 limit=$2; shift 2
  n=$((n + 1))
  case ",${SKIP:-}," in *",$name,"*) echo "[$(date +%T)] skip $name"; return;; esac
  if [ -n "${ONLY:-}" ]; then case ",$ONLY," in *",$name,"*) ;; *) return;; esac; fi
  local log; log=$(printf '%s/%02d-%s.log' "$RESULTS" "$n" "$name")
  echo "[$(date +%T)] start $name (limit ${limit}s): $*"
  timeout "$limit" "$@" > "$log" 2>&1
  local rc=$?  # 124: the time limit
  echo "[$(date +%T)] end $name rc=$rc"
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$RESULTS/gpu.txt" 2>&1

# Order for a 30-device-minute session (staging + install take ~1 min on a warm VM, ~4 with a cold start).
# Measured already (BENCHMARKS.md, 2026-11-23/24): GRIT all four cases (issue 3, closed), tvt on 8B (all six
# cases, nf4 again after the reference change) and SmolLM2 (with A/A controls), the planner, packing without Ray
# (--scaling), the packed sweep against one trial per GPU on one VM (7.9x), 2 GPUs against 1 (2.05x, H200 x2),
# the first step on a warm worker alone (PASS, every kind; also in a thread per trial with one thread) and in a
# per-GPU sweep (3.3-3.6 s median), the study's projected cost (once). VMs differ by up to 40% in speed: compare rows
# of one run only. Later sessions run with SKIP= naming what finished.
#
# Open 1, first step <= 5 s on a warm worker. Found (2026-11-24 evening): each new thread rebuilds cuDNN's attention
# graphs (thread_local in torch; this probe: 50-80 ms per shape in any new thread), and Tune ran each trial in a new
# thread. Sweeps now keep one lasting thread per worker (sweeps/runner.py _TrialThread): per-GPU warm first step
# 1.77 s median, all within 5 s; SDPA in step 1 0.16 s against 1.90 s with a thread per trial (same VM). Packed
# (16 on a GPU) read 4.9 s median only with padded lengths, now the GPU profiles' default: re-check it with margin.
step ray-thread-probe 300 python bench/ray_thread_probe.py
# int8 base models kept by a warm worker (their scales compared where bitsandbytes moved them), with bf16 and nf4;
# pinned small copies; Liger's kernels against transformers' layers (that test last: Liger patches the process).
step pytest-reuse 400 python -m pytest -m gpu -q -p no:cacheprovider -k "reused or pinned or liger"
# Packed warm trials on a kept model still spend ~2.9 s before step 1 (2026-11-24 afternoon), ~1.1 s alone on a
# CPU: where, from stack samples of each trial's setup (before_step1/) under 16-way packing.
step packing-setup-profile 900 python bench/packing.py --mode packed --gpus 1 --packed-seeds 3 \
                     --results "$RESULTS/packing-setup.jsonl" --profile-step1 "$RESULTS/prof-packed" --bench-file "$ADD"
# DPO planner >= 3x: the planned step (1.73-1.75 s, reference precomputed) taken apart by kernel group, then with
# Liger's layer kernels (RMSNorm, SwiGLU, RoPE; ship liger-kernel with offline_wheels.py --extra), then both timed.
# Measured 2026-11-24 15:40-17:10: 1.757 -> 1.451 s at the same plan; with the planner counting Liger (no
# checkpointing at micro-batch 4) 1.392 s, 4.61x bare batch 1 (SFT 6.63x). The 8B profiles now use it.
step planner-profile 900 bash -c 'python bench/trainable_vs_trl.py --checkpoint-only &&
  for liger in false true; do python bench/trainable_vs_trl.py --planner --cases dpo-bf16 --profile-steps 3 \
    --trainable-set trainer.precompute_ref_log_probs=true --trainable-set trainer.use_liger_kernel=$liger; done'
# With Liger the planner counts smaller activations (8B DPO at 80 GB: micro-batch 4, no layer checkpointed); SFT too.
step planner-liger 1200 bash -c 'python bench/trainable_vs_trl.py --checkpoint-only &&
  for liger in false true; do python bench/trainable_vs_trl.py --planner \
  --cases dpo-bf16 --bench-file '"$ADD"' --trainable-set trainer.precompute_ref_log_probs=true \
  --trainable-set trainer.use_liger_kernel=$liger; done &&
  python bench/trainable_vs_trl.py --planner --cases sft-bf16 --bench-file '"$ADD"' \
  --trainable-set trainer.use_liger_kernel=true'
# Packed warm first step: 4.9 / 5.2 s on two VMs (2026-11-24 midday), what is left being before step 1, where
# nf4 trials spent 4.8-5.6 s against bf16's 3.2-3.4 (loading and quantizing the base model under 16-way packing). A
# warm worker's trials now train on the base model its last trial left (trainables/warm_model.py): the control
# without, then the default, back to back, after the embedded model's one-time conversion.
step embedded-model 300 python -c "from trainables import models; print(models.embedded_model_dir())"
step packing-reuse 1200 python bench/packing.py --mode packed-no-reuse packed --gpus 1 --packed-seeds 3 \
                     --results "$RESULTS/packing-reuse.jsonl" --bench-file "$ADD"
# The same on the 8B shape, trials one after another on one worker (setup only: the local profile's short
# configs on the random 8B checkpoint with SmolLM2's tokenizer), with reuse and without.
step first-step-8b-reuse 900 bash -c 'python bench/trainable_vs_trl.py --checkpoint-only &&
  view=$(python -c "import sys; sys.path.insert(0, \"bench\"); from project_cost import with_tokenizer; \
    print(with_tokenizer(\"${ALIGNSWEEP_BENCH_CKPT:-$HOME/.cache/alignsweep-bench}/llama3-8b-shape-random-bf16-seed0\", \
    \"embedded:smollm2-135m-instruct\"))" | tail -1) &&
  for reuse in --reuse-base-model ""; do python bench/first_step.py --model "$view" --kinds dpo-lora-nf4 sft-lora-bf16 \
    --repeat 3 --steps 3 --n-eval 2 $reuse --bench-file '"$ADD"'; done'
# Packed warm first step 6.2 s (2026-11-24 late morning): 12 of 20 warm trials, DPO/CITA meeting the pair shapes
# in step 1, spent 2.2-2.7 s of thread CPU there. cuDNN's attention builds a graph per shape and thread; without
# cuDNN's kernels SDPA builds none, the local profile's default since 2026-11-24 midday (step 1 3.8 -> 0.8 s).
# The control with cuDNN, then the default, back to back on one VM (run after another sweep: the VM's first
# sweep pays a minute of one-time startup).
step packing-cudnn 1000 python bench/packing.py --mode packed-cudnn packed --gpus 1 --packed-seeds 3 \
                     --results "$RESULTS/packing-cudnn.jsonl" --bench-file "$ADD"
# Open: the planner's SmolLM2 cita-nf4 estimate read +28.7% measured alone (2026-11-24 late morning): TRL's fused
# LM head projects only DPO/CITA's completion positions, the planner counts all. Before changing the estimate,
# every SmolLM2 case measured alone (tvt's two-resident attribution is off by up to 18% on SmolLM2).
step memory-peak 600 python bench/memory_peak.py --shape smollm2 --cases sft-nf4 sft-bf16 dpo-nf4 dpo-bf16 \
                     cita-nf4 cita-bf16
# Open 3: DPO planner >= 3x bare batch 1: 1.76x with checkpointing at micro-batch 8 (2026-11-24 late morning);
# 2.23x without it at micro-batch 2, 2.67-3.48x with the reference log-probs precomputed as well. The planner now
# checkpoints every n-th layer where that fits and is predicted faster (80 GB: DPO micro-batch 4 and SFT 8, every
# 8th layer): its choice against checkpointing every layer, back to back on one VM, then with the reference
# precomputed. Then the levers measured that session, for the record.
step planner-choice 1500 bash -c 'for c in on auto; do python bench/trainable_vs_trl.py --planner --checkpointing $c \
                     --cases ${PLANNER_CASES:-dpo-bf16 sft-bf16} --bench-file '"$ADD"'; done'
# With the reference log-probs from the cache shared across trials (trainables/reference.py): twice, so the second
# run reads what the first computed (its build time is the cache hit's).
step planner-precompute 900 bash -c 'for i in 1 2; do python bench/trainable_vs_trl.py --planner --cases dpo-bf16 \
                     --bench-file '"$ADD"' --trainable-set trainer.precompute_ref_log_probs=true; done'
step planner-dpo 600 python bench/trainable_vs_trl.py --planner --cases dpo-bf16 --bench-file "$ADD"
step planner-dpo-nockpt 600 python bench/trainable_vs_trl.py --planner --cases dpo-bf16 --bench-file "$ADD" \
                     --trainable-set gradient_checkpointing=false
# Without checkpointing the 8B step is ~17% faster at micro-batch 4 (2026-11-24 09:35: 2.28 s against 2.74 s at
# micro-batch 8 with it), but the planner's headroom of the time (1.5 x the transient part, from SmolLM2 packed) ruled
# it out on 80 GB (since: the smaller of that and 2 GiB + 0.2 x). What the caching allocator reserves beyond the allocated peak on the 8B shape, lengths varied, with
# and without expandable segments; then SFT's planner comparison without checkpointing (budget raised past it).
step slack-8b 900 bash -c 'python bench/trainable_vs_trl.py --checkpoint-only &&
  for conf in "" expandable_segments:True; do PYTORCH_CUDA_ALLOC_CONF=$conf python bench/memory_peak.py \
    --shape llama3-8b --cases dpo-bf16 --varied --set micro_batch=4 --set gradient_checkpointing=false --steps 12 \
    --top 8; done &&
  python bench/memory_peak.py --shape llama3-8b --cases dpo-bf16 --varied --set micro_batch=8 --steps 8 --top 8'
step planner-sft-nockpt 600 python bench/trainable_vs_trl.py --planner --cases sft-bf16 --bench-file "$ADD" \
                     --budget-gib 160 --trainable-set gradient_checkpointing=false
# The per-GPU and packed sweeps with the lasting thread, step 1 stack-sampled (compare with the midday samples).
step packing    1500 python bench/packing.py --mode ${PACKING_MODES:-per-gpu packed} --gpus ${PACKING_GPUS:-1} --seeds 1 \
                     --packed-seeds 3 --results "$RESULTS/packing.jsonl" --profile-step1 "$RESULTS/prof" \
                     --bench-file "$ADD"
# Padded lengths (2026-11-24 evening): the local GPU profile now pads to a multiple of 64 (fewer cuDNN attention
# shapes: packed 785 trials/h against 582 unpadded, same VM). The control without it, in its own results file.
step packing-unpadded 900 python bench/packing.py --mode packed --gpus 1 --packed-seeds 3 \
                     --set trainer.pad_to_multiple_of=null --results "$RESULTS/packing-unpadded.jsonl" \
                     --profile-step1 "$RESULTS/prof-unpadded" --bench-file "$ADD"
# Open 2: trainable / bare TRL <= 1.02. --swap (both build orders, geometric mean) on 2026-11-24 morning: 8B
# sft/dpo x bf16/nf4 and SmolLM2 sft-nf4, dpo-nf4, dpo-bf16 measured, none resolved slower at 30 steps (+-4-7%).
# Since then the DPO/CITA reference pass leaves gradient checkpointing on (trainables/dpo.py; TRL toggles it
# around every micro-batch, ~25 ms on a CPU for SmolLM2): dpo/cita rows now measure that against bare TRL.
# After it (midday): SmolLM2 dpo-bf16 0.982, cita-bf16 0.960 (both orders). The 30-step readings above 1.02 (8B
# sft-bf16, sft-nf4, dpo-bf16, SmolLM2 sft-nf4) were re-run at 90 steps with the heap frozen (2026-11-24 evening):
# all <= 1.02, 8B sft-bf16 at 1.016 pooled over 6 orders. Never read in both orders: SmolLM2 sft-bf16, the default.
# TVT_RECHECK_8B / TVT_RECHECK_SMOLLM2 name the cases (empty: none).
step tvt-recheck 1800 bash -c 'set -e
  c8=${TVT_RECHECK_8B-}; cs=${TVT_RECHECK_SMOLLM2-sft-bf16}
  if [ -n "$c8" ]; then python bench/trainable_vs_trl.py --cases $c8 --steps 90 --block 1 --swap \
    --times "$1/tvt-times.jsonl" --bench-file "$2"; fi
  if [ -n "$cs" ]; then python bench/trainable_vs_trl.py --shape smollm2 --cases $cs --steps 90 --block 1 --swap \
    --times "$1/tvt-times-smollm2.jsonl" --bench-file "$2"; fi' _ "$RESULTS" "$ADD"
# Do the two sides dispatch the same operators and kernels per step (bench/op_census.py)? 8B sft-bf16 read 1.016
# pooled over 6 orders at 90 steps (2026-11-24 evening); measured that evening (same counts, DPO +2 aten::empty per
# layer): re-check after changes to the trainable. SmolLM2 needs its own limit (the GGUF conversion on a fresh VM).
step op-census-8b 600 python bench/op_census.py --cases sft-bf16 sft-nf4 dpo-bf16
step op-census-smollm2 600 python bench/op_census.py --shape smollm2 --cases sft-nf4 sft-bf16 dpo-bf16
step tvt-smollm2 900 python bench/trainable_vs_trl.py --shape smollm2 --cases ${TVT_SMOLLM2_CASES:-cita-nf4 dpo-nf4} --steps 30 \
                     --block 1 --control --swap --bench-file "$ADD"
# 8B cita-bf16 measured in both orders on 2026-11-24 midday (0.974 / 0.965); cita-nf4 not yet.
step tvt-8b-cita 900 python bench/trainable_vs_trl.py --cases cita-nf4 --steps 30 --block 1 --control --swap \
                     --bench-file "$ADD"
# The control: each trial in the new thread Tune starts for it, as before the lasting thread (same VM as packing).
step packing-new-thread 900 python bench/packing.py --mode per-gpu-new-thread --gpus 1 --seeds 1 \
                     --results "$RESULTS/packing.jsonl" --profile-step1 "$RESULTS/prof" --bench-file "$ADD"
# Whole trials alone (--as-sweep), each in a new thread, step 1 stack-sampled (measured 2026-11-24 midday).
step first-step-as-sweep 900 env OMP_NUM_THREADS=1 ALIGNSWEEP_PROFILE_STEP1="$RESULTS/prof/alone-as-sweep" \
                     python bench/first_step.py --as-sweep --repeat 1 --threads 1 --in-thread \
                     ${FIRST_STEP_KINDS:+--kinds $FIRST_STEP_KINDS} --bench-file "$ADD"
# 8B dpo-nf4 read 1.022 (30 steps) and 1.032 (60), CIs reaching below 1; single steps varied up to 2x. --times
# keeps each step's thread CPU, GC pauses and host steal. 2026-11-24 18:00-19:00 (90 steps, no control): 0.993,
# CI 0.959..1.025, full collections of ~0.46 s one step in ~17; on another VM with the heap frozen first (both
# sides: smaller, more frequent collections, same total) 0.973, CI 0.945..1.003. What a full collection walks,
# and the total with and without a frozen heap: gc-census (needs the random 8B checkpoint).
step tvt-8b-nf4 1500 python bench/trainable_vs_trl.py --cases ${TVT_8B_NF4_CASES:-dpo-nf4 sft-nf4} \
                     --steps ${TVT_STEPS:-30} --block 1 ${TVT_CONTROL---control} --swap \
                     --times "$RESULTS/tvt-times.jsonl" --bench-file "$ADD"
step gc-census 400 bash -c 'python bench/gc_census.py --steps 40 && python bench/gc_census.py --steps 40 --frozen'
step tvt-8b-bf16 1200 python bench/trainable_vs_trl.py --cases dpo-bf16 sft-bf16 --steps 30 --block 1 --control --swap \
                     --bench-file "$ADD"
# Trial start -> first step on one warm worker (target <= 5 s), every kind (FIRST_STEP_KINDS narrows it), with
# torch's threads and with one.
step first-step  400 python bench/first_step.py ${FIRST_STEP_KINDS:+--kinds $FIRST_STEP_KINDS} --bench-file "$ADD"
step first-step-1thread 400 python bench/first_step.py ${FIRST_STEP_KINDS:+--kinds $FIRST_STEP_KINDS} --threads 1 \
                     --bench-file "$ADD"
# The projected cost of the study again, now with a warm-up trial taking the process's cold start: the random 8B
# checkpoint (kept from an earlier step on this VM), one short calibration trial per method x adapter x
# precision (12 8B trials, ~1 min each), then the projection.
step ckpt-8b     300 python bench/trainable_vs_trl.py --checkpoint-only
for precision in bf16 nf4; do
step cost-$precision 600 python bench/project_cost.py calibrate --precisions $precision --steps 8 --n-eval 32 \
                     --n-generate 8 --tokenizer embedded:smollm2-135m-instruct \
                     --model "${ALIGNSWEEP_BENCH_CKPT:-$HOME/.cache/alignsweep-bench}/llama3-8b-shape-random-bf16-seed0"
done
step cost-project 120 python bench/project_cost.py --bench-file "$ADD" project
step pytest-gpu  300 python -m pytest -m gpu -q -p no:cacheprovider
# Without Ray, 1/4/16 processes training at once, time-sliced and under MPS (~5 min): re-check on a new GPU kind.
step scaling     480 python bench/packing.py --scaling 1 4 16 --mps both --steps 20 --bench-file "$ADD"
# Issue 3 (closed): GRIT all four cases with an A/A control, ~13 min; a re-check after GRIT changes.
step grit        900 python bench/grit_speed.py --steps 50 --block 1 --control --control-steps 30 --profile 2 \
                     --bench-file "$ADD"
echo "[$(date +%T)] all done"
