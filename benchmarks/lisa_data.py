"""Writes the calibration and held-out texts of the LiSA benchmarks (nothing is downloaded).

calibration: the Python reference topics that ship with every CPython (pydoc_data.topics),
English technical prose. held-out: the licence texts in /usr/share/common-licenses (GPL-3,
LGPL-3, GFDL-1.3, Apache-2.0, MPL-2.0, Artistic), English legal prose that fitting never sees.

    python benchmarks/lisa_data.py OUT_DIR    # writes OUT_DIR/calibration.txt, OUT_DIR/held_out.txt
"""
import argparse
import sys
from pathlib import Path

LICENSES = ("GPL-3", "LGPL-3", "GFDL-1.3", "Apache-2.0", "MPL-2.0", "Artistic")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    args = parser.parse_args()
    import pydoc_data.topics as topics

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    calibration = "\n\n".join(topics.topics[key] for key in sorted(topics.topics))
    (out / "calibration.txt").write_text(calibration, encoding="utf-8")
    licences = Path("/usr/share/common-licenses")
    missing = [name for name in LICENSES if not (licences / name).is_file()]
    if missing:
        print(f"error: {licences}: missing {', '.join(missing)}", file=sys.stderr)
        return 2
    held_out = "\n\n".join((licences / name).read_text(encoding="utf-8") for name in LICENSES)
    (out / "held_out.txt").write_text(held_out, encoding="utf-8")
    print(f"{out / 'calibration.txt'}: {len(calibration):,} chars (Python {sys.version.split()[0]} topics)")
    print(f"{out / 'held_out.txt'}: {len(held_out):,} chars")
    return 0


if __name__ == "__main__":
    sys.exit(main())
