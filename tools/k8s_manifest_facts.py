#!/usr/bin/env python3
"""Prints, as one JSON object, what Shoal's Kubernetes manifests expect of
the binary, for an end-to-end test to check against a real fleet: each
workload's container arguments, environment and probes (path, port number
with named ports resolved, scheme), the Services, the autoscalers, and what
KEDA's metrics-api trigger reads (URL path, valueLocation, targetValue,
metricType, auth).

Usage: k8s_manifest_facts.py [DIR]   (default: deploy/kubernetes)
Reads the files DIR/kustomization.yaml lists. Needs PyYAML (a dependency of
kubernetes-validate, pinned in tools/requirements.txt).
"""

import json
import os
import sys
from urllib.parse import urlsplit

try:
    import yaml
except ImportError:
    sys.exit("k8s_manifest_facts: needs PyYAML: run scripts/validate-kubernetes (or pip install pyyaml)")

PROBES = {"startupProbe": "startup", "livenessProbe": "liveness", "readinessProbe": "readiness"}


def load(root):
    with open(os.path.join(root, "kustomization.yaml"), encoding="utf-8") as f:
        kustomization = yaml.safe_load(f)
    docs = []
    for resource in kustomization.get("resources", []):
        with open(os.path.join(root, resource), encoding="utf-8") as f:
            docs.extend(d for d in yaml.safe_load_all(f) if d)
    return kustomization, docs


def env_facts(container, config_maps):
    env = {}
    for e in container.get("env", []):
        if "value" in e:
            env[e["name"]] = {"value": e["value"]}
            continue
        src = e.get("valueFrom", {})
        if "fieldRef" in src:
            env[e["name"]] = {"field_ref": src["fieldRef"]["fieldPath"]}
        elif "configMapKeyRef" in src:
            r = src["configMapKeyRef"]
            env[e["name"]] = {"config_map": r["name"], "key": r["key"],
                              "value": config_maps.get(r["name"], {}).get(r["key"])}
        elif "secretKeyRef" in src:
            r = src["secretKeyRef"]
            env[e["name"]] = {"secret": r["name"], "key": r["key"]}
    env_from = [{"secret": s["secretRef"]["name"]} if "secretRef" in s else {"config_map": s["configMapRef"]["name"]}
                for s in container.get("envFrom", [])]
    return env, env_from


def workload_facts(doc, config_maps):
    spec = doc["spec"]
    pod = spec["template"]["spec"]
    container = pod["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    probes = {}
    for key, short in PROBES.items():
        probe = container.get(key)
        if not probe:
            continue
        get = probe.get("httpGet")
        if get is None:
            probes[short] = {"kind": next(iter(k for k in probe if k in ("exec", "tcpSocket", "grpc")), None)}
            continue
        port = get["port"]
        if isinstance(port, str):
            if port not in ports:
                sys.exit(f"k8s_manifest_facts: {doc['metadata']['name']}: {key} port {port!r} is not a named port")
            port = ports[port]
        probes[short] = {"path": get.get("path", "/"), "port": port, "scheme": get.get("scheme", "HTTP")}
    env, env_from = env_facts(container, config_maps)
    args = container.get("args", [])
    return {
        "kind": doc["kind"],
        "role": args[0] if args else None,
        "container": container["name"],
        "image": container.get("image"),
        "command": container.get("command"),
        "args": args,
        "env": env,
        "env_from": env_from,
        "ports": ports,
        "probes": probes,
        "replicas": spec.get("replicas"),
        "labels": spec["template"]["metadata"].get("labels", {}),
    }


def trigger_facts(trigger, auths):
    meta = trigger.get("metadata", {})
    url = urlsplit(meta.get("url", ""))
    facts = {
        "type": trigger["type"],
        "name": trigger.get("name"),
        "url": meta.get("url"),
        "url_host": url.hostname,
        "url_port": url.port or (443 if url.scheme == "https" else 80),
        "url_path": url.path,
        "value_location": meta.get("valueLocation"),
        "target_value": meta.get("targetValue"),
        "metric_type": trigger.get("metricType", "AverageValue"),
        "auth_mode": meta.get("authMode"),
        "auth": None,
    }
    ref = trigger.get("authenticationRef")
    if ref:
        auth = auths.get(ref["name"], {})
        facts["auth"] = {
            "trigger_authentication": ref["name"],
            "secret_params": [{"parameter": s["parameter"], "secret": s["name"], "key": s["key"]}
                              for s in auth.get("spec", {}).get("secretTargetRef", [])],
        }
    return facts


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    root = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "deploy", "kubernetes")
    kustomization, docs = load(root)
    config_maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "ConfigMap"}
    auths = {d["metadata"]["name"]: d for d in docs if d["kind"] == "TriggerAuthentication"}
    workloads = {d["metadata"]["name"]: workload_facts(d, config_maps)
                 for d in docs if d["kind"] in ("Deployment", "StatefulSet")}
    services = {}
    for d in docs:
        if d["kind"] != "Service":
            continue
        selector = d["spec"].get("selector", {})
        selects = [n for n, w in workloads.items() if selector and all(w["labels"].get(k) == v for k, v in selector.items())]
        ports = {}
        for p in d["spec"].get("ports", []):
            target = p.get("targetPort", p["port"])
            if isinstance(target, str):
                target = next((workloads[n]["ports"][target] for n in selects if target in workloads[n]["ports"]), target)
            ports[p.get("name", str(p["port"]))] = {"port": p["port"], "target_port": target}
        services[d["metadata"]["name"]] = {
            "headless": d["spec"].get("clusterIP") == "None",
            "selects": selects,
            "ports": ports,
        }
    autoscalers = {}
    scaled_objects = {}
    for d in docs:
        spec = d.get("spec", {})
        if d["kind"] == "HorizontalPodAutoscaler":
            autoscalers[d["metadata"]["name"]] = {
                "target": f"{spec['scaleTargetRef']['kind']}/{spec['scaleTargetRef']['name']}",
                "min_replicas": spec.get("minReplicas", 1),
                "max_replicas": spec["maxReplicas"],
                "metrics": spec.get("metrics", []),
            }
        elif d["kind"] == "ScaledObject":
            target = spec["scaleTargetRef"]
            scaled_objects[d["metadata"]["name"]] = {
                "target": f"{target.get('kind', 'Deployment')}/{target['name']}",
                "min_replica_count": spec.get("minReplicaCount", 0),
                "max_replica_count": spec.get("maxReplicaCount", 100),
                "polling_interval": spec.get("pollingInterval", 30),
                "triggers": [trigger_facts(t, auths) for t in spec.get("triggers", [])],
            }
    pdbs = {d["metadata"]["name"]: {k: d["spec"][k] for k in ("minAvailable", "maxUnavailable") if k in d["spec"]}
            for d in docs if d["kind"] == "PodDisruptionBudget"}
    print(json.dumps({
        "namespace": kustomization.get("namespace"),
        "workloads": workloads,
        "services": services,
        "autoscalers": autoscalers,
        "scaled_objects": scaled_objects,
        "pod_disruption_budgets": pdbs,
    }, indent=2))


if __name__ == "__main__":
    main()
