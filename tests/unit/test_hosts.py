"""cluster/hosts.py: engine host specs, hosts files, GPU listings and slot plans (no I/O)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tether_server.cluster.hosts import (
    GpuInfo,
    SshSettings,
    parse_engine_hosts,
    parse_gpu_listing,
    plan_slots,
    read_hosts_file,
    ssh_command,
)

GiB = 1024**3


def test_engine_hosts_flag_names_hosts_by_address_with_optional_counts() -> None:
    a, b, c = parse_engine_hosts("root@10.0.0.1:2222=2, gpu2, gpu3=auto")
    assert (a.name, a.ssh, a.engines) == ("10.0.0.1", "root@10.0.0.1:2222", 2)
    assert (b.name, b.engines) == ("gpu2", None)
    assert c.engines is None


@pytest.mark.parametrize("text", ["h=x", "h=-1", "=2", "h,h"])
def test_engine_hosts_flag_refuses_nonsense(text: str) -> None:
    with pytest.raises(ValueError):
        parse_engine_hosts(text)


def test_gpu_listing_in_mib_becomes_bytes_and_skips_junk() -> None:
    gpus = parse_gpu_listing("0, 81559\n1, 81559\nNo devices were found\n")
    assert gpus == [GpuInfo(0, 81559 * 1024 * 1024), GpuInfo(1, 81559 * 1024 * 1024)]


def test_ssh_command_puts_the_port_in_its_flag() -> None:
    cmd = ssh_command(SshSettings(options=("A=b",)), "u@h:2222", "true")
    assert cmd[-2:] == ["u@h", "true"] and "-p" in cmd and "2222" in cmd
    assert "A=b" in cmd


def test_hosts_file_parsing_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "hosts.toml"
    path.write_text(
        '[hosts.a]\nssh = "root@10.0.0.1:2222"\nengines = 3\ntags = ["big"]\n'
        '[hosts.b]\ngpus = "none"\n'
    )
    a, b = read_hosts_file(path)
    gpus = [GpuInfo(0, GiB), GpuInfo(1, GiB)]
    slots = plan_slots(a, gpus, default_tags=True)
    assert [s.gpu for s in slots] == [0, 1, None]
    assert slots[0].tags == ("big", "gpu", "gpu:0")
    assert slots[2].environment()["CUDA_VISIBLE_DEVICES"] == ""
    assert [s.gpu for s in plan_slots(b, gpus, default_tags=True)] == [None]
    assert "CUDA_VISIBLE_DEVICES" not in plan_slots(b, gpus, default_tags=True)[0].environment()
    assert plan_slots(a, gpus, default_tags=False)[0].tags == ("big",)
