#!/usr/bin/env bash
# Install, then: tiny model -> synthetic dataset -> LoRA fine-tune -> a generated video. Prints each phase's time.
# Everything lands in ./quickstart/ (rerunning starts it afresh).
set -euo pipefail
cd "$(dirname "$0")/.."
phase() {  # phase NAME COMMAND...
  local name=$1; shift
  local t0=$(date +%s%N)
  "$@"
  local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  printf '[quickstart] %-9s %4d.%01d s\n' "$name" $((ms / 1000)) $((ms % 1000 / 100)) | tee -a quickstart/timings.txt
}
mkdir -p quickstart && : > quickstart/timings.txt
phase install bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
rm -rf quickstart/model quickstart/data quickstart/run quickstart/video.mp4
phase tiny     cogtune tiny quickstart/model --variant cogvideox-5b
phase synth    cogtune data synth quickstart/data --clips 8
phase train    cogtune train configs/quickstart.yaml
phase generate cogtune generate --model quickstart/model --lora quickstart/run/lora \
  --prompt "a red circle moving left on a white background" --steps 10 --out quickstart/video.mp4
echo "[quickstart] video: quickstart/video.mp4   LoRA: quickstart/run/lora/   metrics: quickstart/run/logs/metrics.jsonl"
