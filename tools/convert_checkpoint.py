#!/usr/bin/env python3
"""Reshard a megagopher checkpoint to another parallel layout offline, or write its full tensors.

    python tools/convert_checkpoint.py --checkpoint DIR --output OUT --tp N --pp M [--vpp V] [--pp-layers 3,5]
    python tools/convert_checkpoint.py --checkpoint DIR --to-full OUT.pt

DIR is a checkpoint root (``latest`` names the newest) or an iter_NNNNNNN directory, saved under any layout.
OUT becomes a checkpoint root holding iter_NNNNNNN (same iteration) in the new layout, with its optimizer
state unless --no-optimizer, and ``latest``; RNG states are dropped. --to-full writes one torch.save'd dict
{name: full unpadded tensor} of the model's weights. See megagopher/export/convert.py.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", help="checkpoint root to write the new layout into")
    p.add_argument("--to-full", help="write a single file of full tensors instead")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--vpp", type=int, default=1)
    p.add_argument("--pp-layers", default=None, help="layers per pipeline (or virtual) stage, e.g. 3,5 "
                                                     "(default: the run's parallel.pp_layers if it fits, else even)")
    p.add_argument("--no-optimizer", action="store_true", help="leave the optimizer state out")
    args = p.parse_args(argv)
    if bool(args.output) == bool(args.to_full):
        p.error("give exactly one of --output and --to-full")
    from megagopher.common import run_command
    return run_command("convert_checkpoint", lambda: _convert(args))


def _convert(args):
    from megagopher.export.convert import convert, to_full
    if args.to_full:
        n = to_full(args.checkpoint, args.to_full)
        print(f"convert_checkpoint: wrote {n} full tensors to {args.to_full}")
        return 0
    pp_layers = [int(x) for x in args.pp_layers.replace(",", " ").split()] if args.pp_layers else None
    path = convert(args.checkpoint, args.output, args.tp, args.pp, args.vpp, pp_layers,
                   optimizer=not args.no_optimizer)
    print(f"convert_checkpoint: wrote {path} (tp {args.tp}, pp {args.pp}, vpp {args.vpp})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
