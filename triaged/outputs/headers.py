"""Make the attributes our objects copy from a source valid, so one bad value never costs the result.

The SC, KOS and SR copy the Patient and Study modules (and a few image attributes) from the source. Real,
anonymised headers break the rules: a StudyDate of ``***``, an LO of 70 characters, a lower-case CS, a value
stored with the wrong VR by a private converter. highdicom (rightly) refuses to write those. Each such value
is repaired where a reader loses nothing that matters (cut to the VR's maximum length, upper-cased CS,
PN component groups cut to 64 characters) and emptied otherwise (all of them are Type 2 or 3 in our IODs,
so empty is valid). The caller logs the attribute keywords, never the values (no PHI in logs).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydicom import config
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.valuerep import validate_value

#: Root attributes of the Patient, Clinical Trial Subject, General Study, Patient Study and Clinical Trial Study
#: modules (what highdicom copies into every object it builds), plus the image attributes sc.py copies. Not
#: sequences (highdicom copies those whole; they are not ours to mend) and not StudyInstanceUID (validated
#: when the instance was received: without it there is no study to add our objects to).
COPIED_KEYWORDS: tuple[str, ...] = (
    "PatientName", "PatientID", "IssuerOfPatientID", "TypeOfPatientID", "PatientBirthDate", "PatientBirthTime",
    "PatientBirthDateInAlternativeCalendar", "PatientDeathDateInAlternativeCalendar", "PatientAlternativeCalendar",
    "PatientSex", "QualityControlSubject", "StrainDescription", "StrainNomenclature", "StrainAdditionalInformation",
    "OtherPatientNames", "PatientSpeciesDescription", "PatientBreedDescription", "ResponsiblePerson",
    "ResponsiblePersonRole", "ResponsibleOrganization", "PatientComments", "PatientIdentityRemoved",
    "DeidentificationMethod", "ClinicalTrialSponsorName", "ClinicalTrialProtocolID", "ClinicalTrialProtocolName",
    "IssuerOfClinicalTrialProtocolID", "ClinicalTrialSiteID", "ClinicalTrialSiteName", "IssuerOfClinicalTrialSiteID",
    "ClinicalTrialSubjectID", "IssuerOfClinicalTrialSubjectID", "ClinicalTrialSubjectReadingID",
    "IssuerOfClinicalTrialSubjectReadingID", "ClinicalTrialProtocolEthicsCommitteeName",
    "ClinicalTrialProtocolEthicsCommitteeApprovalNumber", "StudyDate", "StudyTime", "AccessionNumber",
    "ReferringPhysicianName", "ConsultingPhysicianName", "StudyDescription", "PhysiciansOfRecord",
    "NameOfPhysiciansReadingStudy", "StudyID", "RequestingService", "AdmittingDiagnosesDescription", "PatientAge",
    "PatientSize", "PatientBodyMassIndex", "MeasuredAPDimension", "MeasuredLateralDimension", "PatientWeight",
    "MedicalAlerts", "Allergies", "Occupation", "SmokingStatus", "AdditionalPatientHistory", "PregnancyStatus",
    "LastMenstrualDate", "PatientSexNeutered", "ReasonForVisit", "AdmissionID", "ServiceEpisodeID",
    "ServiceEpisodeDescription", "PatientState", "ClinicalTrialTimePointID", "ClinicalTrialTimePointDescription",
    "LongitudinalTemporalOffsetFromEvent", "LongitudinalTemporalEventType",
    "BodyPartExamined", "RecognizableVisualFeatures",
)  # fmt: skip

#: Type 3 sequences of those modules: present with no item is invalid (PS3.5 7.5.1: "1-n"), absent is fine.
OPTIONAL_SEQUENCES: tuple[str, ...] = (
    "ReferencedPatientSequence", "IssuerOfPatientIDQualifiersSequence", "OtherPatientIDsSequence",
    "ReferencedPatientPhotoSequence", "EthnicGroupCodeSequence", "IssuerOfAccessionNumberSequence",
    "ReferringPhysicianIdentificationSequence", "ConsultingPhysicianIdentificationSequence", "ProcedureCodeSequence",
    "PhysiciansOfRecordIdentificationSequence", "PhysiciansReadingStudyIdentificationSequence",
    "ReferencedStudySequence", "RequestingServiceCodeSequence", "ReasonForPerformedProcedureCodeSequence",
    "AdmittingDiagnosesCodeSequence", "PatientSizeCodeSequence", "ReasonForVisitCodeSequence",
    "IssuerOfAdmissionIDSequence", "IssuerOfServiceEpisodeIDSequence",
)  # fmt: skip

#: Enumerated values (PS3.3 C.7.1.1, C.7.2.2, C.7.6.1) that highdicom checks: anything else is emptied.
_ENUMERATED: dict[str, frozenset[str]] = {
    "PatientSex": frozenset({"M", "F", "O"}),
    "PatientIdentityRemoved": frozenset({"YES", "NO"}),
    "QualityControlSubject": frozenset({"YES", "NO"}),
    "RecognizableVisualFeatures": frozenset({"YES", "NO"}),
    "PatientSexNeutered": frozenset({"ALTERED", "UNALTERED"}),
}

#: Maximum characters per value (PS3.5 Table 6.2-1) for the VRs a repair may cut.
_MAX_LENGTH = {"AE": 16, "CS": 16, "LO": 64, "SH": 16, "LT": 10240, "ST": 1024, "UC": 2**32 - 2}
_TEXT_VRS = frozenset({"LT", "ST", "UT", "UC"})  # a single value that may contain backslashes
_BINARY_VRS = frozenset({"FD", "FL", "SL", "SS", "SV", "UL", "US", "UV", "AT", "OB", "OW", "OF", "OD", "OL", "OV"})


@dataclass
class HeaderRepairs:
    """What was changed, by attribute keyword only (values are PHI and never leave the dataset)."""

    repaired: set[str] = field(default_factory=set)
    emptied: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.repaired or self.emptied)

    def update(self, other: HeaderRepairs) -> None:
        self.repaired |= other.repaired
        self.emptied |= other.emptied


def _valid(vr: str, values: Iterable[object]) -> bool:
    if vr in _BINARY_VRS:  # decoded numbers: nothing a text rule could reject
        return True
    try:
        for value in values:
            validate_value(vr, str(value), config.RAISE)
    except (ValueError, TypeError):
        return False
    return True


def _values(element: DataElement) -> list[object]:
    value = element.value
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return list(value)
    return [value]


def _allowed(keyword: str, values: Iterable[object]) -> bool:
    allowed = _ENUMERATED.get(keyword)
    return allowed is None or all(str(v) in allowed for v in values)


def _repair(keyword: str, vr: str, values: list[object]) -> list[str] | None:
    """A repaired list of values that is valid for ``vr``, or None when only emptying is safe."""
    texts = [str(v) for v in values]
    if vr in _MAX_LENGTH:
        texts = [text[: _MAX_LENGTH[vr]].rstrip() for text in texts]
    if vr == "CS":
        texts = [text.upper() for text in texts]
    if vr == "PN":  # each component group is at most 64 characters (PS3.5 6.2)
        texts = ["=".join(group[:64] for group in text.split("=")[:3]) for text in texts]
    return texts if _valid(vr, texts) and _allowed(keyword, texts) else None


def _element(tag: int, vr: str, values: list[str]) -> DataElement:
    return DataElement(tag, vr, (values[0] if len(values) == 1 else values) or None)


def _checked(dataset: Dataset, keyword: str, tag: int) -> tuple[DataElement | None, bool]:
    """``(replacement or None, repaired)`` for one copied attribute; ``(None, False)`` when it is fine as it is."""
    vr = dictionary_VR(tag)
    if vr in _BINARY_VRS or vr == "SQ" or " or " in vr:
        return None, False  # decoded numbers, sequences and ambiguous VRs: nothing to re-read safely
    try:
        element = dataset[tag]
    except (ValueError, TypeError, OverflowError):  # as read, the bytes do not even convert to the VR
        return DataElement(tag, vr, None), False
    values = _values(element)
    if vr in _TEXT_VRS:
        values = [element.value] if values else []
    elif element.VR in _TEXT_VRS:  # read as text, but a backslash separates values in what it really is
        values = [part for value in values for part in str(value).split("\\")]
    if (
        vr not in _TEXT_VRS and dictionary_VM(tag) == "1" and len(values) > 1
    ):  # "a\\b" where one value belongs: which one is meant?
        return DataElement(tag, vr, None), False
    if vr == element.VR and _valid(vr, values) and _allowed(keyword, values):
        return None, False
    # Invalid, or stored with another VR (an old or private converter): re-read it as what it is.
    fixed = _repair(keyword, vr, values) if values else []
    return (DataElement(tag, vr, None), False) if fixed is None else (_element(tag, vr, fixed), True)


def clean_copied_attributes(dataset: Dataset) -> tuple[Dataset, HeaderRepairs]:
    """``dataset`` itself when every copied attribute is valid, else a copy with them repaired or emptied."""
    changes: dict[int, DataElement | None] = {}  # None: delete
    repairs = HeaderRepairs()
    for keyword in OPTIONAL_SEQUENCES:
        tag = tag_for_keyword(keyword)
        if tag is not None and tag in dataset and dataset[tag].VR == "SQ" and len(dataset[tag].value) == 0:
            changes[tag] = None
            repairs.emptied.add(keyword)
    for keyword in COPIED_KEYWORDS:
        tag = tag_for_keyword(keyword)
        if tag is None or tag not in dataset:
            continue
        replacement, repaired = _checked(dataset, keyword, tag)
        if replacement is None:
            continue
        changes[tag] = replacement
        (repairs.repaired if repaired else repairs.emptied).add(keyword)
    if not changes:
        return dataset, repairs
    cleaned = copy.deepcopy(dataset)
    for tag, element in changes.items():
        if element is None:
            del cleaned[tag]
        else:
            cleaned[tag] = element
    return cleaned, repairs


#: highdicom warns about single-component person names ("***", "phantom"): valid PN, and the warning text
#: would carry the patient's name to stderr. The composition root installs this filter once.
PERSON_NAME_WARNING = r"The string .* is unlikely to represent the intended person name"


def quiet_person_name_warnings() -> None:
    """Ignore highdicom's person-name warning process-wide (its message contains the name: PHI)."""
    warnings.filterwarnings("ignore", message=PERSON_NAME_WARNING, category=UserWarning)
