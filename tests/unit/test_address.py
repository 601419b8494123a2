import pytest
from hypothesis import given, strategies as st

from vfiod.address import PciAddress
from vfiod.errors import InvalidAddress, InvalidArgument


@pytest.mark.parametrize("text", ["0000:04:00.0", "04:00.0", "pci_0000_04_00_0", "0000:04:00.0".upper()])
def test_three_spellings_parse_to_one_address(text):
    assert PciAddress.parse(text) == PciAddress(0, 4, 0, 0)


def test_names_derived_from_the_address():
    a = PciAddress.parse("0001:af:1f.7")
    assert (a.sysfs_name, a.libvirt_name, a.object_name) == (
        "0001:af:1f.7", "pci_0001_af_1f_7", "0001_af_1f_7")
    assert str(a) == "0001:af:1f.7"


@pytest.mark.parametrize("text", [
    "", "0000:04:00.8", "0000:04:20.0", "0000:4:00.0", "00000:04:00.0", "0000:04:00.0/..",
    "../0000:04:00.0", "0000:04:00.0\0", "0000:04:00.0 ", " 04:00.0", "0000:04:00.0\n",
    "pci_0000_04_00_0/../x", "pci_0000_04_00", "g000:04:00.0", "0000:04:00", "x" * 100,
    "0000:04:00.0" * 3, "..", "/sys/bus/pci/devices/0000:04:00.0", "group:8", "٠٠٠٠:04:00.0",
])
def test_anything_else_is_a_named_error(text):
    with pytest.raises(InvalidAddress) as exc:
        PciAddress.parse(text)
    assert isinstance(exc.value, InvalidArgument)
    assert "PCI address" in str(exc.value)


@pytest.mark.parametrize("value", [None, 4, b"0000:04:00.0", ["0000:04:00.0"]])
def test_non_text_is_refused(value):
    with pytest.raises(InvalidAddress):
        PciAddress.parse(value)


@pytest.mark.parametrize("fields", [(0x10000, 0, 0, 0), (0, 256, 0, 0), (0, 0, 32, 0), (0, 0, 0, 8), (0, -1, 0, 0)])
def test_constructor_validates_ranges(fields):
    with pytest.raises(InvalidAddress):
        PciAddress(*fields)


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFF), st.integers(0, 0x1F), st.integers(0, 7))
def test_round_trip_every_spelling(d, b, s, f):
    a = PciAddress(d, b, s, f)
    assert PciAddress.parse(a.sysfs_name) == a
    assert PciAddress.parse(a.libvirt_name) == a
    if d == 0:
        assert PciAddress.parse(f"{b:02x}:{s:02x}.{f}") == a


@given(st.text(max_size=40))
def test_random_text_parses_only_to_safe_names(text):
    try:
        a = PciAddress.parse(text)
    except InvalidAddress:
        return
    assert "/" not in a.sysfs_name and "\0" not in a.sysfs_name and ".." not in a.sysfs_name
