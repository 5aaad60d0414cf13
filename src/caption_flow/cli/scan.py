"""``caption-flow scan-chunks``: check (and with ``--fix`` repair) a data directory.

Exit status: 0 clean, 1 problems remain (after ``--fix``: those it could not repair), 2 the
scan could not run (no state database, ``--fix`` while an orchestrator runs, a bad config).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from caption_flow.cli.configs import orchestrator_config
from caption_flow.cli.logs import verbose_option
from caption_flow.storage import scan_repair
from caption_flow.storage.scan import DAMAGED, INFO, ScanReport, scan
from caption_flow.storage.scan_repair import FixReport, Repair

log = logging.getLogger(__name__)

_STYLE = {DAMAGED: "bold red", INFO: "dim", "problem": "yellow"}


@click.command("scan-chunks")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), help="YAML file")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False),
    help="the orchestrator's state and output folder",
    show_default="config file, else ./caption_data",
)
@click.option(
    "--checkpoint-dir",
    type=click.Path(),
    help="accepted for the original caption-flow and ignored: the checkpoints are the "
    "state database, DATA_DIR/state.db",
)
@click.option(
    "--fix",
    is_flag=True,
    help="repair what can be repaired without losing a caption (refused while an "
    "orchestrator runs on the directory)",
)
@verbose_option
def scan_chunks_command(
    config_path: str | None, data_dir: str | None, checkpoint_dir: str | None, fix: bool
) -> None:
    """Check the state database against the Parquet parts: one row per done item, no
    unrecorded part, no stale lease, no journal left behind."""
    if checkpoint_dir is not None:
        log.info(
            "--checkpoint-dir %s ignored: captionflow keeps chunk and item state (what the "
            "original tool checkpointed) in DATA_DIR/state.db",
            checkpoint_dir,
        )
    config = orchestrator_config(config_path, {"storage.data_dir": data_dir})
    folder = Path(config.storage.data_dir)
    out = Console(soft_wrap=False)
    if fix:
        result = asyncio.run(scan_repair.fix(folder))
        print_fix(out, result)
        clean = result.after.clean
    else:
        report = scan(folder)
        print_scan(out, report)
        clean = report.clean
    click.get_current_context().exit(0 if clean else 1)


def findings_table(report: ScanReport, title: str, fixing: bool) -> Table:
    """One row per finding: its kind and severity, its count, then what it is, a few
    examples and what --fix does (or did not do), folded to fit a narrow terminal."""
    table = Table(title=title, show_lines=True)
    table.add_column("finding", no_wrap=True)
    table.add_column("count", justify="right", no_wrap=True)
    table.add_column("details", overflow="fold")
    fix_label = "--fix" if fixing else "--fix does"
    for f in report.findings:
        lines = [escape(f.about)]
        lines += [f"  [dim]e.g.[/] {escape(e)}" for e in f.examples]
        lines.append(f"[bold]{fix_label}:[/] {escape(f.fix)}")
        kind = f"{f.kind}\n[{_STYLE.get(f.severity, '')}]{f.severity}[/]"
        table.add_row(kind, str(f.count), "\n".join(lines))
    return table


def repairs_table(repairs: list[Repair]) -> Table:
    table = Table(title="repairs made", show_lines=True)
    table.add_column("finding", no_wrap=True)
    table.add_column("count", justify="right", no_wrap=True)
    table.add_column("done", overflow="fold")
    for r in repairs:
        lines = [escape(r.what)] + [f"  [dim]e.g.[/] {escape(e)}" for e in r.examples]
        table.add_row(r.kind, str(r.count), "\n".join(lines))
    return table


def _summary(report: ScanReport) -> str:
    problems = report.problems
    if not problems:
        infos = [f"{f.kind} ({f.count})" for f in report.findings]
        return "clean" + (f" (for information: {', '.join(infos)})" if infos else "")
    kinds = ", ".join(f"{f.kind} ({f.count})" for f in problems)
    return f"{len(problems)} problem(s): {kinds}"


def print_scan(out: Console, report: ScanReport) -> None:
    out.print(f"scan of {escape(str(report.data_dir))}", soft_wrap=True)
    if report.running is not None:
        out.print(
            f"[yellow]an orchestrator is running on it ({escape(report.running)}):[/] read-only "
            "scan, the report may be moving; its leases and journal are not checked",
            soft_wrap=True,
        )
    if report.findings:
        out.print(findings_table(report, "findings", fixing=False))
    hint = "" if report.clean else "; --fix repairs what can be repaired"
    out.print(f"scan-chunks: {_summary(report)}{hint}", soft_wrap=True)


def print_fix(out: Console, result: FixReport) -> None:
    out.print(f"scan of {escape(str(result.before.data_dir))} (--fix)", soft_wrap=True)
    if result.before.findings:
        out.print(findings_table(result.before, "found", fixing=True))
    if result.repairs:
        out.print(repairs_table(result.repairs))
    for line in result.skipped:
        out.print(f"[yellow]not repaired:[/] {escape(line)}", soft_wrap=True)
    remaining = result.after
    if remaining.problems:
        out.print(findings_table(remaining, "left after --fix", fixing=True))
    repaired = ", ".join(f"{r.kind} ({r.count})" for r in result.repairs)
    done = f"repaired {repaired}" if repaired else "nothing repaired"
    out.print(f"scan-chunks --fix: {done}; now {_summary(remaining)}", soft_wrap=True)
