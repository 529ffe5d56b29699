"""How a model's rows are narrowed to what a user may see: declared by each model
(``access_scope = Scope(...)``), applied in one place, :func:`governance.access.narrow`."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Scope:
    """How a model relates to organisations and cases.

    ``org``: lookup from the model to its organisation (``"model_version__ai_model__organisation"``).
    ``case``: lookup from the model to its audit case (``"run__case"``), for reviewers.
    ``via_cases``: for models *above* the case, the lookup from ``AuditCase`` to this model
    (``"model_version__ai_model"``), so reviewers see the model behind a case they review.
    ``own_user``: lookup to a user that may always see the row (their own membership).
    """

    org: str | None = None
    case: str | None = None
    via_cases: str | None = None
    own_user: str | None = None
