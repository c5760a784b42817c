"""medsearch.imaging on real files: pydicom's bundled samples and MedPix PNGs from ../shared."""

from __future__ import annotations

import io
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medsearch.config import ImagingConfig
from medsearch.errors import ImageTooLarge, InvalidImage, InvalidInput, NotFound
from medsearch.imaging import (
    ImageInfo,
    dicom_array,
    dicom_to_uint8,
    image_from_bytes,
    load_image,
    probe_image,
    robust_scale,
    window,
)

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
MEDPIX_IMAGES = SHARED / "datasets" / "medpix-2.0" / "images"

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def sample(name: str) -> str:
    """A DICOM file that ships inside the pydicom wheel (never downloaded)."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom sample {name} is not bundled"
    return str(path)


def medpix_png() -> Path:
    if not MEDPIX_IMAGES.is_dir():
        pytest.fail(f"shared data missing at {MEDPIX_IMAGES}")
    return sorted(MEDPIX_IMAGES.glob("*.png"))[0]


def can_decode(name: str) -> bool:
    from pydicom.pixels import get_decoder

    ts = pydicom.dcmread(sample(name), stop_before_pixels=True).file_meta.TransferSyntaxUID
    return get_decoder(ts).is_available


def manual_window(x: np.ndarray, c: float, w: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2 LINEAR window written out independently of the implementation."""
    y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255
    y[x <= c - 0.5 - (w - 1) / 2] = 0
    y[x > c - 0.5 + (w - 1) / 2] = 255
    return np.clip(np.rint(y), 0, 255).astype(np.uint8)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A tiny, valid-looking PNG whose IHDR claims width x height 8-bit grayscale pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------- DICOM: values and VOI
def test_ct_rescale_gives_hounsfield_units_before_windowing():
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    hu = dicom_array(ds)  # (128, 128) float64
    raw = ds.pixel_array.astype(np.float64)
    assert float(ds.RescaleIntercept) == -1024 and raw.min() >= 0  # stored values are all positive
    np.testing.assert_array_equal(hu, raw * float(ds.RescaleSlope) + float(ds.RescaleIntercept))
    assert hu.min() < -800  # lung/air in HU
    # a head CT: air around the head sits near -1000 HU, brain near 0-80 HU
    head = dicom_array(pydicom.dcmread(sample("693_J2KI.dcm")))
    assert np.mean((head > -1100) & (head < -900)) > 0.1
    assert 0 < np.median(head[200:300, 200:300]) < 80


def test_window_from_header_is_used():
    ds = pydicom.dcmread(sample("MR_small.dcm"))
    assert (float(ds.WindowCenter), float(ds.WindowWidth)) == (600.0, 1600.0)
    got = np.asarray(load_image(sample("MR_small.dcm")))
    np.testing.assert_array_equal(got, manual_window(ds.pixel_array.astype(np.float64), 600, 1600))


def test_first_of_several_windows_is_used():
    ds = pydicom.dcmread(sample("J2K_pixelrep_mismatch.dcm"))
    assert list(ds.WindowCenter) == [40, 40, 40] and list(ds.WindowWidth) == [100, 100, 200]
    got = dicom_to_uint8(ds)
    np.testing.assert_array_equal(got, manual_window(dicom_array(ds), 40, 100))


def test_default_window_applies_only_when_header_has_none():
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    hu = dicom_array(ds)
    cfg = ImagingConfig(default_window=(40.0, 400.0))
    np.testing.assert_array_equal(dicom_to_uint8(ds, config=cfg), manual_window(hu, 40, 400))
    np.testing.assert_array_equal(dicom_to_uint8(ds), robust_scale(hu))  # no window at all: percentiles
    mr = pydicom.dcmread(sample("MR_small.dcm"))  # has its own window: the default is ignored
    np.testing.assert_array_equal(dicom_to_uint8(mr, config=cfg), dicom_to_uint8(mr))


def test_monochrome1_is_inverted(tmp_path):
    ds = pydicom.dcmread(sample("CT_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    path = tmp_path / "mono1.dcm"
    ds.save_as(path)
    raw = ds.pixel_array  # (128, 128) stored values
    mono1 = np.asarray(load_image(path))
    mono2 = np.asarray(load_image(sample("CT_small.dcm")))
    np.testing.assert_array_equal(mono1, 255 - mono2)
    hi = np.unravel_index(np.argmax(raw), raw.shape)
    lo = np.unravel_index(np.argmin(raw), raw.shape)
    assert mono1[hi] < mono1[lo]  # in MONOCHROME1 the largest stored value is the darkest
    assert mono2[hi] > mono2[lo]


def test_multiframe_picks_the_middle_frame_or_the_one_asked():
    path = sample("SC_rgb_rle_2frame.dcm")
    frames = pydicom.dcmread(path).pixel_array  # (2, 100, 100, 3) uint8
    assert frames.shape == (2, 100, 100, 3)
    for i in range(2):
        np.testing.assert_array_equal(np.asarray(load_image(path, frame=i)), frames[i])
    np.testing.assert_array_equal(np.asarray(load_image(path)), frames[1])  # default: n // 2
    assert not np.array_equal(frames[0], frames[1])

    us = sample("examples_ybr_color.dcm")  # 30 JPEG frames, YBR_FULL_422 -> RGB
    default, first = load_image(us), load_image(us, frame=0)
    assert default.mode == "RGB" and default.size == (320, 240)
    np.testing.assert_array_equal(np.asarray(default), np.asarray(load_image(us, frame=15)))
    assert not np.array_equal(np.asarray(default), np.asarray(first))
    with pytest.raises(InvalidInput, match="frame 30 does not exist"):
        load_image(us, frame=30)


def test_compressed_transfer_syntaxes_decode_like_the_uncompressed_file():
    ref = np.asarray(load_image(sample("MR_small.dcm")))
    for name in ("MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm",
                 "MR_small_bigendian.dcm", "MR_small_implicit.dcm"):  # fmt: skip
        if not can_decode(name):
            continue  # decoder package not installed here: covered by the missing-decoder test
        np.testing.assert_array_equal(np.asarray(load_image(sample(name))), ref, err_msg=name)


def test_colour_dicoms_come_out_rgb():
    rgb = sample("examples_rgb_color.dcm")
    np.testing.assert_array_equal(np.asarray(load_image(rgb)), pydicom.dcmread(rgb).pixel_array)
    palette = load_image(sample("examples_palette.dcm"))
    assert palette.mode == "RGB" and palette.size == (800, 350)
    assert load_image(sample("SC_ybr_full_422_uncompressed.dcm")).mode == "RGB"
    big = np.asarray(load_image(sample("SC_rgb_rle_16bit.dcm")))  # 16-bit samples scaled to 8 bit
    assert big.dtype == np.uint8 and big.max() == 255


def test_no_pixel_data_is_an_invalid_image():
    path = sample("rtplan.dcm")
    with pytest.raises(InvalidImage, match="has no pixel data") as err:
        load_image(path)
    assert "rtplan.dcm" in err.value.message and err.value.hint
    with pytest.raises(InvalidImage, match="has no pixel data"):
        probe_image(path)


def test_truncated_dicom_pixel_data():
    with pytest.raises(InvalidImage, match="truncated") as err:
        load_image(sample("MR_truncated.dcm"))
    assert "MR_truncated.dcm" in str(err.value)


def test_transfer_syntax_without_decoder_names_it(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.uid import MPEG2MPML

    ds = pydicom.dcmread(sample("CT_small.dcm"))
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.PixelData = encapsulate([b"\0" * 16])
    ds["PixelData"].VR = "OB"
    path = tmp_path / "video.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(InvalidImage, match=r"MPEG2 .*1\.2\.840\.10008\.1\.2\.4\.100"):
        load_image(path)


def test_missing_decoder_package_is_named(monkeypatch):
    import pydicom.pixels

    class NoDecoder:
        is_available = False
        missing_dependencies = ["pylibjpeg - requires pylibjpeg>=2.0 and pylibjpeg-openjpeg>=2.0"]

    monkeypatch.setattr(pydicom.pixels, "get_decoder", lambda uid: NoDecoder())
    with pytest.raises(InvalidImage, match="no decoder for it is installed") as err:
        load_image(sample("MR_small_jp2klossless.dcm"))
    assert "JPEG 2000" in err.value.message
    assert "pylibjpeg-openjpeg" in (err.value.hint or "")


def test_probe_dicom_reads_the_header_only():
    info = probe_image(sample("examples_ybr_color.dcm"))
    assert info == ImageInfo("DICOM", 320, 240, 30, "YBR_FULL_422", True)
    assert probe_image(sample("CT_small.dcm")).n_frames == 1


def test_dicom_bytes_upload_matches_file():
    path = sample("CT_small.dcm")
    data = Path(path).read_bytes()
    np.testing.assert_array_equal(np.asarray(image_from_bytes(data, "ct.dcm")), np.asarray(load_image(path)))


# ---------------------------------------------------------------------------- PNG / JPEG / PIL modes
def test_medpix_png_loads_as_8bit():
    path = medpix_png()
    im = load_image(path)
    with Image.open(path) as ref:
        assert im.size == ref.size
        assert im.mode in ("L", "RGB")
        np.testing.assert_array_equal(np.asarray(im), np.asarray(ref.convert(im.mode)))
    info = probe_image(path)
    assert (info.format, info.width, info.height, info.n_frames, info.is_dicom) == ("PNG", *im.size, 1, False)
    np.testing.assert_array_equal(np.asarray(image_from_bytes(path.read_bytes())), np.asarray(im))


def test_16bit_png_is_stretched_to_8bit(tmp_path):
    ramp = (np.arange(64 * 64, dtype=np.uint32).reshape(64, 64) * 4 + 1000).astype(np.uint16)  # 1000..17380
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    with Image.open(path) as raw:
        assert raw.mode.startswith("I")
    out = np.asarray(load_image(path))
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)  # monotone: order of values kept


def test_alpha_is_composited_on_black(tmp_path):
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[..., 0] = 200  # red everywhere
    rgba[:2, :, 3] = 255  # top half opaque, bottom half transparent
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = np.asarray(load_image(path))
    assert out.shape == (4, 4, 3)
    assert (out[:2, :, 0] == 200).all() and (out[2:] == 0).all()
    la = Image.fromarray(np.stack([np.full((4, 4), 90, np.uint8), rgba[..., 3]], -1), "LA")
    buf = io.BytesIO()
    la.save(buf, "PNG")
    gray = image_from_bytes(buf.getvalue(), "la.png")
    assert gray.mode == "L" and np.asarray(gray)[0, 0] == 90 and np.asarray(gray)[3, 3] == 0


def test_palette_and_bilevel_images(tmp_path):
    p = Image.fromarray(np.arange(16, dtype=np.uint8).reshape(4, 4) * 16).convert("P")
    p.save(tmp_path / "p.png")
    assert load_image(tmp_path / "p.png").mode == "RGB"
    Image.new("1", (8, 8), 1).save(tmp_path / "b.png")
    b = load_image(tmp_path / "b.png")
    assert b.mode == "L" and np.asarray(b).max() == 255


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), (10, 200, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "rot.jpg", exif=exif)
    assert load_image(tmp_path / "rot.jpg").size == (20, 40)


# ---------------------------------------------------------------------------- guards
def test_truncated_png_names_the_file(tmp_path):
    data = medpix_png().read_bytes()
    path = tmp_path / "cut.png"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InvalidImage, match="truncated or corrupt") as err:
        load_image(path)
    assert str(path) in err.value.message and err.value.hint
    with pytest.raises(InvalidImage, match="cut.png"):
        image_from_bytes(path.read_bytes(), "cut.png")
    with pytest.raises(InvalidImage, match="truncated or corrupt PNG"):
        probe_image(path)  # CRC walk over the chunks, no inflate
    assert probe_image(path, verify=False).format == "PNG"  # header only


def test_probe_catches_truncated_jpeg_and_dicom(tmp_path):
    buf = io.BytesIO()
    Image.open(medpix_png()).convert("RGB").save(buf, "JPEG")
    (tmp_path / "ok.jpg").write_bytes(buf.getvalue())
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    assert probe_image(tmp_path / "ok.jpg").format == "JPEG"
    with pytest.raises(InvalidImage, match="cut.jpg: truncated or corrupt JPEG"):
        probe_image(tmp_path / "cut.jpg")
    with pytest.raises(InvalidImage, match="pixel data truncated"):
        probe_image(sample("MR_truncated.dcm"))


def test_text_renamed_as_png(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("<html>this is not an image</html>\n" * 10)
    with pytest.raises(InvalidImage, match="not a recognised image") as err:
        load_image(path)
    assert str(path) in err.value.message and "PNG" in (err.value.hint or "")
    with pytest.raises(InvalidImage, match="notes.png"):
        probe_image(path)


def test_empty_missing_and_folder(tmp_path):
    (tmp_path / "zero.png").write_bytes(b"")
    with pytest.raises(InvalidImage, match="empty"):
        load_image(tmp_path / "zero.png")
    with pytest.raises(InvalidImage, match="upload.*empty"):
        image_from_bytes(b"")
    with pytest.raises(NotFound, match="nope.png"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(InvalidImage, match="folder"):
        load_image(tmp_path)


def test_huge_declared_png_is_refused_without_decoding(tmp_path):
    path = png_header_only(tmp_path / "bomb.png", 100_000, 100_000)  # 10^10 pixels declared, 100 bytes on disk
    before = Image.MAX_IMAGE_PIXELS
    t0 = time.perf_counter()
    with pytest.raises(ImageTooLarge, match="bomb.png"):
        load_image(path)
    with pytest.raises(ImageTooLarge):
        probe_image(path)
    with pytest.raises(ImageTooLarge):
        image_from_bytes(path.read_bytes(), "bomb.png")
    # our own limit (below Pillow's) is checked from the header too
    small = png_header_only(tmp_path / "wide.png", 5_000, 5_000)
    with pytest.raises(ImageTooLarge, match=r"5000x5000 = 25,000,000 pixels"):
        load_image(small, config=ImagingConfig(max_pixels=1_000_000))
    assert time.perf_counter() - t0 < 2.0  # nothing was allocated or decoded
    assert Image.MAX_IMAGE_PIXELS == before  # global Pillow state untouched


def test_size_limits_from_config():
    path = medpix_png()
    with pytest.raises(ImageTooLarge, match="bytes, above the limit"):
        load_image(path, config=ImagingConfig(max_file_bytes=100))
    with pytest.raises(ImageTooLarge, match="pixels, above the limit"):
        load_image(path, config=ImagingConfig(max_pixels=100))
    with pytest.raises(ImageTooLarge, match="pixels, above the limit"):
        load_image(sample("CT_small.dcm"), config=ImagingConfig(max_pixels=128 * 128 - 1))


def test_window_and_robust_scale_helpers():
    x = np.array([-1000.0, 0.0, 39.5, 40.0, 1000.0])
    out = window(x, 40, 400)
    assert out[0] == 0 and out[-1] == 255 and out[1] < out[3]
    assert window(x, 40, 400, "SIGMOID")[3] == 128
    assert robust_scale(np.full((3, 3), 7.0)).max() == 0  # constant image: no division by zero
    assert robust_scale(np.array([0.0, 1.0, np.nan])).tolist() == [0, 255, 0]


def test_multipage_tiff_frames(tmp_path):
    pages = [Image.new("L", (8, 8), v) for v in (10, 20, 30)]
    pages[0].save(tmp_path / "stack.tif", save_all=True, append_images=pages[1:])
    assert probe_image(tmp_path / "stack.tif").n_frames == 3
    assert np.asarray(load_image(tmp_path / "stack.tif"))[0, 0] == 10  # non-DICOM default: first frame
    assert np.asarray(load_image(tmp_path / "stack.tif", frame=2))[0, 0] == 30
    with pytest.raises(InvalidInput, match="frame 3 does not exist"):
        load_image(tmp_path / "stack.tif", frame=3)


@pytest.mark.parametrize("dtype", ["int16", "uint16", "uint8"])
@pytest.mark.parametrize("voi", ["LINEAR", "LINEAR_EXACT", "SIGMOID", "preset", "override", "MONOCHROME1"])
def test_window_table_gives_the_same_bytes_as_windowing_every_pixel(dtype: str, voi: str) -> None:
    """dicom_to_uint8 tabulates window(rescale(v)) over the stored values of a slice; the result must be the
    bytes of the per-pixel float64 path (``window(dicom_array(ds))``) for signed, unsigned and 8-bit data."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    rng = np.random.default_rng(7)
    lo, hi = {"int16": (-2048, 3071), "uint16": (0, 4095), "uint8": (0, 255)}[dtype]
    px = rng.integers(lo, hi + 1, size=(64, 48)).astype(dtype)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 64, 48, 1
    ds.PhotometricInterpretation = "MONOCHROME1" if voi == "MONOCHROME1" else "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8 if dtype == "uint8" else 16
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(dtype == "int16")
    ds.PixelData = px.tobytes()
    ds.Modality, ds.BodyPartExamined = "CT", "CHEST"
    ds.RescaleSlope, ds.RescaleIntercept = (1, -1024) if dtype == "uint16" else (0.5, 3.25)
    if voi in ("LINEAR", "LINEAR_EXACT", "SIGMOID", "MONOCHROME1"):
        ds.WindowCenter, ds.WindowWidth = 37.5, 351
        if voi != "MONOCHROME1":
            ds.VOILUTFunction = voi
    override = (-600.0, 1500.0) if voi == "override" else None
    hu = dicom_array(ds)  # (64, 48) float64 modality values
    c, w = {"preset": (-600.0, 1500.0), "override": (-600.0, 1500.0)}.get(voi, (37.5, 351.0))
    want = window(hu, c, w, voi if voi in ("LINEAR_EXACT", "SIGMOID") else "LINEAR")
    if voi == "MONOCHROME1":
        want = 255 - want
    got = dicom_to_uint8(ds, window=override)
    assert got.dtype == np.uint8 and got.shape == (64, 48)
    assert np.array_equal(got, want)
    assert len(np.unique(got)) > 20  # the window spreads the values: the comparison is not trivially equal
