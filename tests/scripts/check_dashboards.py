#!/usr/bin/env python3
"""Validates Grafana dashboards against Grafana's dashboard schema.

The schema (tests/fixtures/grafana/dashboard.schema.json) was generated from
the TypeScript types of the npm package @grafana/schema 13.2.3:

    npm install @grafana/schema@13.2.3 ts-json-schema-generator@2.4.0 typescript
    npx ts-json-schema-generator --no-type-check --type Dashboard -o dashboard.schema.json \
        --path node_modules/@grafana/schema/dist/types/raw/dashboard/x/types.gen.d.ts

Usage: check_dashboards.py SCHEMA DASHBOARD.json...  (exit 1 with every error on failure)
"""
import json
import sys

import jsonschema


def main():
    schema = json.load(open(sys.argv[1]))
    defs = schema["definitions"]
    # Panels are "Panel | RowPanel"; choose by type so errors name the real field.
    defs["Dashboard"]["properties"]["panels"]["items"] = {
        "if": {"properties": {"type": {"const": "row"}}},
        "then": {"$ref": "#/definitions/RowPanel"},
        "else": {"$ref": "#/definitions/Panel"},
    }
    validator = jsonschema.Draft7Validator({**schema, "$ref": "#/definitions/Dashboard"})
    failed = False
    for path in sys.argv[2:]:
        errors = sorted(validator.iter_errors(json.load(open(path))), key=lambda e: list(e.path))
        for e in errors:
            failed = True
            print(f"{path}: /{'/'.join(map(str, e.path))}: {e.message}")
        if not errors:
            print(f"{path}: OK")
    sys.exit(1 if failed else 0)


main()
