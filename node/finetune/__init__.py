"""Fine-tuning on local labelled studies with a promotion gate (see pipeline.py).

The scheduler's entry point is :func:`nightly`; it imports torch only when called, so
importing this package stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node.finetune.pipeline import Outcome
    from node.settings import Settings


def nightly(settings: Settings) -> tuple[Outcome, ...]:
    """Run the fine-tuning loop for every MONAI-bundle model that has at least
    ``[finetune] min_new_pairs`` labelled pairs no run has trained on yet; one Outcome per
    model (status "promoted", "kept" or "skipped", with reasons). Idempotent."""
    from node.finetune.pipeline import nightly as run

    return run(settings)
