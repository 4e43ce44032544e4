"""A `triaged serve` that has received real series, with console accounts: for the browser and API tests.

The shipped model triages three series sent by C-STORE: eight clean Kaggle glioma test slices (urgent,
sent first), eight no-tumour slices (not urgent, sent later so it is the newest) and a real Toshiba DWI
series (not assessable). Secondary Captures of the urgent series go to a fake PACS, so the series page
shows what the PACS received, delivered.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pydicom
from sqlalchemy import select

from tests.conftest import shared_data
from tests.support.fake_pacs import running_fake_pacs
from tests.support.pipeline_daemon import send_series
from tests.support.pipeline_support import SHIPPED_MODEL, TOSHIBA_DWI, kaggle_files, labelled_series, wait_for
from tests.support.triaged_daemon import TRIAGED, TriagedDaemon
from triaged.db.models import Output, Result, Series

ADMIN = ("ada", "admin-password-1")
VIEWER = ("vic", "viewer-password-1")
SLICES = 8


@dataclass(frozen=True)
class ConsoleStack:
    base_url: str
    admin_token: str
    viewer_token: str
    urgent_uid: str
    normal_uid: str
    dwi_uid: str
    sc_uid: str  # SOP Instance UID of one Secondary Capture of the urgent series
    daemon: TriagedDaemon


def _uid(paths: list[Path]) -> str:
    return str(pydicom.dcmread(paths[0], stop_before_pixels=True).SeriesInstanceUID)


def _add_user(daemon: TriagedDaemon, name: str, password: str, role: str) -> None:
    done = subprocess.run(
        [*TRIAGED, "--config", str(daemon.config_path), "user", "add", name, "--role", role, "--password-stdin"],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr


def _token(daemon: TriagedDaemon, name: str) -> str:
    done = daemon.cli("user", "token", name, "--label", "tests")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def _settled(daemon: TriagedDaemon, uids: list[str], urgent_uid: str) -> bool:
    """Every series has a result and every SC of the urgent one reached the fake PACS."""
    with daemon.session_factory() as session:
        with_result = session.scalars(
            select(Series.series_instance_uid).join(Result, Result.series_id == Series.id).distinct()
        ).all()
        unsent = session.scalars(
            select(Output.id)
            .join(Result, Result.id == Output.result_id)
            .join(Series, Series.id == Result.series_id)
            .where(Series.series_instance_uid == urgent_uid, Output.sent_at.is_(None))
        ).all()
        sent = session.scalars(
            select(Output.id)
            .join(Result, Result.id == Output.result_id)
            .join(Series, Series.id == Result.series_id)
            .where(Series.series_instance_uid == urgent_uid)
        ).all()
    return set(uids) <= set(with_result) and bool(sent) and not unsent


@contextmanager
def running_console_stack(root: Path) -> Iterator[ConsoleStack]:
    data = shared_data()
    glioma = labelled_series(root / "glioma", kaggle_files("glioma")[:SLICES], seed="console-glioma")
    normal = labelled_series(root / "normal", kaggle_files("notumor")[:SLICES], seed="console-normal")
    dwi = sorted((data / "dicom" / TOSHIBA_DWI).iterdir())
    with ExitStack() as stack:
        pacs = stack.enter_context(running_fake_pacs("FAKEPACS"))
        daemon = TriagedDaemon(
            root=root / "triaged",
            model_dir=SHIPPED_MODEL,
            peers={
                "modality": {"ae_title": "TESTSCU", "host": "127.0.0.1", "port": 104},
                "pacs": {"ae_title": pacs.ae_title, "host": "127.0.0.1", "port": pacs.port},
            },
            outputs={
                "mode": "urgent",
                "destination": "pacs",
                "key_object_selection": False,
                "structured_report": False,
            },
            worker={"torch_threads": 1},
        )
        daemon.start()
        stack.callback(daemon.stop)
        _add_user(daemon, *ADMIN, "admin")
        _add_user(daemon, *VIEWER, "viewer")
        for paths in (glioma, normal, dwi):  # the urgent series first: it must still top the worklist
            send_series(daemon.dicom_port, paths)
        uids = [_uid(glioma), _uid(normal), _uid(dwi)]
        wait_for(lambda: _settled(daemon, uids, uids[0]), timeout=600, what="results and delivered SCs")
        with daemon.session_factory() as session:
            sc_uid = session.scalars(select(Output.sop_instance_uid).where(Output.kind == "sc").limit(1)).one()
        yield ConsoleStack(
            base_url=f"http://127.0.0.1:{daemon.http_port}",
            admin_token=_token(daemon, ADMIN[0]),
            viewer_token=_token(daemon, VIEWER[0]),
            urgent_uid=uids[0],
            normal_uid=uids[1],
            dwi_uid=uids[2],
            sc_uid=sc_uid,
            daemon=daemon,
        )
