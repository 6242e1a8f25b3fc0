"""Matplotlib figures of stats.json, written as reproducible PNGs (no software/date metadata)."""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from release.tiers import TIERS  # noqa: E402

DPI = 80
PNG_METADATA = {"Software": None}  # matplotlib otherwise stamps its version; keep bytes reproducible


def _png(draw: Callable[[Any], None], size: tuple[float, float] = (7.0, 4.0)) -> bytes:
    with plt.rc_context({"svg.hashsalt": "rexverse", "font.size": 9}):
        fig, ax = plt.subplots(figsize=size, dpi=DPI)
        draw(ax)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI, metadata=PNG_METADATA)
        plt.close(fig)
    return buf.getvalue()


def _bar_hist(ax: Any, hist: dict[str, int], xlabel: str, title: str) -> None:
    xs = [int(k) for k in hist]
    ax.bar(xs, list(hist.values()), color="#3b7dd8", width=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("count")
    ax.set_title(title)


def make_plots(stats: dict[str, Any]) -> dict[str, bytes]:
    """File name (under plots/) -> PNG bytes."""
    plots: dict[str, bytes] = {}
    plots["regions_per_image.png"] = _png(
        lambda ax: _bar_hist(
            ax, stats["regions_per_image"]["histogram"], "regions in the image", "Regions per image"
        )
    )

    def tiers(ax: Any) -> None:
        names = [*TIERS, "mask"]
        values = [stats["tiers"][t]["regions"] for t in names]
        ax.bar(names, values, color=["#3b7dd8", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b"])
        for i, t in enumerate(names):
            ax.annotate(f"{stats['tiers'][t]['fraction_of_regions']:.0%}", (i, values[i]), ha="center")
        ax.set_ylim(0, max([*values, 1]) * 1.15)
        ax.set_ylabel("regions")
        ax.set_title("Tier coverage (regions with that field present)")

    plots["tier_coverage.png"] = _png(tiers)

    def lengths(ax: Any) -> None:
        for name in ("phrase", "short_phrase", "referring", "description"):
            hist = stats["text_words"][name]["histogram"]
            if hist:
                ax.plot([int(k) for k in hist], list(hist.values()), marker="o", label=name)
        ax.set_xlabel("words")
        ax.set_ylabel("count")
        ax.set_title("Text lengths: caption phrases, short phrases, referring expressions, descriptions")
        ax.legend()

    plots["text_lengths.png"] = _png(lengths)

    def top(ax: Any) -> None:
        rows = stats["categories"]["top"]
        ax.barh([r["category"] for r in rows][::-1], [r["regions"] for r in rows][::-1], color="#3b7dd8")
        ax.set_xlabel("regions")
        ax.set_title(f"Top {len(rows)} of {stats['categories']['distinct']} categories")

    plots["categories_top50.png"] = _png(top, (7.0, max(3.0, 0.18 * len(stats["categories"]["top"]) + 1)))

    def rank_frequency(ax: Any) -> None:
        freq = stats["categories"]["rank_frequency"]
        if freq:
            ax.loglog(range(1, len(freq) + 1), freq, marker=".", linestyle="-")
        ax.set_xlabel("category rank")
        ax.set_ylabel("regions")
        ax.set_title("Category rank-frequency (long tail)")

    plots["categories_rank_frequency.png"] = _png(rank_frequency)

    def geometry(key: str, xlabel: str, title: str) -> Callable[[Any], None]:
        def draw(ax: Any) -> None:
            edges, counts = stats[key]["bin_edges"], stats[key]["counts"]
            widths = [b - a for a, b in zip(edges, edges[1:], strict=False)]
            ax.bar(edges[:-1], counts, width=widths, align="edge", color="#3b7dd8", edgecolor="white")
            ax.set_xlabel(xlabel)
            ax.set_ylabel("regions")
            ax.set_title(title)

        return draw

    plots["box_size.png"] = _png(geometry("box_size", "sqrt(box area / image area)", "Box size"))
    plots["box_aspect.png"] = _png(geometry("box_aspect", "log2(width / height)", "Box aspect ratio"))

    def drops(ax: Any) -> None:
        labels, values, colors = [], [], []
        for kind, color in (("rejects", "#d62728"), ("drops", "#ff7f0e")):
            for stage, reasons in stats[kind].items():
                for reason, n in reasons.items():
                    labels.append(f"{kind[:-1]} {stage}: {reason}")
                    values.append(n)
                    colors.append(color)
        ax.barh(labels[::-1], values[::-1], color=colors[::-1])
        ax.set_xlabel("count (rejects: images; drops: phrases or regions)")
        ax.set_title("Rejected input images, and phrases/regions dropped inside released images")

    n_reasons = sum(len(v) for k in ("rejects", "drops") for v in stats[k].values())
    plots["drops_rejects.png"] = _png(drops, (8.0, max(3.0, 0.25 * n_reasons + 1.2)))
    return plots
