"""Render a pipeline schedule as a timeline picture: a measured trace, or a schedule's plan.

One row per rank, one box per pass: forward (F) blue, backward (B; with zb-h1 the input-gradient half)
green, deferred weight gradient (W) orange; later model chunks of the interleaved schedule are darker;
the micro-batch number is written in boxes wide enough. Gaps are the bubble, and the bubble fraction of
every rank is printed (megagopher.pipeline_parallel.trace.bubble_fractions).

    # a trace written with parallel.trace = true (the last step, or --step N)
    python tools/plot_pipeline.py runs/x/pipeline_trace.json -o timeline.png
    # the plans of several schedules on one time axis (F = 1, B = 2; ZB-H1: F = B = W = 1)
    python tools/plot_pipeline.py --plan gpipe,1f1b,interleaved,zb-h1 --pp 4 --microbatches 8 -o plans.png

Writes PNG (a small pure-Python writer: numpy + zlib, no matplotlib) or SVG, by the output's suffix.
"""
import argparse
import os
import struct
import sys
import zlib

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from megagopher.pipeline_parallel.plan import SCHEDULES, ScheduleError, simulated_events  # noqa: E402
from megagopher.pipeline_parallel.trace import bubble_fractions, load_events  # noqa: E402

COLOURS = {"F": (66, 133, 244), "B": (52, 168, 83), "W": (251, 140, 0)}
BACKGROUND, IDLE, INK = (255, 255, 255), (236, 236, 236), (20, 20, 20)
ROW, GAP, LEFT, TITLE = 24, 5, 40, 18
# A 3x5 pixel font: 5 rows of 3 bits per glyph.
FONT = dict(zip(
    "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ-=.,:%() ",
    ["111101101101111", "010110010010111", "111001111100111", "111001111001111", "101101111001001",
     "111100111001111", "111100111101111", "111001010010010", "111101111101111", "111101111001111",
     "010101111101101", "110101110101110", "011100100100011", "110101101101110", "111100110100111",
     "111100110100100", "011100101101011", "101101111101101", "111010010010111", "001001001101010",
     "101101110101101", "100100100100111", "101111111101101", "110101101101101", "010101101101010",
     "110101110100100", "010101101110011", "110101110101101", "011100010001110", "111010010010010",
     "101101101101111", "101101101101010", "101101111111101", "101101010101101", "101101010010010",
     "111001010100111", "000000111000000", "000111000111000", "000000000000010", "000000000010100",
     "000010000010000", "101001010100101", "010100100100010", "010001001001010", "000000000000000"]))


def _shade(colour, chunk):
    return tuple(int(c * (1.0 - 0.25 * min(chunk, 3))) for c in colour)


def layout(blocks, width):
    """Rows and boxes in pixels for ``blocks`` [(title or None, events with "rank")] on one time axis."""
    everything = [e for _, events in blocks for e in events]
    t0, t1 = min(e["start"] for e in everything), max(e["end"] for e in everything)
    scale = (width - LEFT - 10) / max(t1 - t0, 1e-12)
    titles, rows, boxes, y = [], [], [], 24
    for title, events in blocks:
        if title:
            titles.append((y, title))
            y += TITLE
        ranks = sorted({e["rank"] for e in events})
        for rank in ranks:
            rows.append((y + ranks.index(rank) * (ROW + GAP), f"R{rank}"))
        for e in events:
            boxes.append((y + ranks.index(e["rank"]) * (ROW + GAP), LEFT + (e["start"] - t0) * scale,
                          LEFT + (e["end"] - t0) * scale, e["op"], e["microbatch"], e["chunk"]))
        y += len(ranks) * (ROW + GAP) + 6
    return titles, rows, boxes, (width, y)


def _text(img, x, y, text, colour=INK, scale=2):
    for ch in text.upper():
        for i, bit in enumerate(FONT.get(ch, FONT[" "])):
            if bit == "1":
                r, c = divmod(i, 3)
                img[y + r * scale:y + (r + 1) * scale, x + c * scale:x + (c + 1) * scale] = colour
        x += 4 * scale


def render_png(blocks, path, width=1200):
    titles, rows, boxes, (w, h) = layout(blocks, width)
    img = np.full((h, w, 3), BACKGROUND, dtype=np.uint8)
    for i, (op, colour) in enumerate(COLOURS.items()):  # legend
        img[6:16, LEFT + i * 60:LEFT + i * 60 + 14] = colour
        _text(img, LEFT + i * 60 + 18, 6, op)
    for y, title in titles:
        _text(img, LEFT, y + 3, title)
    for y, label in rows:
        img[y:y + ROW, LEFT:w - 10] = IDLE
        _text(img, 4, y + 7, label)
    for y, x0, x1, op, mb, chunk in boxes:
        a = int(round(x0))
        b = max(int(round(x1)), a + 1)
        img[y:y + ROW, a:b] = _shade(COLOURS.get(op, INK), chunk)
        img[y:y + ROW, b - 1:b] = BACKGROUND  # a thin separator between neighbouring passes
        label = str(mb)
        if b - a >= 8 * len(label) + 4:
            _text(img, a + (b - a - 8 * len(label)) // 2, y + 7, label, colour=(255, 255, 255))
    write_png(img, path)


def write_png(img, path):
    """An RGB PNG (filter 0 on every row, one IDAT chunk)."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[r].tobytes() for r in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    with open(path, "wb") as f:
        f.write(png)


def render_svg(blocks, path, width=1200):
    titles, rows, boxes, (w, h) = layout(blocks, width)
    hexc = lambda c: "#%02x%02x%02x" % c  # noqa: E731
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
           f'font-size="11"><rect width="{w}" height="{h}" fill="white"/>']
    for i, (op, colour) in enumerate(COLOURS.items()):
        out.append(f'<rect x="{LEFT + i * 60}" y="6" width="14" height="10" fill="{hexc(colour)}"/>'
                   f'<text x="{LEFT + i * 60 + 18}" y="15">{op}</text>')
    for y, title in titles:
        out.append(f'<text x="{LEFT}" y="{y + 13}" font-weight="bold">{title}</text>')
    for y, label in rows:
        out.append(f'<rect x="{LEFT}" y="{y}" width="{w - LEFT - 10}" height="{ROW}" fill="{hexc(IDLE)}"/>'
                   f'<text x="4" y="{y + 16}">{label}</text>')
    for y, x0, x1, op, mb, chunk in boxes:
        out.append(f'<rect x="{x0:.2f}" y="{y}" width="{max(x1 - x0 - 1, 0.5):.2f}" height="{ROW}" '
                   f'fill="{hexc(_shade(COLOURS.get(op, INK), chunk))}"><title>{op} micro-batch {mb} chunk '
                   f'{chunk}</title></rect>')
        if x1 - x0 >= 7 * len(str(mb)) + 4:
            out.append(f'<text x="{(x0 + x1) / 2:.2f}" y="{y + 16}" fill="white" text-anchor="middle">{mb}</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out))


def _plan_blocks(args, parser):
    blocks = []
    for schedule in args.plan.split(","):
        if schedule not in SCHEDULES:
            parser.error(f"--plan: {schedule!r}; valid: {', '.join(SCHEDULES)}")
        vpp = args.vpp if schedule == "interleaved" else 1
        try:
            events = simulated_events(schedule, args.pp, vpp, args.microbatches)
        except ScheduleError as e:
            parser.error(str(e))
        rows = [dict(e, rank=r) for r, evs in enumerate(events) for e in evs]
        name = f"{schedule} (vpp {vpp})" if vpp > 1 else schedule
        mean = sum(bubble_fractions(rows).values()) / args.pp
        blocks.append((f"{name}: pp {args.pp}, m {args.microbatches}, bubble {mean:.3f}", rows))
    return blocks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("trace", nargs="?", help="Chrome trace JSON written with parallel.trace = true")
    parser.add_argument("-o", "--output", help="output .png or .svg (default: the trace's name with .png)")
    parser.add_argument("--step", type=int, default=None, help="training step to draw (default: the last)")
    parser.add_argument("--plan", help="draw these schedules' plans instead of a trace (comma-separated)")
    parser.add_argument("--pp", type=int, default=4, help="--plan: pipeline stages (default 4)")
    parser.add_argument("--vpp", type=int, default=2, help="--plan: virtual stages for interleaved (default 2)")
    parser.add_argument("--microbatches", type=int, default=8, help="--plan: micro-batches (default 8)")
    parser.add_argument("--width", type=int, default=1200, help="picture width in pixels (default 1200)")
    args = parser.parse_args(argv)
    if (args.trace is None) == (args.plan is None):
        parser.error("give a trace file or --plan SCHEDULES (one of the two)")
    if args.plan:
        blocks = _plan_blocks(args, parser)
        output = args.output or "pipeline_plans.png"
    else:
        events = load_events(args.trace)
        if not events:
            parser.error(f"{args.trace}: no passes in the trace")
        step = args.step if args.step is not None else max(e["step"] for e in events)
        events = [e for e in events if e["step"] == step]
        if not events:
            parser.error(f"{args.trace}: no passes in step {step}")
        blocks = [(None, events)]
        output = args.output or os.path.splitext(args.trace)[0] + ".png"
        for rank, fraction in sorted(bubble_fractions(events).items()):
            print(f"rank {rank}: bubble {fraction:.3f}")
    if output.endswith(".svg"):
        render_svg(blocks, output, args.width)
    elif output.endswith(".png"):
        render_png(blocks, output, args.width)
    else:
        parser.error(f"--output {output}: use a .png or .svg name")
    for title, _ in blocks:
        if title:
            print(title)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
