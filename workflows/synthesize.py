#!/usr/bin/env python
"""Write seeded LiTS-like synthetic CT volumes (NIfTI pairs or the converted image dataset).

    python workflows/synthesize.py --output data/synthetic --volumes 12 --size 256 --slices 64
    python workflows/synthesize.py --output data/abdomen --anatomy abdomen --volumes 12 --size 256 --slices 64
"""

from __future__ import annotations

import argparse
import logging
import sys

from workflows._common import Beat, make_config, setup_logging, user_errors

from lits.core.config import COLORMAPS, SYNTH_FORMATS, SynthConfig


def parse_args(argv=None) -> argparse.Namespace:
    d = SynthConfig(output="-")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--output", required=True, help="folder to write into")
    p.add_argument("--volumes", type=int, default=d.volumes, help="number of volumes (default: %(default)s)")
    p.add_argument("--size", type=int, default=d.size, help="in-plane matrix size (default: %(default)s)")
    p.add_argument("--slices", type=int, default=d.slices, help="axial slices per volume (default: %(default)s)")
    p.add_argument("--anatomy", default=d.anatomy, choices=SynthConfig.ANATOMIES,
                   help="simple: ellipses; abdomen: domain-randomised organs and tumours, docs/phantoms.md (default: %(default)s)")
    p.add_argument("--format", default=d.format, choices=SYNTH_FORMATS, help="(default: %(default)s)")
    p.add_argument("--colormap", default=d.colormap, choices=COLORMAPS, help="mask colormap for --format images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed, help="(default: %(default)s)")
    p.add_argument("--first-id", type=int, default=d.first_id, help="number of the first volume (default: %(default)s)")
    p.add_argument("--no-compress", action="store_true", help="write .nii instead of .nii.gz")
    p.add_argument("--verbose", action="store_true", help="a line per volume written")
    return p.parse_args(argv)


class OnBeat(logging.Filter):
    """Lets through the records of a loop that `Beat` finds worth a line."""

    def __init__(self):
        super().__init__()
        self.beat = Beat()

    def filter(self, record: logging.LogRecord) -> bool:
        return self.beat.level() == logging.INFO


def main(argv=None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    with user_errors("synthesize"):
        cfg = make_config(SynthConfig, output=args.output, volumes=args.volumes, size=args.size, slices=args.slices,
                          format=args.format, colormap=args.colormap, seed=args.seed,
                          compress=not args.no_compress, first_id=args.first_id, anatomy=args.anatomy)
        from lits.core import synthetic

        if not args.verbose:  # its line per volume: one every few seconds
            logging.getLogger(synthetic.__name__).addFilter(OnBeat())
        ids = synthetic.synthesize(cfg)
        print(f"wrote {len(ids)} synthetic volume(s) ({cfg.anatomy}, {cfg.format}, {cfg.size}x{cfg.size}x{cfg.slices}) "
              f"to {cfg.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
