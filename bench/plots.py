"""The throughput report as a Markdown table and as PNG plots (matplotlib: the `bench` extra)."""

from __future__ import annotations

from pathlib import Path

SIDE_STYLE = {  # side -> (label, matplotlib line style)
    "triptych": ("Triptych (3 processes, gRPC)", "-o"),
    "transformers_serve": ("transformers serve (HTTP)", "--s"),
    "hf_generate_sequential": ("transformers generate, sequential", ":"),
    "hf_generate_batch": ("transformers generate_batch (text)", "-."),
}


def table(report: dict) -> str:
    """One row per side and concurrency: the figures docs/benchmarks.md quotes. The last column:
    Triptych's output tokens/s over (a) sequential generate, (b) serve at the same concurrency,
    (c) generate_batch."""
    short = {"hf_generate_sequential": "a", "transformers_serve": "b", "hf_generate_batch": "c"}
    header = ("| model | mode | side | concurrency | out tok/s | req/s | TTFT p50 | TTFT p99 | TPOT p50 | "
              "Triptych tok/s ÷ (a) / (b) / (c) |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|"]
    for size, block in report["sizes"].items():
        for r in block["results"]:
            conc = "-" if r["concurrency"] is None else r["concurrency"]
            ratio = ""
            if r["side"] == "triptych":
                mine = {x["vs"]: x["output_tokens_per_s"] for x in block["ratios"]
                        if x["mode"] == r["mode"] and x["concurrency"] == r["concurrency"]}
                ratio = " / ".join(f"{mine[side]:.2f}x" if side in mine else "-" for side in short)
            lines.append(f"| {size} | {r['mode']} | {r['side']} | {conc} | {r['output_tokens_per_s']:.1f} | "
                         f"{r['requests_per_s']:.2f} | {r['ttft_p50_s'] * 1e3:.0f} ms | {r['ttft_p99_s'] * 1e3:.0f} ms | "
                         f"{r['tpot_p50_s'] * 1e3:.1f} ms | {ratio} |")
    return "\n".join(lines)


def write(report: dict, out_dir: Path) -> list[str]:
    """One PNG per model size and mode: output tokens/s and TTFT p50 against concurrency.
    Again from a saved report: python -c "import json, pathlib, bench.plots as p;
    p.write(json.load(open('R.json')), pathlib.Path('DIR'))" (from the repository root)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    levels = report["settings"]["concurrency"]
    written = []
    for size, block in report["sizes"].items():
        for mode in report["settings"]["modes"]:
            rows = [r for r in block["results"] if r["mode"] == mode]
            fig, (tps, ttft) = plt.subplots(1, 2, figsize=(11, 4.2))
            for side, (label, style) in SIDE_STYLE.items():
                mine = sorted((r for r in rows if r["side"] == side), key=lambda r: r["concurrency"] or 0)
                if not mine:
                    continue
                if len(mine) == 1 and side.startswith("hf_"):  # one figure, not a curve over concurrency
                    tps.axhline(mine[0]["output_tokens_per_s"], linestyle=style, color="gray" if ":" in style
                                else "tab:green", label=label)
                    ttft.axhline(mine[0]["ttft_p50_s"] * 1e3, linestyle=style, color="gray" if ":" in style
                                 else "tab:green", label=label)
                    continue
                xs = [r["concurrency"] for r in mine]
                tps.plot(xs, [r["output_tokens_per_s"] for r in mine], style, label=label)
                ttft.plot(xs, [r["ttft_p50_s"] * 1e3 for r in mine], style, label=label)
            for ax, ylabel in ((tps, "output tokens/s"), (ttft, "TTFT p50 (ms)")):
                ax.set_xscale("log", base=2)
                ax.set_xticks(levels, [str(x) for x in levels])
                ax.set_xlabel("concurrent requests")
                ax.set_ylabel(ylabel)
                ax.grid(alpha=0.3)
            tps.set_ylim(bottom=0)
            ttft.set_yscale("log")
            tps.legend(fontsize=8)
            settings = report["settings"]
            fig.suptitle(f"qwen2_vl {size}, {mode} requests, {settings['new_tokens']} new tokens, "
                         f"{settings['requests']} requests, {report['machine']['cpus']} CPUs"
                         + (f"\n{report['label']}" if report.get("label") else ""), fontsize=9)
            fig.tight_layout()
            path = out_dir / f"throughput-{size}-{mode}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(str(path))
    return written
