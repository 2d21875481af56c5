"""The suite's plots: throughput per plan per workload, one Seesaw run's timeline, the
output:input ratio sweep."""

from __future__ import annotations

import os


def plot(results: dict, out_dir: str) -> list[str]:
    """``throughput.png``, ``timeline.png``, ``sweep.png``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    summary = results["summary"]
    fig, axes = plt.subplots(1, len(summary), figsize=(6 * len(summary), 4.5), squeeze=False)
    for ax, (wl, data) in zip(axes[0], summary.items()):
        names = list(data["plans"])
        vals = [data["plans"][n]["total_tokens_per_s"] for n in names]
        palette = {"static": "tab:gray", "hf": "tab:orange", "auto": "tab:green"}
        colors = [palette.get(data["plans"][n]["kind"], "tab:blue") for n in names]
        bars = ax.bar(range(len(names)), vals, color=colors)
        best = names.index(data["best_static"])
        bars[best].set_hatch("//")
        bars[best].set_edgecolor("black")
        ax.annotate("best static", (best, vals[best]), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(f"{wl}")
        ax.set_ylabel("tokens/s (prompt + output)")
    fig.suptitle(f"throughput per plan ({results['machine']})", fontsize=9)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "throughput.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    tl = results.get("timeline") or {"events": [], "plan": "none"}
    ev = [e for e in tl["events"] if not e["switch"]]
    fig, axes = plt.subplots(3, 1, figsize=(9, 6), sharex=True)
    t = [e["t"] for e in ev]
    axes[0].step(t, [1 if e["phase"] == "decode" else 0 for e in ev], where="post")
    axes[0].set_yticks([0, 1], ["prefill", "decode"])
    for e in tl["events"]:
        if e["switch"]:
            axes[0].axvline(e["t"], color="red", lw=0.6)
    axes[1].plot(t, [e["tier_usage"] or 0 for e in ev])
    axes[1].set_ylabel("tier load")
    axes[2].plot(t, [e["num_seqs"] for e in ev])
    axes[2].set_ylabel("batch (seqs)")
    axes[2].set_xlabel("seconds")
    axes[0].set_title(f"phase timeline: {tl['plan']} on {tl.get('workload', '')} "
                      f"(red: switches)", fontsize=9)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "timeline.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sweep = results.get("sweep") or {}
    for plan in sorted({r["plan"] for r in sweep.get("runs", [])}):
        pts = sorted((r["ratio"], r["total_tokens_per_s"]) for r in sweep["runs"]
                     if r["plan"] == plan)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=plan)
    ax.set_xlabel("output:input ratio")
    ax.set_ylabel("tokens/s (prompt + output)")
    ax.set_title(f"sensitivity (input {sweep.get('input_len', '-')} tokens)", fontsize=9)
    if sweep.get("runs"):
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "sweep.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths
