"""The Processing algorithms: each builds a uvsam command line from its parameters, runs it
(:mod:`.runner`) and hands back its outputs; the GeoPackage layers come with their stored
default styles, which QGIS applies when it loads them onto the map."""

import os

from qgis.core import (
    QgsProcessing,
    QgsProcessingAlgorithm,
    QgsProcessingContext,
    QgsProcessingException,
    QgsProcessingOutputFile,
    QgsProcessingOutputVectorLayer,
    QgsProcessingParameterBoolean,
    QgsProcessingParameterFile,
    QgsProcessingParameterFileDestination,
    QgsProcessingParameterMultipleLayers,
    QgsProcessingParameterNumber,
    QgsProcessingParameterRasterDestination,
    QgsProcessingParameterString,
    QgsProcessingParameterVectorLayer,
)

from . import runner


def _file_source(layer) -> str:
    """The file behind a QGIS layer, ``path:LAYER`` for one layer of a GeoPackage."""
    source = layer.source()
    path, _, options = source.partition("|")
    name = dict(o.split("=", 1) for o in options.split("|") if "=" in o).get("layername")
    return f"{path}:{name}" if name else path


def _load(context, uri: str, name: str, output: str) -> None:
    """Add ``uri`` to the map when the algorithm finishes (desktop QGIS; nothing headless)."""
    if context.project() is not None:
        context.addLayerToLoadOnCompletion(uri, QgsProcessingContext.LayerDetails(name, context.project(), output))


class _Uvsam(QgsProcessingAlgorithm):
    def group(self):
        return "Urban villages"

    def groupId(self):  # noqa: N802
        return "villages"

    def createInstance(self):  # noqa: N802
        return type(self)()

    def _optional(self, parameters, context, args: list, name: str, flag: str, kind: str = "number"):
        """Add ``flag VALUE`` when the optional parameter ``name`` is set (else uvsam's default)."""
        if parameters.get(name) in (None, ""):
            return
        value = (self.parameterAsDouble(parameters, name, context) if kind == "number" else
                 self.parameterAsInt(parameters, name, context) if kind == "int" else
                 self.parameterAsString(parameters, name, context))
        if value not in (None, ""):
            args += [flag, value]


class PredictAlgorithm(_Uvsam):
    def name(self):
        return "predict"

    def displayName(self):  # noqa: N802
        return "Predict villages"

    def shortHelpString(self):  # noqa: N802
        return ("Village polygons for whole scenes with a model trained by uvsam (`uvsam predict`): the "
                "specialist's mosaic, candidates, and refinement by the generalist when its official weights "
                "are given. Writes a GeoPackage layer (styled), its candidates and tile grid, and a quicklook "
                "PNG; optionally the probabilities as a GeoTIFF. Interrupted runs resume.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterMultipleLayers("SCENES", "Scenes (rasters)", QgsProcessing.TypeRaster))
        self.addParameter(QgsProcessingParameterFile("MODEL", "Model file (uvsam train)",
                                                     fileFilter="uvsam model (*.ckpt *.pt);;All files (*)"))
        self.addParameter(QgsProcessingParameterString("LAYER", "Layer name (one per year)", "villages"))
        self.addParameter(QgsProcessingParameterString("ACQUIRED", "Acquisition date (YYYY-MM-DD)", optional=True))
        self.addParameter(QgsProcessingParameterFile("CHECKPOINT", "Generalist's official weights", optional=True))
        self.addParameter(QgsProcessingParameterBoolean("REFINE", "Refine outlines with the generalist", True))
        self.addParameter(QgsProcessingParameterNumber("THRESHOLD", "Village probability threshold",
                                                       QgsProcessingParameterNumber.Double, optional=True,
                                                       minValue=0.0, maxValue=1.0))
        self.addParameter(QgsProcessingParameterNumber("MIN_VILLAGE_AREA", "Smallest village kept (m2)",
                                                       QgsProcessingParameterNumber.Double, optional=True,
                                                       minValue=0.0))
        self.addParameter(QgsProcessingParameterRasterDestination("PROBABILITIES", "Village probabilities",
                                                                  optional=True, createByDefault=False))
        self.addParameter(QgsProcessingParameterFileDestination("OUTPUT", "Villages GeoPackage",
                                                                "GeoPackage (*.gpkg)"))
        self.addOutput(QgsProcessingOutputVectorLayer("VILLAGES", "Villages"))
        self.addOutput(QgsProcessingOutputFile("QUICKLOOK", "Quicklook PNG"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        scenes = [layer.source() for layer in self.parameterAsLayerList(parameters, "SCENES", context)]
        if not scenes:
            raise QgsProcessingException("no scene given")
        out = self.parameterAsFileOutput(parameters, "OUTPUT", context)
        layer = self.parameterAsString(parameters, "LAYER", context) or "villages"
        args = ["predict", *scenes, "--model", self.parameterAsFile(parameters, "MODEL", context), "--out", out,
                "--layer", layer, "--local"]
        args.append("--refine" if self.parameterAsBool(parameters, "REFINE", context) else "--no-refine")
        self._optional(parameters, context, args, "ACQUIRED", "--acquired", "string")
        self._optional(parameters, context, args, "CHECKPOINT", "--checkpoint", "string")
        self._optional(parameters, context, args, "THRESHOLD", "--threshold")
        self._optional(parameters, context, args, "MIN_VILLAGE_AREA", "--min-village-area")
        probabilities = self.parameterAsOutputLayer(parameters, "PROBABILITIES", context)
        if probabilities:
            args += ["--probabilities", probabilities]
        summary = runner.run(args, feedback)
        villages = f"{out}|layername={layer}"
        _load(context, villages, layer, "VILLAGES")
        return {"OUTPUT": out, "VILLAGES": villages, "QUICKLOOK": summary.get("quicklook"),
                "PROBABILITIES": probabilities or None}


class ChangeAlgorithm(_Uvsam):
    def name(self):
        return "change"

    def displayName(self):  # noqa: N802
        return "Track village change"

    def shortHelpString(self):  # noqa: N802
        return ("Lifecycles of villages through the years (`uvsam change`): new, demolished, stable, expanded, "
                "shrunk, split, merged, with persistent ids. Give the years' village layers in time order and "
                "their labels (e.g. 2018,2020,2022). Writes a styled GeoPackage and, optionally, an HTML report.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterMultipleLayers("YEARS", "Village layers, in time order",
                                                               QgsProcessing.TypeVectorPolygon))
        self.addParameter(QgsProcessingParameterString("LABELS", "Year labels, comma-separated (same order)"))
        self.addParameter(QgsProcessingParameterNumber("MAPPING_UNIT", "Minimum mapping unit (m2)",
                                                       QgsProcessingParameterNumber.Double, optional=True,
                                                       minValue=0.0))
        self.addParameter(QgsProcessingParameterFileDestination("REPORT", "HTML report", "HTML (*.html)",
                                                                optional=True, createByDefault=False))
        self.addParameter(QgsProcessingParameterFileDestination("OUTPUT", "Change GeoPackage", "GeoPackage (*.gpkg)"))
        self.addOutput(QgsProcessingOutputVectorLayer("CHANGES", "Changes"))
        self.addOutput(QgsProcessingOutputVectorLayer("TRACKED", "Tracked villages"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        layers = self.parameterAsLayerList(parameters, "YEARS", context)
        labels = [x.strip() for x in self.parameterAsString(parameters, "LABELS", context).split(",") if x.strip()]
        if len(labels) != len(layers):
            raise QgsProcessingException(f"{len(layers)} layers but {len(labels)} year labels")
        out = self.parameterAsFileOutput(parameters, "OUTPUT", context)
        args = ["change", *[f"{y}={_file_source(layer)}" for y, layer in zip(labels, layers, strict=True)],
                "--out", out]
        self._optional(parameters, context, args, "MAPPING_UNIT", "--mapping-unit")
        report = self.parameterAsFileOutput(parameters, "REPORT", context)
        if report:
            args += ["--report", report]
        runner.run(args, feedback)
        tracked, changes = f"{out}|layername=villages_tracked", f"{out}|layername=changes"
        _load(context, tracked, "villages_tracked", "TRACKED")
        _load(context, changes, "changes", "CHANGES")
        return {"OUTPUT": out, "CHANGES": changes, "TRACKED": tracked, "REPORT": report or None}


class TrainAlgorithm(_Uvsam):
    def name(self):
        return "train"

    def displayName(self):  # noqa: N802
        return "Train a village model"

    def shortHelpString(self):  # noqa: N802
        return ("Train a UV-SAM model (`uvsam train`) on your imagery and a few villages you drew: a polygon "
                "layer of villages (everything else inside the imagery is background), or a folder of masks "
                "named like the images. Give the generalist's official weights for the full UV-SAM path. "
                "Writes the model file with its metrics CSV and training curves beside it.")

    def initAlgorithm(self, config=None):  # noqa: N802
        self.addParameter(QgsProcessingParameterFile("IMAGES", "Folder of training images",
                                                     behavior=QgsProcessingParameterFile.Folder))
        self.addParameter(QgsProcessingParameterVectorLayer("LABELS", "Villages you drew (polygons)",
                                                            [QgsProcessing.TypeVectorPolygon], optional=True))
        self.addParameter(QgsProcessingParameterFile("MASKS", "Or: folder of masks named like the images",
                                                     behavior=QgsProcessingParameterFile.Folder, optional=True))
        self.addParameter(QgsProcessingParameterString("ENCODER", "Generalist (uvsam encoders)", optional=True))
        self.addParameter(QgsProcessingParameterFile("CHECKPOINT", "Generalist's official weights", optional=True))
        self.addParameter(QgsProcessingParameterNumber("EPOCHS", "Epochs", QgsProcessingParameterNumber.Integer,
                                                       optional=True, minValue=1))
        self.addParameter(QgsProcessingParameterFileDestination("OUTPUT", "Model file", "uvsam model (*.ckpt)"))
        self.addOutput(QgsProcessingOutputFile("CURVES", "Training curves PNG"))

    def processAlgorithm(self, parameters, context, feedback):  # noqa: N802
        layer = self.parameterAsVectorLayer(parameters, "LABELS", context)
        masks = self.parameterAsFile(parameters, "MASKS", context)
        if (layer is None) == (not masks):
            raise QgsProcessingException("give either the villages layer or the masks folder")
        labels = _file_source(layer).split(":")[0] if layer is not None else masks
        out = self.parameterAsFileOutput(parameters, "OUTPUT", context)
        args = ["train", "--images", self.parameterAsFile(parameters, "IMAGES", context), "--labels", labels,
                "--out", out]
        self._optional(parameters, context, args, "ENCODER", "--encoder", "string")
        self._optional(parameters, context, args, "CHECKPOINT", "--checkpoint", "string")
        self._optional(parameters, context, args, "EPOCHS", "--epochs", "int")
        runner.run(args, feedback)
        return {"OUTPUT": out, "CURVES": os.path.splitext(out)[0] + ".curves.png"}
