"""A real Orthanc PACS for tests: Debian's `orthanc` + `orthanc-dicomweb`, on free loopback ports.

``OrthancServer`` writes a config with a temporary storage folder, loads the DICOMweb plugin that
the `orthanc-dicomweb` package installs, starts ``Orthanc CONFIG`` as a subprocess, waits for
``/system`` and stops it at the end. Nothing here is a fake: studies go in over DIMSE (dcmtk's
``storescu``) or HTTP and come back over DICOMweb.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
PLUGIN_DIRS = ("/usr/share/orthanc/plugins", "/usr/lib/orthanc")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dicomweb_plugin() -> str | None:
    for d in PLUGIN_DIRS:
        for p in sorted(Path(d).glob("libOrthancDicomWeb.so*")) if Path(d).is_dir() else []:
            return str(p)
    return None


def available() -> str | None:
    """None when Orthanc and its DICOMweb plugin are installed, else what is missing."""
    if not Path(ORTHANC).exists():
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)"
    if dicomweb_plugin() is None:
        return "the Orthanc DICOMweb plugin is not installed (apt-get install orthanc-dicomweb)"
    return None


class OrthancServer:
    """One Orthanc process with its own storage, HTTP and DICOM ports on 127.0.0.1."""

    def __init__(self, workdir: Path, *, aet: str = "ORTHANC", modalities: dict[str, list] | None = None) -> None:
        self.workdir = Path(workdir)
        self.http_port = free_port()
        self.dicom_port = free_port()
        self.aet = aet
        self.modalities = modalities or {}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb(self) -> str:
        return f"{self.url}/dicom-web"

    def start(self, timeout: float = 60.0) -> OrthancServer:
        missing = available()
        if missing:
            raise RuntimeError(missing)
        storage = self.workdir / "storage"
        storage.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "medsearch-test",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": self.aet,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "UnknownSopClassAccepted": True,
            "DicomModalities": self.modalities,
            "Plugins": [dicomweb_plugin()],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "StudiesMetadata": "MainDicomTags",
                         "SeriesMetadata": "Full"},
            "HttpDescribeErrors": True,
            "StableAge": 1,
        }  # fmt: skip
        cfg = self.workdir / "orthanc.json"
        cfg.write_text(json.dumps(config, indent=1))
        self.log = open(self.workdir / "orthanc.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen([ORTHANC, str(cfg)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode}: see {self.workdir / 'orthanc.log'}")
            try:
                with urllib.request.urlopen(f"{self.url}/system", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"Orthanc did not answer /system within {timeout:.0f} s")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if getattr(self, "log", None):
            self.log.close()

    def get(self, path: str) -> object:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=30) as r:
            return json.loads(r.read())

    def upload(self, data: bytes) -> dict:
        req = urllib.request.Request(f"{self.url}/instances", data=data, method="POST",
                                     headers={"Content-Type": "application/dicom"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.loads(r.read())

    def __enter__(self) -> OrthancServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
