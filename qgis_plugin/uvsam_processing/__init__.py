"""uvsam for QGIS: a Processing provider whose algorithms call a uvsam installation."""


def classFactory(iface):  # noqa: N802 - QGIS's plugin entry point
    from .plugin import UvsamPlugin

    return UvsamPlugin(iface)
