"""Send our output files to a DICOMweb origin server by STOW-RS (PS3.18 10.5), checking every instance.

The second transport of a destination (``[outputs.dicomweb.NAME]``), under the same breaker and retries as
C-STORE (:mod:`triaged.outputs.destinations`). The multipart/related ``application/dicom`` request is built by
``dicomweb-client`` (from the highdicom authors), over a ``requests`` session that carries the TLS
verification, client certificate and basic or bearer credentials; secrets stay in that session and never reach
a log line or an error message.

How the answer maps onto the breaker (the same contract as :mod:`triaged.outputs.dimse`):

- no answer at all (refused, reset, TLS handshake failed, timed out) or a gateway that says the origin is not
  there (HTTP 502/503/504, 429) is :class:`~triaged.errors.DicomPeerError`: the destination is down, and the job
  waits without spending an attempt;
- an answer, read instance by instance from the Store Instances Response Module (PS3.18 10.5.3): every
  instance in the Referenced SOP Sequence (0008,1199) is confirmed through ``on_stored`` (so a retry resends
  only the rest, with the same UIDs), every one in the Failed SOP Sequence (0008,1198) makes the call raise
  :class:`~triaged.errors.DicomSendError` with its Failure Reason (0008,1197), which spends an attempt. So does
  any other refusal (401, 403, 400, 409 without a body, 500).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pydicom
import requests
import structlog
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from triaged.config import DicomwebDestination as DicomwebConfig
from triaged.errors import ConfigError, DicomPeerError, DicomSendError
from triaged.log import uid_hash
from triaged.outputs.dimse import StoreResult

log = structlog.get_logger()

# The origin server is not there (yet): a gateway's answer on its behalf, or "come back later".
PEER_ABSENT = frozenset(
    {
        HTTPStatus.TOO_MANY_REQUESTS,
        HTTPStatus.BAD_GATEWAY,
        HTTPStatus.SERVICE_UNAVAILABLE,
        HTTPStatus.GATEWAY_TIMEOUT,
    }
)
DICOM_JSON = ("application/dicom+json", "application/json")


@dataclass(frozen=True)
class DicomwebDestination:
    """A configured STOW-RS destination: its name (the breaker's key) and its settings."""

    name: str
    config: DicomwebConfig

    def __str__(self) -> str:
        return f"{self.name} ({public_url(self.config.url)})"


def public_url(url: str) -> str:
    """``url`` without any user:password part, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


@contextmanager
def http_session(destination: DicomwebDestination) -> Iterator[requests.Session]:
    """A session with the destination's TLS and credentials; closed on exit (no socket outlives a job)."""
    config = destination.config
    for key in ("ca_file", "cert_file", "key_file"):
        path = getattr(config, key)
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"config error: outputs.dicomweb.{destination.name}.{key}: file not found: {path}")
    session = requests.Session()
    # Only the configuration decides (style P2): requests would otherwise let REQUESTS_CA_BUNDLE override the
    # CA file, and pick up proxies and .netrc credentials from the environment.
    session.trust_env = False
    session.verify = str(config.ca_file) if config.ca_file is not None and config.verify_tls else config.verify_tls
    if config.cert_file is not None and config.key_file is not None:
        session.cert = (str(config.cert_file), str(config.key_file))
    if config.auth == "basic" and config.username is not None and config.password is not None:
        session.auth = requests.auth.HTTPBasicAuth(config.username, config.password.get_secret_value())
    elif config.auth == "bearer" and config.token is not None:
        session.headers["Authorization"] = f"Bearer {config.token.get_secret_value()}"
    try:
        yield session
    finally:
        session.close()


def _client(destination: DicomwebDestination, session: requests.Session) -> DICOMwebClient:
    client = DICOMwebClient(destination.config.url, session=session, timeout=destination.config.timeout_seconds)
    client.set_http_retry_params(retry=False)  # retries are the queue's and the breaker's, with their backoff
    return client


def _read(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except (OSError, InvalidDicomError) as exc:
        raise DicomSendError(f"cannot read output file {path.name}: {exc}") from exc


def _response_dataset(response: requests.Response | None) -> Dataset | None:
    """The Store Instances Response of an error answer, when the server sent one as DICOM JSON."""
    if response is None or not response.content:
        return None
    if response.headers.get("Content-Type", "").split(";")[0].strip() not in DICOM_JSON:
        return None
    try:
        return Dataset.from_json(response.json())
    except (ValueError, TypeError, KeyError):
        return None


def _post(destination: DicomwebDestination, datasets: Sequence[Dataset]) -> Dataset:
    """POST the instances; return the Store Instances Response (empty when the server sent no body)."""
    with http_session(destination) as session:
        try:
            return _client(destination, session).store_instances(datasets)
        except requests.HTTPError as exc:
            response = exc.response
            code = response.status_code if response is not None else 0
            if code in PEER_ABSENT:
                raise DicomPeerError(f"{destination} answered HTTP {code}: not available") from exc
            answer = _response_dataset(response)
            if answer is not None and "FailedSOPSequence" in answer:
                return answer
            raise DicomSendError(f"{destination} refused STOW-RS with HTTP {code}", status=code) from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            # Connection refused or reset, TLS verification or handshake failed, no answer in time.
            raise DicomPeerError(f"{destination} could not be reached: {type(exc).__name__}") from exc
        except (requests.RequestException, ValueError) as exc:
            raise DicomSendError(f"{destination} gave an unreadable STOW-RS answer: {type(exc).__name__}") from exc


def _uids(answer: Dataset, keyword: str) -> dict[str, Dataset]:
    return {
        str(item.ReferencedSOPInstanceUID): item
        for item in answer.get(keyword, [])
        if "ReferencedSOPInstanceUID" in item
    }


def send_files(
    paths: Sequence[Path],
    destination: DicomwebDestination,
    *,
    on_stored: Callable[[StoreResult], None] | None = None,
) -> list[StoreResult]:
    """STOW-RS ``paths`` in one request; call ``on_stored`` for each instance the server confirmed.

    Raises :class:`DicomPeerError` when the server is not there, :class:`DicomSendError` (after confirming the
    stored ones) when it refused any instance or the whole request.
    """
    if not paths:
        return []
    datasets = [_read(Path(path)) for path in paths]
    answer = _post(destination, datasets)
    stored, failed = _uids(answer, "ReferencedSOPSequence"), _uids(answer, "FailedSOPSequence")
    listed = "ReferencedSOPSequence" in answer or "FailedSOPSequence" in answer
    results: list[StoreResult] = []
    unconfirmed = 0
    for path, ds in zip(paths, datasets, strict=True):
        uid = str(ds.SOPInstanceUID)
        fields: dict[str, Any] = {"destination": destination.name, "sop_instance_uid": uid_hash(uid)}
        if uid in failed:
            reason = int(failed[uid].get("FailureReason", 0))
            log.warning("dicomweb_store_failed", failure_reason=f"0x{reason:04X}", **fields)
            continue
        if listed and uid not in stored:
            unconfirmed += 1
            continue
        warning = int(stored[uid].get("WarningReason", 0)) if uid in stored else 0
        if warning:
            log.warning("dicomweb_store_warning", warning_reason=f"0x{warning:04X}", **fields)
        result = StoreResult(Path(path), str(ds.SOPClassUID), uid, warning)
        results.append(result)
        if on_stored is not None:
            on_stored(result)
    if failed or unconfirmed:
        reasons = sorted({int(item.get("FailureReason", 0)) for item in failed.values()})
        first = reasons[0] if reasons else None
        detail = ", ".join(f"0x{r:04X}" for r in reasons) or "none given"
        raise DicomSendError(
            f"{destination} stored {len(results)} of {len(paths)} instances "
            f"({len(failed)} failed, {unconfirmed} not confirmed; failure reasons: {detail})",
            status=first,
        )
    return results


def probe(destination: DicomwebDestination) -> None:
    """One QIDO-RS request (PS3.18 10.6): any HTTP answer from the origin server means it is there.

    Raises :class:`DicomPeerError` when nothing answers, or a gateway answers on its behalf.
    """
    url = destination.config.url.rstrip("/") + "/studies"
    with http_session(destination) as session:
        try:
            response = session.get(
                url,
                params={"limit": "1"},
                headers={"Accept": "application/dicom+json"},
                timeout=destination.config.timeout_seconds,
            )
        except requests.RequestException as exc:
            raise DicomPeerError(f"{destination} could not be reached: {type(exc).__name__}") from exc
        response.close()
    if response.status_code in PEER_ABSENT:
        raise DicomPeerError(f"{destination} answered HTTP {response.status_code}: not available")
