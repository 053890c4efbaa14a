"""The script that runs INSIDE Blender's Python for one render chunk (``blender -b --python``).

Started only by ``worker._blender.ChunkProcess`` as::

    blender -b --factory-startup SCENE --python-exit-code 65 --python _blender_driver.py -- CONFIG

or, for a spare Blender started before its chunk (``worker._blender_spare``), with no SCENE and
``- IDLE_S`` for CONFIG: it then reads CONFIG, one line, from stdin (and exits quietly if none
comes within IDLE_S), moves to the chunk's directory (``cwd``) and opens its ``scene``.

CONFIG is one JSON object (``ChunkProcess.config``: the fields of ``RenderOptions`` plus
``frames`` and ``outdir``): ``frames`` (ints, to render in this order), ``outdir``,
``engine`` / ``samples`` / ``resolution`` / ``threads`` (``null`` keeps the scene's),
``file_format`` (PNG, JPEG, OPEN_EXR), ``gpus`` and ``body`` (the user's Python source, or
``null``).

In order it: sets the options (denoising always off: Debian's Blender has no OpenImageDenoise),
runs the body with ``bpy`` and ``scene`` bound, then renders the frames one by one. What it says
on stdout, one flushed line each, is the protocol with the runner:

- ``PILOT_FRAME <frame> <path>``: the frame is saved at that absolute path;
- ``PILOT_WARNING <text>``: something the user should know (no GPU found, so the CPU renders);
- ``PILOT_SCRIPT_ERROR`` ... ``PILOT_SCRIPT_ERROR_END``: the body's traceback between them,
  then exit with ``SCRIPT_ERROR_EXIT_CODE`` (the same code as ``--python-exit-code``, so an
  error in this driver itself reads the same way, minus the markers);
- ``PILOT_RENDER_ERROR`` ... ``PILOT_RENDER_ERROR_END``: Blender refused to render a frame
  (no camera, a denoiser this build lacks...), then exit with ``RENDER_ERROR_EXIT_CODE``.

It imports nothing from this repository (it runs in Blender's bundled Python, which may be older
than ours: keep it to Python 3.7 syntax) and owns nothing beyond Blender's process.
"""

from __future__ import annotations

import json
import linecache
import os
import select
import sys
import traceback

import bpy  # only inside Blender

# Keep in step with worker/_blender.py.
SCRIPT_ERROR_EXIT_CODE = 65
RENDER_ERROR_EXIT_CODE = 66
BODY_FILENAME = "<render body>"
EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "OPEN_EXR": "exr"}
# Most capable first: OptiX is the faster API on the NVIDIA cards that also have CUDA.
GPU_APIS = ("OPTIX", "CUDA", "HIP", "ONEAPI", "METAL")


def say(*words: object) -> None:
    print(*words, flush=True)


def read_config() -> dict:
    argv = sys.argv[sys.argv.index("--") + 1 :] if "--" in sys.argv else []
    if len(argv) == 2 and argv[0] == "-":  # a spare: the config comes on stdin, when it comes
        ready, _, _ = select.select([sys.stdin], [], [], float(argv[1]))
        line = sys.stdin.readline() if ready else ""
        if not line.strip():  # not taken in time, or dismissed: nothing to do
            sys.exit(0)
        return json.loads(line)
    if len(argv) != 1:
        raise SystemExit("usage: blender -b SCENE --python _blender_driver.py -- CONFIG_JSON")
    return json.loads(argv[0])


def open_scene(path: str) -> None:
    """A spare opens its chunk's scene itself (Blender opened it from argv otherwise)."""
    try:
        bpy.ops.wm.open_mainfile(filepath=path)
    except RuntimeError as exc:  # worded for the runner's classification: SCENE_MISSING
        say("Unable to open", path + ":", str(exc).strip())
        sys.exit(1)


def set_samples(scene, samples: int) -> None:
    engine = scene.render.engine
    if engine == "CYCLES":
        scene.cycles.samples = samples
    elif engine.startswith("BLENDER_EEVEE"):
        scene.eevee.taa_render_samples = samples
    else:
        say("PILOT_WARNING samples are ignored by the", engine, "engine")


def denoising_off(scene) -> None:
    if hasattr(scene, "cycles"):
        scene.cycles.use_denoising = False
        scene.cycles.use_preview_denoising = False
    for layer in scene.view_layers:
        if hasattr(layer, "cycles"):
            layer.cycles.use_denoising = False


def choose_device(scene, gpus: int) -> None:
    """The CPU unless the task has GPUs; then the first GPU API that lists devices."""
    if not hasattr(scene, "cycles"):
        return
    if gpus <= 0:
        scene.cycles.device = "CPU"
        return
    prefs = bpy.context.preferences.addons["cycles"].preferences
    for api in GPU_APIS:
        try:
            prefs.compute_device_type = api
        except TypeError:  # this build does not know the API
            continue
        if hasattr(prefs, "refresh_devices"):  # Blender 4
            prefs.refresh_devices()
        else:
            prefs.get_devices()
        found = [d for d in prefs.devices if d.type == api]
        if not found:
            continue
        for device in prefs.devices:
            device.use = False
        for device in found[:gpus]:
            device.use = True
        scene.cycles.device = "GPU"
        say("PILOT_WARNING rendering on", api, ", ".join(d.name for d in found[:gpus]))
        return
    say("PILOT_WARNING the task has", gpus, "GPU(s) but this Blender finds none: rendering on CPU")
    scene.cycles.device = "CPU"


def apply_options(scene, config: dict) -> None:
    if config.get("engine"):
        scene.render.engine = config["engine"]
    if config.get("samples") is not None:
        set_samples(scene, int(config["samples"]))
    denoising_off(scene)
    if config.get("resolution"):
        width, height = config["resolution"]
        scene.render.resolution_x = int(width)
        scene.render.resolution_y = int(height)
        scene.render.resolution_percentage = 100
    settings = scene.render.image_settings
    settings.file_format = config.get("file_format") or "PNG"
    if settings.file_format == "JPEG" and settings.color_mode == "RGBA":
        settings.color_mode = "RGB"
    if config.get("threads"):
        scene.render.threads_mode = "FIXED"
        scene.render.threads = int(config["threads"])
    scene.render.use_file_extension = True
    choose_device(scene, int(config.get("gpus") or 0))


def run_body(scene, source: str) -> None:
    """Run the user's body; on an error print its traceback and exit with the script code."""
    # Registering the source lets tracebacks quote the body's lines, not just number them.
    linecache.cache[BODY_FILENAME] = (len(source), None, source.splitlines(True), BODY_FILENAME)
    try:
        code = compile(source, BODY_FILENAME, "exec")
        exec(code, {"bpy": bpy, "scene": scene, "__name__": "__render_body__"})
    except BaseException as exc:
        if isinstance(exc, SystemExit) and exc.code in (None, 0):
            return  # the body ended itself early, successfully
        say("PILOT_SCRIPT_ERROR")
        # Start the traceback at the body: the frame of this function is noise to the user.
        trace = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
        say("".join(traceback.format_exception(type(exc), exc, trace)).rstrip())
        say("PILOT_SCRIPT_ERROR_END")
        sys.exit(SCRIPT_ERROR_EXIT_CODE)


def render_frames(scene, frames: list, outdir: str) -> None:
    os.makedirs(outdir, exist_ok=True)
    extension = EXTENSIONS.get(scene.render.image_settings.file_format, "png")
    for frame in frames:
        scene.frame_set(frame)
        # A still render does not expand "#": name each frame's file here, as the runner does.
        path = os.path.join(outdir, f"frame_{frame:06d}.{extension}")
        scene.render.filepath = path
        try:
            bpy.ops.render.render(write_still=True)
        except Exception:
            say("PILOT_RENDER_ERROR")
            say(f"while rendering frame {frame}:")
            say(traceback.format_exc().rstrip())
            say("PILOT_RENDER_ERROR_END")
            sys.exit(RENDER_ERROR_EXIT_CODE)
        if os.path.exists(path):
            say("PILOT_FRAME", frame, path)
        else:
            say("PILOT_WARNING frame", frame, "was rendered but not saved at", path)


def main() -> None:
    config = read_config()
    if config.get("scene"):  # a spare: it started elsewhere, before the chunk was known
        os.chdir(config["cwd"])
        open_scene(config["scene"])
    scene = bpy.context.scene
    apply_options(scene, config)
    if config.get("body"):
        run_body(scene, config["body"])
    render_frames(scene, [int(f) for f in config["frames"]], config["outdir"])


main()
