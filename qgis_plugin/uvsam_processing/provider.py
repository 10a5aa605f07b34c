"""The uvsam Processing provider: predict, change and train."""

from qgis.core import QgsProcessingProvider, QgsSettings

from .algorithms import ChangeAlgorithm, PredictAlgorithm, TrainAlgorithm
from .runner import SETTING


class UvsamProvider(QgsProcessingProvider):
    def id(self):
        return "uvsam"

    def name(self):
        return "uvsam"

    def longName(self):  # noqa: N802
        return "uvsam - urban villages from satellite imagery"

    def load(self):
        try:  # the executable as a setting of the provider in Processing options (desktop QGIS)
            from processing.core.ProcessingConfig import ProcessingConfig, Setting

            ProcessingConfig.addSetting(Setting(self.name(), "UVSAM_EXECUTABLE", "uvsam executable",
                                                QgsSettings().value(SETTING, "", type=str),
                                                valuetype=Setting.FILE))
            ProcessingConfig.readSettings()
            chosen = ProcessingConfig.getSetting("UVSAM_EXECUTABLE")
            if chosen:
                QgsSettings().setValue(SETTING, chosen)
        except ImportError:  # Processing's Python side absent: the environment variable or PATH serve
            pass
        self.refreshAlgorithms()
        return True

    def loadAlgorithms(self):  # noqa: N802
        for alg in (PredictAlgorithm(), ChangeAlgorithm(), TrainAlgorithm()):
            self.addAlgorithm(alg)
