"""The goals and the markdown report of `python -m lit_open.bench gpu-suite`: each part's status and its table.

It reads only the suite's JSON document, so a report can be made again from a `gpu-suite.json` that came back from a
device (`python -m lit_open.bench.gpu_report gpu-suite.json > gpu-suite.md`).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lit_open.bench.turns import ratio_stats

# An "80 GB" H100 has 79.6 GiB usable: what the fit checks compare the peak reserved memory with.
H100_80GB_GIB = 79.0


# -- goals -----------------------------------------------------------------------------------------------------


def _runner(parts: list[dict[str, Any]], part: str, label: str) -> dict[str, Any] | None:
    for record in parts:
        if record["name"] == part and isinstance(record.get("result"), dict):
            runner = record["result"].get("results", {}).get("runners", {}).get(label)
            return runner if runner and runner.get("status") == "ok" else None
    return None


def _speedup(parts, part: str, label: str, over: str) -> float | None:
    a, b = _runner(parts, part, label), _runner(parts, part, over)
    if not a or not b:
        return None
    return ratio_stats(b["round_tokens_per_s"], a["round_tokens_per_s"])["median"]


def _overhead(parts, part: str) -> float | None:
    speed = _speedup(parts, part, "bare", "lightning")
    return None if speed is None else 100 * (speed - 1)


def _fits(parts, part: str, label: str) -> float | None:
    runner = _runner(parts, part, label)
    return None if runner is None else runner.get("peak_reserved_gib")


GOALS: list[tuple[str, Callable[[list[dict[str, Any]]], float | None], str, float]] = [
    (
        "olmo2_1b bf16+compile: Lightning / litgpt tokens/s",
        lambda p: _speedup(p, "throughput", "lightning", "litgpt"),
        ">=",
        1.10,
    ),
    ("olmo2_1b: Lightning overhead over the bare loop (%)", lambda p: _overhead(p, "throughput"), "<=", 3.0),
    (
        "olmo2_1b: float8 tensorwise / bf16 tokens/s",
        lambda p: _speedup(p, "float8", "lightning+strategy.float8=tensorwise", "lightning"),
        ">=",
        1.10,
    ),
    (
        "olmo2_1b: float8 rowwise / bf16 tokens/s",
        lambda p: _speedup(p, "float8", "lightning+strategy.float8=rowwise", "lightning"),
        ">=",
        1.10,
    ),
    (
        "olmo2_1b micro-batch 16, selective AC, chunked loss: peak reserved GiB (80 GB GPU)",
        lambda p: _fits(p, "memory", "lightning+data.micro_batch_size=16+strategy.activation_checkpointing=selective"),
        "<=",
        H100_80GB_GIB,
    ),
    (
        "amber_7b full fine-tune, adamw8bit + full AC: peak reserved GiB (80 GB GPU)",
        lambda p: _fits(p, "amber_7b", "lightning"),
        "<=",
        H100_80GB_GIB,
    ),
]


def check_goals(parts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    checked = []
    for goal, measure, op, target in GOALS:
        value = measure(parts)
        met = None if value is None else (value >= target if op == ">=" else value <= target)
        checked.append({"goal": goal, "target": f"{op} {target}", "measured": value, "met": met})
    return checked


# -- the report ----------------------------------------------------------------------------------------------


def _num(value: Any, fmt: str = ",.0f") -> str:
    return "-" if value is None else format(value, fmt)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def markdown(report: dict[str, Any]) -> str:
    results = report["results"]
    packages = results.get("packages", {})
    device, versions = report.get("device", {}), report["versions"]
    lines = [
        f"# lit-open GPU suite, {report['date']}",
        "",
        f"- device: {device.get('name', '?')} ({_num(device.get('memory_gib'), '.0f')} GiB, capability "
        f"{'.'.join(map(str, device.get('capability', [])))}); torch {versions.get('torch')}, "
        f"CUDA {versions.get('cuda')}",
        f"- lit-open {versions.get('lit_open')} ({versions.get('git_commit')}); "
        f"`{report['command']}`; {results.get('seconds')} s of a {report['config']['budget_s']:.0f} s budget",
        "- packages: "
        + "; ".join(
            f"{name} {info['version']}" if info["ok"] else f"{name} missing ({info['error']})"
            for name, info in packages.items()
        ),
        "",
        "## Goals",
        "",
        *_table(
            ["goal", "target", "measured", "met"],
            [
                [g["goal"], g["target"], _num(g["measured"], ".3f"), {True: "yes", False: "**no**"}.get(g["met"], "-")]
                for g in results.get("goals", [])
            ],
        ),
        "",
        "## Parts",
        "",
        *_table(
            ["part", "status", "seconds", "note"],
            [[p["name"], p["status"], _num(p.get("seconds"), ".0f"), p.get("note", "")] for p in results["parts"]],
        ),
    ]
    for part in results["parts"]:
        result = part.get("result")
        if not isinstance(result, dict):
            continue
        lines += ["", f"## {part['name']}: {part['title']}", ""]
        if part["name"] == "tests":
            lines += _tests(result)
        elif result.get("benchmark") == "throughput":
            lines += _throughput(result)
        elif result.get("benchmark") == "attention":
            lines += _attention(result)
    return "\n".join(lines) + "\n"


def _tests(result: dict[str, Any]) -> list[str]:
    counts = result.get("counts")
    if not counts:
        return [result.get("note", "no report")]
    lines = [", ".join(f"{n} {k}" for k, n in counts.items())]
    bad = [c for c in result["cases"] if c["outcome"] in ("failure", "error")]
    if bad:
        lines += ["", *_table(["failed test", "message"], [[c["test"], c["message"][:200]] for c in bad])]
    skipped = Counter(c["message"][:160] for c in result["cases"] if c["outcome"] == "skipped")
    if skipped:
        lines += ["", *_table(["skipped because", "tests"], [[m, str(n)] for m, n in skipped.most_common()])]
    return lines


def _throughput(result: dict[str, Any]) -> list[str]:
    config, res = result["config"], result["results"]
    lines = [
        f"{config['model']}, micro-batch {config['micro_batch']} x {config['seq_len']}, {config['precision']}, "
        f"{config['schedule']}: {config['rounds']} rounds of {config['round_steps']} steps ({config['round_steps'] - 1}"
        f" timed) after {config['warmup']} warmup; reference `{res.get('reference')}`"
        + (
            f"; Lightning overhead {res['lightning_overhead_pct']:+.1f}% "
            f"(rounds {res['lightning_overhead_pct_range'][0]:+.1f}% to {res['lightning_overhead_pct_range'][1]:+.1f}%)"
            if res.get("lightning_overhead_pct") is not None
            else ""
        ),
        "",
    ]
    rows = []
    for label, r in res["runners"].items():
        if r["status"] != "ok":
            rows.append([f"`{label}`", "-", "-", "-", "-", "-", "-", f"{r['status']}: {r['note'][:200]}"])
            continue
        ratio = r.get("vs_reference")
        rows.append(
            [
                f"`{label}`",
                _num(r["tokens_per_s"]),
                f"{ratio['median']:.3f} [{ratio['min']:.3f}, {ratio['max']:.3f}]" if ratio else "-",
                f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "n/a",
                f"{_num(r.get('peak_memory_gib'), '.1f')} / {_num(r.get('peak_reserved_gib'), '.1f')}",
                f"{r['first_loss']:.4f}",
                f"{r['loss']:.4f}",
                "",
            ]
        )
    header = ["runner", "tokens/s", "vs reference [min, max]", "MFU", "peak GiB (alloc / reserved)", "first loss",
              "final loss", "note"]  # fmt: skip
    lines += _table(header, rows)
    ok = {label: r for label, r in res["runners"].items() if r["status"] == "ok" and r.get("losses")}
    if len(ok) == 2:
        (a, ra), (b, rb) = ok.items()
        diff = max(abs(x - y) for x, y in zip(ra["losses"], rb["losses"]))
        lines += ["", f"Largest per-step loss difference between `{a}` and `{b}`: {diff:.2e}."]
    return lines


def _attention(result: dict[str, Any]) -> list[str]:
    rows = []
    for name, b in result["results"].get("backends", {}).items():
        if b.get("status") != "ok":
            rows.append([name, "-", "-", "-", "-", f"{b.get('status')}: {str(b.get('note', ''))[:160]}"])
            continue
        worst = max((e["max_abs"] for e in b.get("errors", {}).values()), default=None)
        note = f"{b['parity']}" + (f"; {b['note']}" if b.get("note") else "")
        rows.append(
            [
                name,
                _num(b.get("forward_ms"), ".3f"),
                _num(b.get("forward_backward_ms"), ".3f"),
                _num(b.get("forward_backward_tflops"), ".0f"),
                _num(worst, ".2e"),
                note,
            ]
        )
    header = ["backend", "forward ms", "forward+backward ms", "TFLOP/s (fwd+bwd)", "max abs error", "parity"]
    return _table(header, rows)


if __name__ == "__main__":
    print(markdown(json.loads(Path(sys.argv[1]).read_text())), end="")
