#!/usr/bin/env bash
# The CUDA check of `edgecl learn` on a GPU machine, from the repository root, with edgecl
# importable by python3 (installed, or on PYTHONPATH): the daemon's learner throughput against
# `edgecl bench` on the same GPU (fine-tuning and GEM, configs with device: auto), a daemon on
# the GPU fed three pmnist tasks with --repo (exports from a CUDA learner), and the CUDA tests.
# Writes under ${OUT:-/tmp/edgecl-gpu}.
set -euo pipefail
OUT=${OUT:-/tmp/edgecl-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())"
wrapper=$(mktemp -d)/edgecl
printf '#!/bin/sh\nexec python3 -m edgecl "$@"\n' > "$wrapper"
chmod +x "$wrapper"

python3 benchmarks/learn_daemon.py --parts learner --methods finetune gem --repeats 2 \
    --poll-s 0.25 --edgecl "$wrapper" --out "$OUT/learner.json"

state=$(mktemp -d)
mkdir -p "$state/repo"
python3 -m edgecl learn --config models/gem.yaml --state-dir "$state/s" --repo "$state/repo" \
    --port 8765 2> "$OUT/learn.log" &
daemon=$!
python3 -m edgecl replay embedded:pmnist --tasks 0,1,2 --wait-s 300
python3 -m edgecl status --json > "$OUT/status.json"
python3 -m edgecl status
kill -TERM "$daemon"
wait "$daemon"
python3 -c "import json,sys; s=json.load(open(sys.argv[1])); print('daemon device', s['device'],
    'published', {t: v['served_version'] for t, v in s['tasks'].items()})" "$OUT/status.json"

python3 -m pytest -q -x -p no:cacheprovider tests -k "cuda" 2>&1 | tail -5
