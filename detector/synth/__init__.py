"""Synthetic dual-energy cargo scans: vehicles, cargo, threats, the linac renderer, dataset writer."""
from detector.synth.scene import ANOMALY_TYPES, SynthScan, generate_scan  # noqa: F401
from detector.synth.vehicles import VEHICLES  # noqa: F401
from detector.synth.cargo import CARGOS  # noqa: F401
