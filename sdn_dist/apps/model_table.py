"""The teacher/student layer table behind ``sdn-dist model --preset P [--json]``.

    from sdn_dist.apps.model_table import model_table, format_table
    print(format_table(model_table(load_config("paper"))))

Both networks are built on the ``meta`` device and run on a meta input: shapes and parameter
counts are exact, nothing is allocated (the paper student alone is ~575 MB of fp32).
"""

from __future__ import annotations

import torch

from sdn_dist.config import Config
from sdn_dist.model.student import Student
from sdn_dist.model.teacher import Teacher
from sdn_dist.model.plan import FC7


def _count(module: torch.nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def model_table(cfg: Config) -> dict:
    """{"rows": [{point, teacher_shape, student_shape, student_params, student_layer}], "totals": {...}}.

    Shapes are (C, H, W) without the batch. ``student_params`` counts the layer producing the
    point (0 for a nearest upsample). Totals: student and teacher parameters (teacher: trunk,
    plus the classifier when fc7 is distilled), and the share of the FC to pool5.
    """
    m = cfg.model
    with torch.device("meta"):
        student = Student(m, cfg.text.dim)
        teacher = Teacher(m, num_classes=1000 if m.distill_fc7 else 0)
        x = torch.empty(1, 3, m.image_size, m.image_size)
        t_out = teacher(x)
        s_out = student(torch.empty(1, cfg.text.dim))
    rows = []
    for point, t in t_out.items():
        layer = student.producer(point)
        name = {FC7: "fc7 (Linear)", "pool5": "fc_pool5 (Linear) + reshape"}.get(
            point, "conv3x3" + (f" ({cfg.model.output})" if point == "image" else "") if layer is not None else "nearest x2 upsample")
        rows.append({
            "point": point,
            "teacher_shape": list(t.shape[1:]),
            "student_shape": list(s_out[point].shape[1:]),
            "student_layer": name,
            "student_params": _count(layer),
        })
    fc_pool5 = _count(student.fc_pool5)
    total_student = _count(student)
    return {
        "preset": cfg.preset,
        "image_size": m.image_size,
        "width": m.width,
        "text_dim": cfg.text.dim,
        "rows": rows,
        "totals": {
            "student_params": total_student,
            "student_fc_params": _count(student.fc7) + _count(student.fc6) + fc_pool5,
            "fc_to_pool5_params": fc_pool5,
            "teacher_params": _count(teacher),
            "teacher_trainable_params": 0,  # frozen in both stages
        },
    }


def _human(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n:,}"


def format_table(table: dict) -> str:
    shape = lambda s: "x".join(str(v) for v in s)  # noqa: E731
    head = ("point", "teacher (CxHxW)", "student (CxHxW)", "student layer", "params")
    rows = [head] + [(r["point"], shape(r["teacher_shape"]), shape(r["student_shape"]),
                      r["student_layer"], f"{r['student_params']:,}") for r in table["rows"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    line = lambda r: "  ".join(c.rjust(w) if i == 4 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    t = table["totals"]
    out = [f"preset {table['preset']}: {table['image_size']} px, width {table['width']:g}, text dim {table['text_dim']}",
           line(rows[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in rows[1:]]
    out += ["",
            f"student parameters: {t['student_params']:,} ({_human(t['student_params'])}), "
            f"of which FC to pool5: {t['fc_to_pool5_params']:,} ({_human(t['fc_to_pool5_params'])}), "
            f"all FCs: {_human(t['student_fc_params'])}",
            f"teacher parameters: {t['teacher_params']:,} ({_human(t['teacher_params'])}), frozen"]
    return "\n".join(out)
