"""What the user reads: ratios between the rows of one case, the table (text or markdown), the JSON
file and the PNG plot."""
from __future__ import annotations

import collections
import json
import os

_DTYPE_SHORT = {"float32": "f32", "float16": "f16", "bfloat16": "bf16", "float64": "f64"}
EAGER, COMPILED = "reference", "compile"


# --------------------------------------------------------------------------- ratios
def add_ratios(rows: list[dict]) -> None:
    """speedup_vs_eager = eager median / this median (> 1: faster than eager PyTorch), the same
    against torch.compile of the reference, and memory_vs_eager = this peak / eager's peak."""
    groups = collections.defaultdict(list)
    for r in rows:
        groups[r["group"]].append(r)
    for members in groups.values():
        ok = {r["backend"]: r for r in members if r["status"] == "ok"}
        eager, compiled = ok.get(EAGER), ok.get(COMPILED)
        for r in members:
            r["speedup_vs_eager"] = _ratio(eager, r, "time_median_s") if r["status"] == "ok" else None
            r["speedup_vs_compiled"] = _ratio(compiled, r, "time_median_s") if r["status"] == "ok" else None
            r["memory_vs_eager"] = _ratio(r, eager, "peak_memory_bytes") if r["status"] == "ok" else None


def _ratio(num: dict | None, den: dict | None, key: str):
    if not num or not den or num.get(key) is None or not den.get(key):
        return None
    return num[key] / den[key]


# --------------------------------------------------------------------------- formatting
def _num(x):
    return f"{x:.3g}" if x < 999.5 else f"{x:.0f}"


def fmt_time(s):
    if s is None:
        return "-"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if s >= scale:
            return f"{_num(s / scale)} {unit}"
    return f"{_num(s / 1e-9)} ns"


def fmt_bytes(n):
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= scale:
            return f"{_num(n / scale)} {unit}"
    return f"{n} B"


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def fmt_rate(x, unit):
    if x is None:
        return "-"
    short = {"calls/s": "/s", "images/s": "img/s"}.get(unit, unit)
    return f"{x:,.0f} {short}" if x >= 100 else f"{x:.3g} {short}"


def case_cell(r: dict) -> str:
    dt = _DTYPE_SHORT.get(r["dtype"], r["dtype"])
    if r["kind"] == "op":
        return f"{r['name']} {r['pass']} {r['shape_label']} {dt}"
    H, W = r["shape"]["H"], r["shape"]["W"]
    return f"{r['name']} {r['pass']} B{r['shape']['B']} {f'{H}px' if H == W else f'{H}x{W}'} {dt}"


COLUMNS = ("case", "backend", "median", "IQR", "throughput", "peak mem", "saved bwd",
           "vs eager", "vs compiled", "mem vs eager")


ACCURACY_COLUMN = "err vs f64"


def fmt_error(r: dict) -> str:
    """The row's max |error| against the float64 logits, and its ratio to the tolerance when over it."""
    if r.get("error_vs_float64") is None:
        return "-"
    text = f"{r['error_vs_float64']:.1e}"
    tolerance = r.get("error_tolerance")
    return text + (f" (over: {r['error_vs_float64'] / tolerance:.3g}x tol)" if tolerance and r["error_vs_float64"] > tolerance
                   else "")


def case_backend(r: dict) -> str:
    """The backend, with an engine's precision hint (OpenVINO computes bf16 without autocast)."""
    hint = (r.get("engine_settings") or {}).get("INFERENCE_PRECISION_HINT")
    return f"{r['backend']} ({hint})" if hint else r["backend"]


def _cells(r: dict, accuracy: bool = False) -> list[str]:
    cells = [case_cell(r), case_backend(r), fmt_time(r.get("time_median_s")), fmt_time(r.get("time_iqr_s")),
             fmt_rate(r.get("throughput"), r.get("throughput_unit")), fmt_bytes(r.get("peak_memory_bytes")),
             fmt_bytes(r.get("saved_bytes")), fmt_ratio(r.get("speedup_vs_eager")),
             fmt_ratio(r.get("speedup_vs_compiled")), fmt_ratio(r.get("memory_vs_eager"))]
    return cells + [fmt_error(r)] if accuracy else cells


def _grid(header, body, markdown: bool) -> list[str]:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|"]
        return lines + ["| " + " | ".join(c for c in row) + " |" for row in body]
    widths = [max(len(h), *(len(row[i]) for row in body)) if body else len(h) for i, h in enumerate(header)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    return [line(header), line(["-" * w for w in widths])] + [line(row) for row in body]


def table(rows: list[dict], env: dict, settings: dict, markdown: bool = False) -> str:
    """The report: a header saying where and how, the shape legend, one table of the rows that
    ran (ops, then models), and the skipped and failed rows with their reasons."""
    out = []
    head = (f"rest-kernels benchmark, {env['date_utc']}, {env['device']}: {env['device_name']}; "
            f"torch {env['torch']}, triton {env['triton']}, python {env['python']}, "
            f"commit {(env.get('git_commit') or 'unknown')[:10]}{' (dirty)' if env.get('git_dirty') else ''}")
    out.append(("**" + head + "**") if markdown else head)
    if env.get("cpu_allocator", "default") != "default":
        out.append(f"CPU allocator: {env['cpu_allocator']} (rest.tune_cpu_allocator(), for every row of this run).")
    load = env.get("load_average_start")
    if env["device"] == "cpu" and load and load[0] >= 1.0:
        out.append(f"Warning: load average {load[0]:.2f} on {env['cpu_count']} CPUs when the run started: other "
                   f"processes compete for the CPU, so CPU times are noisy (a quiet machine, or --threads 1, helps).")
    out.append("")
    if settings["mode"] != "full":  # a reader of a default or --quick report should know it is not all
        out.append(f"Rows: the {settings['mode']} selection (--list shows them); --full runs every op, shape and model.")
    out.append(f"Time per call: median over {settings['repeats']} repeats after {settings['warmup']} warm-up "
               f"call(s), IQR = q3 - q1; vs eager / vs compiled = speed-up over eager PyTorch (backend "
               f"'reference') / over torch.compile of it (> 1 is faster); mem vs eager = peak memory "
               f"/ eager's (< 1 is less). Peak memory: {settings['memory_method']}. Saved bwd: bytes "
               f"autograd keeps for backward (distinct storages, inputs included).")
    ran = [r for r in rows if r["status"] == "ok"]
    shapes = {}
    for r in ran:
        if r["kind"] == "op":
            shapes.setdefault(r["shape_label"], {}).update(
                {("pa" if r["name"] == "pa" else "emsa"): r["shape"]})
    if shapes:
        out.append("")
        out.append("Shapes:" if not markdown else "Shapes:")
        for label, d in shapes.items():
            parts = []
            if "emsa" in d:
                e = d["emsa"]
                parts.append(f"EMSA B={e['B']} h={e['h']} N={e['N']} M={e['M']} d={e['d']}")
            if "pa" in d:
                p = d["pa"]
                parts.append(f"PA B={p['B']} C={p['C']} H={p['H']} W={p['W']}")
            out.append(f"{'- ' if markdown else '  '}{label}: " + "; ".join(parts))
    accuracy = any(r.get("error_vs_float64") is not None for r in ran)
    if accuracy:
        out.append("")
        out.append("Model inference rows: every backend of a case timed interleaved (one repeat of each per round, "
                   "order rotated, each repeat started on a quiet process after an untimed lead-in call); "
                   f"{ACCURACY_COLUMN} = max |logits - float64 logits| of the row's first call, "
                   "checked before timing against a tolerance of 2x eager PyTorch's own error at that precision.")
    body, last = [], None
    for r in ran:
        cells = _cells(r, accuracy)
        if not markdown and r["group"] == last:
            cells[0] = ""
        last = r["group"]
        body.append(cells)
    out.append("")
    columns = list(COLUMNS) + ([ACCURACY_COLUMN] if accuracy else [])
    out.extend(_grid(columns, body, markdown) if body else ["(no row ran)"])
    skipped = collections.Counter((r["backend"], r["reason"]) for r in rows if r["status"] == "skipped")
    if skipped:
        out.append("")
        out.append("Skipped:")
        for (backend, reason), n in skipped.items():
            out.append(f"- {backend} ({n} row{'s' if n > 1 else ''}): {reason}")
    errors = [r for r in rows if r["status"] == "error"]
    if errors:
        out.append("")
        out.append("Failed:")
        for r in errors:
            out.append(f"- {r['backend']} {case_cell(r)}: {r['reason']}")
    return "\n".join(out)


# --------------------------------------------------------------------------- JSON
def write_json(path: str, env: dict, settings: dict, rows: list[dict]) -> None:
    doc = dict(schema="rest-kernels-bench/1", environment=env, settings=settings,
               results=[{k: v for k, v in r.items() if k != "group"} for r in rows])
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, default=str)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- plot
def plot_unavailable_reason() -> str | None:
    try:
        import matplotlib  # noqa: F401
    except Exception as e:  # ImportError or a broken install
        return f"writing a plot needs matplotlib, which cannot be imported here ({e}); install it with `pip install matplotlib`"
    return None


def write_plot(path: str, rows: list[dict], env: dict) -> None:
    """Two panels: speed-up over eager and memory relative to eager, one bar per backend and case
    (log scale; 1 = eager)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ran = [r for r in rows if r["status"] == "ok" and r["backend"] != EAGER and r.get("speedup_vs_eager")]
    cases = list(dict.fromkeys(case_cell(r) for r in ran))
    backends = list(dict.fromkeys(r["backend"] for r in ran))
    index = {c: i for i, c in enumerate(cases)}
    if not cases:  # nothing to compare (e.g. only eager ran): say so in the picture
        fig, ax = plt.subplots(figsize=(8, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, "no rows to compare with eager PyTorch in this run", ha="center", va="center")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return
    height = max(3.0, 0.22 * len(cases) * max(1, len(backends)) + 1.5)
    fig, axes = plt.subplots(1, 2, figsize=(14, height), sharey=True)
    bar = 0.8 / max(1, len(backends))
    for panel, (key, title) in enumerate((("speedup_vs_eager", "speed-up over eager (> 1 faster)"),
                                          ("memory_vs_eager", "peak memory / eager (< 1 less)"))):
        ax = axes[panel]
        for j, backend in enumerate(backends):
            pts = [(index[case_cell(r)], r[key]) for r in ran if r["backend"] == backend and r.get(key)]
            if pts:
                # bars grow from 1 (= eager) to the ratio, rightwards when above, leftwards below
                ax.barh([i + j * bar for i, _ in pts], [v - 1.0 for _, v in pts], left=1.0, height=bar, label=backend)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:g}x"))
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_title(title)
        ax.grid(axis="x", which="both", alpha=0.3)
    axes[0].set_yticks([i + bar * (len(backends) - 1) / 2 for i in range(len(cases))])
    axes[0].set_yticklabels(cases, fontsize=7)
    axes[0].invert_yaxis()
    axes[0].legend(loc="lower right", fontsize=8)
    fig.suptitle(f"rest-kernels vs eager PyTorch, {env['device_name']}, {env['date_utc']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
