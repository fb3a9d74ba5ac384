"""Printing a pairing report (``kdet check``) as tables."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table

from .pairing import PairingReport
from .teachers import TeacherPairing


def level_table(report: PairingReport) -> Table:
    """One row per stride present in either model: level, grid, input channels, anchors per
    location and classes, for each side."""
    table = Table(title=f"Head levels at {report.student.input_size[0]}x{report.student.input_size[1]}px")
    table.add_column("stride", justify="right")
    table.add_column("teacher")
    table.add_column("student")
    teacher = {level.stride: level for level in report.teacher.levels}
    student = {level.stride: level for level in report.student.levels}
    for stride in sorted(set(teacher) | set(student)):
        cells = [str(stride)]
        for side in (teacher, student):
            level = side.get(stride)
            cells.append("-" if level is None else f"{level.name} {level.grid[0]}x{level.grid[1]}, {level.channels} ch, "
                                                    f"{level.num_anchors} anchor(s), {level.num_classes} classes")
        table.add_row(*cells)
    return table


def feature_table(report: PairingReport) -> Table:
    table = Table(title="Named features (channels, stride, grid)")
    table.add_column("feature")
    table.add_column("teacher", justify="right")
    table.add_column("student", justify="right")
    names = list(dict.fromkeys(list(report.teacher.features) + list(report.student.features)))
    for name in names:
        cells = [name]
        for spec in (report.teacher, report.student):
            item = spec.features.get(name)
            cells.append("-" if item is None else f"{item[0]} ch, /{item[1]}, {item[2][0]}x{item[2][1]}")
        table.add_row(*cells)
    return table


def render_pairing(report: PairingReport | TeacherPairing, console: Console) -> None:
    if isinstance(report, TeacherPairing):
        render_teachers(report, console)
        return
    _render_report(report, console)
    console.print("pairing: OK, ready to distil" if report.ok else f"pairing: {len(report.errors)} error(s); kdet distill will refuse this config",
                  markup=False)


def _render_report(report: PairingReport, console: Console) -> None:
    console.print(f"teacher: {report.teacher.family}, classes {list(report.teacher.class_names)}", markup=False)
    console.print(f"student: {report.student.family}, classes {list(report.student.class_names)}", markup=False)
    console.print(level_table(report))
    console.print(feature_table(report))
    for note in report.notes:
        console.print(f"note: {note}", markup=False, soft_wrap=True)
    for plan in report.terms:
        state = "on" if plan.active else "off (switched off)"
        console.print(f"{plan.key}, weight {plan.config.weight}: {state}", markup=False)
        for note in plan.notes:
            console.print(f"  {note}", markup=False, soft_wrap=True)
    for error in report.errors:
        console.print(f"ERROR: {error}", style="bold red", markup=False, soft_wrap=True)


def render_teachers(pairing: TeacherPairing, console: Console) -> None:
    """Several teachers: each teacher's pairing with the student, then which term reads which."""
    for name, report in pairing.reports.items():
        console.rule(f"teacher {name} (weight {pairing.weights.get(name, 1.0):g})")
        _render_report(report, console)
    console.rule("terms")
    for note in pairing.notes:
        console.print(f"note: {note}", markup=False, soft_wrap=True)
    for term in pairing.terms:
        reads = "every teacher, averaged" if term.averaged else f"teacher {next(iter(term.plans))}"
        console.print(f"{term.key} reads {reads}", markup=False)
    for error in pairing.errors:
        console.print(f"ERROR: {error}", style="bold red", markup=False, soft_wrap=True)
    errors = pairing.all_errors()
    console.print("pairing: OK, ready to distil" if not errors else f"pairing: {len(errors)} error(s); kdet distill will refuse this config",
                  markup=False)
