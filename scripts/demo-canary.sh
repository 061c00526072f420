#!/usr/bin/env bash
# Release a good revision (promoted by the canary, or deployed as the first champion), then
# a degraded one, which the canary must catch and roll back. Exits 0 only when both
# happened as they should; prints both record paths.
#
#   scripts/demo-canary.sh [GOOD_SPEC DEGRADED_SPEC]
#
# Defaults: after `make demo`, MiniLM's v2 then its degraded revision (`make demo-canary`).
# `make demo-chat` runs it with the SmolLM2 chat specs.
set -euo pipefail
cd "$(dirname "$0")/.."
GANTRY=.venv/bin/gantry
GOOD_SPEC=${1:-examples/minilm-demo-v2.yaml}
DEGRADED_SPEC=${2:-examples/minilm-degraded.yaml}
HF_ENDPOINT="$($GANTRY env url hub)"
export HF_ENDPOINT

good=$($GANTRY release "$GOOD_SPEC" | tail -n 1)
echo "promoted: $good"

set +e
bad=$($GANTRY release "$DEGRADED_SPEC" | tail -n 1)
rc=$?
set -e
echo "degraded: $bad"
if [[ $rc -ne 1 ]]; then
  echo "demo-canary: the degraded release exited $rc; expected 1 (rolled back by the canary)" >&2
  exit 1
fi
.venv/bin/python - "$bad" <<'PY'
import json, sys
stage = json.load(open(sys.argv[1]))["stages"]["canary"]
if stage["status"] != "failed" or stage["error"]["type"] != "CanaryFailedError":
    sys.exit(f"demo-canary: expected the canary to roll the degraded model back, got {stage}")
print("rolled back:", stage["error"]["message"].splitlines()[0])
PY
$GANTRY env status | grep '^deployment'
