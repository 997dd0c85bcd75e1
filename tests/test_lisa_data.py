"""benchmarks/lisa_data.py on made-up GNU manuals, licence files, man pages and READMEs: what the
fitting text keeps and drops, the held-out and validation texts, and one error line (exit 2,
nothing written) for missing sources."""
import gzip
import hashlib
import shutil
from pathlib import Path

import pytest

from benchmarks.lisa_data import LICENSES
from tests.fixtures import run_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "lisa_data.py"


def _info(path: Path, *nodes: str) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("This is a made-up manual.\n" + "".join(f"\x1f\n{node}\n" for node in nodes))


def _words(seed: str, count: int) -> str:
    """Text that gzip cannot shrink much, so that a made-up page is as large as a real one."""
    return " ".join(hashlib.sha1(f"{seed}{i}".encode()).hexdigest()[:7] for i in range(count))


def _man(path: Path, name: str, body: str, words: int = 600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write(f'.TH {name.upper()} 1 "2026-11-27" "{name} 1.0" "User Commands"\n'
                f".SH NAME\n{name} \\- a made-up command\n.SH SYNOPSIS\n.B {name}\n[file]\n"
                f".SH DESCRIPTION\n{body}\n.PP\n{_words(name, words)}\n"
                ".SH COPYRIGHT\nThis page is under the GNU General Public License.\n"
                ".SH SEE ALSO\nbeta(1)\n")


def _run(out: Path, info: Path, licences: Path, man: Path, doc: Path):
    return run_script(SCRIPT, out, "--info-dir", info, "--licences-dir", licences, "--man-dir", man, "--doc-dir", doc)


needs_groff = pytest.mark.skipif(shutil.which("groff") is None, reason="groff renders the man pages")


def _prose(name: str, chars: int) -> str:
    sentence = f"The {name} package keeps its notes here for the people who maintain it. "
    return (sentence * (chars // len(sentence) + 1))[:chars]


def _sources(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    info = tmp_path / "info"
    info.mkdir()
    _info(info / "alpha.info.gz",
          "File: alpha.info,  Node: Top,  Next: Intro\n\nAlpha\n*****\n\n* Menu:\n\n* Intro::   How to begin.",
          "File: alpha.info,  Node: Intro,  Up: Top\n\n1 Intro\n=======\n\n   Alpha reads files."
          "\x00\x08[image src=\"flow.png\"]\x00\x08 Then it stops.",
          "File: alpha.info,  Node: GNU Free Documentation License\n\nTERMS AND CONDITIONS OF THE FDL",
          "File: alpha.info,  Node: Concept Index\n\nConcept Index\n*************\n\n"
          "* files, reading:                       Intro.                (line 6)",
          "Tag Table:\nNode: Top27")
    # A manual split in parts: NAME.info.gz then NAME.info-1.gz, NAME.info-2.gz, ..., -10 after -2.
    _info(info / "beta.info.gz", "File: beta.info,  Node: Top\n\nBeta part zero.")
    for part in (1, 2, 10):
        _info(info / f"beta.info-{part}.gz", f"File: beta.info-{part},  Node: P{part}\n\nBeta part {part}.")
    _info(info / "wget.info.gz", "File: wget.info,  Node: Overview\n\nWget fetches pages.")
    licences = tmp_path / "licences"
    licences.mkdir()
    for name in LICENSES:
        (licences / name).write_text(f"The {name} licence text.\n", encoding="utf-8")
    man = tmp_path / "man"
    _man(man / "man1" / "alpha.1.gz", "alpha", "Alpha  reads files.  It stops at the end.")
    _man(man / "man7" / "omega.7.gz", "omega", "Omega is an overview.")
    _man(man / "man1" / "tiny.1.gz", "tiny", "Tiny is too small to keep.", words=10)
    _man(man / "man1" / "wget.1.gz", "wget", "Wget fetches pages.")
    _man(man / "man3" / "libcall.3.gz", "libcall", "A library call: not a section fitted on.")
    _man(man / "de" / "man1" / "alpha.1.gz", "alpha", "Alpha liest Dateien.")
    for number in range(4):  # a family: its three largest pages are kept
        _man(man / "man1" / f"gcloud-part{number}.1.gz", f"gcloud-part{number}", f"Gcloud part {number}.",
             words=600 + 100 * number)
    doc = tmp_path / "doc"
    for package in ("alpha", "beta", "gamma", "delta", "zeta"):
        (doc / package).mkdir(parents=True)
    (doc / "alpha" / "README").write_text(_prose("alpha", 7_000), encoding="utf-8")  # cut to 5,000
    with gzip.open(doc / "beta" / "README.md.gz", "wt", encoding="utf-8") as f:
        f.write(_prose("beta", 2_000))
    (doc / "gamma" / "README.txt").write_text(_prose("gamma", 3_000) + " WITHOUT ANY WARRANTY.", encoding="utf-8")
    (doc / "delta" / "README").write_text(_prose("delta", 1_000), encoding="utf-8")  # too short
    (doc / "zeta" / "README").write_text("x = {1: [2, 3]};\n" * 200, encoding="utf-8")  # code, not prose
    (doc / "zeta" / "changelog").write_text(_prose("zeta", 3_000), encoding="utf-8")  # not a README
    return info, licences, man, doc


def _written(tmp_path: Path) -> Path:
    """The output folder of a run on the made-up sources, which succeeds."""
    out = tmp_path / "out"
    result = _run(out, *_sources(tmp_path))
    assert result.returncode == 0, result.stderr
    return out


@needs_groff
def test_manuals_keep_prose_and_drop_navigation_licences_and_the_held_out_manual(tmp_path):
    out = _written(tmp_path)
    manuals = (out / "manuals.txt").read_text(encoding="utf-8")
    assert "Alpha reads files. Then it stops." in manuals
    for gone in ("File:", "* Menu", "Intro::", "(line 6)", "FDL", "Tag Table", "image", "\x00", "\x08", "Wget"):
        assert gone not in manuals, gone
    parts = [manuals.index(f"Beta part {p}") for p in ("zero", 1, 2, 10)]
    assert parts == sorted(parts)
    assert manuals.index("Alpha") < manuals.index("Beta")
    # The file's preamble (before the first node) stays: a few lines of prose in a real manual.
    assert (out / "held_out_manual.txt").read_text(encoding="utf-8") == "This is a made-up manual.\n\nWget fetches pages."
    held_out = (out / "held_out.txt").read_text(encoding="utf-8")
    assert all(f"The {name} licence text." in held_out for name in LICENSES)
    assert len((out / "calibration.txt").read_text(encoding="utf-8")) > 100_000  # CPython's own topics
    assert sorted(p.name for p in out.iterdir()) == ["calibration.txt", "held_out.txt", "held_out_manual.txt",
                                                     "man_pages.txt", "manuals.txt", "validation.txt"]


@needs_groff
def test_validation_is_the_prose_readmes_without_licences(tmp_path):
    validation = (_written(tmp_path) / "validation.txt").read_text(encoding="utf-8")
    assert validation == _prose("alpha", 5_000).strip() + "\n\n" + _prose("beta", 2_000).strip() + "\n"


@needs_groff
def test_man_pages_are_rendered_as_prose_without_licences_lists_or_the_held_out_page(tmp_path):
    pages = (_written(tmp_path) / "man_pages.txt").read_text(encoding="utf-8")
    assert "DESCRIPTION\nAlpha reads files. It stops at the end." in pages  # one space, no indent
    assert pages.index("Alpha reads") < pages.index("Gcloud part 1") < pages.index("Omega is")
    for gone in ("General Public License", "SEE ALSO", "beta(1)", "SYNOPSIS", "a made-up command", "User Commands",
                 "Tiny is", "Wget", "library call", "Dateien", "Gcloud part 0."):
        assert gone not in pages, gone
    assert all(f"Gcloud part {number}." in pages for number in (1, 2, 3))


def test_no_groff_or_a_corrupt_page_is_one_error_line_and_nothing_written(tmp_path, monkeypatch):
    info, licences, man, doc = _sources(tmp_path)
    out = tmp_path / "out"
    (man / "man7" / "omega.7.gz").write_bytes(b"not gzip at all " * 200)  # large enough to be read
    result = _run(out, info, licences, man, doc)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "omega.7.gz" in result.stderr
    assert result.stderr.count("\n") == 1 and not out.exists()

    monkeypatch.setenv("PATH", str(tmp_path / "no-programs-here"))
    (man / "man7" / "omega.7.gz").unlink()
    result = _run(out, info, licences, man, doc)
    assert result.returncode == 2 and result.stderr.startswith("error: groff not found")
    assert result.stderr.count("\n") == 1 and not out.exists()


def test_missing_sources_are_one_error_line_and_nothing_written(tmp_path):
    info, licences, man, doc = _sources(tmp_path)
    (licences / "MPL-2.0").unlink()
    out = tmp_path / "out"
    result = _run(out, info, licences, man, doc)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "MPL-2.0" in result.stderr
    assert result.stderr.count("\n") == 1 and not out.exists()

    (tmp_path / "second").mkdir()
    info, licences, man, doc = _sources(tmp_path / "second")
    (info / "wget.info.gz").unlink()
    result = _run(out, info, licences, man, doc)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "wget" in result.stderr
    assert not out.exists()

    (info / "wget.info.gz").write_bytes(b"not gzip at all")
    result = _run(out, info, licences, man, doc)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert not out.exists()


@needs_groff
def test_no_readme_of_prose_is_one_error_line_and_nothing_written(tmp_path):
    info, licences, man, doc = _sources(tmp_path)
    out = tmp_path / "out"
    for readme in [*doc.rglob("README*")]:
        readme.unlink()
    result = _run(out, info, licences, man, doc)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "no README" in result.stderr
    assert result.stderr.count("\n") == 1 and not out.exists()
