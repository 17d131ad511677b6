#!/usr/bin/env python3
"""Checks a rendered kustomization (YAML on stdin or a file) for what `kubectl apply -k` onto a
namespace with Pod Security `restricted` needs, and for the deploy path's own rules:

- every pod passes the `restricted` level: non-root, seccomp RuntimeDefault, no privilege
  escalation, every capability dropped; and has a read-only root;
- every image has a tag, and it is not `latest`;
- no Secret is applied (the operator creates it out of band);
- a Deployment an autoscaler targets sets no `replicas` (an apply would undo the autoscaler);
- every Deployment that talks to Postgres migrates first (an init container);
- no pod mounts a service account token (neither binary calls the Kubernetes API);
- every ConfigMap the pods read is generated with a hash suffix (a change rolls the pods);
- every Deployment has a PodDisruptionBudget that lets a drain evict one pod even at 2
  replicas, and the api spreads its replicas over nodes;
- the CronJob has startingDeadlineSeconds and its Jobs activeDeadlineSeconds;
- every workload's pods are selected by a NetworkPolicy with both Ingress and Egress;
- prometheus-operator's kinds, which kubernetes-validate has no schema for, structurally: the
  PodMonitor selects the api and syncd pods by a label they carry, on a port they name, with
  that label as job; every PrometheusRule alert has a severity and an absolute runbook_url
  with an anchor (no RUNBOOK_BASE_URL left); KEDA's trigger has a host:port address.

Prints one line per problem and exits 1 when there is any."""
import sys

import yaml


def pod_specs(doc):
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
        yield spec["template"]["spec"]
    elif kind == "CronJob":
        yield spec["jobTemplate"]["spec"]["template"]["spec"]
    elif kind == "Pod":
        yield spec


def selects(selector, labels):
    """Whether a label selector (matchLabels, matchExpressions In/NotIn/Exists) matches labels."""
    for key, value in (selector.get("matchLabels") or {}).items():
        if labels.get(key) != value:
            return False
    for expr in selector.get("matchExpressions") or []:
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and labels.get(key) in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
    return True


def pod_template(doc):
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        return spec["jobTemplate"]["spec"]["template"]
    return spec["template"]


def operator_checks(docs):
    problems = []
    workloads = [d for d in docs if d["kind"] in ("Deployment", "CronJob")]
    generated = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    for doc in workloads:
        name = f'{doc["kind"]}/{doc["metadata"]["name"]}'
        template = pod_template(doc)
        labels = (template.get("metadata") or {}).get("labels") or {}
        pod = template["spec"]
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{name}: automountServiceAccountToken is not false")
        for c in pod.get("initContainers", []) + pod["containers"]:
            for source in c.get("envFrom", []):
                ref = (source.get("configMapRef") or {}).get("name")
                if ref and ref not in generated:
                    problems.append(f"{name}: reads ConfigMap {ref}, which is not in the manifests")
                elif ref and ref == "participants-config":
                    problems.append(f"{name}: ConfigMap {ref} has no hash suffix; a change would not roll the pods")
        covered = [p for p in policies if selects(p["spec"]["podSelector"], labels)]
        if not any({"Ingress", "Egress"} <= set(p["spec"].get("policyTypes", [])) for p in covered):
            problems.append(f"{name}: no NetworkPolicy restricts both its ingress and egress")
        if doc["kind"] == "CronJob":
            if "startingDeadlineSeconds" not in doc["spec"]:
                problems.append(f"{name}: no startingDeadlineSeconds")
            if "activeDeadlineSeconds" not in doc["spec"]["jobTemplate"]["spec"]:
                problems.append(f"{name}: its Jobs have no activeDeadlineSeconds")
            continue
        budgets = [p for p in pdbs if selects(p["spec"]["selector"], labels)]
        if not budgets:
            problems.append(f"{name}: no PodDisruptionBudget")
        for budget in budgets:
            spec = budget["spec"]
            if "maxUnavailable" not in spec and int(spec.get("minAvailable", 0)) >= 2:
                problems.append(f"{name}: PDB minAvailable {spec['minAvailable']} blocks a drain at 2 replicas; use maxUnavailable: 1")
        if doc["metadata"]["name"] == "participants-api" and not pod.get("topologySpreadConstraints"):
            problems.append(f"{name}: no topologySpreadConstraints for its replicas")
    for monitor in (d for d in docs if d["kind"] == "PodMonitor"):
        name = f'PodMonitor/{monitor["metadata"]["name"]}'
        spec = monitor["spec"]
        job = spec.get("jobLabel")
        ports = {e.get("port") for e in spec.get("podMetricsEndpoints", [])}
        for target in ("participants-api", "participants-syncd"):
            matched = [d for d in workloads if d["metadata"]["name"] == target]
            for doc in matched:
                template = pod_template(doc)
                labels = template["metadata"]["labels"]
                if not selects(spec["selector"], labels):
                    problems.append(f"{name}: does not select {target}'s pods")
                    continue
                named = {p.get("name") for c in template["spec"]["containers"] for p in c.get("ports", [])}
                if not ports & named:
                    problems.append(f"{name}: scrapes ports {sorted(ports)}, {target} names {sorted(named)}")
                if labels.get(job) != target:
                    problems.append(f"{name}: jobLabel {job} does not make job={target} (the rules select it)")
        if any(e.get("path", "/metrics") != "/metrics" for e in spec.get("podMetricsEndpoints", [])):
            problems.append(f"{name}: scrapes a path other than /metrics")
    for rule in (d for d in docs if d["kind"] == "PrometheusRule"):
        name = f'PrometheusRule/{rule["metadata"]["name"]}'
        alerts = [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]
        if not alerts:
            problems.append(f"{name}: no alerts")
        for alert in alerts:
            url = (alert.get("annotations") or {}).get("runbook_url", "")
            if not url.startswith(("https://", "http://")) or "#" not in url or "RUNBOOK_BASE_URL" in url:
                problems.append(f"{name}: {alert['alert']} runbook_url {url!r} is not an absolute URL with an anchor")
            if (alert.get("labels") or {}).get("severity") not in ("warning", "critical"):
                problems.append(f"{name}: {alert['alert']} has no severity warning/critical")
    for scaled in (d for d in docs if d["kind"] == "ScaledObject"):
        for trigger in scaled["spec"]["triggers"]:
            address = (trigger.get("metadata") or {}).get("address", "")
            host, _, port = address.rpartition(":")
            if not host or not port.isdigit():
                problems.append(f"ScaledObject/{scaled['metadata']['name']}: trigger address {address!r} is not host:port")
    return problems


def main():
    source = open(sys.argv[1]) if len(sys.argv) > 1 else sys.stdin
    docs = [d for d in yaml.safe_load_all(source) if d]
    problems = []
    scaled = {
        d["spec"]["scaleTargetRef"]["name"]
        for d in docs
        if d.get("kind") == "ScaledObject"
    }
    for doc in docs:
        name = f'{doc["kind"]}/{doc["metadata"]["name"]}'
        if doc["kind"] == "Secret":
            problems.append(f"{name}: a Secret is applied with the manifests; create it out of band")
        if doc["kind"] == "Deployment" and doc["metadata"]["name"] in scaled and "replicas" in doc["spec"]:
            problems.append(f"{name}: sets replicas while an autoscaler scales it")
        for pod in pod_specs(doc):
            psc = pod.get("securityContext") or {}
            if psc.get("runAsNonRoot") is not True:
                problems.append(f"{name}: pod securityContext.runAsNonRoot is not true")
            if (psc.get("seccompProfile") or {}).get("type") != "RuntimeDefault":
                problems.append(f"{name}: pod seccompProfile is not RuntimeDefault")
            containers = pod.get("initContainers", []) + pod["containers"]
            for c in containers:
                where = f'{name} container {c["name"]}'
                csc = c.get("securityContext") or {}
                if csc.get("allowPrivilegeEscalation") is not False:
                    problems.append(f"{where}: allowPrivilegeEscalation is not false")
                if (csc.get("capabilities") or {}).get("drop") != ["ALL"]:
                    problems.append(f"{where}: capabilities.drop is not [ALL]")
                if csc.get("readOnlyRootFilesystem") is not True:
                    problems.append(f"{where}: root filesystem is writable")
                image = c["image"]
                tag = image.rsplit("/", 1)[-1].partition(":")[2]
                if not tag or tag == "latest":
                    problems.append(f"{where}: image {image} has no fixed tag")
            env_names = {
                e["name"] for c in pod["containers"] for e in c.get("env", [])
            }
            if doc["kind"] == "Deployment" and "DATABASE_URL" in env_names:
                commands = [c.get("command", []) for c in pod.get("initContainers", [])]
                if not any(cmd[-1:] == ["migrate"] for cmd in commands):
                    problems.append(f"{name}: uses Postgres but does not migrate first")
    problems += operator_checks(docs)
    for problem in problems:
        print(f"check-k8s: {problem}")
    print(f"check-k8s: {len(docs)} objects, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
