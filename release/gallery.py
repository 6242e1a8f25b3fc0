"""A static HTML gallery (no server, no network): sampled images with boxes, masks and every region's texts.

Boxes are SVG rectangles over the image, masks a pre-rendered RGBA overlay per image (decoded from the
records' COCO RLE with pycocotools), the grounded caption has its phrases highlighted in the colour of their
regions, and a category menu filters the cards. Everything is inlined in one HTML file next to the images,
so it opens from a file:// URL and copies as a folder. `#noboxes` / `#nomasks` in the URL hide layers,
`#cat=NAME` preselects a category (links to a filtered view).
"""

from __future__ import annotations

import hashlib
import html
import io
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from release.tiers import TIERS, has

PALETTE = (
    "#ff00ff",
    "#00c8ff",
    "#ffd000",
    "#ff3030",
    "#30ff60",
    "#9050ff",
    "#ff8c00",
    "#00ffc0",
)
MASK_ALPHA = 110


def sample_rank(key: str) -> str:
    """The order the gallery samples by: a salted hash of the key (stable, unrelated to shard order)."""
    return hashlib.sha256(b"rexverse-gallery:" + key.encode()).hexdigest()


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def mask_overlay(record: dict[str, Any]) -> bytes | None:
    """RGBA PNG with each region's mask in its colour, or None when no region has a mask."""
    height, width = record["height"], record["width"]
    canvas = np.zeros((height, width, 4), dtype=np.uint8)
    any_mask = False
    for i, region in enumerate(record.get("regions", [])):
        mask = region.get("mask")
        if mask is None:
            continue
        bits = mask_utils.decode({"size": list(mask["size"]), "counts": mask["counts"].encode()}).astype(bool)
        rgb = [int(colour(i)[j : j + 2], 16) for j in (1, 3, 5)]
        canvas[bits] = [*rgb, MASK_ALPHA]
        any_mask = True
    if not any_mask:
        return None
    buf = io.BytesIO()
    Image.fromarray(canvas, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def _caption_html(record: dict[str, Any], region_colour: dict[int, str]) -> str:
    text = record["caption"]["text"]
    spans = sorted((record.get("grounded_caption") or {}).get("spans", []), key=lambda s: s["start"])
    parts, pos = [], 0
    for span in spans:
        if span["start"] < pos:
            continue
        ids = [r for r in span["regions"] if r in region_colour]
        style = f' style="background:{region_colour[ids[0]]}55"' if ids else ""
        parts.append(html.escape(text[pos : span["start"]]))
        title = html.escape("regions " + ", ".join(map(str, span["regions"])))
        parts.append(f'<mark{style} title="{title}">{html.escape(text[span["start"] : span["end"]])}</mark>')
        pos = span["end"]
    parts.append(html.escape(text[pos:]))
    return "".join(parts)


def _card(record: dict[str, Any], split: str, has_mask: bool) -> str:
    key, ext = record["key"], record["image_ext"]
    width, height = record["width"], record["height"]
    regions = record.get("regions", [])
    region_colour = {r["id"]: colour(i) for i, r in enumerate(regions)}
    rects = "".join(
        f'<rect x="{r["box"][0]:.1f}" y="{r["box"][1]:.1f}" width="{r["box"][2] - r["box"][0]:.1f}" '
        f'height="{r["box"][3] - r["box"][1]:.1f}" stroke="{region_colour[r["id"]]}"/>'
        for r in regions
    )
    rows = []
    for r in regions:
        cells = "".join(
            f"<td>{html.escape(r[t]) if has(r, t) else '<span class=none>—</span>'}</td>" for t in TIERS
        )
        swatch = f'<span class="sw" style="background:{region_colour[r["id"]]}"></span>'
        rows.append(f"<tr><td>{swatch}{r['id']}</td>{cells}</tr>")
    head = "".join(f"<th>{t.replace('_', ' ')}</th>" for t in ("region", *TIERS))
    cats = "|".join(sorted({r["category"] for r in regions if has(r, "category")}))
    mask_img = f'<img class="mask" src="img/{key}.mask.png" alt="">' if has_mask else ""
    return (
        f'<div class="card" data-cats="|{html.escape(cats)}|">'
        f'<div class="pic" style="aspect-ratio:{width}/{height}">'
        f'<img src="img/{key}.{ext}" alt="{key}">{mask_img}'
        f'<svg viewBox="0 0 {width} {height}" preserveAspectRatio="none">{rects}</svg></div>'
        f'<p class="meta">{key[:16]}… · {width}×{height} · {split} · {len(regions)} regions</p>'
        f'<p class="cap">{_caption_html(record, region_colour)}</p>'
        f"<table><tr>{head}</tr>{''.join(rows)}</table></div>"
    )


STYLE = """
body{font-family:sans-serif;margin:16px;background:#fafafa;color:#222}
#grid{display:flex;flex-wrap:wrap;gap:14px}
.card{width:380px;background:#fff;border:1px solid #ddd;padding:8px;font-size:12px}
.pic{position:relative;width:380px}
.pic img,.pic svg{position:absolute;left:0;top:0;width:100%;height:100%}
.pic rect{fill:none;stroke-width:3;vector-effect:non-scaling-stroke}
body.noboxes svg,body.nomasks img.mask{display:none}
table{border-collapse:collapse;width:100%;margin-top:4px}
td,th{border-top:1px solid #eee;padding:2px;text-align:left;vertical-align:top}
.sw{display:inline-block;width:10px;height:10px;margin-right:3px}
.none{color:#aaa}
mark{padding:0 1px}
"""

SCRIPT = """
const sel=document.getElementById('cat');
function apply(){const c=sel.value;let n=0;for(const d of document.querySelectorAll('.card')){
const show=!c||d.dataset.cats.includes('|'+c+'|');d.style.display=show?'':'none';n+=show;}
document.getElementById('shown').textContent=n;}
sel.addEventListener('change',apply);
const m=location.hash.match(/cat=([^&]*)/);if(m)sel.value=decodeURIComponent(m[1]);
for(const f of ['noboxes','nomasks']){if(location.hash.includes(f)){document.body.classList.add(f);
document.getElementById(f.slice(2)).checked=false;}}
document.getElementById('boxes').addEventListener('change',e=>document.body.classList.toggle('noboxes',!e.target.checked));
document.getElementById('masks').addEventListener('change',e=>document.body.classList.toggle('nomasks',!e.target.checked));
apply();
"""


def render(title: str, samples: list[tuple[dict[str, Any], str]], masked: set[str], total: int) -> str:
    """The gallery page for `samples` [(record, split)]; `masked` = keys that have a mask overlay."""
    categories = sorted({r["category"] for rec, _ in samples for r in rec["regions"] if has(r, "category")})
    options = "".join(f'<option value="{html.escape(c)}">{html.escape(c)}</option>' for c in categories)
    cards = "".join(_card(rec, split, rec["key"] in masked) for rec, split in samples)
    return (
        "<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8>"
        f"<title>{html.escape(title)} gallery</title><style>{STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<p>{len(samples)} of {total} images, sampled by a hash of the key. "
        '<label>category <select id="cat"><option value="">(all)</option>'
        f"{options}</select></label> · <span id=shown></span> shown · "
        "<label><input type=checkbox id=boxes checked> boxes</label> "
        "<label><input type=checkbox id=masks checked> masks</label></p>"
        f'<div id="grid">{cards}</div><script>{SCRIPT}</script></body></html>\n'
    )
