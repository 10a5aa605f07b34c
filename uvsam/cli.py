"""The ``uvsam`` command line.

Every user error becomes one line on stderr naming the file and the problem, and exit code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from tqdm import tqdm

from tiles.errors import TilesError
from uvsam.config import FORMATS, ChangeConfig, PredictConfig, TrainConfig, default
from uvsam.errors import InputError, UvsamError
from uvsam.progress import SETTINGS

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Urban-village mapping with UV-SAM.")
weights_app = typer.Typer(no_args_is_help=True, help="List, download, import and verify generalist weights.")
app.add_typer(weights_app, name="weights")

_STATE: dict = {"debug": False, "resume": None}


def TD(name: str):  # noqa: N802 - the defaults of the options: TrainConfig's, PredictConfig's, ChangeConfig's
    return default(TrainConfig, name)


def PD(name: str):  # noqa: N802
    return default(PredictConfig, name)


def CD(name: str):  # noqa: N802
    return default(ChangeConfig, name)


class Interrupted(BaseException):
    """Ctrl-C (SIGINT, exit 130) or SIGTERM (a scheduler's kill, ``timeout``; exit 143).

    Raised by uvsam's own handlers rather than as KeyboardInterrupt, which typer turns into a
    return value that a caller could mistake for success."""

    def __init__(self, name: str, code: int):
        super().__init__(name)
        self.name, self.code = name, code


def _on_signal(signum, frame):
    import os
    import signal
    import threading

    if _importing(frame):  # raised inside a C extension's initialisation, it breaks the interpreter's
        # exit (seen: "ImportError: initialization failed", then a fatal error, exit -6): the same
        # signal comes again shortly, once the module has loaded
        threading.Timer(0.05, os.kill, (os.getpid(), signum)).start()
        return
    raise Interrupted("SIGTERM", 143) if signum == signal.SIGTERM else Interrupted("Ctrl-C", 130)


def _importing(frame) -> bool:
    """Whether the main thread is inside an ``import`` (importlib's frames on its stack)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib"):
            return True
        frame = frame.f_back
    return False


def _interrupted(name: str, code: int) -> int:
    hint = _STATE.get("resume")
    if callable(hint):  # what was kept, as it stands at the interruption
        hint = hint()
    sys.stderr.write(f"uvsam: interrupted ({name}); " + (hint or "nothing was written") + "\n")
    return code


def _work_kept(out: Path, layer: str, what: str):
    """The interruption line of a journaled run writing ``layer`` of ``out``: what its work folder
    holds, looked at when the signal comes."""
    from uvsam.files import work_folder

    folder = work_folder(out, layer)
    before = out.stat().st_mtime_ns if out.exists() else None

    def hint() -> str:
        unchanged = (f"{out} was not changed" if out.exists() and out.stat().st_mtime_ns == before
                     else "nothing was written" if not out.exists() else f"{out} was written")
        journal = folder / "journal"
        if journal.is_dir() and any(f.name.startswith(("tiles-", "window-", "tile-")) for d in journal.iterdir()
                                    if d.is_dir() for f in d.iterdir()):
            return f"{what} are kept in {folder}: run the same command again to resume; {unchanged}"
        return f"nothing had finished yet; {unchanged}"
    return hint


def _epochs_kept(out: Path, folds: bool):
    """The interruption line of ``uvsam train``: whether an epoch of this run reached ``out``."""
    before = out.stat().st_mtime_ns if out.exists() else None

    def hint() -> str:
        if folds:
            return f"finished fold models are kept beside {out}: run the same command with --resume to continue"
        if out.exists() and out.stat().st_mtime_ns != before:
            return f"every finished epoch is kept in {out}: run the same command with --resume to continue"
        return (f"no epoch had finished; {out} was not changed" if out.exists()
                else "no epoch had finished; nothing was written")
    return hint


def _version(value: bool) -> None:
    if value:
        from uvsam import __version__

        typer.echo(f"uvsam {__version__}")
        raise typer.Exit()


@app.callback()
def _root(debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks on errors.")] = False,
          quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress and no notes; warnings, errors "
                                              "and results only.")] = False,
          version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True,
                                                help="Print the version and exit.")] = False,
          allow_outside_sources: Annotated[bool, typer.Option(
              "--allow-outside-sources", help="Let a VRT read local files outside its own folder (by default only "
              "files in or under it).")] = False,
          allow_remote_sources: Annotated[bool, typer.Option(
              "--allow-remote-sources", help="Let a VRT read URLs and cloud paths as well (implies "
              "--allow-outside-sources).")] = False):
    """Find urban villages in satellite imagery, year after year. --debug, --quiet, --version and
    --allow-outside-sources / --allow-remote-sources may be given anywhere on the command line."""
    _STATE["debug"] = debug
    SETTINGS.quiet = quiet


def log(message: str) -> None:
    """A note or warning for the user on stderr (above any progress bar); --quiet keeps only warnings."""
    if SETTINGS.quiet and not message.startswith(("warning", "error")):
        return
    tqdm.write(message, file=sys.stderr)


DEVICE_HELP = "auto (a CUDA GPU, else Apple's MPS, else the CPU), cpu, cuda, cuda:N or mps."
PRECISION_HELP = "auto (fp32; TF32 products on a CUDA GPU), fp32, or bf16 / fp16 autocast."

# Examples shown at the end of every command's --help.
EXAMPLES = {
    "distill": ["uvsam distill --teacher sam_vit_h --student mobile_sam --images city/tiles --out mobile_sam_city.pt",
                "uvsam distill --teacher sam_vit_b --teacher-checkpoint sam_vit_b_01ec64.pth --student "
                "efficientvit_sam_l0 --images a.tif --images b.tif --out l0.pt --epochs 4",
                "uvsam distill --teacher sam_vit_h --student edgesam --student-checkpoint edgesam_stage1.pt "
                "--recipe prompt-in-loop --images city/tiles --out edgesam_city.pt"],
    "bench-prompts": ["uvsam bench-prompts --encoder mobile_sam --checkpoint mobile_sam.pt --images rio/image "
                      "--objects buildings.geojson --out mobile_sam_prompts.json"],
    "everything": ["uvsam everything city.tif --encoder sam_vit_b --checkpoint sam_vit_b_01ec64.pth --out objects.gpkg",
                   "uvsam everything 'tiles/*.tif' --encoder mobile_sam --checkpoint mobile_sam.pt --out objects.gpkg "
                   "--hierarchical --gsd 0.5 --workers 4"],
    "oneshot": ["uvsam oneshot city_2020.tif --reference marked.tif --reference-mask one_village.gpkg --encoder "
                "sam_vit_h --checkpoint sam_vit_h_4b8939.pth --out found.gpkg",
                "uvsam oneshot 'tiles/*.tif' --reference marked.tif --reference-mask one_village.gpkg --encoder "
                "mobile_sam --checkpoint mobile_sam.pt --method persam-f --min-similarity 0.75 --out found.gpkg"],
    "select": ["uvsam select objects.gpkg --point 12958213,4852311 --point 12958420,4852300,0 --out picked.gpkg",
               "uvsam select objects.gpkg:objects --text 'dense low-rise settlement' --image city.tif --clip-model "
               "ViT-B-32 --clip-weights open_clip_vit_b_32.bin --top 20 --out settlements.gpkg"],
    "segment": ["uvsam segment scene.tif --encoder sam_vit_b --checkpoint sam_vit_b_01ec64.pth --box 200,150,600,550 "
                "--out mask.tif"],
    "train": ["uvsam train --images labels/images --labels labels/villages.gpkg --out villages.ckpt "
              "--checkpoint ~/.cache/uvsam/weights/efficientvit_sam_l0.pt",
              "uvsam train --images tiles/images --labels tiles/masks --out villages.ckpt --folds 3"],
    "ablate": ["uvsam ablate --images train/images --labels train/masks --val-images val/images --val-labels "
               "val/masks --out ablations/ --checkpoint ~/.cache/uvsam/weights/efficientvit_sam_l0.pt"],
    "train-gate": ["uvsam train-gate --images tiles/images --labels tiles/masks --model villages.ckpt --out gate.pt "
                   "--val-images test/images --val-labels test/masks",
                   "uvsam train-gate --images tiles/images --labels tiles/masks --model villages.ckpt --out gate.pt "
                   "--backbone resnet18 --epochs 5"],
    "evaluate": ["uvsam evaluate --model villages.ckpt --images test/images --labels test/masks --overlays overlays/",
                 "uvsam evaluate --model villages.ckpt --cv"],
    "predict": ["uvsam predict city_2020.tif --model villages.ckpt --out villages.gpkg --layer y2020 "
                "--acquired 2020-06-01",
                "uvsam predict 'tiles/*.tif' --model villages.ckpt --out villages.gpkg --probabilities prob.tif",
                "uvsam predict city.tif --model villages.ckpt --out villages.geojson --dry-run",
                "uvsam predict city.tif --model villages.ckpt --gate gate.pt --out villages.gpkg",
                "uvsam predict s3://imagery/city_2020.tif --model villages.ckpt --out villages.gpkg",
                "uvsam predict --stac https://example.org/stac/catalog.json --datetime 2019/2021 --bbox "
                "116.2,39.7,116.6,40.1 --model villages.ckpt --out villages.gpkg",
                "uvsam predict --tiles 'https://tiles.example.org/{z}/{x}/{y}.jpg' --bbox 116.2,39.7,116.6,40.1 "
                "--model villages.ckpt --out villages.gpkg"],
    "change": ["uvsam change 2018=villages.gpkg:y2018 2020=villages.gpkg:y2020 --out change.gpkg --report "
               "report.html --image 2018=city_2018.tif --image 2020=city_2020.tif",
               "uvsam change 2018=villages.gpkg:y2018 2020=villages.gpkg:y2020 --out change.gpkg --report "
               "report.html --centre 116.397,39.909 --ring-km 2 --belts ring_roads.gpkg --belt-field name",
               "uvsam change 2018=villages.gpkg:y2018 2020=villages.gpkg:y2020 --out change.gpkg --report "
               "report.html --image 2018=city_2018.tif --image 2020=city_2020.tif --propagate --encoder sam_vit_b "
               "--checkpoint sam_vit_b_01ec64.pth"],
    "sample": ["uvsam sample villages.gpkg:y2020 --out sample_2020.gpkg --n 300 --min-per-stratum 50",
               "uvsam sample villages.gpkg:y2018 --later villages.gpkg:y2020 --out change_sample.gpkg"],
    "accuracy": ["uvsam accuracy sample_2020.gpkg --csv accuracy_2020.csv"],
    "demo": ["uvsam demo --out demo"],
    "run": ["uvsam run workflows/single_city.yaml", "uvsam run city.yaml --dry-run"],
    "import-xyz": ["uvsam import-xyz tiles/image --zoom 17 --masks tiles/mask --out georeferenced/"],
    "plan-tiles": ["uvsam plan-tiles scene.tif --tile-size 512 --overlap 64 --gsd 2.0 --out plan.json"],
    "encoders": ["uvsam encoders --only mobile_sam --only efficientvit_sam_l0", "uvsam encoders --json --no-measure"],
    "weights list": ["uvsam weights list --check"],
    "weights fetch": ["uvsam weights fetch sam_vit_b",
                      "uvsam weights fetch efficientvit_sam_l0 --sha256 DIGEST  # its authors publish none"],
    "weights import": ["uvsam weights import mobile_sam ~/Downloads/mobile_sam.pt --sha256 DIGEST"],
    "weights verify": ["uvsam weights verify"],
}


def examples(command: str) -> str:
    """The epilog of ``command``'s help: its examples, one per paragraph (typer joins single lines)."""
    return "Examples:\n\n" + "\n\n".join(f"  $ {e}" for e in EXAMPLES[command])


# Where a command's flag is not the config field's name (``--`` + the field with dashes).
FLAGS = {
    "train": {"steps_per_epoch": "--steps", "scale": "--scale-aug", "gsd_m": "--gsd", "lcn_sigma_m": "--lcn-sigma",
              "min_area_m2": "--min-prompt-area", "warmup_steps": "--warmup", "bands": "--band"},
    "predict": {"min_area_m2": "--min-village-area", "simplify_m": "--simplify"},
    "evaluate": {},
    "train-gate": {"steps_per_epoch": "--steps"},
    "ablate": {"steps_per_epoch": "--steps"},
    "change": {"crs": "--analysis-crs", "output_crs": "--crs", "min_area_m2": "--mapping-unit"},
    "distill": {"warmup_steps": "--warmup"},
}


def flag_for(command: str | None, field: str) -> str:
    """The flag of ``command`` that sets config field ``field``."""
    return FLAGS.get(command or "", {}).get(field, "--" + field.replace("_", "-"))


def _command(args: list[str]) -> str | None:
    return next((a for a in args if not a.startswith("-")), None)


def _parse_ints(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{what} {text!r} is not a comma-separated list of whole numbers") from None


def _parse_floats(text: str, n: tuple[int, ...], what: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{what} {text!r} is not a comma-separated list of numbers") from None
    if len(vals) not in n:
        raise InputError(f"{what} {text!r} needs {' or '.join(map(str, n))} numbers")
    return vals


@app.command("distill", epilog=examples("distill"))
def distill_cmd(
    teacher: Annotated[str, typer.Option(help="Teacher encoder (see `uvsam encoders`).")],
    student: Annotated[str, typer.Option(help="Student encoder to train.")],
    images: Annotated[list[str], typer.Option(help="Rasters to distil on: a file, a folder or a glob; "
                                                   "repeatable.")],
    out: Annotated[Path, typer.Option(help="Student weights to write (its family's official layout); "
                                           "OUT.json, OUT.losses.csv beside.")],
    teacher_checkpoint: Annotated[Path | None, typer.Option(
        help="Teacher weights (default: the verified official file in the weights cache).")] = None,
    student_checkpoint: Annotated[Path | None, typer.Option(help="Start the student from these weights.")] = None,
    recipe: Annotated[str, typer.Option(help="embedding: the teacher's image embedding (MobileSAM, EfficientViT-SAM "
                                             "stage 1); full-stage: embedding, decoder tokens and masks with hard "
                                             "prompts (TinySAM); layerwise: layer by layer, plain ViTs only "
                                             "(SAM-Lightening); prompt-in-loop: decoder masks with corrective "
                                             "clicks (EdgeSAM).")] = "embedding",
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 8,
    steps_per_epoch: Annotated[int, typer.Option(help="Optimiser steps per epoch.")] = 50,
    batch_size: Annotated[int, typer.Option(help="Views per step.")] = 2,
    lr: Annotated[float, typer.Option(help="AdamW peak learning rate (cosine decay).")] = 1e-3,
    warmup: Annotated[int, typer.Option(help="Linear warm-up steps.")] = 20,
    crop: Annotated[int, typer.Option(help="Training window (px at the rasters' resolution).")] = 1024,
    views: Annotated[int, typer.Option(help="Flips and quarter turns of each window (1-8).")] = 8,
    prompts: Annotated[int, typer.Option(help="Prompts per view and step, from the teacher's masks (all recipes "
                                              "but embedding).")] = 8,
    refine_iters: Annotated[int, typer.Option(help="Decoder passes per prompt, each later one adding a click in "
                                                   "the error region (1-5).")] = 2,
    token_weight: Annotated[float, typer.Option(help="full-stage: weight of the decoder-token loss.")] = 1.0,
    output_weight: Annotated[float, typer.Option(help="full-stage: weight of the mask outputs; layerwise: lambda "
                                                      "of L_output.")] = 1.0,
    layer_step: Annotated[int, typer.Option(help="layerwise: steps between switching on one layer and the next "
                                                 "(0: all on by half of the steps).")] = 0,
    focus_layers: Annotated[str, typer.Option(help="layerwise: student layers weighing --focus-weight, comma "
                                                   "separated (-1: the last).")] = "-1",
    focus_weight: Annotated[float, typer.Option(help="layerwise: weight of the focus layers.")] = 2.0,
    cache: Annotated[Path | None, typer.Option(help="Teacher embedding cache (default: OUT.cache/).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    resume: Annotated[bool, typer.Option(help="Continue the distillation that wrote OUT.")] = False,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "auto",
):
    """Distil a fast generalist encoder from a large one on your imagery (saved like a published file)."""
    from uvsam.distill import DistillConfig, distill

    cfg = DistillConfig(teacher=teacher, student=student, images=tuple(images), out=str(out),
                        teacher_checkpoint=str(teacher_checkpoint) if teacher_checkpoint else None,
                        student_checkpoint=str(student_checkpoint) if student_checkpoint else None, recipe=recipe,
                        crop=crop, views=views, epochs=epochs, steps_per_epoch=steps_per_epoch,
                        batch_size=batch_size, lr=lr, warmup_steps=warmup, prompts=prompts, refine_iters=refine_iters,
                        token_weight=token_weight, output_weight=output_weight, layer_step=layer_step,
                        focus_layers=_parse_ints(focus_layers, "--focus-layers"),
                        focus_weight=focus_weight, cache=str(cache) if cache else None, seed=seed, device=device,
                        precision=precision)
    record = distill(cfg, resume=resume, log=log)
    if os.environ.get("RANK", "0") != "0":  # torchrun's other processes: the first one reports
        return
    typer.echo(json.dumps({k: record[k] for k in ("student", "teacher", "teacher_sha256", "recipe", "epochs_done",
                                                  "history", "student_sha256")} | {"out": str(out)}))


@app.command("bench-prompts", epilog=examples("bench-prompts"))
def bench_prompts_cmd(
    encoder: Annotated[str, typer.Option(help="Generalist variant (see `uvsam encoders`).")],
    checkpoint: Annotated[Path, typer.Option(help="Its weights, in the official layout.")],
    images: Annotated[str, typer.Option(help="Georeferenced rasters: a file, a folder or a glob.")],
    objects: Annotated[str, typer.Option(
        help="FILE[:LAYER] of object polygons (building footprints, villages) in any CRS.")],
    out: Annotated[Path, typer.Option(help="JSON to write (summary and every object); a Markdown table beside.")],
    objects_crs: Annotated[str | None, typer.Option(help="CRS of an objects file that names none.")] = None,
    clicks: Annotated[str, typer.Option(help="Click counts to score, comma-separated.")] = "1,3,5",
    max_objects: Annotated[int | None, typer.Option(help="Score at most this many objects.")] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "auto",
):
    """The seeds' evaluation of a generalist: box and 1/3/5-click mIoU per object size (EfficientViT-SAM's protocol)."""
    from uvsam.files import atomic_path, check_writable
    from uvsam.prompt_bench import bench_prompts, table

    values = _parse_floats(clicks, tuple(range(1, 11)), "--clicks")
    if any(v != int(v) or v < 1 for v in values):
        raise InputError(f"--clicks {clicks!r}: give whole numbers of clicks, 1 or more (e.g. 1,3,5)")
    counts = tuple(sorted({int(v) for v in values}))
    out = check_writable(out)
    result = bench_prompts(encoder, checkpoint, images, objects, objects_crs, counts, max_objects, device, precision,
                           log)
    md = out.with_suffix(".md")
    with atomic_path(out) as tmp:
        tmp.write_text(json.dumps(result, indent=1))
    with atomic_path(md) as tmp:
        tmp.write_text(table(result))
    typer.echo(json.dumps({k: v for k, v in result.items() if k != "per_object"} | {"out": str(out), "table": str(md)}))


def _parse_points(specs: list[str], one: str, zero: str) -> list[tuple[float, float, int]]:
    """``--point X,Y[,LABEL]`` values -> (x, y, label), LABEL 1 (``one``, the default) or 0 (``zero``)."""
    points = []
    for p in specs:
        v = _parse_floats(p, (2, 3), "--point")
        label = int(v[2]) if len(v) == 3 else 1
        if label not in (0, 1):
            raise InputError(f"--point {p!r}: label must be 1 ({one}) or 0 ({zero})")
        points.append((v[0], v[1], label))
    return points


@app.command(epilog=examples("segment"))
def segment(
    image: Annotated[str, typer.Argument(help="Raster to segment (GeoTIFF or any GDAL format; a file or URL).")],
    encoder: Annotated[str, typer.Option(help="Generalist variant (see `uvsam encoders`).")],
    checkpoint: Annotated[Path, typer.Option(help="Its weights, in the official layout.")],
    out: Annotated[Path, typer.Option(help="Mask GeoTIFF to write (CRS and transform of IMAGE).")],
    box: Annotated[list[str], typer.Option(help="X0,Y0,X1,Y1 in pixels; repeatable.")] = [],  # noqa: B006
    point: Annotated[list[str], typer.Option(help="X,Y[,LABEL] in pixels, LABEL 1 (default) or 0.")] = [],  # noqa: B006
    multimask: Annotated[bool, typer.Option(help="Pick the best of three masks per prompt.")] = False,
    int8: Annotated[bool, typer.Option(help="Static int8 encoder on the CPU, calibrated on IMAGE and used only if "
                                            "it measures faster with masks agreeing at IoU >= 0.95.")] = False,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "auto",
):
    """Prompted segmentation of one image with a generalist."""
    from uvsam.segment import segment_image

    boxes = [_parse_floats(b, (4,), "--box") for b in box]
    points = _parse_points(point, "foreground", "background")
    result = segment_image(image, encoder, checkpoint, out, boxes, points, multimask, device, precision, int8)
    typer.echo(json.dumps(result))


@app.command("everything", epilog=examples("everything"))
def everything_cmd(
    scenes: Annotated[list[str], typer.Argument(help="Rasters: files, VRTs, folders, globs or URLs.")],
    encoder: Annotated[str, typer.Option(help="Generalist variant (see `uvsam encoders`).")],
    checkpoint: Annotated[Path, typer.Option(help="Its weights, in the official layout.")],
    out: Annotated[Path, typer.Option(help="GeoPackage to write the objects layer into (other layers kept).")],
    layer: Annotated[str, typer.Option(help="Layer name.")] = "objects",
    points_per_side: Annotated[int, typer.Option(help="Point prompts per tile side (the scene's lattice).")] = 32,
    pred_iou_thresh: Annotated[float, typer.Option(help="Keep masks whose predicted IoU exceeds this.")] = 0.88,
    stability_thresh: Annotated[float, typer.Option(help="Keep masks whose stability score reaches this.")] = 0.95,
    nms: Annotated[float, typer.Option(help="Box IoU above which the weaker of two objects is dropped.")] = 0.7,
    min_region: Annotated[int, typer.Option(help="Islands and holes under this many px are removed (0: off).")] = 0,
    hierarchical: Annotated[bool, typer.Option(help="TinySAM's hierarchical mode: sparse points first, dense ones "
                                                    "only where no mask was confident.")] = False,
    tile: Annotated[int, typer.Option(help="Window side in px (at --gsd).")] = 1024,
    overlap: Annotated[int, typer.Option(help="Px shared by neighbouring windows.")] = 256,
    gsd: Annotated[float | None, typer.Option(help="Resample to this GSD in metres first (default: native).")] = None,
    crs: Annotated[str | None, typer.Option(help="CRS of the layer (default: the first scene's).")] = None,
    scheduler: Annotated[str | None, typer.Option(help="tcp://HOST:PORT of a Dask scheduler.")] = None,
    workers: Annotated[int | None, typer.Option(help="Local Dask workers.")] = None,
    local: Annotated[bool | None, typer.Option(
        "--local/--dask", help="In this process, or on Dask (default: Dask with --scheduler/--workers or 8+ cores).")
    ] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "auto",
):
    """Every object a generalist finds in the scenes (SAM's automatic mask generator, city-scale)."""
    from uvsam.everything import EverythingConfig
    from uvsam.objects import ObjectsConfig, generalist_ref, run_everything
    from uvsam.prediction.execution import runs_in_process

    if workers is not None and workers < 1:
        raise InputError(f"--workers must be at least 1, not {workers}")
    cfg = ObjectsConfig(EverythingConfig(points_per_side, 64, pred_iou_thresh, stability_thresh, 1.0, nms, min_region,
                                         hierarchical), tile, overlap, gsd)
    _STATE["resume"] = _work_kept(out, layer, "finished windows")
    ref = generalist_ref(_known_encoder(encoder), checkpoint, device, precision)
    if runs_in_process(local, scheduler, workers):
        result = run_everything(scenes, ref, out, cfg, layer, crs=crs)
    else:
        from uvsam.prediction.distributed import dask_runner, make_client

        with make_client(scheduler, workers) as client:
            result = run_everything(scenes, ref, out, cfg, layer, dask_runner(client), crs=crs)
    typer.echo(json.dumps(result))


@app.command("oneshot", epilog=examples("oneshot"))
def oneshot_cmd(
    scenes: Annotated[list[str], typer.Argument(help="Rasters to search: files, VRTs, folders, globs or URLs.")],
    reference: Annotated[Path, typer.Option(help="The image the example object is marked on.")],
    reference_mask: Annotated[str, typer.Option(help="The object: a polygon layer FILE[:LAYER] (any CRS) or a "
                                                     "mask raster on the reference's grid.")],
    encoder: Annotated[str, typer.Option(help="Generalist variant (see `uvsam encoders`; SAM's decoder).")],
    checkpoint: Annotated[Path, typer.Option(help="Its weights, in the official layout.")],
    out: Annotated[Path, typer.Option(help="GeoPackage to write the found objects into (other layers kept).")],
    layer: Annotated[str, typer.Option(help="Layer name.")] = "oneshot",
    method: Annotated[str, typer.Option(help="persam (training-free) or persam-f (two scale weights fitted on "
                                             "the reference, seconds).")] = "persam",
    min_similarity: Annotated[float, typer.Option(help="Local maxima of the confidence map above this cosine "
                                                       "similarity become objects.")] = 0.8,
    max_points: Annotated[int, typer.Option(help="Objects tried per window at most.")] = 16,
    train_steps: Annotated[int, typer.Option(help="With persam-f: fitting steps of its two weights.")] = 1000,
    tile: Annotated[int, typer.Option(help="Window side in px.")] = 1024,
    overlap: Annotated[int, typer.Option(help="Px shared by neighbouring windows.")] = 256,
    gsd: Annotated[float | None, typer.Option(help="Resample scenes to this GSD in metres (default: native).")] = None,
    crs: Annotated[str | None, typer.Option(help="CRS of the layer (default: the first scene's).")] = None,
    local: Annotated[bool | None, typer.Option(
        "--local/--dask", help="In this process, or on Dask (default: Dask with --scheduler/--workers or 8+ cores).")
    ] = None,
    scheduler: Annotated[str | None, typer.Option(help="tcp://HOST:PORT of a Dask scheduler.")] = None,
    workers: Annotated[int | None, typer.Option(help="Local Dask workers.")] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "auto",
):
    """Find objects like one marked example (PerSAM / PerSAM-F one-shot personalisation)."""
    from uvsam.objects import ObjectsConfig, generalist_ref
    from uvsam.oneshot import OneShotConfig, run_oneshot
    from uvsam.prediction.execution import runs_in_process

    if workers is not None and workers < 1:
        raise InputError(f"--workers must be at least 1, not {workers}")
    cfg = OneShotConfig(method, train_steps, min_similarity=min_similarity, max_points=max_points)
    objects_cfg = ObjectsConfig(tile=tile, overlap=overlap, gsd_m=gsd)
    _STATE["resume"] = _work_kept(out, layer, "finished windows")
    ref = generalist_ref(_known_encoder(encoder), checkpoint, device, precision)
    if runs_in_process(local, scheduler, workers):
        result = run_oneshot(scenes, reference, reference_mask, ref, out, objects_cfg, cfg, layer, crs=crs)
    else:
        from uvsam.prediction.distributed import dask_runner, make_client

        with make_client(scheduler, workers) as client:
            result = run_oneshot(scenes, reference, reference_mask, ref, out, objects_cfg, cfg, layer,
                                 dask_runner(client), crs=crs)
    typer.echo(json.dumps(result))


@app.command("select", epilog=examples("select"))
def select_cmd(
    objects: Annotated[str, typer.Argument(help="Objects layer FILE[:LAYER] (from `uvsam everything`).")],
    out: Annotated[Path, typer.Option(help="GeoPackage to write the selection into (other layers kept).")],
    layer: Annotated[str, typer.Option(help="Layer name of the selection.")] = "selected",
    point: Annotated[list[str], typer.Option(help="X,Y[,LABEL]: objects containing it (LABEL 1, default), or "
                                                  "cut out where LABEL is 0; repeatable.")] = [],  # noqa: B006
    box: Annotated[list[str], typer.Option(help="X0,Y0,X1,Y1: the object of highest IoU with it; "
                                                "repeatable.")] = [],  # noqa: B006
    text: Annotated[str | None, typer.Option(help="A phrase: the objects whose image crops CLIP finds most "
                                                  "similar to it.")] = None,
    image: Annotated[str | None, typer.Option(help="With --text: the raster the objects were found in.")] = None,
    clip_model: Annotated[str, typer.Option(help="With --text: open_clip model name.")] = "ViT-B-32",
    clip_weights: Annotated[str | None, typer.Option(help="With --text: its weights file.")] = None,
    top: Annotated[int, typer.Option(help="With --text: how many objects to keep.")] = 1,
    prompt_crs: Annotated[str | None, typer.Option(help="CRS of --point/--box coordinates (default: the "
                                                        "layer's).")] = None,
):
    """Objects chosen by points, boxes or a phrase (FastSAM's selection over everything mode)."""
    from uvsam.selection import ClipModel, run_select

    points = _parse_points(point, "include", "exclude")
    boxes = [_parse_floats(b, (4,), "--box") for b in box]
    clip = ClipModel(clip_model, clip_weights) if text is not None else None
    typer.echo(json.dumps(run_select(objects, out, layer, points, boxes, text, image, clip, top, prompt_crs)))


@app.command(epilog=examples("train"))
def train(
    images: Annotated[str, typer.Option(help="Training rasters: a file, a folder or a glob.")],
    labels: Annotated[str, typer.Option(help="Masks named like the images (folder/glob) or a vector file.")],
    out: Annotated[Path, typer.Option(help="Model file to write (.ckpt); rewritten after every epoch.")],
    encoder: Annotated[str, typer.Option(help="Generalist variant (see `uvsam encoders`).")] = TD("encoder"),
    checkpoint: Annotated[Path | None, typer.Option(help="The generalist's official weights.")] = None,
    val_images: Annotated[str | None, typer.Option(help="Validation rasters.")] = None,
    val_labels: Annotated[str | None, typer.Option(help="Validation labels.")] = None,
    val_fraction: Annotated[float, typer.Option(
        help="Without --val-images: share of scenes held out.")] = TD("val_fraction"),
    folds: Annotated[int, typer.Option(
        help="Spatial cross-validation: train one model per fold (OUT.foldK.ckpt), folds of whole groups of "
        "overlapping or touching scenes, and score each on its held-out fold (OUT.cv.json).")] = TD("folds"),
    epochs: Annotated[int, typer.Option(help="Epochs.")] = TD("epochs"),
    steps: Annotated[int, typer.Option(help="Optimiser steps per epoch.")] = TD("steps_per_epoch"),
    sam_epochs: Annotated[int, typer.Option(help="Last epochs that train the full UV-SAM path.")] = TD("sam_epochs"),
    batch_size: Annotated[int, typer.Option(help="Views per step.")] = TD("batch_size"),
    crop: Annotated[int, typer.Option(help="View side in pixels at the training GSD.")] = TD("crop"),
    scale_aug: Annotated[str, typer.Option(
        help="MIN,MAX: a view covers crop x a random factor in this range of the scene (scale augmentation).")]
    = ",".join(map(str, TD("scale"))),
    gsd: Annotated[str, typer.Option(help="Training ground resolution in m/px, or 'native'.")] = str(
        TD("gsd_m")),
    specialist: Annotated[str, typer.Option(
        help="SegFormer mit_b0 .. mit_b5, or any segmentation-models-pytorch ARCH[:ENCODER] (deeplabv3plus:resnet50, "
             "unet:efficientnet-b0, fpn; encoder default resnet34).")] = TD("specialist"),
    mit_weights: Annotated[Path | None, typer.Option(
        help="Pretrained encoder weights: MiT (mmseg or HF layout), or the smp encoder's (timm/torchvision).")] = None,
    fusion: Annotated[str, typer.Option(help="mlp or add.")] = TD("fusion"),
    specialist_input: Annotated[str, typer.Option(
        help="lcn_rgb (local contrast of each band), lcn (grey local contrast) or rgb.")] = TD("specialist_input"),
    lcn_sigma: Annotated[float, typer.Option(help="Local contrast scale, metres on the ground.")] = TD("lcn_sigma_m"),
    tune_decoder: Annotated[bool, typer.Option(help="Also train the generalist's mask decoder.")] = TD("tune_decoder"),
    ladder: Annotated[bool, typer.Option(help="Add SAM-LST's ladder side network.")] = TD("ladder"),
    box_prompt: Annotated[bool, typer.Option(help="Prompt the generalist with each village's box (ablation: off).")]
    = TD("box_prompt"),
    mask_prompt: Annotated[bool, typer.Option(
        help="Prompt the generalist with the specialist's mask (ablation: off).")] = TD("mask_prompt"),
    sam_embedding: Annotated[bool, typer.Option(
        help="The generalist's embedding in the semantic prompt (ablation: off).")] = TD("sam_embedding"),
    specialist_embedding: Annotated[bool, typer.Option(
        help="The specialist's feature in the semantic prompt (ablation: off).")] = TD("specialist_embedding"),
    min_prompt_area: Annotated[float | None, typer.Option(
        help="Smallest village (m^2) the generalist is prompted for; smaller ones keep the specialist's mask "
        "(default: official 100 px at 0.916 m).")] = TD("min_area_m2"),
    views_per_scene: Annotated[int, typer.Option(
        help="Fixed views per scene for the UV-SAM path.")] = TD("views_per_scene"),
    cache_embeddings: Annotated[bool, typer.Option(
        help="Keep the UV-SAM views' embeddings on disk (~/.cache/uvsam/embeddings, by content) for later runs.")
    ] = TD("cache_embeddings"),
    lr: Annotated[float, typer.Option(help="Peak learning rate (AdamW).")] = TD("lr"),
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = TD("weight_decay"),
    warmup: Annotated[int, typer.Option(help="Warm-up steps.")] = TD("warmup_steps"),
    sam_weight: Annotated[float, typer.Option(help="Weight of the UV-SAM path loss.")] = TD("sam_weight"),
    ema: Annotated[float, typer.Option(help="Decay of the weight average kept (0: last weights).")] = TD("ema"),
    harmonise: Annotated[bool, typer.Option(help="Match every scene to the training radiometry.")] = TD("harmonise"),
    photometric: Annotated[bool, typer.Option(
        help="Random colour, band-mixing, grey, gamma and blur changes of the specialist's views "
        "(off by default: it measured worse across seasons, docs/results.md).")] = TD("photometric"),
    force_refine: Annotated[bool, typer.Option(
        help="Train the UV-SAM path even when the generalist's "
        "weights are not verified official ones.")] = TD("force_refine"),
    band: Annotated[list[int], typer.Option(help="Band to read (1-based); repeatable.")] = [],  # noqa: B006
    labels_crs: Annotated[str | None, typer.Option(help="CRS of vector labels that name none.")] = TD("labels_crs"),
    seed: Annotated[int, typer.Option(help="Random seed.")] = TD("seed"),
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = TD("device"),
    precision: Annotated[str, typer.Option(help=PRECISION_HELP + " Training: not fp16.")] = TD("precision"),
    compile: Annotated[str, typer.Option(
        help="The frozen encoder of the UV-SAM views compiled, built once per encoder and machine and reused from "
             "~/.cache/uvsam/compiled (predict uses the same): auto (use a cached one; build it for 64+ views to "
             "encode), always, never (eager PyTorch).")] = TD("compile"),
    threads: Annotated[int | None, typer.Option(help="CPU threads for torch.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the training saved in --out.")] = False,
):
    """Train the specialist and fusion head of UV-SAM (the generalist stays frozen)."""
    _STATE["resume"] = _epochs_kept(out, bool(folds))
    from uvsam.training import train as run_training

    if threads:
        import torch

        torch.set_num_threads(threads)
    if gsd == "native":
        gsd_m = None
    else:
        gsd_m = _parse_floats(gsd, (1,), "--gsd")[0]
    cfg = TrainConfig(
        images=images, labels=labels, out=str(out), val_images=val_images, val_labels=val_labels,
        val_fraction=val_fraction, folds=folds, fold=1 if folds else 0,
        encoder=_known_encoder(encoder), checkpoint=str(checkpoint) if checkpoint else None, specialist=specialist,
        mit_weights=str(mit_weights) if mit_weights else None, fusion=fusion,
        specialist_input=specialist_input, lcn_sigma_m=lcn_sigma, tune_decoder=tune_decoder,
        box_prompt=box_prompt, mask_prompt=mask_prompt, sam_embedding=sam_embedding,
        specialist_embedding=specialist_embedding,
        ladder=ladder, min_area_m2=min_prompt_area, gsd_m=gsd_m, crop=crop,
        scale=_parse_floats(scale_aug, (2,), "--scale-aug"),
        batch_size=batch_size, epochs=epochs, steps_per_epoch=steps,
        sam_epochs=sam_epochs, views_per_scene=views_per_scene, cache_embeddings=cache_embeddings, lr=lr,
        weight_decay=weight_decay, warmup_steps=warmup, sam_weight=sam_weight, ema=ema, harmonise=harmonise,
        photometric=photometric, force_refine=force_refine,
        bands=tuple(band) or None, labels_crs=labels_crs, seed=seed, device=device, precision=precision,
        compile=compile,
    )
    if folds:
        from uvsam.crossval import cross_validate

        typer.echo(json.dumps(cross_validate(cfg, log, resume=resume)["summary"]))
        return
    last = run_training(cfg, resume=resume, log=log)
    typer.echo(json.dumps(last))


@app.command("ablate", epilog=examples("ablate"))
def ablate_cmd(
    images: Annotated[str, typer.Option(help="Training rasters: a file, a folder or a glob.")],
    labels: Annotated[str, typer.Option(help="Masks named like the images (folder/glob) or a vector file.")],
    val_images: Annotated[str, typer.Option(help="Validation rasters the table is scored on.")],
    val_labels: Annotated[str, typer.Option(help="Validation labels.")],
    out: Annotated[Path, typer.Option(help="Folder for the variants' model files and ablations.csv / .md.")],
    encoder: Annotated[str, typer.Option(help="Generalist variant (see `uvsam encoders`).")] = TD("encoder"),
    checkpoint: Annotated[Path | None, typer.Option(help="The generalist's official weights.")] = None,
    specialist: Annotated[str, typer.Option(help="The specialist (as `uvsam train`).")] = TD("specialist"),
    epochs: Annotated[int, typer.Option(help="Epochs of each variant.")] = TD("epochs"),
    steps: Annotated[int, typer.Option(help="Optimiser steps per epoch.")] = TD("steps_per_epoch"),
    sam_epochs: Annotated[int, typer.Option(help="Last epochs that train the full UV-SAM path.")] = TD("sam_epochs"),
    seed: Annotated[int, typer.Option(help="Random seed (the same for every variant).")] = TD("seed"),
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = PD("device"),
):
    """The paper's ablation table: train UV-SAM and each variant without one prompt or embedding,
    score each and the specialist alone on the validation scenes (one table: CSV, Markdown, JSON)."""
    from uvsam.ablations import ablate

    cfg = TrainConfig(images=images, labels=labels, out=str(out / "uvsam.ckpt"), encoder=_known_encoder(encoder),
                      checkpoint=str(checkpoint) if checkpoint else None, specialist=specialist, epochs=epochs,
                      steps_per_epoch=steps, sam_epochs=sam_epochs, seed=seed, device=device)
    typer.echo(json.dumps(ablate(cfg, val_images, val_labels, out, log)))


@app.command("train-gate", epilog=examples("train-gate"))
def train_gate_cmd(
    images: Annotated[str, typer.Option(help="Training rasters: a file, a folder or a glob.")],
    labels: Annotated[str, typer.Option(help="Masks named like the images (folder/glob) or a vector file.")],
    model: Annotated[Path, typer.Option(help="The model file the gate serves: tiles are read as its specialist "
                                              "reads them.")],
    out: Annotated[Path, typer.Option(help="Gate file to write (.pt).")],
    backbone: Annotated[str, typer.Option(help="timm backbone: resnet50 (the paper's), resnet18, efficientnet_b0, "
                                                 "mobilenetv3_large_100 ...")] = "resnet50",
    tile_m: Annotated[float, typer.Option(help="Side of a gate tile on the ground (m).")] = 240.0,
    epochs: Annotated[int, typer.Option(help="Epochs.")] = 10,
    steps: Annotated[int, typer.Option(help="Optimiser steps per epoch.")] = 40,
    batch_size: Annotated[int, typer.Option(help="Tiles per step, half with villages.")] = 32,
    lr: Annotated[float, typer.Option(help="Adam learning rate (cosine annealed).")] = 1e-4,
    min_village: Annotated[float, typer.Option(help="Share of village pixels that makes a village tile.")] = 0.02,
    recall: Annotated[float, typer.Option(help="Share of held-out village tiles the threshold keeps.")] = 0.99,
    holdout: Annotated[float, typer.Option(
        help="Share of the area's width (an edge strip) held out to choose the threshold.")] = 0.2,
    val_images: Annotated[str | None, typer.Option(help="Validation rasters: AUC, recall, precision, F1.")] = None,
    val_labels: Annotated[str | None, typer.Option(help="Validation labels.")] = None,
    negatives: Annotated[str | None, typer.Option(
        help="Scenes known to hold no village (file, folder or glob): their tiles join the negatives.")] = None,
    backbone_weights: Annotated[Path | None, typer.Option(
        help="Pretrained weights of the backbone (timm or torchvision layout, e.g. ImageNet ResNet-50).")] = None,
    input_mode: Annotated[str | None, typer.Option(
        help="rgb, lcn or lcn_rgb (default: what the model's specialist sees).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = PD("device"),
):
    """Train the pre-classification gate (UV-SAM's city-wide tile classifier) for `predict --gate`.

    Tiles with and without villages, 1:1, from the labelled scenes read as MODEL's specialist reads
    them; the threshold is chosen for recall on a held-out strip of the area (JSON: threshold, AUC,
    recall, precision, F1).
    """
    from uvsam.gate import GateConfig, train_gate

    cfg = GateConfig(images=images, labels=labels, model=str(model), out=str(out), backbone=backbone, tile_m=tile_m,
                     epochs=epochs, steps_per_epoch=steps, batch_size=batch_size, lr=lr, min_village=min_village,
                     recall=recall, holdout=holdout, val_images=val_images, val_labels=val_labels,
                     negatives=negatives, backbone_weights=str(backbone_weights) if backbone_weights else None,
                     input_mode=input_mode, seed=seed, device=device)
    record = train_gate(cfg, log)
    typer.echo(json.dumps({k: record[k] for k in ("threshold", "crop", "backbone", "metrics")}))


@app.command(epilog=examples("evaluate"))
def evaluate(
    model: Annotated[Path, typer.Option(help="Model file written by `uvsam train`.")],
    images: Annotated[str | None, typer.Option(help="Rasters: a file, a folder or a glob.")] = None,
    labels: Annotated[str | None, typer.Option(help="Masks named like the images, or a vector file.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="The generalist's official weights.")] = None,
    window: Annotated[int, typer.Option(help="Inference window (px at the model's GSD).")] = 512,
    labels_crs: Annotated[str | None, typer.Option(help="CRS of vector labels that name none.")] = None,
    specialist_only: Annotated[bool, typer.Option(help="Skip the in-memory UV-SAM path.")] = False,
    force_refine: Annotated[bool, typer.Option(
        help="Refine even with a generalist whose weights are not verified official ones.")] = PD("force_refine"),
    cascade: Annotated[bool, typer.Option(
        help="Score with PerSAM's cascaded post-refinement of the generalist's masks (as predict --cascade).")]
    = PD("cascade"),
    cv: Annotated[bool, typer.Option(
        help="Score the fold models of MODEL (from `train --folds`) on their held-out folds.")] = False,
    overlays: Annotated[Path | None, typer.Option(
        help="Folder for one PNG per scene: hits, false alarms and misses of the villages over the image.")] = None,
    ablations: Annotated[bool, typer.Option(
        help="Also score the UV-SAM path with each prompt and embedding left out, side by side (trains nothing).")]
    = False,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = PD("device"),
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = PD("precision"),
):
    """IoU/F1/precision/recall and object F1 of what `uvsam predict` ships (polygons), its specialist
    mosaic and the in-memory UV-SAM path, on the label grid (JSON)."""
    cfg = PredictConfig(force_refine=force_refine, cascade=cascade, device=device, precision=precision)
    if cv:
        from uvsam.crossval import evaluate_cv

        typer.echo(json.dumps(evaluate_cv(model, checkpoint, log, cfg), indent=2))
        return
    if images is None or labels is None:
        raise InputError("--images and --labels are needed (or --cv with fold models)")
    from uvsam.evaluation import evaluate as run_evaluation

    typer.echo(json.dumps(run_evaluation(model, images, labels, checkpoint, window, labels_crs, specialist_only,
                                         cfg, log, overlays, ablations), indent=2))


def _known_encoder(name: str) -> str:
    from uvsam.modeling.registry import get_spec

    return get_spec(name).name


@app.command(epilog=examples("predict"))
def predict(
    scenes: Annotated[list[str] | None, typer.Argument(
        help="Rasters: files, VRTs, folders, globs, or URLs (http(s)://, s3://, gs://, az://, /vsi...).")] = None,
    model: Annotated[Path, typer.Option(help="Model file written by `uvsam train`.")] = ...,
    out: Annotated[Path, typer.Option(help="Output: villages.gpkg (or another format with --format).")] = ...,
    stac: Annotated[str | None, typer.Option(
        help="Scenes from STAC: an Item, ItemCollection, Catalog or Collection (file or URL), or a STAC API to "
             "search; each item's date fills `acquired`.")] = None,
    asset: Annotated[str | None, typer.Option(help="With --stac: the asset to read (default: the visual one).")] = None,
    tiles: Annotated[str | None, typer.Option(
        "--tiles", help="A tile service to read over --bbox: an XYZ/TMS URL template ({z}/{x}/{y}, or {-y}) or a "
                        "GDAL WMS/WMTS XML file.")] = None,
    zoom: Annotated[int | None, typer.Option(
        help="With --tiles: the zoom to read (default: the coarsest as fine as the model's GSD).")] = None,
    tile_cache: Annotated[Path | None, typer.Option(
        help="With --tiles: the on-disk tile cache (default: ~/.cache/uvsam/tiles).")] = None,
    max_connections: Annotated[int, typer.Option(
        help="With --tiles: requests at once to the tile server.")] = 2,
    requests_per_second: Annotated[float, typer.Option(
        help="With --tiles: requests per second to the tile server at most.")] = 8.0,
    bbox: Annotated[str | None, typer.Option(
        help="WEST,SOUTH,EAST,NORTH (degrees): the area --tiles reads, or the items of --stac kept.")] = None,
    stac_datetime: Annotated[str | None, typer.Option(
        "--datetime", help="With --stac: only items of this date, year, YYYY-MM or interval A/B (.. open).")] = None,
    layer: Annotated[str, typer.Option(help="Villages layer name (one per year); other layers are kept.")] = "villages",
    fmt: Annotated[str | None, typer.Option("--format", help="Default: from the extension of --out. " + "; ".join(
        f"{f.name} ({f.suffix}): {f.holds}" for f in FORMATS.values()) + ".")] = None,
    crs: Annotated[str | None, typer.Option(help="Reproject the layers to this CRS (default: the scene's).")] = None,
    probabilities: Annotated[Path | None, typer.Option(
        help="Also write the village probabilities (0-1) as a GeoTIFF on the model's GSD grid (several scenes: "
             "FILE_SCENE.tif each).")] = None,
    quicklook: Annotated[bool, typer.Option(
        help="Write a PNG of the scenes with the villages outlined beside --out (OUT.png, OUT_LAYER.png).")] = True,
    checkpoint: Annotated[Path | None, typer.Option(help="The generalist's official weights.")] = None,
    gate: Annotated[Path | None, typer.Option(
        help="A tile gate (`uvsam train-gate`): tiles it finds no village in skip the specialist and the "
             "generalist (status `gated` in the tiles layer).")] = None,
    refine: Annotated[bool, typer.Option(help="Refine candidates with the generalist.")] = PD("refine"),
    force_refine: Annotated[bool, typer.Option(
        help="Refine even with a generalist whose weights are not verified official ones.")] = PD("force_refine"),
    cascade: Annotated[bool, typer.Option(
        help="PerSAM's cascaded post-refinement: each village's mask decoded twice more, with its own logits "
             "and then its box as prompts (about 3x the decoder time).")] = PD("cascade"),
    int8: Annotated[bool, typer.Option(
        help="Static int8 generalist encoder on the CPU (in this process), calibrated on four of your tiles and "
             "kept only if it measures faster there with masks agreeing at IoU >= 0.95.")] = PD("int8"),
    compile: Annotated[str, typer.Option(
        help="Compiled model parts, built once per model, shape and machine and reused from "
             "~/.cache/uvsam/compiled: auto (use cached ones; build them for runs of 4+ Mpx at the model's GSD), "
             "always, never (eager PyTorch). With --precision bf16 they compute in bf16 (their own "
             "artefacts).")] = PD("compile"),
    tile: Annotated[int, typer.Option(help="Specialist tile (px at the model's GSD).")] = PD("tile"),
    batch_size: Annotated[int | None, typer.Option(
        help="Tiles per specialist call (default: 2 on a CPU, by free memory on a GPU).")] = PD("batch_size"),
    window: Annotated[int, typer.Option(help="Refinement window (px at the model's GSD).")] = PD("window"),
    window_margin: Annotated[int, typer.Option(
        help="Margin (px) a refined outline may grow past its box.")] = PD("window_margin"),
    refine_min_iou: Annotated[float, typer.Option(
        help="The generalist's predicted IoU a refined outline needs.")] = PD("refine_min_iou"),
    refine_min_stability: Annotated[float, typer.Option(
        help="Stability score a refined outline needs.")] = PD("refine_min_stability"),
    refine_min_overlap: Annotated[float, typer.Option(
        help="IoU a refined outline must share with its candidate.")] = PD("refine_min_overlap"),
    block: Annotated[int, typer.Option(help="Vectorise the mosaic in square blocks of this many px.")] = PD("block"),
    overlap: Annotated[int, typer.Option(help="Tile overlap (px).")] = PD("overlap"),
    threshold: Annotated[float, typer.Option(help="Village probability threshold.")] = PD("threshold"),
    min_village_area: Annotated[float, typer.Option(
        help="Smallest village (and hole in one) kept (m^2).")] = PD("min_area_m2"),
    simplify: Annotated[float | None, typer.Option(
        help="Simplification tolerance (m); default: the GSD.")] = PD("simplify_m"),
    acquired: Annotated[str | None, typer.Option(
        help="Acquisition date of the imagery (YYYY-MM-DD).")] = PD("acquired"),
    grid_offset: Annotated[int, typer.Option(
        help="Shift the tile grid by this many px (invariance checks).")] = PD("grid_offset"),
    pif_reference: Annotated[str | None, typer.Option(
        help="A reference year's raster (file or URL): normalise each scene onto its pseudo-invariant pixels.")] = None,
    force: Annotated[bool, typer.Option(
        help="Run scenes the suitability check refuses (resolution far from the model's, too small).")] = PD("force"),
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = PD("device"),
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = PD("precision"),
    scheduler: Annotated[str | None, typer.Option(help="tcp://HOST:PORT of a Dask scheduler.")] = None,
    workers: Annotated[int | None, typer.Option(help="Local Dask workers (default: sized to the machine).")] = None,
    local: Annotated[bool | None, typer.Option(
        "--local/--dask", help="In this process, or on Dask (default: Dask with --scheduler/--workers or 8+ cores).",
    )] = None,
    dry_run: Annotated[bool, typer.Option(help="Print tiles, km2, estimated time and memory; write nothing.")] = False,
):
    """Village polygons for whole scenes: specialist mosaic, candidates, generalist refinement.

    Resumable: run the same command again after an interruption and finished work is skipped.
    """
    from uvsam.devices import gpus_for
    from uvsam.prediction import model_info, run_prediction, runs_in_process
    from uvsam.prediction.sources import scene_sources

    scenes = scene_sources(scenes, stac=stac, asset=asset, bbox=bbox, datetime=stac_datetime, tiles=tiles, zoom=zoom,
                           tile_cache=tile_cache, max_connections=max_connections,
                           requests_per_second=requests_per_second, acquired=acquired)
    cfg = PredictConfig(tile=tile, overlap=overlap, batch_size=batch_size, threshold=threshold, refine=refine,
                        force_refine=force_refine, cascade=cascade, refine_min_iou=refine_min_iou,
                        refine_min_stability=refine_min_stability, refine_min_overlap=refine_min_overlap,
                        window=window, window_margin=window_margin, min_area_m2=min_village_area, simplify_m=simplify,
                        block=block, acquired=acquired, grid_offset=grid_offset,
                        pif_reference=pif_reference or None, force=force, device=device,
                        precision=precision, gate=str(gate) if gate else None, int8=int8, compile=compile)
    if dry_run:
        from uvsam.prediction import dry_run as estimate

        typer.echo(json.dumps(estimate(scenes, model, cfg, checkpoint), indent=2))
        return
    _STATE["resume"] = _work_kept(out, layer, "finished tiles and windows")
    gpus = gpus_for(cfg.device)  # a worker per GPU when Dask runs locally
    in_process = runs_in_process(local, scheduler, workers, len(gpus))
    if cfg.int8 and not in_process:
        raise InputError("--int8: the int8 encoder is measured and kept in this process: give --local")
    if in_process:
        summary = run_prediction(scenes, model, out, cfg, layer, fmt, crs, checkpoint, log=log,
                                 probabilities=probabilities, quicklook=quicklook)
    else:
        from uvsam.prediction.distributed import dask_runner, make_client, register_model

        info = model_info(model, checkpoint, cfg.device, cfg.precision)
        with make_client(scheduler, workers, gpus=gpus) as client:
            register_model(client, info)
            summary = run_prediction(scenes, model, out, cfg, layer, fmt, crs, checkpoint,
                                     runner=dask_runner(client), log=log, probabilities=probabilities,
                                     quicklook=quicklook)
    typer.echo(json.dumps(summary))


@app.command("change", epilog=examples("change"))
def change_cmd(
    years: Annotated[list[str], typer.Argument(help="YEAR=FILE[:LAYER], oldest first (e.g. 2018=v.gpkg:y2018).")],
    out: Annotated[Path, typer.Option(help="Output GeoPackage (changes, villages_tracked, tables); CSVs beside.")],
    min_overlap: Annotated[float, typer.Option(
        help="Share of the smaller village two must share to link.")] = CD("min_overlap"),
    stable_pct: Annotated[float, typer.Option(help="Area change (%) still counted as stable.")] = CD("stable_pct"),
    mapping_unit: Annotated[float, typer.Option(
        help="Minimum mapping unit (m^2): events whose villages "
        "are all smaller are not reported.")] = CD("min_area_m2"),
    districts: Annotated[Path | None, typer.Option(help="Polygon layer of districts to sum by.")] = None,
    district_field: Annotated[str | None, typer.Option(help="Districts' name field (default: first text).")] = None,
    centre: Annotated[str | None, typer.Option(help="LON,LAT of the centre for distance rings.")] = None,
    ring_km: Annotated[float, typer.Option(help="Width of the distance rings (km).")] = 2.0,
    step_km: Annotated[float, typer.Option(
        help="Step of the cumulative count and area curves against distance from --centre (km).")] = 0.5,
    belts: Annotated[str | None, typer.Option(
        help="FILE[:LAYER] of ring roads (closed lines) or belt polygons to sum by; nested rings make belts "
             "between them.")] = None,
    belt_field: Annotated[str | None, typer.Option(help="Belts' name field (default: first text).")] = None,
    map_year: Annotated[str | None, typer.Option(
        help="Year the report's distribution map shows (default: the last).")] = None,
    analysis_crs: Annotated[str | None, typer.Option(help="Projected analysis CRS (default: equal-area).")] = None,
    crs: Annotated[str | None, typer.Option(help="CRS of the output layers (default: the years' own CRS when "
                                                 "they share one, else the UTM zone).")] = None,
    report: Annotated[Path | None, typer.Option(help="Write a self-contained HTML report here.")] = None,
    image: Annotated[list[str], typer.Option(
        help="YEAR=RASTER imagery (co-registration, report); repeatable.")] = [],  # noqa: B006
    max_shift: Annotated[float, typer.Option(help="Warn when years' imagery is shifted more (m).")] = 5.0,
    accuracy: Annotated[list[str], typer.Option(
        help="YEAR=SAMPLE.gpkg: a labelled `uvsam sample` of that year's map; its error-adjusted areas with 95 % "
             "confidence intervals go in the accuracy table and the report; repeatable.")] = [],  # noqa: B006
    propagate: Annotated[bool, typer.Option(
        help="Check every event with SAM-PT: each earlier village's points carried into the later year's --image "
             "and redrawn by the generalist (--encoder, --checkpoint); propagated_iou and confirmed per event.")
    ] = False,
    encoder: Annotated[str | None, typer.Option(help="With --propagate: the generalist variant.")] = None,
    checkpoint: Annotated[Path | None, typer.Option(help="With --propagate: its weights.")] = None,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "auto",
):
    """Village lifecycles across years (new, demolished, stable, expanded, shrunk, split, merged)."""
    from uvsam.changes import run_change

    generalist = None
    if propagate:
        if encoder is None or checkpoint is None:
            raise InputError("--propagate needs the generalist: give --encoder NAME --checkpoint FILE")
        if not image:
            raise InputError("--propagate needs the later years' imagery: give --image YEAR=RASTER")
        from uvsam.objects import generalist_ref

        generalist = generalist_ref(_known_encoder(encoder), checkpoint, device, precision)

    point = None
    if centre is not None:
        try:
            lon, lat = (float(v) for v in centre.split(","))
        except ValueError:
            raise InputError(f"--centre {centre!r}: give LON,LAT in degrees, e.g. 116.397,39.909") from None
        if not (-180 <= lon <= 180 and -90 <= lat <= 90):
            raise InputError(f"--centre {centre!r}: longitude or latitude out of range")
        point = (lon, lat)
    cfg = ChangeConfig(min_overlap=min_overlap, stable_pct=stable_pct, crs=analysis_crs, min_area_m2=mapping_unit)
    typer.echo(json.dumps(run_change(years, out, cfg, districts, district_field, point, ring_km, crs, report,
                                     image, max_shift, accuracy, belts, belt_field, step_km, map_year, log,
                                     generalist)))


@app.command("sample", epilog=examples("sample"))
def sample_cmd(
    villages: Annotated[str, typer.Argument(help="The map: FILE[:LAYER] of village polygons (a predict GeoPackage).")],
    out: Annotated[Path, typer.Option(help="Sample GeoPackage to write: points to label (field reference), strata.")],
    n: Annotated[int, typer.Option(help="Points in all, shared by mapped area.")] = 300,
    min_per_stratum: Annotated[int, typer.Option(help="At least this many points per stratum.")] = 50,
    area: Annotated[str | None, typer.Option(
        help="Polygon file of the mapped area (default: the GeoPackage's tiles that ran).")] = None,
    later: Annotated[str | None, typer.Option(
        help="A later year's map (FILE[:LAYER]): the strata are then the change classes (village both years, "
             "lost, gained, neither).")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (the same seed draws the same points).")] = 0,
):
    """Draw a stratified random sample of points to label, for an accuracy assessment.

    Strata: village and not village over the mapped area (with --later: the change classes between
    the two maps). Label each point's `reference` in QGIS (a drop-down of the classes) from better
    imagery or fieldwork, then run `uvsam accuracy`.
    """
    from uvsam.changes.accuracy import SampleDesign, draw_sample

    typer.echo(json.dumps(draw_sample(villages, out, SampleDesign(n, min_per_stratum, seed), area, later)))


@app.command("accuracy", epilog=examples("accuracy"))
def accuracy_cmd(
    sample: Annotated[Path, typer.Argument(help="A sample GeoPackage from `uvsam sample`, its points labelled.")],
    confidence: Annotated[float, typer.Option(help="Confidence level of the intervals.")] = 0.95,
    csv: Annotated[Path | None, typer.Option(help="Also write the per-class table as CSV.")] = None,
):
    """Error matrix, user's and producer's accuracy and error-adjusted areas with confidence
    intervals, from a labelled stratified sample (Olofsson et al. 2014)."""
    from statistics import NormalDist

    from uvsam.changes.accuracy import assess
    from uvsam.files import atomic_path

    if not 0.5 <= confidence < 1:
        raise InputError(f"--confidence {confidence}: give a level in [0.5, 1), e.g. 0.95")
    result = assess(sample, NormalDist().inv_cdf(0.5 + confidence / 2))
    if csv is not None:
        with atomic_path(csv) as tmp:
            result.table().to_csv(tmp, index=False)
    typer.echo(json.dumps(result.to_dict()))


@app.command("demo", epilog=examples("demo"))
def demo_cmd(
    out: Annotated[Path, typer.Option(help="Folder for the synthetic scenes, model and GeoPackage.")] = Path("demo"),
    local: Annotated[bool, typer.Option(help="Predict in this process instead of a local Dask cluster.")] = False,
):
    """The whole pipeline offline on a synthetic city it draws itself (a few minutes on a laptop)."""
    from uvsam.demo import run_demo

    report = run_demo(out, log, local=local)
    typer.echo(json.dumps({k: report[k] for k in ("synthetic", "geopackage", "score", "seconds")}))


@app.command("run", epilog=examples("run"))
def run_cmd(
    workflow: Annotated[Path, typer.Argument(help="Workflow YAML (see workflows/).")],
    dry_run: Annotated[bool, typer.Option(help="Validate and print per-year estimates; write nothing.")] = False,
    local: Annotated[bool | None, typer.Option("--local/--dask", help="Override the file's execution.")] = None,
    workers: Annotated[int | None, typer.Option(help="Local Dask workers (overrides the file).")] = None,
    scheduler: Annotated[str | None, typer.Option(help="tcp://HOST:PORT (overrides the file).")] = None,
):
    """Run a workflow: each year's scenes predicted into its own layer of one output."""
    from uvsam.workflow import load, run

    out = load(workflow)[0].out
    before = out.stat().st_mtime_ns if out.exists() else None
    _STATE["resume"] = lambda: ("finished years, tiles and windows are kept: run the same command again to resume; "
                                + (f"{out} was not changed" if out.exists() and out.stat().st_mtime_ns == before
                                   else f"{out} was written (the years finished)" if out.exists()
                                   else "nothing was written"))
    typer.echo(json.dumps(run(workflow, log, dry_run, local, workers, scheduler), indent=2 if dry_run else None))


@app.command("import-xyz", epilog=examples("import-xyz"))
def import_xyz_cmd(
    images: Annotated[Path, typer.Argument(help="Folder of {y}_{x}.png XYZ images.")],
    zoom: Annotated[int, typer.Option(help="XYZ zoom level of the file names.")],
    out: Annotated[Path, typer.Option(help="Output folder: images/, masks/, images.vrt, masks.vrt.")],
    masks: Annotated[Path | None, typer.Option(help="Folder of same-named masks.")] = None,
):
    """Georeference an XYZ tile folder (EPSG:3857 GeoTIFFs) and mosaic it into VRTs."""
    from tiles.xyz import import_xyz
    from uvsam.files import check_writable
    from uvsam.progress import Progress

    check_writable(out, folder=True)
    bar: list[Progress] = []

    def on_tile(total: int) -> None:
        if not bar:
            bar.append(Progress(total, "tiles", task="import-xyz"))
        bar[0].advance()

    try:
        res = import_xyz(images, zoom, out, masks_dir=masks, on_tile=on_tile)
    except BaseException:
        for b in bar:
            b.close(failed=True)
        raise
    for b in bar:
        b.close()
    typer.echo(json.dumps({"images": len(res.images), "masks": len(res.masks), "images_vrt": str(res.images_vrt),
                           "masks_vrt": str(res.masks_vrt) if res.masks_vrt else None}))


@app.command("plan-tiles", epilog=examples("plan-tiles"))
def plan_tiles_cmd(
    image: Annotated[str, typer.Argument(help="Raster to tile (any GDAL format; a file or URL).")],
    tile_size: Annotated[float, typer.Option(help="Tile side, in --unit.")] = 1024,
    overlap: Annotated[float, typer.Option(help="Overlap of neighbouring tiles, in --unit.")] = 128,
    unit: Annotated[str, typer.Option(help="px, or m (metres on the ground).")] = "px",
    gsd: Annotated[float | None, typer.Option(help="Resample to this ground resolution (m).")] = None,
    crs: Annotated[str | None, typer.Option(help="Reproject to this CRS (e.g. EPSG:32650).")] = None,
    band: Annotated[list[int], typer.Option(help="Band to read (1-based); repeatable.")] = [],  # noqa: B006
    normalisation: Annotated[str, typer.Option(help="auto, percentile or identity.")] = "auto",
    out: Annotated[Path | None, typer.Option(help="Write the manifest JSON here (else stdout).")] = None,
):
    """Plan the tiling of a scene: grid, scene-level normalisation, non-empty tiles (a manifest)."""
    from tiles import ReadOptions, TilingConfig, plan
    from uvsam.files import atomic_path

    if unit not in ("px", "m"):
        raise InputError(f"--unit {unit!r}: use px or m")
    config = TilingConfig(tile_size, overlap, unit, normalisation,
                          read=ReadOptions(tuple(band) or None, gsd, crs))
    text = json.dumps(plan(image, config).manifest(), indent=2)
    if out is None:
        typer.echo(text)
    else:
        with atomic_path(out) as tmp:
            tmp.write_text(text + "\n")


@app.command(epilog=examples("encoders"))
def encoders(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    measure: Annotated[bool, typer.Option(help="Measure GFLOPs and CPU latency (slow for ViT-H).")] = True,
    only: Annotated[list[str], typer.Option(help="Restrict to these encoders; repeatable.")] = [],  # noqa: B006
    repeats: Annotated[int, typer.Option(help="Timed runs per encoder (median reported).")] = 3,
    device: Annotated[str, typer.Option(help=DEVICE_HELP)] = "auto",
    precision: Annotated[str, typer.Option(help=PRECISION_HELP)] = "auto",
):
    """Registered generalist variants: parameters, GFLOPs at native input, CPU latency."""
    from uvsam.devices import select
    from uvsam.encoders_table import encoder_rows, format_table

    rows = encoder_rows(only or None, measure=measure, repeats=repeats, device=select(device, precision))
    typer.echo(json.dumps(rows, indent=2) if as_json else format_table(rows))


@weights_app.command("list", epilog=examples("weights list"))
def weights_list(
    check: Annotated[bool, typer.Option(help="Hash cached files against their digests.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
):
    """Each variant's file, official URL, SHA-256, size, licence and cache status."""
    from uvsam.weights import list_weights

    rows = [r.as_dict() for r in list_weights(check)]
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        size = f"{r['size'] / 1e6:.0f} MB" if r["size"] else "?"
        typer.echo(f"{r['name']:<22} {r['status']:<10} {size:>8}  {r['licence']:<22} {r['sha256'] or 'unpinned'}")
        typer.echo(f"{'':<22} {r['url']}")


@weights_app.command("fetch", epilog=examples("weights fetch"))
def weights_fetch(
    name: str,
    url: Annotated[str | None, typer.Option(help="Mirror to download from instead of the official URL.")] = None,
    sha256: Annotated[str | None, typer.Option(help="Digest to pin where the authors publish none.")] = None,
):
    """Download weights into the cache (resumable); used only once their SHA-256 matches."""
    from uvsam.weights import fetch

    def progress(done, total):
        if sys.stderr.isatty():
            pct = f"{100 * done / total:5.1f}%" if total else f"{done / 1e6:.1f} MB"
            sys.stderr.write(f"\r{name}: {pct}")

    path = fetch(name, url=url, sha256=sha256, progress=progress)
    typer.echo(str(path))


@weights_app.command("import", epilog=examples("weights import"))
def weights_import(
    name: str,
    file: Path,
    sha256: Annotated[str | None, typer.Option(help="Digest the file must have.")] = None,
):
    """Copy a checkpoint downloaded elsewhere into the cache after checking digest and keys."""
    from uvsam.weights import import_file

    typer.echo(str(import_file(name, file, sha256)))


@weights_app.command("verify", epilog=examples("weights verify"))
def weights_verify():
    """Re-hash every cached file; exit 2 if any does not match its digest."""
    from uvsam.weights import list_weights

    bad = []
    for r in list_weights(check=True):
        if r.status in ("verified", "MISMATCH"):
            typer.echo(f"{r.name}: {r.status}")
        if r.status == "MISMATCH":
            bad.append(r.name)
    if bad:
        raise UvsamError(f"cached weights do not match their SHA-256: {', '.join(bad)}")


def usage_line(e: Exception, args: list[str] = ()) -> str:
    """One line for a usage error: the command, the problem, where its help is. A file whose name
    starts with ``-`` (read as an option) is named, with the two ways to give it."""
    message = e.format_message() if hasattr(e, "format_message") else str(e)
    message = " ".join(message.split())  # Click's messages may span lines
    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None else "uvsam"
    dashed = [a for a in args if a.startswith("-") and len(a) > 1 and Path(a).exists()]
    if dashed and "No such option" in message:
        return (f"{dashed[0]}: a name starting with '-' reads as an option: write ./{dashed[0]}, or give it after "
                "-- at the end")
    return f"{where}: {message} (see `{where} --help`)"


GLOBAL_FLAGS = ("--debug", "--quiet", "-q", "--allow-outside-sources", "--allow-remote-sources")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning user errors into one line and exit code 2."""
    args = sys.argv[1:] if argv is None else argv
    # the options of every command may come anywhere: `uvsam predict ... --quiet`
    args = [a for a in args if a in GLOBAL_FLAGS] + [a for a in args if a not in GLOBAL_FLAGS]
    SETTINGS.quiet = False
    debug = "--debug" in args
    if not debug:
        # Library warnings (rasterio's NotGeoreferencedWarning, torch deprecations) are noise
        # for a batch user; uvsam reports what matters itself. --debug shows them.
        warnings.simplefilter("ignore")
        # GDAL's error messages reach Python's logging; uvsam's one line carries what matters
        for name in ("rasterio", "pyogrio"):
            logging.getLogger(name).addHandler(logging.NullHandler())
    import os
    import signal
    import threading

    from tiles.vrt import SOURCES_ENV

    policy = os.environ.get(SOURCES_ENV)  # what a user's VRT may read (tiles.vrt.check_vrt_sources)
    if "--allow-outside-sources" in args or "--allow-remote-sources" in args:
        os.environ[SOURCES_ENV] = "any" if "--allow-remote-sources" in args else "local"
    previous = ({s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
                if threading.current_thread() is threading.main_thread() else {})
    try:
        code = app(args=args, prog_name="uvsam", standalone_mode=False)
        if isinstance(code, int) and code == 130:  # typer's answer to a KeyboardInterrupt it caught
            return _interrupted("Ctrl-C", 130)
        if isinstance(code, int) and code:
            return code
    except (UvsamError, TilesError) as e:
        if debug:
            raise
        line = e.line(flag_for(_command(args), e.field)) if getattr(e, "field", None) else str(e)
        sys.stderr.write(f"uvsam: error: {line}\n")
        return getattr(e, "exit_code", 2)
    except OSError as e:  # what no check foresaw: a folder that vanished, a mount that went read-only
        if debug:
            raise
        where = f"{e.filename}: " if e.filename else ""
        sys.stderr.write(f"uvsam: error: {where}{e.strerror or e}\n")
        return 2
    except (typer.Abort, KeyboardInterrupt):
        return _interrupted("Ctrl-C", 130)
    except Interrupted as e:
        return _interrupted(e.name, e.code)
    except typer.TyperException as e:  # a usage error (typer's Click): one line, the command's help named
        if debug:
            raise
        sys.stderr.write(f"uvsam: error: {usage_line(e, args)}\n")
        return getattr(e, "exit_code", 2) or 2
    finally:
        for s, handler in previous.items():
            # as the program (no argv): the work is over and its line written; a signal during
            # the interpreter's exit changes nothing, so it no longer kills with the signal's code
            signal.signal(s, signal.SIG_IGN if argv is None else handler)
        _STATE["resume"] = None
        if policy is None:
            os.environ.pop(SOURCES_ENV, None)
        else:
            os.environ[SOURCES_ENV] = policy
    return 0


if __name__ == "__main__":
    sys.exit(main())
