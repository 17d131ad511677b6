#!/usr/bin/env python3
"""Checks a rendered kustomization (YAML on stdin or a file) for what `kubectl apply -k` onto a
namespace with Pod Security `restricted` needs, and for the deploy path's own rules:

- every pod passes the `restricted` level: non-root, seccomp RuntimeDefault, no privilege
  escalation, every capability dropped; and has a read-only root;
- every image has a tag, and it is not `latest`;
- no Secret is applied (the operator creates it out of band);
- a Deployment an autoscaler targets sets no `replicas` (an apply would undo the autoscaler);
- every Deployment that talks to Postgres migrates first (an init container).

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
    for problem in problems:
        print(f"check-k8s: {problem}")
    print(f"check-k8s: {len(docs)} objects, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
