"""The result as an HL7 v2.5.1 ORU^R01 message to a RIS or reading worklist, sent over MLLP with ACK handling.

Commercial triage moves the study up the worklist; images in the PACS alone do not. One message per assessed
series carries the decision (urgent flag, label, probabilities, urgency and threshold with enough digits to tell
them apart), the model, the identifiers as the PACS sent them (patient ID, accession number, Study Instance UID)
and the UID of our Secondary Capture series, so the RIS can link to the key images.

The message is built and escaped with the ``hl7`` library (python-hl7) and framed by its MLLP streams (HL7 v2
Appendix C: ``<VT> message <FS><CR>``). The Message Control ID is derived from the result, so a resend after a
lost ACK is recognisably the same message. Patient names are left out unless ``include_patient_name`` is set;
nothing identifying is ever logged.

ACKs (HL7 v2 2.9.2, table 0008): ``AA``/``CA`` delivered; ``AE``/``AR``/``CE``/``CR`` or an unreadable answer mean
the receiver answered and refused (:class:`~triaged.errors.Hl7SendError`, spends an attempt); no connection, or no
ACK in time, mean it is not there (:class:`~triaged.errors.DestinationDownError`: it is down, the job waits).
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import socket
from dataclasses import dataclass
from datetime import UTC, datetime

import hl7
from hl7.mllp import InvalidBlockError, open_hl7_connection

from triaged.config import Hl7Destination as Hl7Config
from triaged.errors import DestinationDownError, Hl7SendError
from triaged.outputs.summary import TriageSummary, distinct_digits, pretty_label

VERSION = "2.5.1"
ACCEPTED = frozenset({"AA", "CA"})
CODING = "L"  # local coding system for our observation identifiers (HL7 table 0396)
_SEPARATORS = "MSH|^~\\&|"


@dataclass(frozen=True)
class Hl7Destination:
    """A configured ``[notify.NAME]`` receiver: its name (the breaker's key) and its settings."""

    name: str
    config: Hl7Config

    def __str__(self) -> str:
        return f"{self.name} ({self.config.host}:{self.config.port})"


@dataclass(frozen=True)
class Hl7Result:
    """What one ORU^R01 says: the triage summary plus identifiers read from the source header."""

    summary: TriageSummary
    message_control_id: str
    observed_at: datetime
    study_instance_uid: str
    sc_series_instance_uid: str | None
    patient_id: str = ""
    patient_name: str = ""  # DICOM PN (family^given^middle^prefix^suffix); sent only when configured
    accession_number: str = ""


def _esc(value: object) -> str:
    """``value`` with HL7 delimiters and non-ASCII escaped (2.7), using the standard encoding characters."""
    return str(hl7.parse(_SEPARATORS).escape(str(value)))


def _ts(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def _obx(index: int, value_type: str, code: str, text: str, value: str, *, sub_id: str = "", flag: str = "") -> str:
    fields = ["OBX", str(index), value_type, f"{code}^{_esc(text)}^{CODING}", sub_id, value, "", "", flag, "", "", "F"]
    return "|".join(fields)


def _observations(result: Hl7Result) -> list[str]:
    summary = result.summary
    urgency, threshold = summary.urgency or 0.0, summary.threshold or 0.0
    urgency_text, threshold_text = distinct_digits(urgency, threshold)
    flag = "A" if summary.urgent else "N"  # HL7 table 0078: abnormal / normal
    rows: list[tuple[str, str, str, str, str]] = [  # type, code, text, value, sub-id
        ("CE", "URGENT", "AI triage urgent", "Y^Yes^HL70136" if summary.urgent else "N^No^HL70136", ""),
        ("CE", "LABEL", "AI triage finding", f"{_esc(summary.label or '')}^{_esc(pretty_label(summary.label))}^L", ""),
        ("NM", "URGENCY", "AI triage urgency score", urgency_text, ""),
        ("NM", "THRESHOLD", "AI triage urgency threshold", threshold_text, ""),
    ]
    rows += [
        ("NM", "PROB", f"Probability {name}", f"{probability:.4f}", _esc(name))
        for name, probability in sorted(summary.probabilities.items())
    ]
    rows += [
        ("ST", "MODEL", "AI model", _esc(f"{summary.model_name} {summary.model_version}"), ""),
        ("ST", "110180", "Study Instance UID", _esc(result.study_instance_uid), ""),
        ("ST", "112002", "Series Instance UID", _esc(summary.series_instance_uid), "SOURCE"),
    ]
    if result.sc_series_instance_uid:
        rows.append(("ST", "112002", "Series Instance UID", _esc(result.sc_series_instance_uid), "AI_SC"))
    rows.append(("ST", "DISCLAIMER", "Disclaimer", "AI TRIAGE - NOT FOR DIAGNOSTIC USE", ""))
    return [
        _obx(i, kind, code, text, value, sub_id=sub_id, flag=flag if code == "URGENT" else "")
        for i, (kind, code, text, value, sub_id) in enumerate(rows, start=1)
    ]


def build_oru(result: Hl7Result, config: Hl7Config, *, now: datetime | None = None) -> hl7.Message:
    """The ORU^R01 for ``result`` (parsed back by ``hl7``, so what is sent is what a receiver will read)."""
    now = now or datetime.now(UTC)
    msh = "|".join(
        [
            "MSH",
            "^~\\&",
            _esc(config.sending_application),
            _esc(config.sending_facility),
            _esc(config.receiving_application),
            _esc(config.receiving_facility),
            _ts(now),
            "",
            "ORU^R01^ORU_R01",
            _esc(result.message_control_id),
            "P",
            VERSION,
        ]
    )
    name = "^".join(_esc(part) for part in result.patient_name.split("^")) if config.include_patient_name else ""
    patient_id = f"{_esc(result.patient_id)}^^^^PI" if result.patient_id else ""
    pid = f"PID|1||{patient_id}||{name}"
    accession = _esc(result.accession_number)
    priority = "S" if result.summary.urgent else "R"  # stat / routine
    obr = "|".join(
        [
            "OBR",
            "1",
            "",
            accession,
            f"AITRIAGE^{_esc('AI triage, brain MRI')}^{CODING}",
            priority,
            "",
            _ts(result.observed_at),
        ]
        + [""] * 10
        + [accession, "", "", "", _ts(result.observed_at), "", "", "F"]
    )
    return hl7.parse("\r".join([msh, pid, obr, *_observations(result)]))


async def _exchange(message: hl7.Message, destination: Hl7Destination) -> hl7.Message:
    config = destination.config
    reader, writer = await asyncio.wait_for(
        open_hl7_connection(config.host, config.port, encoding="ascii"), config.timeout_seconds
    )
    try:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.writemessage(message)
        await writer.drain()
        return await asyncio.wait_for(reader.readmessage(), config.timeout_seconds)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


def send_message(message: hl7.Message, destination: Hl7Destination) -> str:
    """Send ``message`` and check its ACK; return the acknowledgment code (``AA`` or ``CA``)."""
    try:
        ack = asyncio.run(_exchange(message, destination))
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        message_text = f"{destination} did not acknowledge: {type(exc).__name__}"
        raise DestinationDownError(message_text, destination=destination.name) from exc
    except (InvalidBlockError, ValueError, hl7.HL7Exception) as exc:  # it answered, but nothing we can accept
        raise Hl7SendError(f"{destination} sent an unreadable ACK: {type(exc).__name__}") from exc
    try:
        code, acked_id = str(ack.segment("MSA")(1)), str(ack.segment("MSA")(2))
    except (KeyError, IndexError) as exc:
        raise Hl7SendError(f"{destination} answered without an MSA segment") from exc
    control_id = str(message.segment("MSH")(10))
    if acked_id != control_id:
        raise Hl7SendError(f"{destination} acknowledged message {acked_id!r}, not {control_id!r}")
    if code not in ACCEPTED:
        raise Hl7SendError(f"{destination} answered {code or 'no code'} (not accepted)", code=code)
    return code


def probe(destination: Hl7Destination) -> None:
    """Connect to the MLLP port and check the receiver keeps the connection open for ``timeout_seconds``.

    HL7 v2 has no echo message a receiver must answer without acting on it, so this is the most a probe can ask
    without sending a result: a stopped receiver refuses, one behind a balancer whose backend is gone accepts and
    resets; both are down. A receiver that is open but never ACKs passes, and the next send finds it out.
    """
    config = destination.config
    try:
        with socket.create_connection((config.host, config.port), timeout=config.timeout_seconds) as sock:
            readable, _, _ = select.select([sock], [], [], config.timeout_seconds)
            if readable and not sock.recv(1):
                raise ConnectionResetError("closed by the receiver")
    except OSError as exc:
        message_text = f"{destination} could not be reached: {type(exc).__name__}"
        raise DestinationDownError(message_text, destination=destination.name) from exc
