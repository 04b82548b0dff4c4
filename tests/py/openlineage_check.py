"""Checks OpenLineage run events (one JSON object per line) against the OpenLineage client's
generated model (PyPI openlineage-python): each event is rebuilt from the client's classes,
whose validators check the run id, the event time and the types, and serialized by the
client; the result must be the event as written, key for key. Prints a JSON summary.

Usage: openlineage_check.py EVENTS.jsonl
"""

import json
import sys

from openlineage.client.event_v2 import InputDataset, Job, OutputDataset, Run, RunEvent, RunState
from openlineage.client.generated import data_quality_assertions_dataset as dq
from openlineage.client.generated import error_message_run as em
from openlineage.client.generated import output_statistics_output_dataset as stats
from openlineage.client.generated import schema_dataset as sd
from openlineage.client.generated import sql_job
from openlineage.client.serde import Serde


def facet_args(facet):
    return {k: v for k, v in facet.items() if not k.startswith("_")} | {"producer": facet["_producer"]}


def dataset_facets(facets):
    out = {}
    for name, facet in facets.items():
        args = facet_args(facet)
        if name == "schema":
            args["fields"] = [sd.SchemaDatasetFacetFields(**f) for f in args["fields"]]
            out[name] = sd.SchemaDatasetFacet(**args)
        elif name == "dataQualityAssertions":
            args["assertions"] = [dq.Assertion(**a) for a in args["assertions"]]
            out[name] = dq.DataQualityAssertionsDatasetFacet(**args)
        else:
            raise SystemExit(f"unexpected dataset facet {name}")
    return out


def rebuild(event):
    run_facets = {}
    for name, facet in event["run"]["facets"].items():
        assert name == "errorMessage", name
        run_facets[name] = em.ErrorMessageRunFacet(**facet_args(facet))
    job_facets = {"sql": sql_job.SQLJobFacet(**facet_args(event["job"]["facets"]["sql"]))}
    inputs = [
        InputDataset(namespace=d["namespace"], name=d["name"], facets=dataset_facets(d["facets"]))
        for d in event["inputs"]
    ]
    outputs = []
    for d in event["outputs"]:
        output_facets = {}
        for name, facet in d.get("outputFacets", {}).items():
            assert name == "outputStatistics", name
            output_facets[name] = stats.OutputStatisticsOutputDatasetFacet(**facet_args(facet))
        outputs.append(
            OutputDataset(
                namespace=d["namespace"],
                name=d["name"],
                facets=dataset_facets(d["facets"]),
                outputFacets=output_facets,
            )
        )
    rebuilt = RunEvent(
        eventType=RunState[event["eventType"]],
        eventTime=event["eventTime"],
        producer=event["producer"],
        run=Run(runId=event["run"]["runId"], facets=run_facets),
        job=Job(namespace=event["job"]["namespace"], name=event["job"]["name"], facets=job_facets),
        inputs=inputs,
        outputs=outputs,
    )
    check_types(rebuilt)
    return json.loads(Serde.to_json(rebuilt))


SIMPLE = {"int": int, "str": str, "bool": bool, "float": (int, float)}


def check_types(obj, where="event"):
    """The client's attrs classes check UUIDs and times, not scalar types: check those from
    the field annotations (`int | None`, `str`, ...), through nested facets and lists."""
    import attr

    if isinstance(obj, (list, tuple)):
        for i, item in enumerate(obj):
            check_types(item, f"{where}[{i}]")
        return
    if isinstance(obj, dict):
        for key, item in obj.items():
            check_types(item, f"{where}.{key}")
        return
    if not attr.has(type(obj)):
        return
    for field in attr.fields(type(obj)):
        value = getattr(obj, field.name)
        annotation = str(field.type)
        kinds = [SIMPLE[t.strip()] for t in annotation.split("|") if t.strip() in SIMPLE]
        if value is not None and kinds and not isinstance(value, tuple(kinds)) or (
            isinstance(value, bool) and "bool" not in annotation and kinds
        ):
            raise SystemExit(f"{where}.{field.name}: {value!r} is not {annotation}")
        check_types(value, f"{where}.{field.name}")


def without_empty(value):
    """The client drops empty maps and lists when it serializes; so do we, to compare."""
    if isinstance(value, dict):
        return {k: without_empty(v) for k, v in value.items() if v not in ({}, [], None)}
    if isinstance(value, list):
        return [without_empty(v) for v in value]
    return value


def main():
    events = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
    for event in events:
        rebuilt = rebuild(event)
        if without_empty(rebuilt) != without_empty(event):
            raise SystemExit(
                "event differs from the OpenLineage client's:\n"
                + json.dumps(without_empty(event), indent=1, sort_keys=True)
                + "\n---\n"
                + json.dumps(without_empty(rebuilt), indent=1, sort_keys=True)
            )
    json.dump(
        [
            {
                "eventType": e["eventType"],
                "runId": e["run"]["runId"],
                "job": e["job"]["name"],
                "inputs": [d["name"] for d in e["inputs"]],
                "outputs": [d["name"] for d in e["outputs"]],
                "rows": e["outputs"][0].get("outputFacets", {}).get("outputStatistics", {}).get("rowCount"),
                "assertions": e["outputs"][0]["facets"].get("dataQualityAssertions", {}).get("assertions", []),
                "error": e["run"]["facets"].get("errorMessage", {}).get("message"),
            }
            for e in events
        ],
        sys.stdout,
    )


if __name__ == "__main__":
    main()
