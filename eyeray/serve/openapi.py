"""The OpenAPI document of one application, made from FastAPI's and the bundles it serves.

FastAPI documents `/v1/{task}/...` for any task; the application knows its tasks, their classes and
whether it requires a token, so its document says so: one path per served task (no 404 for an
unknown task to document, and `class` an enum of that task's classes), and the bearer scheme on the
routes that check it (or no 401 where none is required). Clients and fuzzers then see the same
constraints the routes enforce.
"""

import copy
from typing import Any

BEARER = "bearer"


def for_tasks(base: dict[str, Any], manifests: dict[str, dict], auth: bool) -> dict[str, Any]:
    """`base` (FastAPI's document) for this application's `manifests` (task -> manifest)."""
    doc = copy.deepcopy(base)
    paths = {}
    for path, operations in doc["paths"].items():
        if "{task}" not in path:
            paths[path] = operations
            continue
        for task, manifest in sorted(manifests.items()):
            paths[path.replace("{task}", task)] = {
                method: for_task(operation, task, manifest["classes"]) for method, operation in operations.items()
            }
    doc["paths"] = paths
    for operation in (op for operations in paths.values() for op in operations.values()):
        if "401" not in operation["responses"]:
            continue
        if auth:
            operation["security"] = [{BEARER: []}]
        else:
            del operation["responses"]["401"]
    if auth:
        doc.setdefault("components", {})["securitySchemes"] = {BEARER: {"type": "http", "scheme": "bearer"}}
    return doc


def for_task(operation: dict[str, Any], task: str, classes: list[str]) -> dict[str, Any]:
    """A `/v1/{task}/...` operation as the task's own path documents it."""
    operation = copy.deepcopy(operation)
    operation["operationId"] = operation["operationId"].replace("_task_", task)
    operation["tags"] = [task]
    operation["parameters"] = [p for p in operation.get("parameters", []) if p["name"] != "task"]
    for parameter in operation["parameters"]:
        if parameter["name"] == "class":
            parameter["schema"] = {**parameter["schema"], "type": "string", "enum": list(classes)}
            parameter["schema"].pop("anyOf", None)
    operation["responses"].pop("404", None)
    return operation
