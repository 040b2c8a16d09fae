"""Registered memory: byte views of every supported buffer kind; shared regions and their cleanup."""

import mmap
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from tsukimi.transfer.memory import SHM_DIR, SharedRegion, as_byte_view, sweep_orphans


def test_byte_views_of_supported_buffers():
    t = torch.arange(6, dtype=torch.float32)
    cases = [(bytearray(b"abcd"), 4, False), (b"abcd", 4, True), (np.zeros((2, 3), dtype=np.int16), 12, False),
             (mmap.mmap(-1, 4096), 4096, False), (t, 24, False)]
    for obj, nbytes, readonly in cases:
        view = as_byte_view(obj)
        assert view.nbytes == nbytes and view.format == "B" and view.readonly is readonly
    as_byte_view(t)[0:4] = bytes(4)  # a view of the tensor's own memory, not a copy
    assert t[0].item() == 0.0
    with pytest.raises(ValueError):
        as_byte_view(np.zeros((4, 4))[:, 1])
    with pytest.raises(ValueError):
        as_byte_view(torch.zeros(4, 4).t())


def test_shared_region_attach_and_unlink():
    region = SharedRegion.create(1 << 16)
    try:
        region.view[:5] = b"hello"
        peer = SharedRegion.attach(region.name, 1 << 16, writable=False)
        assert bytes(peer.view[:5]) == b"hello"
        with pytest.raises(TypeError):
            peer.view[0:1] = b"x"  # mapped read-only: the OS refuses writes
        with pytest.raises(ValueError, match="expected"):
            SharedRegion.attach(region.name, 1 << 12, writable=False)
        peer.close()
        assert os.path.exists(os.path.join(SHM_DIR, region.name))  # only the owner unlinks
    finally:
        region.close()
    assert not os.path.exists(os.path.join(SHM_DIR, region.name))
    with pytest.raises(FileNotFoundError):
        SharedRegion.attach(region.name, 1 << 16, writable=False)


def test_sweep_reclaims_regions_of_dead_processes_only():
    code = "from tsukimi.transfer.memory import SharedRegion; import os; r = SharedRegion.create(4096); print(r.name); os._exit(0)"
    name = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    mine = SharedRegion.create(4096)
    try:
        assert os.path.exists(os.path.join(SHM_DIR, name))
        removed = sweep_orphans()
        assert name in removed and mine.name not in removed
        assert not os.path.exists(os.path.join(SHM_DIR, name))
    finally:
        mine.close()
