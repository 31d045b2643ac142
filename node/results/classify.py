"""Class probabilities of a classification model as TID 1500 measurement groups.

One generic group (TID 1501) per declared class, in the model's class order: its
Finding (row 3, DCM 121071) is the class's coded concept, a numeric "Probability"
(DCM 122157, unit "1") carries the model's probability, and a qualitative evaluation
"Presence of property" (DCM 121052) says Present for the most probable class and
Absent for the others, so a reader that only looks at coded values still sees the
model's answer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import highdicom as hd
from pydicom.sr.codedict import codes

from node.errors import ResultError
from node.results.seg import coded
from node.results.uids import derive_uid

_PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
_PRESENCE = hd.sr.CodedConcept("121052", "DCM", "Presence of property")
_SUM_TOLERANCE = 1e-3


class ClassLike(Protocol):
    """What results need of ``node.inference.runner.ClassSpec``."""

    @property
    def name(self) -> str: ...

    @property
    def finding(self) -> tuple[str, str, str]: ...


def check_probabilities(classes: Sequence[ClassLike],
                        probabilities: Sequence[float] | None) -> list[float]:
    """One probability in [0, 1] per class, summing to 1 (softmax output)."""
    if probabilities is None:
        raise ResultError(f"class_probabilities: the model declares {len(classes)} class(es) "
                          f"but the prediction has no class probabilities")
    values = [float(p) for p in probabilities]
    if len(values) != len(classes):
        raise ResultError(f"class_probabilities: expected one per declared class "
                          f"({len(classes)}: {[c.name for c in classes]}), got {len(values)}")
    if not all(math.isfinite(p) and 0.0 <= p <= 1.0 for p in values):
        raise ResultError(f"class_probabilities: expected values in [0, 1], got {values}")
    if abs(sum(values) - 1.0) > _SUM_TOLERANCE:
        raise ResultError(f"class_probabilities: expected a distribution summing to 1, got "
                          f"{values} (sum {sum(values):.4f})")
    return values


def classification_groups(classes: Sequence[ClassLike], probabilities: Sequence[float] | None,
                          *, algorithm: hd.sr.AlgorithmIdentification, job_key: str,
                          model: str, version: str,
                          ) -> list[hd.sr.MeasurementsAndQualitativeEvaluations]:
    """TID 1501 groups, one per class (see the module docstring)."""
    if not classes:
        return []
    values = check_probabilities(classes, probabilities)
    best = max(range(len(values)), key=lambda i: values[i])
    groups = []
    for index, (spec, probability) in enumerate(zip(classes, values, strict=True)):
        finding = coded(spec.finding, f"class {index} ({spec.name}) finding")
        presence = codes.DCM.Present if index == best else codes.DCM.Absent
        groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=derive_uid("class-tracking", job_key, model, version, str(index)),
                identifier=spec.name),
            finding_type=finding, algorithm_id=algorithm,
            measurements=[hd.sr.Measurement(name=_PROBABILITY, value=round(probability, 6),
                                            unit=codes.UCUM.NoUnits)],
            qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=_PRESENCE,
                                                                 value=presence)]))
    return groups
