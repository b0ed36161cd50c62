#!/usr/bin/env python3
"""Write ``iod_required.json``: for each SOP class its IOD, and for each IOD the Type 1 and
Type 2 top-level attributes of the modules it marks M (Mandatory), from DICOM PS3.3.

Source: the machine-readable PS3.3 tables highdicom ships (its ``_standard`` JSON files, which
highdicom generates from the innolitics/dicom-standard copy of the standard's own HTML). They
are read here, once, when the data file is made; Carina reads only its own file at run time, so
no private highdicom module is imported by the server. Re-run from the repository root with the
highdicom named in pyproject.toml installed::

    python curation/make_iod_required.py [--output PATH]

Output: ``{"source": ..., "sop_classes": {uid: iod}, "iods": {iod: [module, ...]},
"modules": {module: {keyword: "1" | "2"}}}``; Conditional types (1C, 2C), Type 3, attributes
inside sequences and modules an IOD marks C or U are left out.
"""

from __future__ import annotations

import argparse
import json
from importlib import metadata, resources
from pathlib import Path
from typing import Any

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "iod_required.json"


def _table(name: str) -> Any:
    return json.loads(resources.files("highdicom").joinpath("_standard", name).read_text())


def build() -> dict[str, Any]:
    """The data file's content, from highdicom's copy of the PS3.3 tables."""
    sop_classes: dict[str, str] = _table("sop_class_iod_map.json")
    iod_modules: dict[str, list[dict[str, str]]] = _table("iod_module_map.json")
    attributes: dict[str, list[dict[str, Any]]] = _table("module_attribute_map.json")
    iods = {
        iod: [m["key"] for m in modules if m["usage"] == "M"]
        for iod, modules in sorted(iod_modules.items())
    }
    used = sorted({m for ms in iods.values() for m in ms})
    modules = {
        m: {
            a["keyword"]: a["type"]
            for a in attributes.get(m, [])
            if not a["path"] and a["type"] in ("1", "2")
        }
        for m in used
    }
    return {
        "source": "DICOM PS3.3 module tables as highdicom "
        f"{metadata.version('highdicom')} ships them (curation/make_iod_required.py)",
        "sop_classes": dict(sorted(sop_classes.items())),
        "iods": iods,
        "modules": modules,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    args = parser.parse_args()
    args.output.write_text(_dumps(build()))


def _dumps(content: dict[str, Any]) -> str:
    """JSON with one line per SOP class, IOD and module, so a new edition diffs readably."""
    lines = ["{", f' "source": {json.dumps(content["source"])},']
    sections = [k for k in content if k != "source"]
    for i, section in enumerate(sections):
        entries = [f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in content[section].items()]
        end = "}" if i == len(sections) - 1 else "},"
        lines += [f" {json.dumps(section)}: {{", ",\n".join(entries), f" {end}"]
    return "\n".join(lines) + "\n}\n"


if __name__ == "__main__":
    main()
