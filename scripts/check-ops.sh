#!/usr/bin/env bash
# Validates the operations artefacts as committed, with the real tools:
#   promtool check rules / test rules, docker-compose config, kubectl kustomize (the overlay as
#   `kubectl apply -k` would send it), kubernetes-validate --strict on that, and
#   scripts/check-k8s.py (Pod Security `restricted`, fixed image tags, no Secret, migrate first).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "check-ops: promtool"
promtool check rules ops/prometheus/participants-rules.yml
(cd ops/prometheus && promtool test rules participants-rules.test.yml)

echo "check-ops: every alert has a runbook section"
for anchor in $(grep -o 'runbook_url: docs/RUNBOOK.md#[a-z]*' ops/prometheus/participants-rules.yml | cut -d'#' -f2); do
    if ! grep -qi "^## ${anchor}\$" docs/RUNBOOK.md; then
        echo "check-ops: docs/RUNBOOK.md has no section for #${anchor}" >&2
        exit 1
    fi
done
alerts=$(grep -c '^ *- alert:' ops/prometheus/participants-rules.yml)
linked=$(grep -c 'runbook_url: docs/RUNBOOK.md#' ops/prometheus/participants-rules.yml)
if [ "$alerts" != "$linked" ]; then
    echo "check-ops: $alerts alerts but $linked runbook_url annotations" >&2
    exit 1
fi

echo "check-ops: docker-compose"
JWT_SECRET=check-ops-secret-0123456789 docker-compose -f compose.yaml config -q
# No default JWT_SECRET: without one, compose must refuse to start.
if env -u JWT_SECRET docker-compose -f compose.yaml config -q >/dev/null 2>&1; then
    echo "check-ops: compose.yaml starts without JWT_SECRET" >&2
    exit 1
fi
# The healthchecks are the binaries' own subcommands (the image has no curl, and its /bin/sh
# is dash, which has no /dev/tcp).
if grep -n '/dev/tcp' compose.yaml; then
    echo "check-ops: a compose healthcheck relies on bash's /dev/tcp" >&2
    exit 1
fi

echo "check-ops: kustomize, kubernetes-validate --strict, check-k8s"
# KEDA's kinds have no bundled schema: kubernetes-validate reports them as warnings, unchecked.
mkdir -p target
if command -v kubectl >/dev/null 2>&1; then
    kubectl kustomize k8s/overlays/example > target/k8s-example.yaml
    target/ops-venv/bin/kubernetes-validate --strict --quiet target/k8s-example.yaml
    target/ops-venv/bin/python scripts/check-k8s.py target/k8s-example.yaml
else
    echo "check-ops: kubectl is not installed: the overlay is not rendered; checking the base files one by one" >&2
    target/ops-venv/bin/kubernetes-validate --strict --quiet k8s/base/api.yaml k8s/base/syncd.yaml k8s/base/configmap.yaml
    cat k8s/base/api.yaml <(echo ---) k8s/base/syncd.yaml | target/ops-venv/bin/python scripts/check-k8s.py
fi
target/ops-venv/bin/kubernetes-validate --strict --quiet k8s/secret.example.yaml

echo "check-ops: grafana dashboard is valid JSON"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["panels"], "no panels"' ops/grafana/participants-dashboard.json
echo "check-ops: all passed"
