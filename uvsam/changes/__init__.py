"""Multi-year change analysis, a package of its steps in the order data flows:

=================  ===================================================================
:mod:`.sources`    each year's village layer and imagery
:mod:`.track`      lifecycles and persistent ids in one equal-area analysis CRS
:mod:`.summaries`  per district, distance ring, cumulative distance and belt; agreement of years
:mod:`.imagery`    co-registration and colour-only change between years
:mod:`.accuracy`   a stratified sample to label, and error-adjusted areas with confidence intervals
:mod:`.outputs`    the GeoPackage and CSVs
:mod:`.report`     the HTML report for decision makers
:mod:`.run`        ``uvsam change``
=================  ===================================================================
"""

from uvsam.changes.imagery import check_consistency, coregistration
from uvsam.changes.outputs import write_outputs
from uvsam.changes.report import write_report
from uvsam.changes.run import run_change
from uvsam.changes.sources import YearLayer, parse_images, parse_spec, read_layer
from uvsam.changes.summaries import belts_from, by_belt, by_distance, by_district, by_ring, village_area_iou
from uvsam.changes.track import LIFECYCLES, ChangeConfig, ChangeResult, analysis_crs, track

__all__ = ["LIFECYCLES", "ChangeConfig", "ChangeResult", "YearLayer", "analysis_crs", "belts_from", "by_belt",
           "by_distance", "by_district", "by_ring",
           "check_consistency", "coregistration", "parse_images", "parse_spec", "read_layer", "run_change",
           "track", "village_area_iou", "write_outputs", "write_report"]
