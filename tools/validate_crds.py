#!/usr/bin/env python3
"""Validates what kubernetes-validate cannot: KEDA's custom resources, and
the references between Shoal's manifests.

kubernetes-validate ships the schemas of Kubernetes' own kinds only; for a
custom resource it prints a warning and passes. So, for every `keda.sh`
object this script:

1. validates it against a JSON Schema of KEDA's CRDs, strictly (an unknown
   field is an error, as `kubectl apply` rejects it). The schema comes from
   the PyPI package cloudcoil-models-keda (pinned in tools/requirements.txt):
   models generated from the CustomResourceDefinitions of a KEDA release
   (2.16.1 for 2.16.1.0), turned back into JSON Schema with pydantic;
2. checks the metrics-api triggers against KEDA's documented parameters
   (which the CRD leaves as a free string map): url, valueLocation and a
   positive targetValue, a known authMode, and for `bearer` a
   TriggerAuthentication that supplies the `token` parameter.

Then, across all the manifests, it checks the references a cluster would
only trip on at run time: Secrets, ConfigMaps and their keys used by pods
(or by KEDA), probe ports, Service selectors and target ports, and the
targets of HPAs, PDBs and ScaledObjects. Secrets that are created by hand
and never committed (the bearer tokens) are named with --external-secret.

Usage: validate_crds.py [--namespace NS] [--external-secret NAME:KEY]... FILE...
Exits 1 and prints every problem when anything is wrong.
"""

import argparse
import sys

import jsonschema
import yaml

KEDA_API = "keda.sh/v1alpha1"
# authMode values the metrics-api scaler documents, and the parameters each
# needs from the trigger or its TriggerAuthentication.
METRICS_API_AUTH = {
    "apiKey": {"apiKey"},
    "basic": {"username"},
    "tls": {"cert", "key"},
    "bearer": {"token"},
}
WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


def load(files):
    docs = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for doc in yaml.safe_load_all(f):
                if doc:
                    docs.append((path, doc))
    return docs


def name_of(doc):
    return f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"


def strict(schema):
    """Pydantic's JSON Schema, made as strict as the API server: optional
    fields are absent rather than null, and objects with declared properties
    take no others."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {k: strict(v) for k, v in schema.items()}
    branches = schema.get("anyOf")
    if isinstance(branches, list):
        kept = [b for b in branches if b != {"type": "null"}]
        if len(kept) != len(branches):
            if schema.get("default", 0) is None:
                del schema["default"]
            if len(kept) == 1:
                del schema["anyOf"]
                schema.update(kept[0])
            else:
                schema["anyOf"] = kept
    if "properties" in schema and "additionalProperties" not in schema:
        schema["additionalProperties"] = False
    return schema


_schemas = {}


def keda_schema(kind):
    if kind not in _schemas:
        from cloudcoil.models.keda import v1alpha1
        from cloudcoil.resources import Resource

        model = getattr(v1alpha1, kind, None)
        if not (isinstance(model, type) and issubclass(model, Resource) and model is not Resource):
            _schemas[kind] = None
        else:
            _schemas[kind] = strict(model.model_json_schema(by_alias=True, mode="validation"))
    return _schemas[kind]


def check_keda(path, doc, errors):
    kind = doc.get("kind")
    schema = keda_schema(kind)
    if schema is None:
        errors.append(f"{path}: {name_of(doc)}: KEDA has no kind {kind!r} in {KEDA_API}")
        return False
    validator = jsonschema.Draft202012Validator(schema)
    ok = True
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
        where = ".".join(str(p) for p in e.path) or "(top)"
        errors.append(f"{path}: {name_of(doc)}: {where}: {e.message}")
        ok = False
    return ok


def check_metrics_api(path, so, trigger_auths, errors):
    spec = so.get("spec")
    triggers = spec.get("triggers") if isinstance(spec, dict) else None
    for i, trig in enumerate(triggers if isinstance(triggers, list) else []):
        if not isinstance(trig, dict) or trig.get("type") != "metrics-api":
            continue
        where = f"{path}: {name_of(so)}: spec.triggers.{i}"
        meta = trig.get("metadata")
        if not isinstance(meta, dict):
            continue
        for key in ("url", "valueLocation", "targetValue"):
            if not meta.get(key):
                errors.append(f"{where}.metadata: metrics-api needs {key!r}")
        url = meta.get("url", "")
        if url and not url.startswith(("http://", "https://")):
            errors.append(f"{where}.metadata.url: {url!r} is not an http(s) URL")
        try:
            if float(meta.get("targetValue", "1")) <= 0:
                raise ValueError
        except (TypeError, ValueError):
            errors.append(f"{where}.metadata.targetValue: {meta.get('targetValue')!r} is not a positive number")
        metric_type = trig.get("metricType", "AverageValue")
        if metric_type not in ("AverageValue", "Value"):
            errors.append(f"{where}.metricType: {metric_type!r}: metrics-api takes AverageValue or Value")
        modes = [m.strip() for m in str(meta.get("authMode", "")).split(",") if m.strip()]
        supplied = set(meta)
        ref = trig.get("authenticationRef")
        if ref:
            ref_kind = ref.get("kind", "TriggerAuthentication")
            auth = trigger_auths.get((ref_kind, ref.get("name")))
            if auth is None:
                errors.append(f"{where}.authenticationRef: no {ref_kind} {ref.get('name')!r} in the manifests")
            else:
                spec = auth.get("spec", {})
                for section in ("secretTargetRef", "configMapTargetRef", "env"):
                    supplied |= {p.get("parameter") for p in spec.get(section, [])}
        for mode in modes:
            if mode not in METRICS_API_AUTH:
                errors.append(f"{where}.metadata.authMode: {mode!r} is not one of {sorted(METRICS_API_AUTH)}")
                continue
            missing = METRICS_API_AUTH[mode] - supplied
            if missing:
                errors.append(f"{where}: authMode {mode} needs parameter(s) {sorted(missing)} "
                              "from the trigger or its TriggerAuthentication")


def pod_spec(doc):
    spec = doc.get("spec", {})
    if doc.get("kind") == "Pod":
        return spec
    if doc.get("kind") == "CronJob":
        return spec.get("jobTemplate", {}).get("spec", {}).get("template", {}).get("spec")
    return spec.get("template", {}).get("spec")


def check_references(docs, namespace, external, errors):
    by_kind = {}
    for path, doc in docs:
        by_kind.setdefault(doc.get("kind"), {})[doc["metadata"]["name"]] = (path, doc)
        ns = doc["metadata"].get("namespace")
        if namespace and doc.get("kind") != "Namespace" and ns != namespace:
            errors.append(f"{path}: {name_of(doc)}: namespace {ns!r}, expected {namespace!r}")

    def keys_of(kind, name):
        if kind == "Secret" and name in external:
            return external[name]
        found = by_kind.get(kind, {}).get(name)
        if found is None:
            return None
        d = found[1]
        return set(d.get("data") or {}) | set(d.get("stringData") or {}) | set(d.get("binaryData") or {})

    def need(where, kind, name, key=None, optional=False):
        keys = keys_of(kind, name)
        if keys is None:
            if not optional:
                errors.append(f"{where}: {kind} {name!r} is neither in the manifests nor an --external-secret")
        elif key is not None and key not in keys:
            errors.append(f"{where}: {kind} {name!r} has no key {key!r}")

    workloads = []
    for path, doc in docs:
        spec = pod_spec(doc) if doc.get("kind") in WORKLOAD_KINDS | {"Pod", "CronJob"} else None
        if not spec:
            continue
        labels = (doc.get("spec", {}).get("template", {}).get("metadata", {}) or {}).get("labels", {})
        workloads.append((doc, labels, spec))
        where = f"{path}: {name_of(doc)}"
        for vol in spec.get("volumes", []):
            if "secret" in vol:
                s = vol["secret"]
                for item in s.get("items", []) or [None]:
                    need(f"{where}: volume {vol['name']}", "Secret", s["secretName"],
                         item and item["key"], s.get("optional", False))
            if "configMap" in vol:
                c = vol["configMap"]
                for item in c.get("items", []) or [None]:
                    need(f"{where}: volume {vol['name']}", "ConfigMap", c["name"],
                         item and item["key"], c.get("optional", False))
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c in spec.get("initContainers", []) + spec.get("containers", []):
            cw = f"{where}: container {c['name']}"
            for env in c.get("env", []):
                src = env.get("valueFrom", {})
                for ref_key, kind in (("secretKeyRef", "Secret"), ("configMapKeyRef", "ConfigMap")):
                    if ref_key in src:
                        r = src[ref_key]
                        need(f"{cw}: env {env['name']}", kind, r["name"], r["key"], r.get("optional", False))
            for env_from in c.get("envFrom", []):
                for ref_key, kind in (("secretRef", "Secret"), ("configMapRef", "ConfigMap")):
                    if ref_key in env_from:
                        r = env_from[ref_key]
                        need(f"{cw}: envFrom", kind, r["name"], None, r.get("optional", False))
            for mount in c.get("volumeMounts", []):
                if mount["name"] not in volumes:
                    errors.append(f"{cw}: volumeMount {mount['name']!r} has no volume")
                vol = volumes.get(mount["name"], {})
                if "subPath" in mount and "secret" in vol:
                    need(f"{cw}: volumeMount {mount['name']} subPath", "Secret",
                         vol["secret"]["secretName"], mount["subPath"], vol["secret"].get("optional", False))
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", []) if p.get("name")}
            for probe_name in ("startupProbe", "livenessProbe", "readinessProbe"):
                get = (c.get(probe_name) or {}).get("httpGet")
                if get and isinstance(get.get("port"), str) and get["port"] not in ports:
                    errors.append(f"{cw}: {probe_name} port {get['port']!r} is not a named container port")

    def matching(selector):
        return [w for w in workloads if selector and all(w[1].get(k) == v for k, v in selector.items())]

    for path, doc in docs:
        kind, spec, where = doc.get("kind"), doc.get("spec", {}), f"{path}: {name_of(doc)}"
        if kind == "Service" and spec.get("selector"):
            targets = matching(spec["selector"])
            if not targets:
                errors.append(f"{where}: selector {spec['selector']} matches no pod template")
            for port in spec.get("ports", []):
                tp = port.get("targetPort")
                if isinstance(tp, str):
                    for w in targets:
                        named = {p.get("name") for c in w[2].get("containers", []) for p in c.get("ports", [])}
                        if tp not in named:
                            errors.append(f"{where}: targetPort {tp!r} is not a port of {name_of(w[0])}")
        if kind == "PodDisruptionBudget" and not matching(spec.get("selector", {}).get("matchLabels")):
            errors.append(f"{where}: selector matches no pod template")
        if kind in ("StatefulSet",) and spec.get("serviceName") not in by_kind.get("Service", {}):
            errors.append(f"{where}: serviceName {spec.get('serviceName')!r} is not a Service in the manifests")
        if kind in WORKLOAD_KINDS and "selector" in spec:
            labels = spec.get("template", {}).get("metadata", {}).get("labels", {})
            if any(labels.get(k) != v for k, v in spec["selector"].get("matchLabels", {}).items()):
                errors.append(f"{where}: selector does not match its own pod template")
        target = None
        if kind == "HorizontalPodAutoscaler" or (kind == "ScaledObject" and doc.get("apiVersion") == KEDA_API):
            target = spec.get("scaleTargetRef", {})
            t_kind = target.get("kind", "Deployment")
            if target.get("name") not in by_kind.get(t_kind, {}):
                errors.append(f"{where}: scaleTargetRef {t_kind}/{target.get('name')} is not in the manifests")
        if kind == "TriggerAuthentication":
            for ref in spec.get("secretTargetRef", []):
                need(f"{where}: secretTargetRef {ref.get('parameter')}", "Secret", ref["name"], ref["key"])

    # One autoscaler per workload: an HPA and a ScaledObject (which makes
    # its own HPA) on the same target would fight.
    scaled = {}
    for path, doc in docs:
        if doc.get("kind") in ("HorizontalPodAutoscaler", "ScaledObject"):
            t = doc["spec"].get("scaleTargetRef", {})
            key = (t.get("kind", "Deployment"), t.get("name"))
            if key in scaled:
                errors.append(f"{path}: {name_of(doc)} and {scaled[key]} both scale {key[0]}/{key[1]}")
            scaled[key] = name_of(doc)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--namespace", help="the namespace every namespaced object must name")
    parser.add_argument("--external-secret", action="append", default=[], metavar="NAME:KEY",
                        help="a Secret created outside the manifests, with one of its keys")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()

    external = {}
    for item in args.external_secret:
        name, _, key = item.partition(":")
        external.setdefault(name, set()).add(key)

    errors = []
    docs = load(args.files)
    for path, doc in docs:
        if not isinstance(doc, dict) or not doc.get("kind") or not (doc.get("metadata") or {}).get("name"):
            errors.append(f"{path}: a document without kind or metadata.name")
    if errors:
        print("\n".join(f"ERROR {e}" for e in errors))
        return 1

    keda = [(p, d) for p, d in docs if d.get("apiVersion", "").split("/")[0] == "keda.sh"]
    trigger_auths = {(d["kind"], d["metadata"]["name"]): d for _, d in keda
                     if d["kind"] in ("TriggerAuthentication", "ClusterTriggerAuthentication")}
    for path, doc in keda:
        if doc.get("apiVersion") != KEDA_API:
            errors.append(f"{path}: {name_of(doc)}: apiVersion {doc.get('apiVersion')!r}, expected {KEDA_API}")
            continue
        before = len(errors)
        check_keda(path, doc, errors)
        # The documented parameters too, so one run reports every mistake.
        if doc["kind"] == "ScaledObject":
            check_metrics_api(path, doc, trigger_auths, errors)
        if len(errors) == before:
            print(f"INFO {path} passed for resource {doc['kind'].lower()}/{doc['metadata']['name']} "
                  f"against KEDA's CRD schema (cloudcoil-models-keda {models_version()})")

    try:
        check_references(docs, args.namespace, external, errors)
    except (KeyError, TypeError, AttributeError) as e:
        # A malformed object the schema checks report better.
        errors.append(f"cannot follow the references between the manifests: {type(e).__name__}: {e}")
    for e in errors:
        print(f"ERROR {e}")
    if not errors:
        print(f"INFO references between {len(docs)} objects in {len(args.files)} files resolve")
    return 1 if errors else 0


def models_version():
    from importlib.metadata import version

    return version("cloudcoil-models-keda")


if __name__ == "__main__":
    sys.exit(main())
