"""Class labels of a sample, read from its metadata: what the teacher's heads and the judge learn.

Every scalar ``meta["attributes"]`` entry is a class (str, int, bool; floats are measurements,
not classes); ``meta["label"]`` (int or str) is one more. The judge reports per attribute and takes
the label only when a sample has no attributes; teacher training takes both (more supervision for
the features SDN distils).
"""

from __future__ import annotations


def sample_labels(meta: dict | None, with_label: bool = False) -> dict[str, str]:
    """{"shape": "circle", ..., "label": "17"} as strings. ``with_label``: add ``label`` even
    when attributes are present."""
    if not isinstance(meta, dict):
        return {}
    out: dict[str, str] = {}
    attrs = meta.get("attributes")
    if isinstance(attrs, dict):
        for k, v in attrs.items():
            if isinstance(v, (str, bool, int)):
                out[str(k)] = str(v)
    lab = meta.get("label")
    if (with_label or not out) and isinstance(lab, (int, str)) and not isinstance(lab, bool):
        out["label"] = str(lab)
    return out


def class_order(value: str):
    """Sort key for class values: integers numerically, then strings."""
    return (0, int(value), "") if value.lstrip("-").isdigit() else (1, 0, value)
