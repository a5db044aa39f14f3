"""report.html: the report as a page a person can open offline, charts drawn by matplotlib as inline SVG."""

from __future__ import annotations

import html
import io
import math
from pathlib import Path
from typing import TYPE_CHECKING

from .document import step_facts

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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


ARITHMETIC_LABELS = {"htp": "HTP integer arithmetic", "exact": "exact arithmetic"}


def _htp_section(htp: dict) -> str:
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
    return (
        f"<h2>Simulation against Qualcomm's HTP emulator ({htp['samples']} samples)</h2>"
        "<table><tr><th>simulation</th><th>output</th><th>SQNR dB vs HTP</th><th>max error (LSB)</th>"
        f"<th>top-1 agree</th></tr>{rows}</table><p>Ops that fell back to the CPU: {_e(fallback_text)}</p>"
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


def _figure(figsize: tuple[float, float]) -> Figure:
    """A matplotlib figure; matplotlib loads on the first chart, not with the package."""
    from matplotlib.figure import Figure

    return Figure(figsize=figsize)


def _svg(figure: Figure) -> str:
    buffer = io.StringIO()
    import matplotlib

    with matplotlib.rc_context({"svg.hashsalt": "onnxsnpe", "svg.fonttype": "none"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _finite(values: list[float | None], cap: float) -> list[float]:
    """dB values for plotting: exact (None) or above ``cap`` drawn at ``cap``."""
    return [cap if v is None or not math.isfinite(v) or v > cap else v for v in values]


def _error_along_graph(tensors: list[dict], worst: set[str]) -> str:
    figure = _figure(figsize=(11, 3.6))
    ax = figure.add_subplot()
    index = list(range(len(tensors)))
    cap = 100.0
    ax.plot(index, _finite([t["cumulative_sqnr_db"] for t in tensors], cap), label="cumulative SQNR (tensor)")
    ax.plot(index, _finite([t["isolated_output_sqnr_db"] for t in tensors], cap), ".", markersize=4,
            label="isolated SQNR (outputs)")
    marked = [i for i, t in enumerate(tensors) if t["name"] in worst]
    ax.plot(marked, _finite([tensors[i]["isolated_output_sqnr_db"] for i in marked], cap), "o", mfc="none",
            color="crimson", markersize=8, label="ten worst")
    ax.set_xlabel("quantized tensor, in graph order")
    ax.set_ylabel("SQNR (dB)")
    ax.set_title("Error along the graph")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    figure.tight_layout()
    return _svg(figure)


def _worst_bars(worst: list[dict]) -> str:
    figure = _figure(figsize=(11, 0.4 * max(len(worst), 1) + 1.2))
    ax = figure.add_subplot()
    labels = [_shorten(t["name"]) for t in worst][::-1]
    ax.barh(labels, _finite([t["isolated_output_sqnr_db"] for t in worst], 100.0)[::-1], color="crimson")
    ax.set_xlabel("output SQNR with only this tensor quantized (dB); lower costs more")
    ax.set_title("Worst tensors, isolated")
    ax.grid(axis="x", alpha=0.3)
    figure.tight_layout()
    return _svg(figure)


def _histogram(tensor: dict) -> str:
    hist = tensor["histogram"]
    counts = hist["counts"]
    width = (hist["max"] - hist["min"]) / len(counts)
    edges = [hist["min"] + i * width for i in range(len(counts))]
    figure = _figure(figsize=(4.6, 2.8))
    ax = figure.add_subplot()
    ax.bar(edges, [max(c, 0.8) for c in counts], width=width, align="edge", color="steelblue", log=True)
    enc = tensor["encoding"]
    for x in (enc["min"], enc["max"]):
        ax.axvline(x, color="crimson", linestyle="--", linewidth=1.2)
    ax.set_title(_shorten(tensor["name"], 40), fontsize=9)
    ax.set_xlabel(f"value (dashed: encoding range; {100 * tensor['clipped_share']:.2f}% clipped)", fontsize=8)
    ax.tick_params(labelsize=7)
    figure.tight_layout()
    return _svg(figure)


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
    figure = _figure(figsize=(11, 0.45 * len(configs) * len(outputs) + 1.4))
    ax = figure.add_subplot()
    height = 0.8 / len(outputs)
    for k, name in enumerate(outputs):
        values = _finite([next(o["sqnr_db"] for o in c["outputs"] if o["name"] == name) for c in configs], 100.0)
        positions = [i + k * height for i in range(len(configs))]
        ax.barh(positions, values, height=height, label=_shorten(name, 40))
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(configs))], [c["name"] for c in configs])
    ax.invert_yaxis()
    ax.set_xlabel("output SQNR against FP32 (dB); higher is better")
    ax.set_title("Configurations compared")
    ax.grid(axis="x", alpha=0.3)
    if len(outputs) > 1:
        ax.legend(fontsize=8)
    figure.tight_layout()
    return _svg(figure)
