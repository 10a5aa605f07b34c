"""The plugin: registers the uvsam Processing provider (in QGIS and in qgis_process)."""

from qgis.core import QgsApplication

from .provider import UvsamProvider


class UvsamPlugin:
    def __init__(self, iface=None):
        self.iface = iface
        self.provider = None

    def initProcessing(self):  # noqa: N802 - called by QGIS, also headless (qgis_process)
        self.provider = UvsamProvider()
        QgsApplication.processingRegistry().addProvider(self.provider)

    def initGui(self):  # noqa: N802
        self.initProcessing()

    def unload(self):
        if self.provider is not None:
            QgsApplication.processingRegistry().removeProvider(self.provider)
            self.provider = None
