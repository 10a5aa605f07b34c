"""Label values of village masks, shared by datasets, losses, metrics and evaluation.

Labels are (H, W) uint8: ``BACKGROUND`` 0, ``VILLAGE`` 1, ``IGNORE`` 255 where there is no
label (nodata in the image or the mask); ignored pixels count in no loss and no score.
"""

BACKGROUND = 0
VILLAGE = 1
IGNORE = 255
