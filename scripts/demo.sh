#!/usr/bin/env bash
# The main job: set up, build the tiny model if absent, start the three services,
# answer one image+text request, stop the services.
#   MODEL=/path/to/hf/checkpoint scripts/demo.sh   serves a real local checkpoint instead.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1
MODEL="${MODEL:-models/tiny-qwen2_vl}"
IMAGE="${IMAGE:-assets/sample.png}"
PROMPT="${PROMPT:-What is in this picture?}"
if [ "$MODEL" = "models/tiny-qwen2_vl" ]; then
  [ -f "$MODEL/config.json" ] || .venv/bin/triptych make-model --family qwen2_vl --out "$MODEL" >/dev/null 2>&1
  echo "NOTE: $MODEL has RANDOM weights: the answer is gibberish by design."
  echo "      Serve a real checkpoint folder with: MODEL=/path/to/Qwen2-VL-2B-Instruct scripts/demo.sh"
fi
LOG="$(mktemp)"
.venv/bin/triptych up --model "$MODEL" --port "${PORT:-50051}" >"$LOG" 2>&1 &
UP_PID=$!
trap 'kill -TERM $UP_PID 2>/dev/null; wait $UP_PID 2>/dev/null; rm -f "$LOG"' EXIT
for _ in $(seq 1 600); do
  grep -q "^processor listening on" "$LOG" && break
  kill -0 $UP_PID 2>/dev/null || { cat "$LOG"; echo "triptych up failed" >&2; exit 1; }
  sleep 0.5
done
ADDRESS="$(grep "^processor listening on" "$LOG" | awk '{print $4}')"
[ -n "$ADDRESS" ] || { cat "$LOG"; echo "triptych up did not start in time" >&2; exit 1; }
echo "$(grep "^processor listening on" "$LOG")"
echo "request: $PROMPT + $IMAGE"
echo -n "answer:  "
.venv/bin/triptych generate --server "$ADDRESS" --prompt "$PROMPT" --image "$IMAGE" --max-new-tokens 32
