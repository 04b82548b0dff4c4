#!/usr/bin/env python3
"""Validates rendered Kubernetes manifests strictly (unknown fields are errors).

Built-in kinds are checked with kubernetes-validate's schemas for the given Kubernetes
version; custom resources (KEDA ScaledObject and TriggerAuthentication, the Prometheus
operator's ServiceMonitor) against the openAPIV3Schema of the CRDs vendored in deploy/crds/,
made strict the same way (no properties beyond those declared, unless the schema says
x-kubernetes-preserve-unknown-fields). A kind with no schema at all is an error.

    deploy/validate.py [--kubernetes-version 1.33] rendered.yaml...
"""
import argparse
import pathlib
import sys

import jsonschema
import kubernetes_validate
import yaml

CRDS = pathlib.Path(__file__).resolve().parent / "crds"


def strict(schema):
    """The schema with additionalProperties false wherever properties are listed."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def crd_schemas():
    """(apiVersion, kind) -> strict JSON schema, from every vendored CRD."""
    schemas = {}
    for path in sorted(CRDS.glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            group = crd["spec"]["group"]
            kind = crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = version["schema"]["openAPIV3Schema"]
                # apiVersion, kind and metadata are checked by the API server itself.
                schema = dict(schema)
                props = dict(schema.get("properties", {}))
                props.setdefault("apiVersion", {"type": "string"})
                props.setdefault("kind", {"type": "string"})
                props["metadata"] = {"type": "object"}
                schema["properties"] = props
                schemas[(f"{group}/{version['name']}", kind)] = strict(schema)
    return schemas


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-k", "--kubernetes-version", default="1.33")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args()
    custom = crd_schemas()
    failures = 0
    checked = 0
    for name in args.files:
        for doc in yaml.safe_load_all(pathlib.Path(name).read_text()):
            if not doc:
                continue
            checked += 1
            what = f"{name}: {doc.get('kind')}/{doc.get('metadata', {}).get('name')}"
            key = (doc.get("apiVersion"), doc.get("kind"))
            try:
                if key in custom:
                    jsonschema.Draft7Validator(custom[key]).validate(doc)
                    source = "vendored CRD"
                else:
                    kubernetes_validate.validate(doc, args.kubernetes_version, strict=True)
                    source = f"Kubernetes {args.kubernetes_version}"
                print(f"ok    {what} ({source})")
            except kubernetes_validate.SchemaNotFoundError as e:
                failures += 1
                print(f"FAIL  {what}: no schema: {e}")
            except jsonschema.ValidationError as e:
                failures += 1
                where = "/".join(str(p) for p in e.absolute_path)
                print(f"FAIL  {what}: {where}: {e.message}")
    print(f"{checked} document(s) checked, {failures} invalid")
    return 1 if failures or not checked else 0


if __name__ == "__main__":
    sys.exit(main())
