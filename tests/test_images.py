"""Images are read as the model will see them: every PIL mode, arrays, tensors, bytes, EXIF, the pixel limit."""

import io

import numpy as np
import PIL
import pytest
import torch
from PIL import Image

from causalmm import InputError, load_image
from causalmm.images import PIXEL_LIMIT_ENV, to_rgb

RED = (200, 30, 40)


def _saved(im: Image.Image, fmt: str, tmp_path, **params) -> Image.Image:
    """``im`` written in ``fmt`` and loaded back through load_image (the path a user gives)."""
    path = tmp_path / f"img.{fmt.lower()}"
    im.save(path, fmt, **params)
    return load_image(path)


def _pixel(im: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    assert im.mode == "RGB"
    return im.getpixel(xy)


def _near(got, want, tol=2):
    assert all(abs(g - w) <= tol for g, w in zip(got, want, strict=True)), (got, want)


@pytest.mark.parametrize(
    ("mode", "fmt"), [("I;16", "PNG"), ("I;16", "TIFF"), ("I;16B", "TIFF"), ("I;16L", "TIFF"), ("I;16N", None)]
)
def test_sixteen_bit_mid_grey_is_mid_grey_not_white(mode, fmt, tmp_path):
    im = Image.new(mode, (4, 4), 32768)
    im.putpixel((1, 0), 65535)
    im.putpixel((2, 0), 0)
    rgb = _saved(im, fmt, tmp_path) if fmt else load_image(im)
    assert _pixel(rgb) == (128, 128, 128)  # im.convert("RGB") gives (255, 255, 255)
    assert _pixel(rgb, (1, 0)) == (255, 255, 255) and _pixel(rgb, (2, 0)) == (0, 0, 0)


def test_int32_images_scale_by_the_declared_depth_or_the_values(tmp_path):
    sixteen = Image.new("I", (2, 2), 32768)  # PPM keeps 16-bit samples as mode I
    assert _pixel(_saved(sixteen, "PPM", tmp_path)) == (128, 128, 128)
    eight = Image.new("I", (2, 2), 100)  # a 32-bit TIFF of 8-bit values (e.g. L converted to I)
    assert _pixel(_saved(eight, "TIFF", tmp_path)) == (100, 100, 100)
    assert _pixel(_saved(sixteen, "TIFF", tmp_path)) == (128, 128, 128)  # values within 16 bits
    wide = Image.fromarray(np.array([[-1000, 0], [1000, 1000]], dtype=np.int32))  # signed: stretched
    rgb = load_image(wide)
    assert _pixel(rgb) == (0, 0, 0) and _pixel(rgb, (1, 1)) == (255, 255, 255) and _pixel(rgb, (1, 0))[0] == 128


def test_float_images_scale_by_their_range(tmp_path):
    unit = Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32))
    rgb = _saved(unit, "TIFF", tmp_path)
    assert [_pixel(rgb, xy)[0] for xy in ((0, 0), (1, 0), (0, 1), (1, 1))] == [0, 128, 255, 64]
    byte_range = Image.new("F", (2, 2), 128.0)
    assert _pixel(load_image(byte_range)) == (128, 128, 128)
    nan = Image.fromarray(np.array([[np.nan, 0.5]], dtype=np.float32))
    with pytest.raises(InputError, match="NaN or infinite"):
        load_image(nan)


def test_alpha_is_composited_onto_white(tmp_path):
    rgba = Image.new("RGBA", (2, 1), (*RED, 0))
    rgba.putpixel((1, 0), (*RED, 255))
    rgb = _saved(rgba, "PNG", tmp_path)
    assert _pixel(rgb) == (255, 255, 255) and _pixel(rgb, (1, 0)) == RED  # convert("RGB") gives RED for both
    half = load_image(Image.new("RGBA", (1, 1), (0, 0, 0, 128)))
    assert _pixel(half) == (127, 127, 127)
    assert _pixel(load_image(Image.new("RGBA", (1, 1), (0, 0, 0, 0)), background=(0, 0, 255))) == (0, 0, 255)
    assert _pixel(_saved(Image.new("LA", (1, 1), (100, 0)), "PNG", tmp_path)) == (255, 255, 255)
    assert _pixel(_saved(Image.new("LA", (1, 1), (100, 255)), "PNG", tmp_path)) == (100, 100, 100)
    # premultiplied modes: La (100 at alpha 128 means 199 unpremultiplied), RGBa
    assert _pixel(load_image(Image.new("La", (1, 1), (100, 128)))) == (227, 227, 227)
    _near(_pixel(load_image(Image.new("RGBa", (1, 1), (100, 0, 0, 128)))), (227, 127, 127))
    with pytest.raises(InputError, match="background"):
        load_image(rgba, background=(0, 0))


def test_palette_images_with_and_without_transparency(tmp_path):
    pal = Image.new("P", (2, 1), 1)
    pal.putpalette([0, 0, 0, *RED])
    pal.putpixel((1, 0), 0)
    assert _pixel(_saved(pal, "PNG", tmp_path)) == RED and _pixel(load_image(pal), (1, 0)) == (0, 0, 0)
    rgb = _saved(pal, "PNG", tmp_path, transparency=0)  # index 0 (black) transparent
    assert _pixel(rgb) == RED and _pixel(rgb, (1, 0)) == (255, 255, 255)
    pa = Image.new("PA", (1, 1), (1, 0))
    pa.putpalette([0, 0, 0, *RED])
    assert _pixel(_saved(pa, "TIFF", tmp_path)) == (255, 255, 255)
    pa.putpixel((0, 0), (1, 255))
    assert _pixel(load_image(pa)) == RED


def test_colour_spaces_convert_to_the_same_colour(tmp_path):
    cmyk = Image.new("CMYK", (2, 2), (0, 255, 255, 0))
    assert _pixel(_saved(cmyk, "TIFF", tmp_path)) == (255, 0, 0)
    _near(_pixel(_saved(cmyk, "JPEG", tmp_path, quality=100)), (255, 0, 0), tol=3)
    ycc = Image.new("RGB", (2, 2), RED).convert("YCbCr")
    if int(PIL.__version__.split(".")[0]) >= 13:
        _near(_pixel(_saved(ycc, "TIFF", tmp_path)), RED)
    else:  # Pillow 12 cannot read back the YCbCr TIFF it writes (gradio caps Pillow below 13): refused by name
        with pytest.raises(InputError, match="a damaged image"):
            _saved(ycc, "TIFF", tmp_path)
    _near(_pixel(load_image(Image.new("RGB", (2, 2), RED).convert("HSV"))), RED, tol=3)
    lab_grey = Image.new("LAB", (2, 2), (127, 128, 128))  # L* 50, a = b = 0: sRGB 119
    _near(_pixel(_saved(lab_grey, "TIFF", tmp_path)), (119, 119, 119))
    assert _pixel(_saved(Image.new("L", (2, 2), 77), "PNG", tmp_path)) == (77, 77, 77)
    one = Image.new("1", (2, 1), 0)
    one.putpixel((1, 0), 1)
    rgb = _saved(one, "PNG", tmp_path)
    assert _pixel(rgb) == (0, 0, 0) and _pixel(rgb, (1, 0)) == (255, 255, 255)
    assert _pixel(load_image(Image.new("RGBX", (1, 1), (*RED, 0)))) == RED


def test_every_pil_mode_is_converted_or_refused_by_name():
    for mode in Image.MODES:
        im = Image.new(mode, (3, 2))
        rgb = load_image(im)
        assert rgb.mode == "RGB" and rgb.size == (3, 2), mode


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (4, 2), (0, 0, 0))
    im.putpixel((0, 0), RED)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: rotate 90 degrees clockwise to show
    path = tmp_path / "phone.png"
    im.save(path, exif=exif)
    rgb = load_image(path)
    assert rgb.size == (2, 4)
    assert _pixel(rgb, (1, 0)) == RED  # the top-left pixel ends top-right


def test_empty_image_is_refused():
    with pytest.raises(InputError, match="no pixels"):
        load_image(Image.new("RGB", (0, 3)))


def test_arrays_tensors_and_bytes_are_read_as_the_same_image(tmp_path):
    g = np.random.default_rng(0)
    arr = g.integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    ref = Image.fromarray(arr)
    buf = io.BytesIO()
    ref.save(buf, "PNG")
    same = [
        load_image(arr),
        load_image(torch.from_numpy(arr).permute(2, 0, 1)),  # CxHxW uint8
        load_image(torch.from_numpy(arr).permute(2, 0, 1).float() / 255),  # CxHxW in [0, 1]
        load_image(torch.from_numpy(arr)),  # HxWxC: unambiguous, accepted
        load_image(np.moveaxis(arr, -1, 0)),  # CxHxW numpy: unambiguous, accepted
        load_image(buf.getvalue()),
        load_image(arr.astype(np.uint16) * 257),  # 16-bit
    ]
    for im in same:
        assert np.array_equal(np.asarray(im), arr)
    grey = g.integers(0, 256, size=(4, 6), dtype=np.uint8)
    assert np.array_equal(np.asarray(load_image(grey))[..., 0], grey)
    assert np.array_equal(np.asarray(load_image(grey[..., None]))[..., 0], grey)
    assert _pixel(load_image(np.zeros((2, 2, 4), np.uint8))) == (255, 255, 255)  # RGBA, transparent


@pytest.mark.parametrize(
    ("value", "needle"),
    [
        (None, "is None"),
        (42, "cannot use a int as an image"),
        (np.zeros((2, 3, 4, 4), np.uint8), "batch of images"),
        (np.zeros((5, 6, 7), np.uint8), "not an image"),
        (np.zeros((0, 4), np.uint8), "not an image"),
        (np.array([["a"]]), "dtype"),
        (b"not an image", "cannot read image bytes"),
        ("https://example.com/cat.jpg", "URL"),
    ],
)
def test_unusable_images_are_refused_by_type(value, needle):
    with pytest.raises(InputError, match=needle):
        load_image(value)


def test_directory_given_as_image(tmp_path):
    with pytest.raises(InputError, match="is a directory"):
        load_image(tmp_path)


def test_pixel_limit_refuses_with_the_size_and_how_to_allow(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    Image.new("RGB", (12, 10)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL's own setting, lowered (120 is in its warning range)
    with pytest.raises(InputError, match=r"12x10 = 120 pixels, more than the limit of 100.*MAX_IMAGE_PIXELS"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # past twice the limit PIL raises DecompressionBombError
    with pytest.raises(InputError, match=f"120 pixels, more than the limit of 50.*{PIXEL_LIMIT_ENV}=0"):
        load_image(path.read_bytes())
    monkeypatch.setenv(PIXEL_LIMIT_ENV, "0")
    assert load_image(path).size == (12, 10)
    monkeypatch.setenv(PIXEL_LIMIT_ENV, "lots")
    with pytest.raises(InputError, match="must be an integer"):
        load_image(path)


def test_damaged_file_is_one_error(tmp_path):
    path = tmp_path / "cut.png"
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), RED).save(buf, "PNG")
    path.write_bytes(buf.getvalue()[:60])
    with pytest.raises(InputError, match="cannot read image"):
        load_image(path)


def test_to_rgb_returns_a_new_image():
    im = Image.new("RGB", (2, 2), RED)
    out = to_rgb(im)
    assert out is not im and out.tobytes() == im.tobytes()


def test_generate_gives_the_same_answer_for_every_form_of_one_image(loaded, images, tmp_path):
    cm = loaded("llava")
    ref = cm.generate(images[0], "Describe it.", max_new_tokens=4).token_ids
    arr = np.array(images[0])
    buf = io.BytesIO()
    images[0].save(buf, "PNG")
    for form in (arr, torch.from_numpy(arr).permute(2, 0, 1), buf.getvalue(), images[0].convert("RGBA")):
        assert cm.generate(form, "Describe it.", max_new_tokens=4).token_ids == ref
