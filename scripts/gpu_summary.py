"""Compose scripts/gpu_check.sh's report: a markdown file with every log, one JSON file with every step's
figures named for the device (the copy for docs/gpu/), and a short table on stdout.

python3 scripts/gpu_summary.py --steps LOGDIR/steps.tsv --report-dir DIR --mode gpu|dry [--report NAME]

Each step's own JSON file moves into LOGDIR once it is in the combined file, so the report folder holds
the report, the combined JSON and (after gpu_check.sh archives LOGDIR) the logs.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# Imports no framework: the report is written even when torch or jax fail to import.
from parity.conversion.atomic import atomic_write  # noqa: E402  (after the checkout is importable)

TIMEOUT_CODES = ("124", "137")  # timeout(1)'s exit status, and SIGKILL after --kill-after
LOG_TAIL_LINES = 400  # per step in the markdown report; the full logs stay beside it


def read_steps(path: Path) -> list[dict[str, str]]:
    """The step records gpu_check.sh wrote: name, rc, seconds, command."""
    steps = []
    for line in path.read_text().splitlines():
        name, rc, seconds, command = (line.split("\t", 3) + ["", "", ""])[:4]
        steps.append({"name": name, "rc": rc, "seconds": seconds, "command": command})
    return steps


def status(rc: str) -> str:
    """ok, FAIL (rc N) or TIMEOUT."""
    if rc == "0":
        return "ok"
    return "TIMEOUT" if rc in TIMEOUT_CODES else f"FAIL (rc {rc})"


def _load_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _last_line(log: Path) -> str:
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "-"
    return lines[-1] if lines else "-"


def parity_figure(report: dict[str, Any] | None) -> str:
    """'N/M checks pass; worst rel per precision' from resnet-parity check's JSON."""
    if report is None:
        return "no JSON written"
    results = [r for run in report["runs"] for r in run.get("results", [])]
    errors = [f"{run['arch']} {run['precision']}: {run['error']}" for run in report["runs"] if "error" in run]
    passed = sum(r["passed"] for r in results)
    worst: dict[str, tuple[float, float, str]] = {}
    for r in results:
        key = f"{r['precision']} {r['check']}"
        if key not in worst or r["rel"] / r["tol"] > worst[key][0] / worst[key][1]:
            worst[key] = (r["rel"], r["tol"], r["arch"])
    parts = [f"{passed}/{len(results)} checks pass" + ("" if report.get("complete", True) else " (interrupted)")]
    failed = [
        f"{r['arch']} {r['precision']} {r['check']} at {r['first_diverging']}" for r in results if not r["passed"]
    ]
    parts += [f"FAILED {f}" for f in failed[:3]] + [f"ERROR {e[:120]}" for e in errors[:2]]
    return "; ".join(parts)


def parity_worst_table(report: dict[str, Any] | None) -> list[str]:
    """Markdown rows: the worst relative error per (precision, check) over all depths."""
    if report is None:
        return []
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for run in report["runs"]:
        for r in run.get("results", []):
            key = (r["precision"], r["check"])
            if key not in rows or r["rel"] > rows[key]["rel"]:
                rows[key] = r
    out = ["| precision | check | worst relative error | depth | tolerance | all pass |", "|---|---|---|---|---|---|"]
    results = [x for run in report["runs"] for x in run.get("results", [])]
    for (precision, check), r in rows.items():
        all_pass = all(x["passed"] for x in results if (x["precision"], x["check"]) == (precision, check))
        verdict = "yes" if all_pass else "NO"
        out.append(f"| {precision} | {check} | {r['rel']:.2e} | {r['arch']} | {r['tol']:.0e} | {verdict} |")
    return out


def throughput_figure(report: dict[str, Any] | None) -> str:
    """images/s of each implementation and mode, compactly."""
    if report is None:
        return "no JSON written"
    figures = [f"{r['impl']} {r['mode']} {r['images_per_s']:.0f}" for r in report.get("results", [])]
    errors = [f"FAILED {e['impl']} {e['what']}: {e['error'][:120]}" for e in report.get("errors", [])]
    return "; ".join(figures + errors) + " img/s" if figures else "; ".join(errors) or "no figures"


def flags_figure(report: dict[str, Any] | None) -> str:
    """Each XLA flag's status and images/s."""
    if report is None:
        return "no JSON written"
    parts = []
    for r in report["rows"]:
        rate = f" {r['images_per_s']:.0f} img/s" if r.get("images_per_s") else ""
        parts.append(f"{r['flag']} {r['status']}{rate}")
    return "; ".join(parts)


def _parity_reports(report_dir: Path, name: str) -> list[Path]:
    return sorted(report_dir.glob(f"{name}*.json"))


def key_figure(step: dict[str, str], report_dir: Path) -> str:
    """The one line that matters for each step."""
    log = report_dir / "gpu-logs" / f"{step['name']}.log"
    if step["name"] == "environment":
        first = log.read_text(errors="replace").splitlines()[:1] if log.exists() else []
        return first[0] if first else "-"
    if step["name"].startswith("parity"):
        paths = _parity_reports(report_dir, step["name"])
        return " | ".join(f"{p.stem}: {parity_figure(_load_json(p))}" for p in paths) or "no JSON written"
    if step["name"] == "speed":
        return throughput_figure(_load_json(report_dir / "speed.json"))
    if step["name"] == "flags":
        return flags_figure(_load_json(report_dir / "flags.json"))
    return _last_line(log)


def markdown(steps: list[dict[str, str]], report_dir: Path, mode: str) -> str:
    """The full report: environment, step table, parity extremes, then every step's log tail."""
    title = "GPU check" if mode == "gpu" else "GPU check: DRY RUN (CPU stand-ins, no GPU figures)"
    lines = [f"# {title}", "", f"Written {time.strftime('%Y-%m-%d %H:%M:%S %Z')}.", ""]
    env = report_dir / "gpu-logs" / "environment.log"
    if env.exists():
        lines += ["## Machine and versions", "", "```", env.read_text(errors="replace").strip(), "```", ""]
    lines += ["## Steps", "", "| step | status | seconds | key figure |", "|---|---|---|---|"]
    for s in steps:
        lines.append(f"| {s['name']} | {status(s['rc'])} | {s['seconds']} | {key_figure(s, report_dir)} |")
    for path in _parity_reports(report_dir, "parity"):
        worst = parity_worst_table(_load_json(path))
        if worst:
            lines += ["", f"## {path.stem}: worst relative error per precision and check", ""] + worst
    for s in steps:
        lines += ["", f"## {s['name']}: {status(s['rc'])}, {s['seconds']} s", "", f"`{s['command']}`", ""]
        log = report_dir / "gpu-logs" / f"{s['name']}.log"
        if log.exists():
            tail = log.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:]
            lines += ["```", *tail, "```"]
    return "\n".join(lines) + "\n"


def short_table(steps: list[dict[str, str]], report_dir: Path, mode: str, report: str) -> str:
    """The table printed last: one line per step."""
    head = "GPU check summary" + ("" if mode == "gpu" else " (DRY RUN on CPU: no GPU figures)")
    width = max([len("step"), *(len(s["name"]) for s in steps)])
    rows = [head, f"{'step':<{width}} {'status':<12} {'s':>5}  key figure"]
    for s in steps:
        rows.append(f"{s['name']:<{width}} {status(s['rc']):<12} {s['seconds']:>5}  {key_figure(s, report_dir)[:300]}")
    rows.append(f"full report: {report_dir / report}")
    return "\n".join(rows)


def device_slug(report_dir: Path, mode: str) -> str:
    """The card's name from the environment log (nvidia-smi's first field), lower case, words joined by '-'."""
    if mode != "gpu":
        return "dry-run-cpu"
    log = report_dir / "gpu-logs" / "environment.log"
    first = log.read_text(errors="replace").splitlines()[:1] if log.exists() else []
    name = first[0].split(",")[0] if first else "unknown-gpu"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown-gpu"


def combine(steps: list[dict[str, str]], report_dir: Path, mode: str) -> Path:
    """One JSON file with every step's record and figures, named for the device; the steps' own files
    move into gpu-logs/."""
    env = report_dir / "gpu-logs" / "environment.log"
    slug = device_slug(report_dir, mode)
    figures = {}
    for path in sorted(report_dir.glob("*.json")):
        if path.name.startswith("gpu-check-"):
            continue
        figures[path.stem] = _load_json(path)
        path.rename(report_dir / "gpu-logs" / path.name)
    combined = {
        "what": "scripts/gpu_check.sh" + (" --dry-run (CPU stand-ins, no GPU figures)" if mode != "gpu" else ""),
        "device": slug,
        "written": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "environment": env.read_text(errors="replace").strip().splitlines() if env.exists() else [],
        "steps": [{**s, "status": status(s["rc"]), "key_figure": key_figure(s, report_dir)} for s in steps],
        "figures": figures,
    }
    path = report_dir / f"gpu-check-{slug}.json"
    data = (json.dumps(combined, indent=1) + "\n").encode()
    atomic_write(path, lambda f: f.write(data))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=Path, required=True, help="steps.tsv written by gpu_check.sh")
    p.add_argument("--report-dir", type=Path, required=True, help="where the report and the JSON files live")
    p.add_argument("--report", default="gpu-check.md", help="the report's file name (default: gpu-check.md)")
    p.add_argument("--mode", choices=("gpu", "dry"), required=True, help="a GPU run or the CPU dry run")
    args = p.parse_args(argv)
    steps = read_steps(args.steps)
    text = markdown(steps, args.report_dir, args.mode)
    table = short_table(steps, args.report_dir, args.mode, args.report)
    atomic_write(args.report_dir / args.report, lambda f: f.write(text.encode()))
    combined = combine(steps, args.report_dir, args.mode)
    print(table)
    print(f"every figure: {combined}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
