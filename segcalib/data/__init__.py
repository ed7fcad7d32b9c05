"""Cases, volumes and the MONAI pipelines that turn them into network inputs."""

from segcalib.data.check import DatasetSummary, check_manifest
from segcalib.data.manifest import SPLITS, Case, Manifest, load_manifest, safe_case_id
from segcalib.data.volumes import VolumeHeader, read_header, read_volume, save_like

__all__ = [
    "SPLITS",
    "Case",
    "DatasetSummary",
    "Manifest",
    "VolumeHeader",
    "check_manifest",
    "load_manifest",
    "read_header",
    "read_volume",
    "safe_case_id",
    "save_like",
]
