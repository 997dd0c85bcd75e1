"""Writes the fitting and held-out texts of the LiSA benchmarks (nothing is downloaded).

calibration: the Python reference topics that ship with every CPython (pydoc_data.topics),
English technical prose. manuals: the GNU manuals in /usr/share/info (Texinfo's plain-text
output), each cut to its first MANUAL_CHARS characters so that no one manual dominates, without
their navigation lines, indices and licence appendices, and without the wget manual. held-out:
the licence texts in /usr/share/common-licenses (GPL-3, LGPL-3, GFDL-1.3, Apache-2.0, MPL-2.0,
Artistic), English legal prose that fitting never sees; held_out_manual: the wget manual, the
same cleaning, a second unseen text of another kind.

    python benchmarks/lisa_data.py OUT_DIR [--info-dir DIR] [--licences-dir DIR]
    # writes OUT_DIR/calibration.txt, manuals.txt, held_out.txt, held_out_manual.txt
"""
import argparse
import gzip
import re
import sys
import zlib
from pathlib import Path

LICENSES = ("GPL-3", "LGPL-3", "GFDL-1.3", "Apache-2.0", "MPL-2.0", "Artistic")
HELD_OUT_MANUAL = "wget"
MANUAL_CHARS = 120_000
HELD_OUT_MANUAL_CHARS = 90_000
# Nodes that are licence texts (kept out of fitting: the held-out texts are licences), tables.
SKIPPED_NODE = re.compile(r"GNU Free Documentation License|GNU General Public License|GNU Lesser General"
                          r"|Copying This Manual|^Tag Table:|^End Tag Table|^Indirect:", re.IGNORECASE | re.MULTILINE)
# Texinfo marks an image as \0\b[image ...]\0\b; other control bytes have no place in prose.
IMAGE_OR_CONTROL = re.compile(r"\x00\x08\[image[^\]]*\]\x00\x08|[\x00-\x08\x0b-\x1f\x7f\ufffd]")
NAVIGATION = re.compile(r"^(File: .*Node: .*|\* Menu:.*|\* [^\n]*::.*|\* [^\n]*: [^\n]*\(line +\d+\))$")


def manual_names(info_dir: Path) -> list[str]:
    """The manuals in info_dir by name (a manual split into NAME.info-1.gz, ... counts once)."""
    return sorted({re.sub(r"\.info(-\d+)?\.gz$", "", p.name) for p in info_dir.glob("*.info*.gz")})


def _read_gzip(path: Path) -> str:
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def manual_text(info_dir: Path, name: str) -> str:
    """One manual as prose: its nodes in order, without navigation lines, indices and licences."""
    parts = sorted(info_dir.glob(f"{name}.info*.gz"), key=lambda p: (len(p.name), p.name))
    raw = "".join(_read_gzip(p) for p in parts)
    nodes = []
    for node in raw.split("\x1f"):
        node = IMAGE_OR_CONTROL.sub("", node)
        if SKIPPED_NODE.search(node[:2000]):
            continue
        lines = [line for line in node.splitlines() if not NAVIGATION.match(line.strip())]
        text = "\n".join(lines).strip()
        if text:
            nodes.append(text)
    return "\n\n".join(nodes)


class DataError(Exception):
    """A missing source text, said in one line."""


def collect(info_dir: Path, licences: Path) -> dict[str, str]:
    """The four texts by file name; nothing is written until all of them are read."""
    import pydoc_data.topics as topics

    missing = [name for name in LICENSES if not (licences / name).is_file()]
    if missing:
        raise DataError(f"{licences}: missing {', '.join(missing)}")
    names = manual_names(info_dir)
    if HELD_OUT_MANUAL not in names or len(names) < 2:
        raise DataError(f"{info_dir}: expected the {HELD_OUT_MANUAL} manual and at least one other (*.info*.gz)")
    return {
        "calibration.txt": "\n\n".join(topics.topics[key] for key in sorted(topics.topics)),
        "manuals.txt": "\n\n".join(manual_text(info_dir, name)[:MANUAL_CHARS] for name in names if name != HELD_OUT_MANUAL),
        "held_out.txt": "\n\n".join((licences / name).read_text(encoding="utf-8") for name in LICENSES),
        "held_out_manual.txt": manual_text(info_dir, HELD_OUT_MANUAL)[:HELD_OUT_MANUAL_CHARS],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--info-dir", type=Path, default=Path("/usr/share/info"), help="the GNU manuals (*.info*.gz)")
    parser.add_argument("--licences-dir", type=Path, default=Path("/usr/share/common-licenses"))
    args = parser.parse_args()
    try:
        texts = collect(args.info_dir, args.licences_dir)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        for file, text in texts.items():
            # Written beside and renamed: an interrupted run leaves no half-written text.
            partial = args.out_dir / f".{file}.partial"
            partial.write_text(text, encoding="utf-8")
            partial.replace(args.out_dir / file)
            print(f"{args.out_dir / file}: {len(text):,} chars")
    except DataError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (OSError, UnicodeDecodeError, EOFError, zlib.error) as exc:
        print(f"error: {getattr(exc, 'filename', None) or args.out_dir}: {getattr(exc, 'strerror', None) or exc}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
