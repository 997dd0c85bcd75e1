"""Writes the fitting and held-out texts of the LiSA benchmarks (nothing is downloaded).

calibration: the Python reference topics that ship with every CPython (pydoc_data.topics),
English technical prose. manuals: the GNU manuals in /usr/share/info (Texinfo's plain-text
output), each cut to its first MANUAL_CHARS characters so that no one manual dominates, without
their navigation lines, indices and licence appendices, and without the wget manual. held-out:
the licence texts in /usr/share/common-licenses (GPL-3, LGPL-3, GFDL-1.3, Apache-2.0, MPL-2.0,
Artistic), English legal prose that fitting never sees; held_out_manual: the wget manual, the
same cleaning, a second unseen text of another kind. man_pages: the start of the larger man pages
of sections 1, 5, 7 and 8 (at most a few per project), rendered by groff as prose, without their
licence, author and see-also sections, and without wget's. validation: the README files in
/usr/share/doc that are prose and hold no licence, a third unseen text (packaging notes, another
kind again) to choose between fits and layers by, so that the two held-out texts stay a test.

    python benchmarks/lisa_data.py OUT_DIR [--info-dir DIR] [--licences-dir DIR] [--man-dir DIR] [--doc-dir DIR]
    # writes OUT_DIR/calibration.txt, manuals.txt, man_pages.txt, held_out.txt, held_out_manual.txt,
    # validation.txt
"""
import argparse
import gzip
import re
import shutil
import subprocess
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


def _gunzip(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as f:
            return f.read()
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: unreadable ({getattr(exc, 'strerror', None) or exc})") from None


def _read_gzip(path: Path) -> str:
    return _gunzip(path).decode("utf-8", errors="replace")


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


# Man pages: sections of prose (commands, file formats, overviews, administration), not the
# translations in /usr/share/man/LANG. A page family (gcloud-*, git-*, ALTER_*) gives at most
# MAN_FAMILY_PAGES pages, its largest, so that no one project's boilerplate dominates.
MAN_SECTIONS = ("man1", "man5", "man7", "man8")
MAN_FAMILY_PAGES = 3
MAN_MIN_BYTES = 2_000  # compressed: smaller pages are mostly a synopsis and an option list
MAN_PAGE_CHARS = 4_000  # the start of each page: about 2.2M characters from this machine's 572
# Sections that are licences, credits or lists of other pages: no prose worth fitting on.
SKIPPED_MAN_SECTION = re.compile(r"^(COPYRIGHT|COPYING|LICEN[CS]E|AUTHORS?|SEE ALSO|COLOPHON|REPORTING BUGS"
                                 r"|NAME|SYNOPSIS)\b", re.IGNORECASE)
LICENCE_TEXT = re.compile(r"General Public License|Free Documentation License|Permission is granted to",
                          re.IGNORECASE)


# Validation: READMEs in path order, the start of each, until about VALIDATION_CHARS (the size of
# the held-out licences). A README that names a licence may quote one; one that is under
# README_MIN_PROSE letters and spaces is mostly code, tables or lists.
README = re.compile(r"README(\.(md|txt|markdown|rst))?(\.gz)?$")
README_LICENCE = re.compile(r"General Public License|Permission is granted|Apache License|Mozilla Public"
                            r"|Redistribution and use|THE SOFTWARE IS PROVIDED|WITHOUT ANY WARRANTY", re.IGNORECASE)
README_MIN_CHARS = 1_500
README_MIN_PROSE = 0.8
README_CHARS = 5_000
VALIDATION_CHARS = 100_000


class DataError(Exception):
    """A missing source text, said in one line."""


def man_family(page: Path) -> str:
    return re.split(r"[-_.]", page.name, maxsplit=1)[0].lower()


def man_pages(man_dir: Path) -> list[Path]:
    """The pages to fit on: per family its MAN_FAMILY_PAGES largest, in name order."""
    families: dict[str, list[tuple[int, Path]]] = {}
    for section in MAN_SECTIONS:
        for page in sorted((man_dir / section).glob("*.gz")):
            if page.is_file() and not page.is_symlink() and (size := page.stat().st_size) >= MAN_MIN_BYTES:
                families.setdefault(man_family(page), []).append((size, page))
    chosen = [page for family, pages in families.items() if family != HELD_OUT_MANUAL
              for _, page in sorted(pages, key=lambda sp: (-sp[0], sp[1].name))[:MAN_FAMILY_PAGES]]
    return sorted(chosen, key=lambda p: (p.name.lower(), str(p)))


def man_page_text(page: Path, groff: str) -> str:
    """One man page as prose: rendered on lines too long to wrap, without hyphenation, page header
    and footer, indentation, or the sections SKIPPED_MAN_SECTION names. '' if groff fails on it."""
    try:
        rendered = subprocess.run([groff, "-k", "-man", "-Tutf8", "-rLL=4000n", "-rHY=0", "-rcR=1", "-P", "-cbou"],
                                  input=_gunzip(page), capture_output=True, timeout=30).stdout
    except subprocess.TimeoutExpired:
        return ""
    lines = rendered.decode("utf-8", errors="replace").splitlines()[1:-1]  # header, footer
    kept, skipping = [], False
    for line in lines:
        if line and not line[0].isspace():  # a section heading
            skipping = bool(SKIPPED_MAN_SECTION.match(line))
        if not skipping and not LICENCE_TEXT.search(line):
            # groff puts two spaces after a sentence and pads option lists: prose has one.
            kept.append(re.sub(" {2,}", " ", IMAGE_OR_CONTROL.sub("", line.strip())))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(kept)).strip()


def man_pages_text(man_dir: Path) -> str:
    groff = shutil.which("groff")
    if groff is None:
        raise DataError("groff not found: it renders the man pages (apt install groff-base)")
    texts = [text[:MAN_PAGE_CHARS] for text in (man_page_text(page, groff) for page in man_pages(man_dir))
             if len(text) >= 500]
    if not texts:
        raise DataError(f"{man_dir}: no man pages in {', '.join(MAN_SECTIONS)}")
    return "\n\n".join(texts)


def validation_text(doc_dir: Path) -> str:
    texts, total = [], 0
    for path in sorted(p for p in doc_dir.rglob("README*") if README.match(p.name) and p.is_file()):
        text = (_gunzip(path) if path.suffix == ".gz" else path.read_bytes()).decode("utf-8", errors="replace")
        prose = sum(c.isalpha() or c == " " for c in text) / len(text) if text else 0.0
        if README_LICENCE.search(text) or len(text) < README_MIN_CHARS or prose < README_MIN_PROSE:
            continue
        texts.append(text[:README_CHARS].strip())
        total += len(texts[-1])
        if total > VALIDATION_CHARS:
            break
    if not texts:
        raise DataError(f"{doc_dir}: no README of prose (README, README.md, ... at least {README_MIN_CHARS} chars)")
    return "\n\n".join(texts) + "\n"


def collect(info_dir: Path, licences: Path, man_dir: Path, doc_dir: Path) -> dict[str, str]:
    """The six texts by file name; nothing is written until all of them are read."""
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
        "man_pages.txt": man_pages_text(man_dir),
        "held_out.txt": "\n\n".join((licences / name).read_text(encoding="utf-8") for name in LICENSES),
        "held_out_manual.txt": manual_text(info_dir, HELD_OUT_MANUAL)[:HELD_OUT_MANUAL_CHARS],
        "validation.txt": validation_text(doc_dir),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--info-dir", type=Path, default=Path("/usr/share/info"), help="the GNU manuals (*.info*.gz)")
    parser.add_argument("--licences-dir", type=Path, default=Path("/usr/share/common-licenses"))
    parser.add_argument("--man-dir", type=Path, default=Path("/usr/share/man"),
                        help="the man pages (SECTION/*.gz, rendered with groff)")
    parser.add_argument("--doc-dir", type=Path, default=Path("/usr/share/doc"), help="the README files")
    args = parser.parse_args()
    try:
        texts = collect(args.info_dir, args.licences_dir, args.man_dir, args.doc_dir)
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
    except (OSError, UnicodeDecodeError) as exc:
        print(f"error: {getattr(exc, 'filename', None) or args.out_dir}: {getattr(exc, 'strerror', None) or exc}",
              file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
