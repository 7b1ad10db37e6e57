"""Physics sanity checks on what a station is sent: the open beam of a detector of fewer bits, the energy order,
and a scan upside down."""
from __future__ import annotations

import numpy as np
import pytest

from detector.scan import estimate_i0, scan_from_counts
from detector.synth.scene import generate_scan


@pytest.fixture(scope="module")
def truck():
    """One generator scan: uint16 counts (high, low) with air above the truck and wheels on the road."""
    return generate_scan(3, anomaly=True)


@pytest.mark.parametrize("shift", [4, 2])
def test_fewer_bits_read_with_i0_from_the_air(truck, shift):
    """12-bit (>> 4) and 14-bit (>> 2) counts in a 16-bit container, with no I0 in the metadata: the air above the
    truck (~3300 / ~13000 counts) is the open beam, so the scan reads as the 16-bit one. I0 was taken as 65535 and
    every pixel read 2.8 (1.4) denser: the model scored clean trucks as anomalous (AUROC 0.53 / 0.66)."""
    ref = scan_from_counts(truck.counts).attenuation
    scan = scan_from_counts(truck.counts >> shift)
    assert all(abs(v - truck.i0 / 2 ** shift) < 0.03 * truck.i0 / 2 ** shift for v in scan.i0), scan.i0
    lit = ref < 4.0   # beneath it a 12-bit detector has a few counts left: quantised
    assert float(np.median(np.abs(scan.attenuation - ref)[lit])) < 0.005
    assert float(np.percentile(np.abs(scan.attenuation - ref)[lit], 99)) < 0.1


def test_flat_dense_top_is_not_taken_for_air(truck):
    """A scan cropped at a container roof: its top rows are flat but dense, and the air elsewhere reads brighter;
    they are not the open beam (I0 stays the dtype's maximum)."""
    counts = truck.counts >> 4
    rng = np.random.default_rng(0)
    counts[:, :8] = 300 + rng.integers(0, 6, (2, 8, counts.shape[2]))
    assert estimate_i0(counts, 65535.0) == (65535.0, 65535.0)


def test_flat_brightest_top_of_fewer_bits_is_air():
    """The rule in isolation: flat top rows that are the brightest part of the image (noise allowed) are air."""
    rng = np.random.default_rng(1)
    img = rng.poisson(1500, (1, 100, 200)).astype(np.uint16)   # cargo
    img[:, :20] = rng.poisson(3300, (1, 20, 200))                 # the air above it, 12-bit
    (i0,) = estimate_i0(img, 65535.0)
    assert abs(i0 - 3300) < 10
