"""Spectral scanning of checkpoints: condition numbers and log-volumes of every weight matrix."""

from conditune.scanning.records import TensorRecord, read_records, write_records
from conditune.scanning.scanner import scan_source
from conditune.scanning.sources import TensorSource, open_source
from conditune.scanning.spectrum import Spectrum, analyse_matrices, analyse_matrix

__all__ = [
    "Spectrum",
    "TensorRecord",
    "TensorSource",
    "analyse_matrices",
    "analyse_matrix",
    "open_source",
    "read_records",
    "scan_source",
    "write_records",
]
