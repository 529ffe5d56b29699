#!/usr/bin/env bash
# One short session on a lent GPU machine (15 minutes of device time in all, start included), most
# important first, each step with its own timeout and none started past a deadline:
#  0. batched per-word occlusion against a per-patch loop and captum's FeatureAblation on CUDA, then
#     on all the machine's CPU cores (loop and Loupe only): the bar of >= 5x a per-patch loop, which
#     a 2-core CPU cannot show (there the batched path already runs near the cores' float32
#     matrix-product rate, so only the loop's per-call overhead separates them);
#  1. batched chefer vs the per-image loop on the machine's CPU cores (issue 3's CPU ratio; the
#     2-core development machine caps it below 5x, see chefer_ceiling in benchmarks/grounding.py),
#     at 1, 8 and all threads, three runs each, interleaved so drift hits every thread count alike;
#  2. the ViT-B/16 grounding benchmark in bf16 (chefer, gradcam);
#  3. the probe library's CUDA path on the zoo models: grounding evaluation on CUDA and CPU, the
#     generative probes (token attribution and its benchmark, attention statistics, head ablation),
#     memory backoff after a real out-of-memory error, the shortcut probe.
# Everything lands in ${OUT:-gpu-out}/gpu_check.tar.gz (the device tool returns at most 8 files)
# and a log; one line per step goes to stdout.
set -uo pipefail
out=${OUT:-gpu-out}; mkdir -p "$out"
work=$(mktemp -d); deadline=${GPU_CHECK_DEADLINE:-420}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 LOUPE_CACHE_DIR=/tmp/loupe-cache PYTHONPATH=.
step() {  # step NAME TIMEOUT COMMAND...: stdout to $work/NAME, skipped past the deadline
  local name=$1 limit=$2; shift 2
  if (( SECONDS > deadline )); then : > "$work/$name"; echo "$name skipped (past ${deadline}s)"; return; fi
  local t0=$SECONDS; timeout "$limit" "$@" > "$work/$name" 2> "$work/$name.err"
  echo "$name rc=$? ${SECONDS}s (+$((SECONDS - t0))s)"
}
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; lscpu | grep -E "Model name|^CPU\(s\)"
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"; } \
  | tee "$work/machine.txt"
step token_perturbation_cuda.json 150 python3 benchmarks/token_attribution.py --device cuda --perturbation --images 3 \
  --repeats 3; grep -h "speedup\|median_s\|max_abs" "$work/token_perturbation_cuda.json"
step token_perturbation_cpu.json 150 env CUDA_VISIBLE_DEVICES="" python3 benchmarks/token_attribution.py --perturbation \
  --images 3 --repeats 3 --threads "$(nproc)" --variants loupe,per-patch-loop
grep -h "speedup\|median_s" "$work/token_perturbation_cpu.json"
for run in 1 2 3; do
  for threads in 1 8 $(nproc); do
    step "chefer_cpu_${threads}t_r${run}.txt" 60 env CUDA_VISIBLE_DEVICES="" python3 -m benchmarks grounding --only chefer \
      --repeats 7 --threads "$threads" --json "$work/chefer_cpu_${threads}t_r${run}.json"
  done
done
# the benchmark prints its own one-line verdict (speedup, ceiling) on stderr
grep -h "^chefer" "$work"/chefer_cpu_*.txt.err 2>/dev/null
step gpu_grounding.json 150 python3 benchmarks/gpu_grounding.py --dtype bf16
head -c 2500 "$work/gpu_grounding.json"; echo
zoo=workers/probes/zoo/checkpoints
model=$zoo/tiny-clip; [ -d "$model" ] || model=$zoo/clean-clip
for device in cuda cpu; do
  step "evaluate_$device.json" 90 python3 -m workers.probes evaluate --model "$model" --method chefer --limit 128 \
    --device $device --json; cat "$work/evaluate_$device.json"; echo
done
llava=$zoo/tiny-llava
heldout=$(python3 -c "from workers.probes import zoo; print(zoo.dataset_dir('heldout'))")
step token_attribution_cuda.json 90 python3 benchmarks/token_attribution.py --device cuda --repeats 5
head -c 1500 "$work/token_attribution_cuda.json"; echo
step attribute_cuda.json 90 python3 -m workers.probes attribute --model $llava --dataset "$heldout" --limit 64 --device cuda \
  --no-progress --json; head -c 800 "$work/attribute_cuda.json"; echo
step attention_cuda.json 60 python3 -m workers.probes attention --model $llava --dataset "$heldout" --limit 16 --device cuda \
  --no-progress --json; head -c 600 "$work/attention_cuda.json"; echo
step intervene_cuda.json 90 python3 -m workers.probes intervene --model $llava --dataset "$heldout" --kind head-ablation \
  --mode mean --limit 16 --device cuda --no-progress --json; head -c 600 "$work/intervene_cuda.json"; echo
# Memory backoff on a real device: a selftest batch of 2^20 blank images cannot fit; suite.run halves it
# until it does and records where (metrics.memory_backoff).
step memory_backoff_cuda.json 120 python3 -c "
import json; from workers.probes import suite
print(json.dumps(suite.run('selftest', '$model', None, {'batch_size': 1 << 20}, device='cuda').metrics))
"; cat "$work/memory_backoff_cuda.json"; echo
data=$(python3 -c "from workers.probes.zoo import shortcut; print(shortcut.probe_data())")
step shortcut_cuda.json 120 python3 -m workers.probes shortcut --model $zoo/shortcut-clip --concepts "$data/concepts" \
  --inputs "$data/inputs" --target "a red circle" --device cuda --json; head -c 1000 "$work/shortcut_cuda.json"; echo
for f in "$work"/*.err; do [ -s "$f" ] && { echo "== $(basename "$f")"; tail -c 700 "$f"; echo; }; done
tar -czf "$out/gpu_check.tar.gz" -C "$work" .
echo "done in ${SECONDS}s"
