"""The study report: `report.md` (figures beside it) and a self-contained `report.html`
(figures embedded), with the fit table and a one-paragraph reading of each curve.
"""
from __future__ import annotations

import base64
import html
from pathlib import Path

from ..tables import fmt
from .fits import Fit


def _group_label(f: Fit) -> str:
    return ", ".join(f"{k.split('.')[-1]}={v}" for k, v in f.group.items())


def _num(v: float) -> str:
    return fmt(float(v), 3)


def fit_rows(fits: list[Fit]) -> list[dict[str, str]]:
    """One row per fit, parameters as 'value [lo, hi]'."""
    rows = []
    for f in fits:
        params = "; ".join(f"{k} = {_num(v)} [{_num(f.ci[k][0])}, {_num(f.ci[k][1])}]"
                           + (" (at its bound)" if k in f.at_bound else "") for k, v in f.params.items())
        onset = "" if f.onset is None else f"{_num(f.onset)} [{_num(f.onset_ci[0])}, {_num(f.onset_ci[1])}]"
        rows.append({"group": _group_label(f), "metric": f.y_key, "form": f.form, "parameters (95% CI)": params,
                     "R²": f"{f.r2:.3f}", "rows": str(f.n), "collapse onset K (95% CI)": onset})
    return rows


def reading(f: Fit) -> str:
    """One paragraph in words: what the curve says, with the numbers behind it."""
    who = _group_label(f)
    lo, hi = f.x_range
    if f.form == "saturating":
        at_hi = float(f.predict([hi])[0])
        if f.onset is not None and f.onset <= hi:
            return (f"{who}: utilization falls below {f.threshold:.0%} at K ≈ {_num(f.onset)} "
                    f"(95% CI {_num(f.onset_ci[0])}–{_num(f.onset_ci[1])}); at the largest K swept "
                    f"({_num(hi)}) the fit gives {at_hi:.1%} of codes in use (R² = {f.r2:.2f}).")
        return (f"{who}: utilization stays above {f.threshold:.0%} over the whole range swept "
                f"(K = {_num(lo)}–{_num(hi)}); the fit gives {at_hi:.1%} in use at K = {_num(hi)} and would "
                f"cross {f.threshold:.0%} only at K ≈ {_num(f.onset)}, beyond the data (R² = {f.r2:.2f}).")
    p, ci = f.params, f.ci
    gain = 1 - float(f.predict([hi])[0]) / float(f.predict([lo])[0])
    if "alpha" in f.at_bound:
        return (f"{who}: {f.y_key} does not follow a power law in K: it changes by {gain:.0%} from K = {_num(lo)} "
                f"to {_num(hi)}, in a step at the smallest sizes, and stays near {_num(p['E'])} after "
                f"(the exponent ran to its bound; R² = {f.r2:.2f}).")
    trend = ("shows no reliable improvement with K" if ci["alpha"][0] <= 0.02 else
             f"improves with K as K^-{p['alpha']:.2f} (95% CI {ci['alpha'][0]:.2f}–{ci['alpha'][1]:.2f})")
    return (f"{who}: {f.y_key} {trend} towards a floor E = {_num(p['E'])}; from K = {_num(lo)} to "
            f"{_num(hi)} the fitted {f.y_key} drops by {gain:.0%} (R² = {f.r2:.2f}).")


def _md_table(rows: list[dict[str, str]]) -> str:
    if not rows:
        return "_no fits (fewer than 3 codebook sizes, or no finished trials)_\n"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r[c] for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_report(out: Path, title: str, summary: str, fits: list[Fit], figures: list[Path]) -> list[Path]:
    """report.md and report.html in `out`; figures are the PNGs (SVG twins sit beside them)."""
    readings = [reading(f) for f in fits]
    pngs = [p for p in figures if p.suffix == ".png"]
    md = [f"# {title}\n", summary + "\n", "## Fits\n", _md_table(fit_rows(fits))]
    md += ["## Reading the curves\n"] + [f"- {r}" for r in readings] + [""]
    md += ["## Figures\n"] + [f"![{p.stem}]({p.relative_to(out).as_posix()})\n" for p in pngs]
    md_path = out / "report.md"
    md_path.write_text("\n".join(md))

    def img(p: Path) -> str:
        data = base64.b64encode(p.read_bytes()).decode()
        return f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,{data}"></figure>'

    rows = fit_rows(fits)
    table = "<p><em>no fits</em></p>" if not rows else (
        "<table><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in rows[0]) + "</tr>" +
        "".join("<tr>" + "".join(f"<td>{html.escape(v)}</td>" for v in r.values()) + "</tr>" for r in rows) +
        "</table>")
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}
table{{border-collapse:collapse;font-size:0.85em}}td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}
th{{background:#f3f3f3}}img{{max-width:100%}}figure{{margin:1.5em 0}}</style></head><body>
<h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p><h2>Fits</h2>{table}
<h2>Reading the curves</h2><ul>{''.join(f'<li>{html.escape(r)}</li>' for r in readings)}</ul>
<h2>Figures</h2>{''.join(img(p) for p in pngs)}</body></html>"""
    html_path = out / "report.html"
    html_path.write_text(page)
    return [md_path, html_path]
