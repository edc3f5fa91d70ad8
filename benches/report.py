"""Turns the benchmark harnesses' JSON into the suite's outputs: one JSON with the machine it ran
on, a Markdown table, and an SVG chart.

    python3 benches/report.py DIR      # reads DIR/overlay.json and DIR/l7.json
"""
import datetime
import json
import os
import platform
import sys

out = sys.argv[1]
overlay = json.load(open(os.path.join(out, "overlay.json")))
l7 = json.load(open(os.path.join(out, "l7.json")))


def machine():
    model = "unknown CPU"
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": round(mem / 2**20, 1), "kernel": platform.release()}


results = {"date": datetime.date.today().isoformat(), "machine": machine(), "overlay": overlay, "l7": l7}
json.dump(results, open(os.path.join(out, "results.json"), "w"), indent=2)

m = results["machine"]
lines = [f"Ran {results['date']} on {m['cores']} cores ({m['cpu']}), {m['memory_gib']} GiB, Linux {m['kernel']}.", ""]
lines += ["| overlay path | Gbit/s | × underlay (same run) | meshd CPU s per Gbit | UDP loss |", "|---|---|---|---|---|"]
for r in overlay["throughput"]:
    cpu = r.get("meshd_cpu_s_per_gbit")
    loss = r.get("lost_percent")
    ratio = r.get("ratio_to_underlay")
    lines.append(f"| {r['name']} | {r['gbps']:.2f} | {'' if ratio is None else f'{ratio:.3f}'} | {'' if cpu is None else cpu} | {'' if loss is None else f'{loss} %'} |")
p = overlay["ping_ms"]
lines += ["", f"Ping, average of 200: mesh overlay {p['mesh']:.3f} ms, plain underlay {p['underlay']:.3f} ms.", ""]
lines += ["| L7 path (wrk, keep-alive) | requests/s | p50 | p99 |", "|---|---|---|---|"]
names = {"direct": "direct (no proxy)", "haproxy": "HAProxy, two hops, mTLS", "mesh": "mesh, two meshd, mTLS + policy"}
for n, r in l7["results"].items():
    lines.append(f"| {names.get(n, n)} | {r['requests_per_second']:,.0f} | {r['p50_ms']:.2f} ms | {r['p99_ms']:.2f} ms |")
open(os.path.join(out, "results.md"), "w").write("\n".join(lines) + "\n")


def bars(title, unit, rows, x, y, width):
    """A horizontal bar chart: rows of (label, value, highlighted)."""
    top = max(v for _, v, _ in rows) or 1
    svg = [f'<text x="{x}" y="{y}" font-size="15" font-weight="bold">{title}</text>']
    for i, (label, value, mine) in enumerate(rows):
        yy = y + 16 + i * 26
        w = max(1, value / top * (width - 260))
        colour = "#2b7bb9" if mine else "#9aa5b1"
        svg.append(f'<text x="{x}" y="{yy + 14}" font-size="12">{label}</text>')
        svg.append(f'<rect x="{x + 200}" y="{yy}" width="{w:.1f}" height="18" fill="{colour}"/>')
        svg.append(f'<text x="{x + 205 + w:.1f}" y="{yy + 14}" font-size="12">{value:,.2f} {unit}</text>'
                   if value < 1000 else f'<text x="{x + 205 + w:.1f}" y="{yy + 14}" font-size="12">{value:,.0f} {unit}</text>')
    return svg, 16 + len(rows) * 26 + 30


width = 760
tp = [(r["name"], r["gbps"], r["name"].startswith("mesh")) for r in overlay["throughput"]]
rq = [(names.get(n, n), r["requests_per_second"], n == "mesh") for n, r in l7["results"].items()]
a, ha = bars("Overlay throughput (iperf3)", "Gbit/s", tp, 10, 30, width)
b, hb = bars("Layer-7 requests/s (wrk)", "req/s", rq, 10, 30 + ha, width)
height = 30 + ha + hb
svg = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">',
       f'<rect width="{width}" height="{height}" fill="white"/>'] + a + b
svg.append(f'<text x="10" y="{height - 8}" font-size="11" fill="#555">{lines[0]}</text>')
svg.append("</svg>")
open(os.path.join(out, "chart.svg"), "w").write("\n".join(svg) + "\n")
print("\n".join(lines))
print(f"\nwrote {out}/results.json, results.md, chart.svg")
