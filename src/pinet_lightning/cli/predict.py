"""``pinet-predict``: poses on a folder of images or a video (``conf/predict.yaml``).

    pinet-predict ckpt_path=<.ckpt | model.pt | .onnx> input=<folder | image | video> \
        output_dir=<dir>

An ``.onnx`` graph (``pinet-export``) runs with onnxruntime; its decoding is fixed in the graph,
so only the ``decode.*`` settings given on the command line reach it (one the graph cannot
change is an error naming it).

An image that cannot be read (missing, a folder named like an image, truncated, corrupt) is
skipped with a warning; the run goes on and lists them at the end (``unreadable.json``).
Writes into ``output_dir`` (default: the run directory), ``results.json`` even when the run
stops early (for the images read until then), each JSON file whole or not at all (a full
disk leaves the previous file and an error naming it):

- ``results.json``: COCO keypoint results (``image_id``, ``category_id`` 1, ``keypoints``
  ``[x, y, score] * K`` in the original pixels, ``score``);
- ``image_ids.json``: ``[{"id", "file_name"}]`` (images read: sorted file names, ids from 1;
  video: ``frame_000000`` ..., ids = frame number + 1);
- ``images/<name>`` or ``frames/frame_NNNNNN.jpg`` with the skeletons drawn, and for a video
  ``<video name>_poses.mp4``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pinet_lightning.cli.config import run_hydra
from pinet_lightning.cli.run import load_inference_net, save_config, setup_threads
from pinet_lightning.core.atomic import write_json
from pinet_lightning.core.config import to_plain
from pinet_lightning.inference.decoding import DecodeConfig
from pinet_lightning.inference.predictor import load_image
from pinet_lightning.inference.visualize import draw_poses, save_image

if TYPE_CHECKING:
    from pinet_lightning.core.layouts import Layout
    from pinet_lightning.inference.predictor import Person, Predictor

__all__ = ["main", "predict", "graph_decode_overrides", "IMAGE_SUFFIXES", "VIDEO_SUFFIXES"]

log = logging.getLogger("pinet_lightning.predict")

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg")


Item = tuple[str, "np.ndarray | Exception"]


def _image_items(files: list[Path]) -> Iterator[Item]:
    """(name, RGB image) per file, or (name, the error) for a file that cannot be read."""

    for path in files:
        try:
            yield path.name, load_image(path)
        except (OSError, ValueError) as err:  # missing, a folder, truncated, corrupt
            yield path.name, err


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"pinet-predict: no images ({', '.join(IMAGE_SUFFIXES)}) in "
                                f"{folder}")
    return files


def _video_items(path: Path, max_frames: int | None) -> Iterator[Item]:
    capture = cv2.VideoCapture(str(path))
    if not capture.isOpened():
        raise OSError(f"pinet-predict: OpenCV cannot open the video {path} (unknown codec?); "
                      "extract its frames into a folder and pass that folder as input")
    try:
        index = 0
        while max_frames is None or index < max_frames:
            ok, frame = capture.read()
            if not ok:
                break
            yield f"frame_{index:06d}.jpg", cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
            index += 1
    finally:
        capture.release()


def _video_fps(path: Path) -> float:
    capture = cv2.VideoCapture(str(path))
    fps = capture.get(cv2.CAP_PROP_FPS) if capture.isOpened() else 0.0
    capture.release()
    return float(fps) if fps and fps > 0 else 25.0


def predict(cfg: DictConfig) -> dict[str, Any]:
    """Run the predictor over ``cfg.input``; returns a summary (counts and paths)."""
    setup_threads(cfg)
    source, single_image, is_video = _input_source(cfg)
    out_dir = _output_dir(cfg)
    predictor = _load_predictor(cfg, source)
    if is_video:
        items = _video_items(source, cfg.get("max_frames"))
    else:
        items = _image_items([source] if single_image else _image_files(source))
    outputs = _Outputs(cfg, out_dir, source, is_video, predictor.layout)
    _run_predictor(predictor, items, outputs)
    return outputs.summary()


def _input_source(cfg: DictConfig) -> tuple[Path, bool, bool]:
    """``cfg.input`` as (path, a single image, a video); an error when it does not exist."""
    source = Path(str(cfg.input)).expanduser()
    if not source.exists():
        raise FileNotFoundError(f"pinet-predict: input={cfg.input} does not exist (a folder of "
                                "images, an image or a video file)")
    single_image = source.is_file() and source.suffix.lower() in IMAGE_SUFFIXES
    is_video = source.is_file() and not single_image
    if is_video and source.suffix.lower() not in VIDEO_SUFFIXES:
        log.warning("%s: not a known video suffix %s; trying OpenCV anyway", source,
                    VIDEO_SUFFIXES)
    return source, single_image, is_video


def _output_dir(cfg: DictConfig) -> Path:
    """The output folder (``output_dir``, else the run directory), created, with the config."""
    out_dir = Path(str(cfg.get("output_dir") or cfg.paths.output_dir)).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out_dir / "predict_config.yaml")
    return out_dir


def _load_predictor(cfg: DictConfig, source: Path) -> Predictor:
    """The predictor for ``cfg.ckpt_path`` with the run's device, size, batch and decoding."""
    decode = to_plain(cfg.decode)
    if Path(str(cfg.ckpt_path)).suffix.lower() == ".onnx":
        decode = graph_decode_overrides(decode, _command_line())
    # input_size null: the codec the checkpoint records (its input size)
    predictor = load_inference_net(cfg.ckpt_path, device=str(cfg.get("device", "auto")),
                                   input_size=cfg.get("input_size"),
                                   batch_size=int(cfg.get("batch_size", 1)),
                                   trust_checkpoint=bool(cfg.get("trust_checkpoint", False)),
                                   **decode)
    log.info("predicting on %s with input size %d on %s (%s)", source, predictor.input_size,
             predictor.device, "onnxruntime" if predictor.graph is not None else "PyTorch")
    return predictor


def _command_line() -> list[str] | None:
    """The run's command-line overrides, None outside a Hydra run (a composed config)."""
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else None


def graph_decode_overrides(decode: dict[str, Any],
                           command_line: list[str] | None) -> dict[str, Any]:
    """The ``decode.*`` settings meant for an exported graph, which keeps its own for the
    others: those named on the command line, or without one (a composed config) those that
    differ from ``DecodeConfig``'s defaults."""
    given = DecodeConfig.from_any(decode).to_dict()
    if command_line is not None:
        named = {o.split("=", 1)[0].lstrip("+~") for o in command_line}
        return {k: v for k, v in given.items() if f"decode.{k}" in named}
    defaults = DecodeConfig().to_dict()
    return {k: v for k, v in given.items() if v != defaults[k]}


def _run_predictor(predictor: Predictor, items: Iterator[Item], outputs: _Outputs) -> None:
    """Predict batch by batch, skipping unreadable images; outputs written whatever happens."""
    batch: list[tuple[str, np.ndarray]] = []

    def flush() -> None:
        people_per_image = predictor.predict([im for _, im in batch])
        for (name, image), people in zip(batch, people_per_image, strict=True):
            outputs.add(name, image, people)
        batch.clear()

    try:
        for name, item in items:
            if isinstance(item, Exception):  # reported at the end; the others go on
                outputs.skip(name, item)
                continue
            batch.append((name, item))
            if len(batch) >= predictor.batch_size:
                flush()
        if batch:
            flush()
    finally:
        # whatever happened, the results of the images read so far are written
        outputs.close()


class _Outputs:
    """What a run writes: COCO results, the image list, unreadable inputs, drawn pictures."""

    def __init__(self, cfg: DictConfig, out_dir: Path, source: Path, is_video: bool,
                 layout: Layout) -> None:
        self.cfg, self.out_dir, self.source, self.is_video = cfg, out_dir, source, is_video
        self.layout = layout
        self.drawn_dir = out_dir / ("frames" if is_video else "images")
        self.video_path = out_dir / f"{source.stem}_poses.mp4"
        self.writer: Any = None
        self.results: list[dict] = []
        self.image_ids: list[dict] = []
        self.unreadable: list[dict] = []

    def skip(self, name: str, err: Exception) -> None:
        """Note an image that could not be read."""
        log.warning("skipping %s: %s", name, err)
        self.unreadable.append({"file_name": name, "error": str(err)})

    def add(self, name: str, image: np.ndarray, people: list[Person]) -> None:
        """Record one image's poses and draw them (a picture, a video frame)."""
        image_id = len(self.image_ids) + 1
        self.image_ids.append({"id": image_id, "file_name": name,
                               "height": int(image.shape[0]), "width": int(image.shape[1])})
        for person in people:
            self.results.append({"image_id": image_id, "category_id": 1,
                                 "keypoints": [round(float(v), 3)
                                               for v in person.keypoints.reshape(-1)],
                                 "score": float(person.score)})
        if self.cfg.get("draw", True):
            self._draw(name, image, people)

    def _draw(self, name: str, image: np.ndarray, people: list[Person]) -> None:
        """Save the image with the skeletons drawn; append it to the video for a video."""

        cfg = self.cfg
        poses = (np.stack([p.keypoints for p in people]) if people
                 else np.zeros((0, self.layout.num_keypoints, 3)))
        scores = np.array([p.score for p in people])
        canvas = draw_poses(image, poses, self.layout, scores,
                            threshold=float(cfg.threshold), min_score=float(cfg.min_score))
        save_image(self.drawn_dir / name, canvas)
        if self.is_video and cfg.get("write_video", True):
            if self.writer is None:
                self.writer = cv2.VideoWriter(str(self.video_path),
                                              cv2.VideoWriter_fourcc(*"mp4v"),
                                              _video_fps(self.source),
                                              (canvas.shape[1], canvas.shape[0]))
            self.writer.write(cv2.cvtColor(canvas, cv2.COLOR_RGB2BGR))

    def close(self) -> None:
        """Finish the video and write the JSON files, each whole or not at all (a full disk
        leaves the previous file, if any); one that cannot be written does not keep the
        others from being written, and the error names every such file."""
        out_dir = self.out_dir
        if self.writer is not None:
            self.writer.release()
        files = [("results.json", self.results, None), ("image_ids.json", self.image_ids, 1)]
        if self.unreadable:
            files.append(("unreadable.json", self.unreadable, 1))
        failed: list[OSError] = []
        for name, content, indent in files:
            try:
                write_json(out_dir / name, content, indent=indent)
            except OSError as err:
                failed.append(err)
        if failed:
            message = "pinet-predict: " + "; ".join(e.strerror or str(e) for e in failed)
            raise (OSError(failed[0].errno, message) if failed[0].errno is not None
                   else OSError(message)) from failed[0]

    def summary(self) -> dict[str, Any]:
        """Log the counts; the summary (counts and paths)."""
        out_dir, results, unreadable = self.out_dir, self.results, self.unreadable
        summary = {"images": len(self.image_ids), "poses": len(results),
                   "unreadable": len(unreadable),
                   "results_json": str(out_dir / "results.json"), "output_dir": str(out_dir)}
        if self.writer is not None:
            summary["video"] = str(self.video_path)
        log.info("%d %s, %d poses -> %s", len(self.image_ids),
                 "frames" if self.is_video else "images", len(results), out_dir)
        if unreadable:
            log.warning("%d images could not be read (listed in %s): %s", len(unreadable),
                        out_dir / "unreadable.json",
                        "; ".join(f"{u['file_name']}: {u['error']}" for u in unreadable[:10]))
        return summary


def main() -> None:
    """Console entry point ``pinet-predict``."""
    run_hydra("predict", predict)


if __name__ == "__main__":
    main()
