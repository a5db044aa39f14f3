"""report.html: the report as a page a person can open offline, charts drawn as inline SVG (svg.py)."""

from __future__ import annotations

import html
import math
from pathlib import Path

from .document import htp_arch_phrase, step_facts
from .svg import DOT_COLOUR, LINE_COLOUR, PALETTE, Chart, box_marker, dot_marker, line_marker, log_ticks, value_ticks

HISTOGRAMS_SHOWN = 6
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; font-size: 0.9em; margin: 0.5em 0; }
th, td { padding: 3px 8px; border-bottom: 1px solid #eee; text-align: right; }
th:first-child, td:first-child, td.name { text-align: left; }
td.name { font-family: monospace; max-width: 420px; overflow-wrap: anywhere; }
.note { background: #fff4d6; padding: 0.5em 1em; border-left: 4px solid #e0a800; }
.charts svg { max-width: 100%; height: auto; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr)); gap: 8px; }
"""


def write_html_report(report: dict, path: Path) -> None:
    """Write the page for one quantize run's report (the dict written to report.json)."""
    path.write_text(render_report(report))


def render_report(report: dict) -> str:
    """The whole page as a string; identical reports give identical pages."""
    settings = report["settings"]
    evaluation = report["evaluation"]
    tensors = report["tensors"]["figures"]
    by_name = {t["name"]: t for t in tensors}
    worst = [by_name[n] for n in report["tensors"]["worst_isolated"]]
    title = f"onnxsnpe report: {Path(report['model']['path']).name}"
    parts = [
        f"<h1>{_e(title)}</h1>",
        "<p>",
        f"Model <code>{_e(report['model']['path'])}</code>, inputs "
        + ", ".join(f"<code>{_e(i['name'])}</code> {i['shape']}" for i in report["model"]["inputs"])
        + ".<br>",
        f"Calibrated with <b>{_e(settings['method'])}</b> on {report['calibration']['num_samples']} samples; "
        f"activations {settings['act_bitwidth']}-bit, weights {settings['weight_bitwidth']}-bit "
        f"{'per channel' if settings.get('per_channel') else 'per tensor'}, "
        f"bias {settings['bias_bitwidth']}-bit.<br>",
        f"Evaluated on {evaluation['num_samples']} {'held-out' if evaluation['held_out'] else 'calibration'} "
        f"samples from <code>{_e(evaluation['path'])}</code>.",
        "</p>",
    ]
    if evaluation.get("note"):
        parts.append(f"<p class='note'>{_e(evaluation['note'])}</p>")
    arithmetic = ARITHMETIC_LABELS.get(report["settings"].get("arithmetic"), "")
    parts += [f"<h2>Model outputs: simulated quantized model ({_e(arithmetic)}) against FP32</h2>",
              _outputs_table(report["outputs"])]
    if "htp" in report:
        parts.append(_htp_section(report["htp"]))
    parts.append(_optimizations_section(report.get("optimizations", {})))
    parts += [
        "<h2>Where accuracy is lost</h2>",
        "<p>Cumulative: the quantized model's value of each tensor against FP32's. Isolated: the outputs' "
        f"SQNR when only that tensor is quantized (first {report['tensors']['isolated_samples']} evaluation "
        "samples); the lower, the more that tensor's quantization costs.</p>",
        f"<div class='charts'>{_error_along_graph(tensors, set(report['tensors']['worst_isolated']))}</div>",
        "<h3>The ten tensors whose quantization costs the most</h3>",
        _tensor_table(worst, ranked=True),
        f"<div class='charts'>{_worst_bars(worst)}</div>",
        "<h3>Histograms of the worst tensors with the chosen range</h3>",
        "<div class='charts grid'>" + "".join(_histogram(t) for t in worst[:HISTOGRAMS_SHOWN]) + "</div>",
        "<h2>Weights</h2>",
        _weights_section(report["weights"]),
        "<h2>Every quantized tensor, in graph order</h2>",
        f"<details><summary>{len(tensors)} tensors</summary>{_tensor_table(tensors, ranked=False)}</details>",
    ]
    body = "\n".join(parts)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _e(text: object) -> str:
    return html.escape(str(text))


def _db(value: float | None) -> str:
    return "exact" if value is None else f"{value:.2f}"


def _percent(share: float | None) -> str:
    return "" if share is None else f"{100 * share:.1f}%"


ARITHMETIC_LABELS = {"htp": "HTP integer arithmetic", "htp-v73": "HTP v73 integer arithmetic",
                     "exact": "exact arithmetic"}


def _htp_section(htp: dict) -> str:
    if "refused" in htp:
        return f"<h2>Qualcomm's HTP emulator</h2><p>It refused the QDQ model: {_e(htp['refused'])}</p>"
    rows = "".join(
        f"<tr><td>{_e(ARITHMETIC_LABELS.get(label, label))}</td><td class='name'>{_e(r['name'])}</td>"
        f"<td>{_db(r['sqnr_db'])}</td>"
        f"<td>{r['max_error_lsb']:g}</td><td>{_percent(r['top1_agreement'])}</td></tr>"
        for label, results in htp["agreement"].items()
        for r in results
    )
    fallback = htp["cpu_fallback_ops"]
    fallback_text = ("unknown (this onnxruntime does not report node placement)" if fallback is None
                     else ", ".join(f"{op} {name}" for op, name in fallback) or "none")
    float_text = ", ".join(f"{op} {name}" for op, name in htp.get("float_ops", [])) or "none"
    return (
        f"<h2>Simulation against Qualcomm's HTP emulator ({htp['samples']} samples{htp_arch_phrase(htp)})</h2>"
        "<table><tr><th>simulation</th><th>output</th><th>SQNR dB vs HTP</th><th>max error (LSB)</th>"
        f"<th>top-1 agree</th></tr>{rows}</table><p>Ops that fell back to the CPU: {_e(fallback_text)}</p>"
        f"<p>Ops the HTP computes in float: {_e(float_text)}</p>"
    )


def _optimizations_section(done: dict) -> str:
    """The accuracy steps that ran: --optimize's ablation (held-back samples, cumulative), what each
    step did, and what automatic mixed precision raised; empty when none ran."""
    if not done:
        return ""
    parts = ["<h2>Accuracy steps</h2>"]
    if "recipe" in done:
        recipe = done["recipe"]
        rows = "".join(
            f"<tr><td>{_e(row['step'])}</td><td>{_db(row['sqnr_db'])}</td>"
            f"<td>{_percent(row['top1_agreement'])}</td><td>{'kept' if row['kept'] else 'not kept'}</td>"
            f"<td>{row['seconds']:.1f}</td></tr>" for row in recipe["ablation"])
        parts.append(
            f"<p>--optimize: each step on top of the kept ones, judged on {recipe['held_back_samples']} held-back "
            "calibration samples (lowest output SQNR), never on the evaluation data.</p>"
            "<table><tr><th>step</th><th>held-back SQNR dB</th><th>top-1 agree</th><th>kept</th>"
            f"<th>seconds</th></tr>{rows}</table>")
    facts = step_facts(done)
    if facts:
        parts.append("<ul>" + "".join(f"<li>{_e(fact)}</li>" for fact in facts) + "</ul>")
    if "auto_precision" in done:
        parts.append(_precision_section(done["auto_precision"]))
    return "\n".join(parts)


def _precision_section(record: dict, configuration: str = "") -> str:
    """What automatic mixed precision raised, and how it chose."""
    met = {True: "target met", False: "target not met", None: "no target"}[record["target_met"]]
    weights = set(record.get("raised_weights", []))
    items = "".join(f"<li><code>{_e(name)}</code>{' (weight)' if name in weights else ''}</li>"
                    for name in record["raised"])
    label = f" ({_e(configuration)})" if configuration else ""
    return (
        f"<h3>Automatic mixed precision{label}</h3>"
        f"<p>{record['count']} tensors raised by {_e(record['strategy'])}: {record['activations_at_16_bits']} "
        f"activations and {record['weights_at_16_bits']} weights at 16 bits; held-back SQNR "
        f"{_db(record['baseline_sqnr_db'])} -> {_db(record['final_sqnr_db'])} dB, {met}; "
        f"{record['evaluations']} scorings on {record['held_back_samples']} held-back samples, "
        f"{record['seconds']:.1f} s.</p>"
        f"<details><summary>raised tensors</summary><ul>{items}</ul></details>"
    )


def _outputs_table(outputs: list[dict]) -> str:
    rows = []
    for o in outputs:
        top1 = o.get("top1_agreement")
        top5 = o.get("top5_agreement")
        rows.append(
            f"<tr><td class='name'>{_e(o['name'])}</td><td>{_db(o['sqnr_db'])}</td><td>{o['cosine']:.5f}</td>"
            f"<td>{o['max_abs_error']:.4g}</td><td>{o['mean_abs_error']:.4g}</td>"
            f"<td>{'' if top1 is None else f'{100 * top1:.1f}%'}</td>"
            f"<td>{'' if top5 is None else f'{100 * top5:.1f}%'}</td></tr>"
        )
    return (
        "<table><tr><th>output</th><th>SQNR dB</th><th>cosine</th><th>max |err|</th><th>mean |err|</th>"
        "<th>top-1 agree</th><th>top-5 agree</th></tr>" + "".join(rows) + "</table>"
    )


def _tensor_table(tensors: list[dict], ranked: bool) -> str:
    rows = []
    for rank, t in enumerate(tensors, 1):
        enc = t["encoding"]
        rows.append(
            "<tr>" + (f"<td>{rank}</td>" if ranked else "")
            + f"<td class='name'>{_e(t['name'])}</td><td>{_db(t['isolated_output_sqnr_db'])}</td>"
            f"<td>{_db(t['cumulative_sqnr_db'])}</td><td>{100 * t['clipped_share']:.3f}%</td>"
            f"<td>[{enc['min']:.4g}, {enc['max']:.4g}]</td><td>[{t['observed_min']:.4g}, {t['observed_max']:.4g}]</td>"
            f"<td>{enc['bitwidth']}</td><td>{enc['scale']:.3g}</td></tr>"
        )
    head = ("<th>#</th>" if ranked else "") + (
        "<th>tensor</th><th>isolated dB</th><th>cumulative dB</th><th>clipped</th><th>encoding range</th>"
        "<th>calibration range</th><th>bits</th><th>scale</th>"
    )
    return f"<table><tr>{head}</tr>" + "".join(rows) + "</table>"


def _weights_section(weights: dict) -> str:
    figures = {w["name"]: w for w in weights["figures"]}

    def table(names: list[str]) -> str:
        rows = "".join(
            f"<tr><td class='name'>{_e(n)}</td><td>{_e(figures[n]['op'])}</td><td>{figures[n]['shape']}</td>"
            f"<td>{_db(figures[n]['sqnr_db'])}</td><td>{_db(figures[n]['per_channel_sqnr_db'])}</td>"
            f"<td>{_db(figures[n]['sixteen_bit_sqnr_db'])}</td></tr>"
            for n in names
        )
        return (
            "<table><tr><th>weight</th><th>op</th><th>shape</th><th>SQNR dB as exported</th>"
            "<th>per-channel dB</th><th>16-bit dB</th></tr>" + rows + "</table>"
        )

    return (
        "<p>SQNR of each weight tensor's own quantization: as exported (per tensor), per-channel symmetric "
        "at the same bitwidth, and per tensor at 16 bits.</p>"
        "<h3>Would gain most from per-channel quantization</h3>" + table(weights["most_gain_per_channel"])
        + "<h3>Would gain most from 16 bits</h3>" + table(weights["most_gain_16_bit"])
        + f"<details><summary>all {len(figures)} weights</summary>{table(list(figures))}</details>"
    )


def _finite(values: list[float | None], cap: float) -> list[float]:
    """dB values for plotting: exact (None) or above ``cap`` drawn at ``cap``."""
    return [cap if v is None or not math.isfinite(v) or v > cap else v for v in values]


def _error_along_graph(tensors: list[dict], worst: set[str]) -> str:
    chart = Chart(1100, 360, "Error along the graph")
    cap = 100.0
    cumulative = _finite([t["cumulative_sqnr_db"] for t in tensors], cap)
    isolated = _finite([t["isolated_output_sqnr_db"] for t in tensors], cap)
    ylim, yticks = value_ticks(min(cumulative + isolated, default=0.0), max(cumulative + isolated, default=1.0), 8)
    xlim, xticks = value_ticks(0, max(len(tensors) - 1, 1), 8)
    chart.scales(xlim, ylim)
    chart.axes([(t, f"{t:g}") for t, _ in xticks], yticks, "quantized tensor, in graph order", "SQNR (dB)")
    chart.polyline(list(enumerate(cumulative)), LINE_COLOUR)
    chart.dots(list(enumerate(isolated)), 2.2, DOT_COLOUR)
    marked = [(i, isolated[i]) for i, t in enumerate(tensors) if t["name"] in worst]
    chart.dots(marked, 6, "crimson", hollow=True)
    chart.legend([("cumulative SQNR (tensor)", line_marker(LINE_COLOUR)),
                  ("isolated SQNR (outputs)", dot_marker(DOT_COLOUR)),
                  ("ten worst", dot_marker("crimson", 5, hollow=True))])
    return chart.svg()


def _worst_bars(worst: list[dict]) -> str:
    labels = [_shorten(t["name"]) for t in worst]
    values = _finite([t["isolated_output_sqnr_db"] for t in worst], 100.0)
    left = int(min(max((len(label) for label in labels), default=10) * 7.4 + 18, 480))
    chart = Chart(1100, int(40 * max(len(worst), 1) + 110), "Worst tensors, isolated", left=left)
    return _bars(chart, labels, [[v] for v in values], ["crimson"],
                 "output SQNR with only this tensor quantized (dB); lower costs more")


def _bars(chart: Chart, labels: list[str], values: list[list[float]], colours: list[str], xlabel: str) -> str:
    """Horizontal bars from 0, one row per label (top to bottom), one bar per series in each row."""
    flat = [v for row in values for v in row]
    xlim, xticks = value_ticks(min(0.0, *flat) if flat else 0.0, max(0.0, *flat) if flat else 1.0)
    xlim = (min(xlim[0], 0.0) if min(flat, default=0.0) < 0 else 0.0, xlim[1])
    chart.scales(xlim, (len(labels) - 0.4, -0.6))
    chart.axes([t for t in xticks if t[0] >= xlim[0]], [(row, label) for row, label in enumerate(labels)], xlabel,
               ygrid=False)
    series = max((len(row) for row in values), default=1)
    height = 0.8 / series
    for row, bars in enumerate(values):
        for k, value in enumerate(bars):
            top = row - 0.4 + k * height
            chart.parts.append(chart.rect(0.0, top, value, top + height, colours[k % len(colours)]))
    return chart.svg()


def _histogram(tensor: dict) -> str:
    hist = tensor["histogram"]
    counts = hist["counts"]
    width = (hist["max"] - hist["min"]) / len(counts)
    enc = tensor["encoding"]
    chart = Chart(460, 280, _shorten(tensor["name"], 40), left=52, font=12)
    xlim, xticks = value_ticks(hist["min"], hist["max"], 5)
    ylim, yticks = log_ticks(max(counts, default=1))
    chart.scales(xlim, ylim, ylog=True)
    chart.axes(xticks, yticks, f"value (dashed: encoding range; {100 * tensor['clipped_share']:.2f}% clipped)",
               xgrid=False, ygrid=False)
    chart.parts.append("".join(chart.rect(hist["min"] + i * width, 0.5, hist["min"] + (i + 1) * width, max(c, 0.8),
                                          "steelblue") for i, c in enumerate(counts) if c > 0))
    for x in (enc["min"], enc["max"]):
        chart.vline(x, "crimson")
    return chart.svg()


def _shorten(name: str, limit: int = 60) -> str:
    return name if len(name) <= limit else "..." + name[-(limit - 3):]


def write_comparison_html(comparison: dict, path: Path) -> None:
    """Write the page for ``onnxsnpe compare`` (the dict written to compare.json)."""
    path.write_text(render_comparison(comparison))


def render_comparison(comparison: dict) -> str:
    """Every configuration in one table and one chart; identical inputs give identical pages."""
    configs = comparison["configurations"]
    title = f"onnxsnpe comparison: {Path(comparison['model']['path']).name}"
    evaluation = comparison["evaluation"]
    rows = []
    for config in configs:
        for output in config["outputs"]:
            top1, top5 = output.get("top1_agreement"), output.get("top5_agreement")
            worst = config["worst_isolated"][:1]
            rows.append(
                f"<tr><td>{_e(config['name'])}</td><td class='name'>{_e(output['name'])}</td>"
                f"<td>{_db(output['sqnr_db'])}</td><td>{output['cosine']:.5f}</td>"
                f"<td>{output['max_abs_error']:.4g}</td>"
                f"<td>{'' if top1 is None else f'{100 * top1:.1f}%'}</td>"
                f"<td>{'' if top5 is None else f'{100 * top5:.1f}%'}</td>"
                f"<td class='name'>{_e(worst[0]) if worst else ''}</td>"
                f"<td class='name'>{_e(config['overrides'])}</td></tr>"
            )
    table = (
        "<table><tr><th>configuration</th><th>output</th><th>SQNR dB</th><th>cosine</th><th>max |err|</th>"
        "<th>top-1 agree</th><th>top-5 agree</th><th>costliest tensor (isolated)</th><th>overrides file</th></tr>"
        + "".join(rows) + "</table>"
    )
    body = "\n".join([
        f"<h1>{_e(title)}</h1>",
        f"<p>Calibrated once on {comparison['calibration']['num_samples']} samples; every configuration "
        f"evaluated on {evaluation['num_samples']} {'held-out' if evaluation['held_out'] else 'calibration'} "
        f"samples from <code>{_e(evaluation['path'])}</code>, simulated in the "
        f"{_e(ARITHMETIC_LABELS.get(configs[0]['settings'].get('arithmetic'), ''))}.</p>",
        f"<p class='note'>{_e(evaluation['note'])}</p>" if evaluation.get("note") else "",
        table,
        f"<div class='charts'>{_comparison_bars(configs)}</div>",
        _optimizations_section(comparison.get("optimizations", {})),
        *(_precision_section(config["auto_precision"], config["name"]) for config in configs
          if config.get("auto_precision")),
    ])
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _comparison_bars(configs: list[dict]) -> str:
    outputs = [o["name"] for o in configs[0]["outputs"]]
    values = [_finite([next(o["sqnr_db"] for o in c["outputs"] if o["name"] == name) for name in outputs], 100.0)
              for c in configs]
    labels = [c["name"] for c in configs]
    chart = Chart(1100, int(45 * len(configs) * len(outputs) + 110), "Configurations compared",
                  left=int(max(len(label) for label in labels) * 7.4 + 18))
    if len(outputs) > 1:
        chart.legend([(_shorten(name, 40), box_marker(PALETTE[k % len(PALETTE)])) for k, name in enumerate(outputs)])
    return _bars(chart, labels, values, list(PALETTE), "output SQNR against FP32 (dB); higher is better")
