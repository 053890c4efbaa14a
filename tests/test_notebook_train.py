"""notebooks/train-classifier.ipynb runs top to bottom under nbclient against a real `pilot up`.

The notebook trains a small classifier on scikit-learn's bundled digits images with
``%%distribute --ddp 2`` (real torch.distributed, gloo, one rank on each of `pilot up`'s two
workers), checks the ranks' weights are identical and the held-out accuracy is at least 95%,
then classifies the held-out images with ``%%distribute --over`` and ``pilot.cached``, and
checks the labels equal one process's. Those checks are the notebook's own asserts (a failed
one fails ``execute``); this test checks what the kernel sent on top: the labelled rank lines,
the live metrics table and plot, the checkpoints announced, and the summaries.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests_support import outputs_of, run_notebook_on_pilot_up

pytest.importorskip("torch")
pytest.importorskip("sklearn")

NOTEBOOK = Path(__file__).parent.parent / "notebooks" / "train-classifier.ipynb"
CELL_TIMEOUT_S = 300  # the training cell on a loaded 2-core machine: two ranks import torch

pytestmark = [pytest.mark.system, pytest.mark.slow, pytest.mark.timeout(900)]


def text_of(outputs: list[dict]) -> str:
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


def test_train_classifier_notebook_trains_with_ddp_and_classifies_with_a_cached_model(
    tmp_path: Path,
) -> None:
    nb = run_notebook_on_pilot_up(NOTEBOOK, tmp_path, CELL_TIMEOUT_S)

    train = outputs_of(nb, "%%distribute --ddp 2")
    text = text_of(train)
    assert "[rank 0] 20 epochs on 2 ranks: held-out accuracy" in text, text
    assert "2 ranks on" in text and "40 reports" in text, text
    shown = [o.data for o in train if o.output_type in ("display_data", "update_display_data")]
    tables = [d for d in shown if "<table" in d.get("text/html", "")]
    assert tables and "<svg" in tables[-1]["text/html"], "the live table with its loss plot"
    status, header = tables[-1]["text/plain"].splitlines()[:2]
    assert "checkpoints 4" in status, status  # every 5th of 20 epochs, rank 0 alone
    assert header.split() == ["rank", "step", "loss", "accuracy", "reports"]

    assert "held-out accuracy: " in text_of(outputs_of(nb, "weights, other = trained"))
    summary = text_of(outputs_of(nb, "local = load_model(weights)"))
    assert "359 images classified by" in summary and "(one model each)" in summary, summary
