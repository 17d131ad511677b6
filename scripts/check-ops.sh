#!/usr/bin/env bash
# Validates the operations artefacts as committed, with the real tools:
#   promtool check rules / test rules (also on the PrometheusRule's rules, which must be the
#   rules file's: scripts/render-rules.py), docker-compose config (and stop_grace_period against
#   the drains), the Dockerfile (digest-pinned bases, rust-toolchain.toml's Rust, a distroless
#   runtime without maxsim), kubectl kustomize (the overlay as `kubectl apply -k` would send it,
#   with both components), kubernetes-validate --strict on that, and scripts/check-k8s.py (Pod
#   Security `restricted`, fixed image tags, no Secret, migrate first, PDBs, NetworkPolicies,
#   hashed ConfigMaps, the custom kinds' structure).
set -euo pipefail
cd "$(dirname "$0")/.."

echo "check-ops: promtool"
promtool check rules ops/prometheus/participants-rules.yml
(cd ops/prometheus && promtool test rules participants-rules.test.yml)

echo "check-ops: every alert has a runbook section"
for anchor in $(grep -o 'runbook_url: RUNBOOK_BASE_URL#[a-z]*' ops/prometheus/participants-rules.yml | cut -d'#' -f2); do
    if ! grep -qi "^## ${anchor}\$" docs/RUNBOOK.md; then
        echo "check-ops: docs/RUNBOOK.md has no section for #${anchor}" >&2
        exit 1
    fi
done
alerts=$(grep -c '^ *- alert:' ops/prometheus/participants-rules.yml)
linked=$(grep -c 'runbook_url: RUNBOOK_BASE_URL#' ops/prometheus/participants-rules.yml)
if [ "$alerts" != "$linked" ]; then
    echo "check-ops: $alerts alerts but $linked runbook_url annotations" >&2
    exit 1
fi

echo "check-ops: the PrometheusRule is the rules file, and promtool accepts what it holds"
mkdir -p target
scripts/render-rules.py prometheusrule > target/prometheusrule.yaml
if ! diff -u k8s/components/prometheus-operator/prometheusrule.yaml target/prometheusrule.yaml; then
    echo "check-ops: k8s/components/prometheus-operator/prometheusrule.yaml is out of date:" >&2
    echo "  scripts/render-rules.py prometheusrule > k8s/components/prometheus-operator/prometheusrule.yaml" >&2
    exit 1
fi
scripts/render-rules.py rules --runbook-base-url https://runbooks.example.com/RUNBOOK.md > target/participants-rules.rendered.yml
promtool check rules target/participants-rules.rendered.yml

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

# compose stops a container after stop_grace_period (default 10 s): it must outlast the
# binaries' own drain (the api's drain deadline, 20 s; SYNCD_SHUTDOWN_GRACE, 20 s by default), or a stop
# kills requests and MAX calls in flight.
target/ops-venv/bin/python - <<'PY'
import re, sys, yaml
services = yaml.safe_load(open("compose.yaml"))["services"]
def seconds(text):
    m = re.fullmatch(r"(\d+)s", str(text))
    return int(m.group(1)) if m else None
bad = []
for name in ("api", "syncd"):
    grace = seconds(services[name].get("stop_grace_period", "10s"))
    if grace is None or grace <= 20:
        bad.append(f"{name}: stop_grace_period {services[name].get('stop_grace_period', '10s (default)')} is not longer than the 20 s drain")
for line in bad:
    print(f"check-ops: compose.yaml {line}", file=sys.stderr)
sys.exit(1 if bad else 0)
PY

echo "check-ops: the Dockerfile (pinned bases, the toolchain's Rust, a shell-less runtime without maxsim)"
target/ops-venv/bin/python - <<'PY'
import re, sys
text = open("Dockerfile").read()
toolchain = re.search(r'^channel = "([^"]+)"', open("rust-toolchain.toml").read(), re.M).group(1)
bad = []
images = dict(re.findall(r"^ARG (\w+_IMAGE)=(\S+)", text, re.M))
for name, image in images.items():
    if not re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", image):
        bad.append(f"{name}={image} is not pinned as image:tag@sha256:<digest>")
for line in re.findall(r"^FROM (\S+)", text, re.M):
    if not line.startswith("${") and "@sha256:" not in line:
        bad.append(f"FROM {line} is not pinned by digest")
rust = images.get("RUST_IMAGE", "")
if not rust.startswith(f"rust:{toolchain}-"):
    bad.append(f"RUST_IMAGE {rust} is not rust-toolchain.toml's {toolchain}")
runtime = text[text.rindex("\nFROM "):]
if " AS runtime" not in runtime.splitlines()[1]:
    bad.append("the last stage (the default target) is not the runtime")
if "maxsim" in runtime:
    bad.append("the runtime stage carries maxsim")
if re.search(r"^RUN ", runtime, re.M):
    bad.append("the runtime stage RUNs a command: it has no shell")
if "distroless" not in images.get("RUNTIME_IMAGE", ""):
    bad.append("the runtime is not distroless")
for label in ("title", "version", "revision", "licenses", "description"):
    if f"org.opencontainers.image.{label}=" not in runtime:
        bad.append(f"the runtime has no org.opencontainers.image.{label} label")
if "CARGO_PROFILE_RELEASE_STRIP=symbols" not in text:
    bad.append("the binaries are not stripped")
for line in bad:
    print(f"check-ops: Dockerfile: {line}", file=sys.stderr)
sys.exit(1 if bad else 0)
PY

echo "check-ops: kustomize, kubernetes-validate --strict, check-k8s"
# prometheus-operator's kinds (PodMonitor, PrometheusRule) have no bundled schema either: they
# are rendered by kustomize, their rules checked by promtool above, and their structure by
# check-k8s.py (selectors, ports, job label, runbook URLs).
# KEDA's kinds have no bundled schema: kubernetes-validate reports them as warnings, unchecked.
mkdir -p target
if command -v kubectl >/dev/null 2>&1; then
    kubectl kustomize k8s/overlays/example > target/k8s-example.yaml
    target/ops-venv/bin/kubernetes-validate --strict --quiet target/k8s-example.yaml
    target/ops-venv/bin/python scripts/check-k8s.py target/k8s-example.yaml
    # The rules as the cluster gets them (kustomize filled the runbook links in).
    target/ops-venv/bin/python -c '
import sys, yaml
rules = [d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "PrometheusRule"]
assert len(rules) == 1, f"{len(rules)} PrometheusRules rendered"
yaml.safe_dump(rules[0]["spec"], open(sys.argv[2], "w"), sort_keys=False)
' target/k8s-example.yaml target/k8s-prometheusrule-spec.yml
    promtool check rules target/k8s-prometheusrule-spec.yml
else
    echo "check-ops: kubectl is not installed: the overlay is not rendered; checking the base files one by one" >&2
    target/ops-venv/bin/kubernetes-validate --strict --quiet k8s/base/api.yaml k8s/base/syncd.yaml k8s/base/networkpolicy.yaml
fi
target/ops-venv/bin/kubernetes-validate --strict --quiet k8s/secret.example.yaml

echo "check-ops: grafana dashboard is valid JSON"
python3 -c 'import json,sys; d=json.load(open(sys.argv[1])); assert d["panels"], "no panels"' ops/grafana/participants-dashboard.json
echo "check-ops: all passed"
