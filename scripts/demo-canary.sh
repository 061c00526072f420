#!/usr/bin/env bash
# After `make demo`: release a second good revision (promoted by the canary), then the
# degraded variant, which the canary must catch and roll back. Exits 0 only when both
# happened as they should; prints both record paths.
set -euo pipefail
cd "$(dirname "$0")/.."
GANTRY=.venv/bin/gantry
HF_ENDPOINT="$($GANTRY env url hub)"
export HF_ENDPOINT

good=$($GANTRY release examples/minilm-demo-v2.yaml | tail -n 1)
echo "promoted: $good"

set +e
bad=$($GANTRY release examples/minilm-degraded.yaml | tail -n 1)
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
