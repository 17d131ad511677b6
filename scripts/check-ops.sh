#!/usr/bin/env bash
# Validates the operations artefacts as committed, with the real tools:
#   promtool check rules / test rules, docker-compose config, kubernetes-validate --strict.
set -euo pipefail
cd "$(dirname "$0")/.."

echo "check-ops: promtool"
promtool check rules ops/prometheus/participants-rules.yml
(cd ops/prometheus && promtool test rules participants-rules.test.yml)

echo "check-ops: docker-compose"
docker-compose -f compose.yaml config -q
MAX_API_URL=http://maxsim:9099 docker-compose -f compose.yaml --profile sim config -q

echo "check-ops: kubernetes-validate --strict"
# KEDA's ScaledObject has no bundled schema: it is reported as a warning, not checked.
target/ops-venv/bin/kubernetes-validate --strict --quiet k8s/*.yaml

echo "check-ops: grafana dashboard is valid JSON"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["panels"], "no panels"' ops/grafana/participants-dashboard.json
echo "check-ops: all passed"
