"""Publishing: the one home of everything that turns a run's stage outputs into a dataset version.

    vlpref/publish/version.py   the orchestration: which branches are built, reused or shared, the
                                manifest, the report and the exports written with the version
                                (`publish_version`, called by `flows/build.py: build_dataset`)
    vlpref/publish/rows.py      a branch's rows (pure): splits, the SPA-VL quadruples, the
                                Hugging Face features, statistics (`branch_parts`)
    vlpref/publish/card.py      the dataset card (pure): `dataset_card(manifest)`

The store (`vlpref.store`) writes what these hand it, immutably; the report is
`vlpref.report_html`, the exporters `vlpref.export`.
"""

from vlpref.publish.card import dataset_card
from vlpref.publish.rows import QUADRUPLES, assign_splits, branch_parts, build_quadruples
from vlpref.publish.version import publish_version

__all__ = [
    "QUADRUPLES",
    "assign_splits",
    "branch_parts",
    "build_quadruples",
    "dataset_card",
    "publish_version",
]
