"""detector: find anomalies in X-ray scans of cargo trucks and containers."""
__version__ = "0.1.0"
