"""Mediated device types as sysfs lays them out (the kernel's mtty sample: one parent,
two types), and mdevctl's persistent definitions."""

import os

import pytest

from vfiod.report import mdev_json, render_mdev
from vfiod.sysfs import Roots
from vfiod.errors import InvalidArgument, KernelError
from vfiod.sysfs import Kernel, classify_mdev_write
from vfiod.sysfs.mdev import MdevKind, mdevctl_defined, read_types

UUID1 = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1001"
UUID2 = "83b8f4f2-509f-382f-3c1e-e6bfe0fa1002"


def _mtty(tmp_path):
    sysfs = tmp_path / "sys"
    parent = sysfs / "devices/virtual/mtty/mtty"
    for t, name, avail in (("mtty-1", "Single port serial", "22"), ("mtty-2", "Dual port serial", "11")):
        d = parent / "mdev_supported_types" / t
        (d / "devices").mkdir(parents=True)
        (d / "name").write_text(name + "\n")
        (d / "device_api").write_text("vfio-pci\n")
        (d / "available_instances").write_text(avail + "\n")
        (d / "create").write_text("")
    for uuid, group in ((UUID1, 7), (UUID2, 8)):
        (parent / uuid).mkdir()
        os.symlink(f"../../../{uuid}", parent / "mdev_supported_types/mtty-2/devices" / uuid)
        (sysfs / "kernel/iommu_groups" / str(group)).mkdir(parents=True)
        os.symlink(f"../../../kernel/iommu_groups/{group}", parent / uuid / "iommu_group")
        os.symlink("../mdev_supported_types/mtty-2", parent / uuid / "mdev_type")
        (parent / uuid / "remove").write_text("")
        (sysfs / "bus/mdev/devices").mkdir(parents=True, exist_ok=True)
        os.symlink(f"../../../devices/virtual/mtty/mtty/{uuid}", sysfs / "bus/mdev/devices" / uuid)
    (sysfs / "class/mdev_bus").mkdir(parents=True)
    os.symlink("../../devices/virtual/mtty/mtty", sysfs / "class/mdev_bus/mtty")
    etc = tmp_path / "etc/mdevctl.d/mtty"
    etc.mkdir(parents=True)
    (etc / UUID2).write_text('{"mdev_type": "mtty-2", "start": "auto"}\n')
    (etc / "not-a-uuid").write_text("")
    return (Roots(str(sysfs), str(tmp_path / "proc"), str(tmp_path / "dev"), etc=str(tmp_path / "etc")),
            str(tmp_path / "etc/mdevctl.d"))


def test_parents_types_instances_and_mdevctl(tmp_path):
    roots, etc = _mtty(tmp_path)
    assert mdevctl_defined(etc) == {UUID2}
    types = read_types(roots, etc)
    assert [t.target for t in types] == ["mdev:mtty/mtty-1", "mdev:mtty/mtty-2"]
    one, two = types
    assert (one.name, one.device_api, one.available, one.instances) == ("Single port serial", "vfio-pci", 22, ())
    assert [(i.uuid, i.group, i.mdevctl) for i in two.instances] == [(UUID1, 7, False), (UUID2, 8, True)]
    doc = mdev_json(types)
    assert doc[1]["instances"][1] == {"uuid": UUID2, "iommu_group": 8, "mdevctl": True}
    text = render_mdev(doc)
    assert "mdev type mdev:mtty/mtty-2: Dual port serial (vfio-pci), 11 more available" in text
    assert f"{UUID2}  group 8  (defined by mdevctl)" in text


def test_no_mdev_bus_is_no_types(tmp_path):
    assert read_types(Roots(str(tmp_path), str(tmp_path), str(tmp_path)), str(tmp_path / "none")) == []
    assert render_mdev([]) == ""


def test_an_instance_as_the_kernel_shows_it_now(tmp_path):
    roots, _ = _mtty(tmp_path)
    kernel = Kernel(roots)
    now = kernel.mdev.instance(UUID1)
    assert (now.kind, now.group) == (MdevKind("mtty", "mtty-2"), 7)
    assert kernel.mdev.instance("83b8f4f2-509f-382f-3c1e-e6bfe0fa1003") is None
    assert kernel.mdev.mdevctl_defined() == {UUID2}          # the roots' etc/mdevctl.d
    assert kernel.mdev.type(MdevKind("mtty", "mtty-1")).available == 22
    assert kernel.mdev.type(MdevKind("mtty", "mtty-9")) is None


def test_the_writer_writes_create_and_remove_and_nothing_else(tmp_path):
    roots, _ = _mtty(tmp_path)
    kernel = Kernel(roots)
    kernel.mdev.create(MdevKind("mtty", "mtty-1"), UUID1)
    assert (tmp_path / "sys/devices/virtual/mtty/mtty/mdev_supported_types/mtty-1/create").read_text() == UUID1
    kernel.mdev.remove(UUID1)
    assert (tmp_path / "sys/devices/virtual/mtty/mtty" / UUID1 / "remove").read_text() == "1"
    for rel, data in (("class/mdev_bus/../mdev_supported_types/x/create", UUID1),
                      ("class/mdev_bus/mtty/mdev_supported_types/../create", UUID1),
                      ("class/mdev_bus/mtty/mdev_supported_types/mtty-1/create", "not-a-uuid"),
                      ("bus/mdev/devices/../remove", "1"), (f"bus/mdev/devices/{UUID1}/remove", "0"),
                      (f"bus/mdev/devices/{UUID1}/mdev_type", "1")):
        with pytest.raises(KernelError, match="not a path vfiod writes"):
            classify_mdev_write(rel, data)
    with pytest.raises(InvalidArgument):
        kernel.mdev.instance("../../etc")


@pytest.mark.parametrize("text", ["../x/y", "../x", "mtty", "mtty/", "/mtty-2", "mtty/..", "./mtty-2", "a/b/c",
                                  "mtty/mtty 2", "mtty/mtty-2\x00", "m" * 65 + "/t"])
def test_a_type_is_parent_slash_type_and_nothing_else(text):
    with pytest.raises(InvalidArgument, match="not an mdev"):
        MdevKind.parse(text)


def test_sysfs_names_of_parents_and_types():
    assert MdevKind.parse("mtty/mtty-2") == MdevKind("mtty", "mtty-2")
    assert str(MdevKind.parse("0000:00:02.0/i915-GVTg_V5_4")) == "0000:00:02.0/i915-GVTg_V5_4"
