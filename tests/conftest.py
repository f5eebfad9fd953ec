"""Shared pytest fixtures: real photographs, deterministic torch settings."""
from __future__ import annotations

import ipaddress
import socket

import numpy as np
import pytest
import torch

# Tiny models run fastest (and most reproducibly) on one thread; the suite is many small ops.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def photos() -> dict[str, np.ndarray]:
    """A few real RGB uint8 photographs shipped by scikit-image."""
    from skimage import data

    return {
        "astronaut": data.astronaut(),
        "coffee": data.coffee(),
        "chelsea": data.chelsea(),
        "rocket": data.rocket(),
    }


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
    np.random.seed(0)


_getaddrinfo, _connect = socket.getaddrinfo, socket.socket.connect


def _loopback(host) -> bool:
    if host in (None, "", "localhost"):
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


class NetworkAccess(OSError):
    """A test reached for the network (nothing may download at run time)."""


def _local_getaddrinfo(host, *args, **kwargs):
    if not _loopback(host):
        raise NetworkAccess(f"a test tried to resolve {host!r}: the suite runs without network")
    return _getaddrinfo(host, *args, **kwargs)


def _local_connect(sock, address):
    if sock.family in (socket.AF_INET, socket.AF_INET6) and not _loopback(address[0]):
        raise NetworkAccess(f"a test tried to connect to {address!r}: the suite runs without network")
    return _connect(sock, address)


@pytest.fixture(autouse=True)
def _no_network(monkeypatch) -> None:
    """Every test runs with Python-level network access refused (loopback, which torch.distributed
    uses, stays open): a code path that would download something fails instead of reaching out."""
    monkeypatch.setattr(socket, "getaddrinfo", _local_getaddrinfo)
    monkeypatch.setattr(socket.socket, "connect", _local_connect)
