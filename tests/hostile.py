"""A corpus of hostile inputs, generated at test time (nothing is committed but this generator).

Three corpora, each built in a fresh folder:

* ``image_folder``: a folder of files to ingest as an image folder (broken images, odd names,
  special files, symlink loops, a CSV sidecar);
* ``jsonl_dataset``: a JSONL-layout dataset with malformed, non-UTF-8 and ill-typed lines and
  ``file`` names that try to leave the folder;
* ``dicom_tree``: DICOM files without pixels, with a wrong or unknown transfer syntax, with a
  10 MB private tag, truncated, declaring absurd sizes.

Each entry is a ``Hostile``: what it is, and what must happen - ``skip`` (named in the ingest
summary's skipped list with a matching reason), ``ingest`` (harmless: stored, and nothing of
the hostile part leaks into the catalog) or ``fail`` (stored, then refused at embedding by name).
Valid files come from ../shared (covid-chestxray) and pydicom's bundled samples.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

from PIL import Image


@dataclass(frozen=True)
class Hostile:
    name: str  # what it is
    expect: str  # skip | ingest | fail
    item: str  # substring of the skipped item (file path or "file.jsonl:line"), or the stored key
    reason: str = ""  # regex the skip/failure reason must match


# ---------------------------------------------------------------------------- byte builders
def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A well-formed PNG header declaring width x height 8-bit grey pixels, with a tiny IDAT."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + png_chunk(b"IEND", b""))  # fmt: skip


def png_bytes(size=(32, 32), color=90) -> bytes:
    buf = io.BytesIO()
    Image.new("L", size, color).save(buf, format="PNG")
    return buf.getvalue()


def png_with_ztxt_bomb(mb: int = 64) -> bytes:
    """A valid small PNG carrying a zTXt chunk that inflates to ``mb`` MiB."""
    base = png_bytes()
    bomb = png_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"A" * (mb << 20), 9))
    return base[:33] + bomb + base[33:]  # after the signature (8) and IHDR (25)


def tiff_declaring(width: int, height: int) -> bytes:
    """A little-endian grey TIFF declaring width x height, with one 8-byte strip."""
    data_at = 8 + 2 + 9 * 12 + 4
    entries = [(256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1), (262, 3, 1, 1),
               (273, 4, 1, data_at), (277, 3, 1, 1), (278, 4, 1, height), (279, 4, 1, 8)]  # fmt: skip
    ifd = struct.pack("<H", len(entries)) + b"".join(struct.pack("<HHII", *e) for e in entries) + b"\0\0\0\0"
    return b"II*\0" + struct.pack("<I", 8) + ifd + b"\0" * 8


def jpeg_bytes(src_png: Path) -> bytes:
    buf = io.BytesIO()
    with Image.open(src_png) as im:
        im.convert("L").save(buf, format="JPEG", quality=85)
    return buf.getvalue()


# ---------------------------------------------------------------------------- corpora
def image_folder(root: Path, covid: Path) -> list[Hostile]:
    """Image-folder corpus. Returns the entries; files are written under ``root``."""
    root.mkdir(parents=True)
    good = sorted((covid / "images").iterdir())[:2]
    real = good[0].read_bytes()
    out: list[Hostile] = []

    def put(name: str, data: bytes, expect: str, reason: str = "") -> None:
        (root / name).write_bytes(data)
        out.append(Hostile(name, expect, name, reason))

    put("truncated.png", real[: len(real) // 3], "skip", r"truncated|corrupt")
    jpg = jpeg_bytes(good[1])
    put("truncated.jpg", jpg[: int(len(jpg) * 0.6)], "skip", r"truncated|corrupt")
    put("zero.png", b"", "skip", r"empty \(0 bytes\)")
    put("text.png", b"Patient report, not an image.\n" * 20, "skip", r"not a recognised image")
    put("html.jpg", b"<!doctype html><html><body>404</body></html>", "skip", r"not a recognised image")
    put("huge.png", png_declaring(100_000, 100_000), "skip", r"100000x100000|too large")
    put("huge.tif", tiff_declaring(100_000, 100_000), "skip", r"100000x100000|too large")
    bad_crc = bytearray(png_bytes((64, 64)))
    bad_crc[-20] ^= 0xFF  # inside the IDAT chunk: the CRC no longer matches
    put("badcrc.png", bytes(bad_crc), "skip", r"corrupt|truncated|crc|CRC")
    put("ztxt-bomb.png", png_with_ztxt_bomb(), "skip", r"too large|Decompressed|corrupt|unreadable")
    put("notes.exe", b"MZ\x90\x00", "skip", r"not an image file type")
    put("newline\nname.png", png_bytes(color=11), "ingest")
    put("x" * 251 + ".png", png_bytes(color=12), "ingest")  # 255 bytes: the longest name a file can have
    # a file name that is not valid UTF-8: stored names must be text, so it is skipped by name
    with open(os.path.join(os.fsencode(root), b"latin1-\xe9\xff.png"), "wb") as f:
        f.write(png_bytes(color=13))
    out.append(Hostile("non-UTF-8 file name", "skip", "latin1-", r"not valid UTF-8"))
    # special files and links
    os.mkfifo(root / "pipe.png")
    out.append(Hostile("FIFO named .png", "skip", "pipe.png", r"not a regular file"))
    (root / "dangling.png").symlink_to(root / "does-not-exist.png")
    out.append(Hostile("dangling symlink", "skip", "dangling.png", r"broken symlink|not a regular file"))
    (root / "loop-a.png").symlink_to(root / "loop-b.png")
    (root / "loop-b.png").symlink_to(root / "loop-a.png")
    out.append(Hostile("symlink loop of files (a)", "skip", "loop-a.png", r"symlink loop|cannot stat|broken"))
    out.append(Hostile("symlink loop of files (b)", "skip", "loop-b.png", r"symlink loop|cannot stat|broken"))
    (root / "sub").mkdir()
    (root / "sub" / "up").symlink_to(root)
    out.append(Hostile("symlink loop of folders", "skip", "up", r"symlink loop"))
    deep = root.joinpath(*["d"] * 60)
    deep.mkdir(parents=True)
    (deep / "deep.png").write_bytes(png_bytes(color=14))
    out.append(Hostile("60 folders deep", "ingest", "deep.png"))
    put("ok.png", real, "ingest")
    return out


def jsonl_dataset(root: Path, covid: Path) -> list[Hostile]:
    """JSONL-layout corpus: reports.jsonl and images.jsonl with hostile lines."""
    (root / "images").mkdir(parents=True)
    src = sorted((covid / "images").iterdir())[:3]
    for f in src:
        (root / "images" / f.name).write_bytes(f.read_bytes())
    reports: list[bytes] = []
    images: list[bytes] = []
    out: list[Hostile] = []

    def report(line: bytes | str | dict, expect: str, what: str, reason: str = "") -> None:
        reports.append(
            line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode()
        )
        out.append(Hostile(what, expect, f"reports.jsonl:{len(reports)}", reason))

    def image(line: bytes | str | dict, expect: str, what: str, reason: str = "") -> None:
        images.append(
            line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line)).encode()
        )
        out.append(Hostile(what, expect, f"images.jsonl:{len(images)}", reason))

    report("\ufeff" + json.dumps({"id": "H1", "findings": "Clear lungs.", "labels": {"finding": "normal"}}),
           "ingest", "UTF-8 byte-order mark before the first line")  # fmt: skip
    report('{"id": "H2", "findings": ', "skip", "malformed JSON", r"malformed JSON")
    report(b'{"id": "H3", "findings": "caf\xe9 \xff"}', "skip", "non-UTF-8 line", r"not UTF-8")
    report("[1, 2, 3]", "skip", "a JSON array, not an object", r"expected a JSON object")
    report("[" * 100_000 + "]" * 100_000, "skip", "JSON nested 100k deep", r"nested too deeply")
    report('{"id": "H4\\ud800", "findings": "lone surrogate"}', "skip", "lone UTF-16 surrogate in a string",
           r"surrogate|not valid Unicode")  # fmt: skip
    report({"id": "H5", "findings": "Labels not an object.", "labels": "pneumonia"}, "skip", "labels is a string",
           r"labels")  # fmt: skip
    report(
        {"id": "H6", "findings": "Labels a list.", "labels": [["a", "b", "c"]]}, "skip", "labels is a list", r"labels"
    )
    report({"findings": "No id at all."}, "skip", "report without an id", r"no 'id'")
    report({"id": {"nested": [1, 2]}, "findings": "An object as id.", "age": 10**30, "labels": {"x": float("nan")}},
           "ingest", "object id, 10^30 age, NaN label")  # fmt: skip
    report("", "blank", "a blank line")  # blank lines are not records
    ok = src[0].relative_to(covid).as_posix()
    image({"image_id": "I1", "case_id": "H1", "file": ok, "caption": "fine"}, "ingest", "a good image row")
    image({"image_id": "I2", "case_id": "H1", "file": "../../../../etc/passwd"}, "skip", "file with ../",
          r"outside the dataset folder")  # fmt: skip
    image(
        {"image_id": "I3", "case_id": "H1", "file": "/etc/passwd"},
        "skip",
        "absolute file",
        r"outside the dataset folder",
    )
    image({"image_id": "I4", "case_id": "H1", "file": "images/a\u0000b.png"}, "skip", "NUL in the file name",
          r"outside the dataset folder|NUL")  # fmt: skip
    image({"image_id": "I5", "case_id": "H1", "file": "images/" + "n" * 300 + ".png"}, "skip", "300-character file name",
          r"too long|cannot read|missing")  # fmt: skip
    out[-1] = Hostile(out[-1].name, "skip", "n" * 300, out[-1].reason)  # skipped by path, not by line
    image({"image_id": "I6", "case_id": "H1", "file": "images/missing.png"}, "skip", "missing file", r"missing")
    out[-1] = Hostile(out[-1].name, "skip", "images/missing.png", out[-1].reason)
    image({"image_id": "I7", "case_id": "H1", "file": src[1].relative_to(covid).as_posix(), "frame": 10**30}, "skip",
          "frame 10^30", r"frame")  # fmt: skip
    image({"image_id": "I8", "case_id": "H1", "file": src[1].relative_to(covid).as_posix(), "frame": "middle"}, "skip",
          "frame not a number", r"frame")  # fmt: skip
    image({"image_id": "I9", "case_id": "H1", "file": 12345}, "skip", "file is a number", r"missing")
    out[-1] = Hostile(out[-1].name, "skip", "/12345", out[-1].reason)
    image(b'{"image_id": "I10", "file": "images/\xff.png"}', "skip", "non-UTF-8 image line", r"not UTF-8")
    image({"image_id": "I11\ud800", "case_id": "H1", "file": ok}, "skip", "lone surrogate in image_id",
          r"surrogate|not valid Unicode")  # fmt: skip
    image({"image_id": "I12", "case_id": "H1", "file": src[2].relative_to(covid).as_posix(), "caption": "x" * 5000},
          "ingest", "5000-character caption")  # fmt: skip
    (root / "reports.jsonl").write_bytes(b"\n".join(reports) + b"\n")
    (root / "images.jsonl").write_bytes(b"\n".join(images) + b"\n")
    return [h for h in out if h.expect != "blank"]


def dicom_tree(root: Path) -> list[Hostile]:
    """DICOM corpus from pydicom's bundled CT_small.dcm (never downloaded)."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    root.mkdir(parents=True)
    base = get_testdata_file("CT_small.dcm", download=False)
    assert base is not None
    out: list[Hostile] = []

    def variant(name: str, expect: str, reason: str = "", **change) -> pydicom.Dataset:
        ds = pydicom.dcmread(base)
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for k, v in change.items():
            setattr(ds, k, v)
        out.append(Hostile(name, expect, name, reason))
        return ds

    ds = variant("no-pixels.dcm", "skip", r"no pixel data")
    del ds.PixelData
    ds.save_as(root / "no-pixels.dcm")
    # pydicom refuses to write these, so the transfer syntax UID is patched in the bytes (same length)
    ds = variant("wrong-ts.dcm", "skip", r"not encapsulated|could not be decoded|transfer syntax")
    ds.save_as(root / "wrong-ts.dcm")
    patch_ts(root / "wrong-ts.dcm", "1.2.840.10008.1.2.5")  # says RLE Lossless, holds raw pixels
    ds = variant("unknown-ts.dcm", "skip", r"cannot decode|transfer syntax|unreadable")
    ds.save_as(root / "unknown-ts.dcm")
    patch_ts(root / "unknown-ts.dcm", "1.2.3.4.5.6.7.8.9.1")  # no such transfer syntax
    ds = variant("private-10mb.dcm", "ingest")
    block = ds.private_block(0x0011, "HOSTILE TEST", create=True)
    block.add_new(0x01, "OB", b"PHI-IN-A-PRIVATE-TAG " * (10 * 1024 * 1024 // 21))
    ds.save_as(root / "private-10mb.dcm")
    ds = variant("huge-declared.dcm", "skip", r"65535x65535|above the limit", Rows=65535, Columns=65535)
    ds.save_as(root / "huge-declared.dcm")
    ds = variant("bad-frames.dcm", "skip", r"NumberOfFrames")
    ds.NumberOfFrames = "12"
    ds.save_as(root / "bad-frames.dcm")
    raw = (root / "bad-frames.dcm").read_bytes()
    elem = b"\x28\x00\x08\x00IS\x02\x0012"  # (0028,0008) IS, 2 bytes, "12"
    assert raw.count(elem) == 1
    (root / "bad-frames.dcm").write_bytes(raw.replace(elem, elem[:-2] + b"xx"))  # not a number
    data = (Path(base)).read_bytes()
    (root / "truncated-header.dcm").write_bytes(data[:300])
    out.append(Hostile("truncated-header.dcm", "skip", "truncated-header.dcm", r"unreadable|truncated|Rows|no "))
    (root / "truncated-pixels.dcm").write_bytes(data[: len(data) - 5000])
    out.append(Hostile("truncated-pixels.dcm", "skip", "truncated-pixels.dcm", r"truncated"))
    (root / "text.dcm").write_text("not DICOM, only named .dcm")
    out.append(Hostile("text.dcm", "skip", "text.dcm", r"unreadable|not a|no StudyInstanceUID|Rows"))
    ds = variant("ok.dcm", "ingest")
    ds.save_as(root / "ok.dcm")
    return out


def patch_ts(path: Path, uid: str) -> None:
    """Replace the Explicit VR Little Endian transfer syntax UID in a file's meta header."""
    native = b"1.2.840.10008.1.2.1\x00"
    data = path.read_bytes()
    new = uid.encode().ljust(len(native), b"\x00")
    assert len(new) == len(native) and data.count(native) >= 1
    path.write_bytes(data.replace(native, new, 1))


def reason_ok(entry: Hostile, reason: str) -> bool:
    return bool(re.search(entry.reason, reason, re.I))
