"""Running the uvsam command line from QGIS: which executable, progress into the feedback,
cancellation, and the command's one-line errors as Processing errors."""

import json
import os
import re
import shutil
import subprocess
import threading

from qgis.core import QgsProcessingException, QgsSettings

SETTING = "uvsam/executable"  # QgsSettings key, written by the provider's setting in Processing options
PERCENT = re.compile(r"\((\d+)%\)")


def executable() -> str:
    """The uvsam to run: UVSAM_EXECUTABLE, else the Processing setting, else ``uvsam`` on the PATH."""
    exe = os.environ.get("UVSAM_EXECUTABLE") or QgsSettings().value(SETTING, "", type=str) or shutil.which("uvsam")
    if not exe or not (os.path.isfile(exe) and os.access(exe, os.X_OK)):
        raise QgsProcessingException(
            "uvsam was not found: install it (pip install uvsam, in its own environment) and set its executable in "
            "Settings > Options > Processing > Providers > uvsam, or the UVSAM_EXECUTABLE environment variable"
            + (f" (now {exe!r})" if exe else ""))
    return exe


def run(args: list, feedback) -> dict:
    """``uvsam ARGS``; its progress records go to ``feedback`` (percent and text), a click on
    Cancel stops it; returns the JSON summary it prints. A uvsam error is raised with its line."""
    cmd = [executable(), *[str(a) for a in args]]
    feedback.pushCommandInfo(" ".join(cmd))
    env = {**os.environ, "UVSAM_PROGRESS_SECONDS": os.environ.get("UVSAM_PROGRESS_SECONDS", "5")}
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
        errors = []

        def read_stderr():
            for line in proc.stderr:
                line = line.rstrip()
                if not line:
                    continue
                match = PERCENT.search(line)
                if match:
                    feedback.setProgress(float(match.group(1)))
                if line.startswith("uvsam: error"):
                    errors.append(line)
                    feedback.reportError(line)
                elif line.startswith("warning"):
                    feedback.pushWarning(line)
                else:
                    feedback.pushInfo(line)

        reader = threading.Thread(target=read_stderr, daemon=True)
        reader.start()
        while True:
            try:
                proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                if feedback.isCanceled():
                    proc.terminate()  # uvsam keeps its finished work: the same run resumes
                    proc.wait()
                    raise QgsProcessingException("cancelled: run it again to resume where it stopped") from None
        stdout = proc.stdout.read()
        reader.join(timeout=5)
    if proc.returncode != 0:
        raise QgsProcessingException(errors[-1] if errors else f"uvsam exited with {proc.returncode}")
    lines = [line for line in stdout.splitlines() if line.strip()]
    try:
        return json.loads("\n".join(lines[lines.index(next(x for x in lines if x.startswith("{"))):]))
    except (StopIteration, ValueError):
        return {}
