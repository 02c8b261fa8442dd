"""The Omniglot reader, preprocessing, splits and the prepared cache, on the real data."""
import os
import shutil

import pytest
import torch

from anml_fast.data import cache, omniglot
from anml_fast.data.tasks import MetaTestSet, MetaTrainSampler, normalize
from anml_fast.errors import DataError


def test_class_order_and_split_sizes(omniglot):
    names = omniglot.class_names
    assert len(names) == 1623 and omniglot.num_background == 964
    assert names[0] == "images_background/Alphabet_of_the_Magi/character01"
    assert names[963] == "images_background/Tifinagh/character55"
    assert names[964] == "images_evaluation/Angelic/character01"
    assert names[-1] == "images_evaluation/ULOG/character26"
    assert names == sorted(names[:964]) + sorted(names[964:])
    train = MetaTrainSampler(omniglot, "cpu")
    assert tuple(train.images.shape) == (963, 20, 1, 28, 28)
    test = MetaTestSet(omniglot, "cpu")
    assert tuple(test.train.shape) == (659, 15, 1, 28, 28)
    assert tuple(test.test.shape) == (659, 5, 1, 28, 28)


def test_decoded_image_matches_reference_pipeline(omniglot, omniglot_root):
    from PIL import Image
    from torchvision import transforms

    path = (omniglot_root / "omniglot-py/images_background/Alphabet_of_the_Magi/character01/0709_01.png")
    ref = transforms.Compose([
        transforms.Resize((28, 28), interpolation=transforms.InterpolationMode.LANCZOS),
        transforms.ToTensor(),
        transforms.Normalize(mean=[0.92206 * 256] * 3, std=[0.08426 * 256 * 256] * 3),
    ])(Image.open(path).convert("L").convert("RGB"))
    ours = normalize(omniglot.images[0, 0]).expand(3, 28, 28)
    assert torch.equal(ours, ref)
    # pinned values of this drawing, so that a change in the decoder cannot go unnoticed
    u8 = omniglot.images[0, 0]
    assert int(u8.sum()) == PINNED_SUM and int(u8.min()) == 0 and int(u8.max()) == 255
    assert ours[0, 14, 14].item() == pytest.approx(PINNED_CENTRE, abs=1e-9)


PINNED_SUM = 182617
PINNED_CENTRE = -0.042565133422613144


def _mirror(src_root, dst_root):
    """A copy of the data tree made of symlinks, cheap to damage in one place."""
    for s in omniglot.SETS:
        d = dst_root / "omniglot-py" / s
        d.mkdir(parents=True)
        for alphabet in os.listdir(src_root / "omniglot-py" / s):
            (d / alphabet).symlink_to(src_root / "omniglot-py" / s / alphabet)


def _writable_character(root, character, alphabet="Tifinagh"):
    """Replace one character folder of a mirrored tree by a real copy, to damage it."""
    a = root / "omniglot-py" / "images_background" / alphabet
    target = a.resolve()
    a.unlink()
    a.mkdir()
    for ch in os.listdir(target):
        (a / ch).symlink_to(target / ch)
    ch = a / character
    real = ch.resolve()
    ch.unlink()
    shutil.copytree(real, ch)
    return ch


def test_missing_data_names_path_and_layout(tmp_path):
    with pytest.raises(DataError, match=r"omniglot-py/images_background.*expected the layout"):
        cache.load_omniglot(tmp_path, tmp_path / "c", progress=False)


def test_wrong_number_of_drawings_names_folder(omniglot_root, tmp_path):
    _mirror(omniglot_root, tmp_path)
    ch = _writable_character(tmp_path, "character03")
    os.remove(next(ch.glob("*_07.png")))
    with pytest.raises(DataError, match=r"Tifinagh/character03: found drawings .* expected exactly one"):
        omniglot.list_classes(tmp_path)


def test_unreadable_png_names_file(omniglot_root, tmp_path):
    _mirror(omniglot_root, tmp_path)
    ch = _writable_character(tmp_path, "character01")
    bad = next(ch.glob("*_02.png"))
    bad.write_bytes(b"not a png")
    with pytest.raises(DataError, match=rf"{bad.name}: cannot read this PNG"):
        cache.load_omniglot(tmp_path, tmp_path / "c", progress=False)


def test_cache_is_verified_and_rebuilt(omniglot, omniglot_root, omniglot_cache_dir, tmp_path):
    messages = []
    cdir = tmp_path / "c"
    path = cache.cache_path(omniglot_root, cdir)
    cdir.mkdir()
    shutil.copy(cache.cache_path(omniglot_root, omniglot_cache_dir), path)
    # corrupt one image byte in place: the checksum catches it and the cache is rebuilt
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0xFF
    path.write_bytes(bytes(raw))
    data = cache.load_omniglot(omniglot_root, cdir, progress=False, log=messages.append)
    assert any("corrupt" in m for m in messages)
    assert torch.equal(data.images, omniglot.images)
    # truncated file: rebuilt too
    path.write_bytes(path.read_bytes()[:1000])
    messages.clear()
    cache.load_omniglot(omniglot_root, cdir, progress=False, log=messages.append)
    assert any("cannot be read" in m for m in messages)
    # and a good cache is used silently
    messages.clear()
    cache.load_omniglot(omniglot_root, cdir, progress=False, log=messages.append)
    assert messages == []


def test_stale_cache_is_rebuilt_when_files_change(omniglot_root, tmp_path, omniglot):
    _mirror(omniglot_root, tmp_path)
    cdir = tmp_path / "c"
    cache.load_omniglot(tmp_path, cdir, progress=False)
    ch = _writable_character(tmp_path, "character05")
    f = next(ch.glob("*_01.png"))
    other = next(ch.glob("*_02.png"))
    shutil.copy(other, f)  # drawing 1 now holds drawing 2's pixels
    messages = []
    data = cache.load_omniglot(tmp_path, cdir, progress=False, log=messages.append)
    assert any("changed" in m for m in messages)
    idx = data.class_names.index("images_background/Tifinagh/character05")
    assert torch.equal(data.images[idx, 0], data.images[idx, 1])
