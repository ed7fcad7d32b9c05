"""Merge the stage results of ``benchmarks/gpu_check.sh`` into one JSON and a Markdown summary.

    python -m benchmarks.gpu_summary WORKDIR OUTDIR

WORKDIR holds ``stages/STAGE.json`` (written by ``benchmarks.gpu_stages``), ``stages/STAGE.meta.json``
(written by the shell: exit code, seconds, limit, whether it timed out or had no time left) and
``logs/STAGE.log``. OUTDIR receives ``gpu_check.json``, ``gpu_check.md`` and ``gpu_check.log``
(every stage's log, concatenated). Standard library only: it must run even where torch is broken.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

ORDER = ("env", "cuda_tests", "metrics", "losses", "evaluate", "training", "export")
TAIL_CHARS = 3000


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def merge_stage(name: str, stage: dict | None, meta: dict | None, log_tail: str) -> dict:
    """One stage's record: the stage's own JSON, corrected by what the shell saw (timeout, crash)."""
    meta = meta or {}
    out: dict[str, Any] = {"stage": name, "status": "error", "reason": "", "checks": [], "figures": {}}
    if stage is not None:
        out.update(stage)
    if meta.get("no_time"):
        out.update(status="not run", reason=meta.get("reason", "no time left in the budget"))
    elif meta.get("timed_out"):
        out.update(status="timeout", reason=f"killed after its {meta.get('timeout_s')} s limit")
    elif stage is None:
        out["reason"] = f"no result written (exit code {meta.get('rc')})" if meta else "stage did not run"
    out["seconds"] = meta.get("seconds", out.get("seconds"))
    out["timeout_s"] = meta.get("timeout_s")
    out["rc"] = meta.get("rc")
    if out["status"] not in ("pass", "skipped", "info"):
        out["log_tail"] = log_tail[-TAIL_CHARS:]
    return out


def overall(stages: list[dict]) -> str:
    """pass: every stage passed; fail: one failed, errored or timed out; not run (no CUDA):
    every measuring stage skipped; incomplete otherwise."""
    statuses = [s["status"] for s in stages if s["status"] != "info"]
    if any(s in ("fail", "error", "timeout") for s in statuses):
        return "fail"
    if statuses and all(s == "skipped" for s in statuses):
        return "not run (no CUDA)"
    if statuses and all(s == "pass" for s in statuses):
        return "pass"
    return "incomplete"


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _verdict(ok: bool | None) -> str:
    return {True: "pass", False: "**FAIL**", None: "–"}[ok]


def _detail_figures(figures: dict[str, dict]) -> list[str]:
    """Figures behind the checks that say where time goes (issue 25): which MbLS/CALS path ran,
    HD95's parts, the overlapped export."""
    lines: list[str] = []
    if figures.get("losses", {}).get("mbls_cals_path"):
        lines.append(f"- MbLS/CALS path in the training step: {figures['losses']['mbls_cals_path']}")
    for row in figures.get("metrics", {}).get("rows", []):
        if str(row.get("metric", "")).startswith("hd95"):
            lines.append(f"- {row['metric']}: {_fmt(row.get('ours_ms'))} ms ({row.get('agreement', '')})")
    overlap = figures.get("export", {}).get("overlap")
    if overlap:
        lines.append(f"- export of {overlap['cases']} cases of {overlap['size']}³x{overlap['classes']}: "
                     f"{_fmt(overlap['s_per_case_sequential'])} s/case one after the other, "
                     f"{_fmt(overlap['s_per_case_overlapped'])} s/case overlapped, same bytes: {overlap['same_bytes']}")
    return ["", "## Where the time goes", "", *lines] if lines else []


def to_markdown(results: dict) -> str:
    """The summary: machine, overall verdict, one table row per check, then skips and failures."""
    env = results.get("env", {})
    lines = [f"# segcalib GPU check, {results.get('generated', '')}", ""]
    device = env.get("device") or "no CUDA device"
    lines.append(f"- machine: {device}" + (f" (compute capability {env['capability']}, {env.get('device_memory_gib')} GiB)"
                                          if env.get("capability") else ""))
    lines.append(f"- python {env.get('python', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('torch_cuda')}, "
                 f"cuDNN {env.get('cudnn')}, {env.get('cpus', '?')} CPUs")
    if env.get("wheels_installed"):
        lines.append(f"- installed from wheels: {', '.join(env['wheels_installed'])}")
    lines += [f"- total {_fmt(results.get('seconds'))} s of a {results.get('budget_s')} s budget", "",
              f"**Overall: {results['overall'].upper()}**", ""]
    if any(s.get("rehearsal") for s in results["stages"]):
        lines += ["REHEARSAL (GPU_CHECK_REHEARSE=1): the stages ran on the CPU at tiny sizes; no figure is a GPU figure.", ""]
    lines += [
              "| stage | status | s | check | measured | target | result |", "|---|---|---:|---|---:|---:|---|"]
    for s in results["stages"]:
        secs = "–" if s.get("seconds") is None else f"{float(s['seconds']):.1f}"
        head = f"| {s['stage']} | {s['status']} | {secs} |"
        if not s["checks"]:
            lines.append(f"{head} {s.get('reason') or '–'} | | | |")
        for i, c in enumerate(s["checks"]):
            lead = head if i == 0 else "| | | |"
            lines.append(f"{lead} {c['name']} | {_fmt(c['value'])} {c['unit']} | {c['op']} {_fmt(c['target'])} {c['unit']} | "
                         f"{_verdict(c['pass'])} |")
    notes = [s for s in results["stages"] if s["checks"] and s["status"] != "pass" and s.get("reason")]
    if notes:
        lines += ["", "## Not passed, skipped or partial", ""]
        lines += [f"- **{s['stage']}** ({s['status']}): {s['reason']}" for s in notes]
    tests = next((s for s in results["stages"] if s["stage"] == "cuda_tests"), None)
    if tests and tests.get("figures"):
        f = tests["figures"]
        lines += ["", "## CUDA tests (`pytest -m cuda`)", "",
                  f"{f.get('passed', 0)} passed, {len(f.get('failed', []))} failed, {len(f.get('errors', []))} errors, "
                  f"{sum(f.get('skipped', {}).values())} skipped"]
        lines += [f"- failed: `{t}`" for t in f.get("failed", []) + f.get("errors", [])]
        lines += [f"- skipped {n}x: {r}" for r, n in f.get("skipped", {}).items()]
        lines += [f"- not collected: `{m}` (needs {r})" for m, r in f.get("not_collected", {}).items()]
    lines += _detail_figures({s["stage"]: s.get("figures") or {} for s in results["stages"]})
    for s in results["stages"]:
        if s["status"] in ("error", "timeout") and s.get("log_tail"):
            tail = "\n".join(s["log_tail"].splitlines()[-15:])
            lines += ["", f"## {s['stage']}: end of its log", "", "```", tail, "```"]
    if env.get("nvidia_smi"):
        lines += ["", "## nvidia-smi", "", "```", env["nvidia_smi"], "```"]
    return "\n".join(lines) + "\n"


def summarise(work: Path, out: Path, budget_s: float | None = None, seconds: float | None = None) -> dict:
    """Write ``gpu_check.json``, ``gpu_check.md`` and ``gpu_check.log`` under ``out``; return the JSON."""
    stages, logs = [], []
    names = list(ORDER) + sorted({p.name.split(".")[0] for p in (work / "stages").glob("*.json")} - set(ORDER))
    for name in names:
        stage = _read_json(work / "stages" / f"{name}.json")
        meta = _read_json(work / "stages" / f"{name}.meta.json")
        log_path = work / "logs" / f"{name}.log"
        log = log_path.read_text(errors="replace") if log_path.exists() else ""
        if stage is None and meta is None and not log:
            continue
        logs.append(f"===== {name} =====\n{log}")
        stages.append(merge_stage(name, stage, meta, log))
    env_stage = next((s for s in stages if s["stage"] == "env"), None)
    results = {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "budget_s": budget_s, "seconds": seconds,
        "overall": overall(stages),
        "env": env_stage["figures"] if env_stage else {},
        "stages": stages,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "gpu_check.md").write_text(to_markdown(results))
    (out / "gpu_check.log").write_text("\n".join(logs))
    return results


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 4):
        print("usage: python -m benchmarks.gpu_summary WORKDIR OUTDIR [BUDGET_S SECONDS]", file=sys.stderr)
        return 2
    extra = [float(a) for a in args[2:]] or [None, None]
    results = summarise(Path(args[0]), Path(args[1]), *extra)
    print((Path(args[1]) / "gpu_check.md").read_text())
    return 0 if results["overall"] in ("pass", "not run (no CUDA)") else 1


if __name__ == "__main__":
    raise SystemExit(main())
