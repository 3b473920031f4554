"""Camera frames for the face service built from still photos by synthetic transforms.

Tests, the face benchmark and the demo need bursts of gate frames, and all we have are the
four still portraits of the face_recognition sdist (scripts/fetch_test_data.sh). This
module turns one portrait into:

- a gate frame: the face cropped with its surroundings to 640x480, as a camera at a gate
  about half a metre from the rider would see it (the face some 250 pixels wide);
- a blink: both eyes closed by pulling the skin above each eye down over it (the eye opening
  is squeezed into a thin slit at the lower lid), which lowers the eye aspect ratio the way
  a real blink does;
- a head turn: the nose and the middle of the face shifted sideways relative to the jaw and
  ears, which is what a yaw of the head does to a face (the nose stands in front of the face
  plane, so it moves across the face while the outline stays). A flat photo that is moved,
  rotated or tilted cannot do this;
- a still replay: one frame repeated;
- a frame with two faces and one with none.

The transforms work from the landmarks the face service's own model finds, so the same
model that checks liveness says where the eyes and the nose are.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = ROOT / ".local" / "test-data" / "faces"
FRAME_SIZE = (640, 480)

Landmarks = Mapping[str, Sequence[tuple[float, float]]]


def photo_path(name: str) -> Path:
    path = PHOTOS / f"{name}.jpg"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `bash scripts/fetch_test_data.sh`")
    return path


def photo_bytes(name: str) -> bytes:
    return photo_path(name).read_bytes()


def jpeg(image: Image.Image, quality: int = 90) -> bytes:
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def decode(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        return image.convert("RGB")


def _points(landmarks: Landmarks) -> np.ndarray:
    return np.array([p for group in landmarks.values() for p in group], dtype=float)


def gate_frame(photo: Image.Image, landmarks: Landmarks) -> Image.Image:
    """The face of `photo` (whose landmarks are given in `photo`'s own pixels) as a 640x480
    gate frame with the face about 40% of the frame wide."""
    points = _points(landmarks)
    chin = np.asarray(landmarks["chin"], dtype=float)
    face_width = chin[:, 0].max() - chin[:, 0].min()
    cx, cy = points.mean(axis=0)
    width = face_width * 2.6
    height = width * FRAME_SIZE[1] / FRAME_SIZE[0]
    box = (int(cx - width / 2), int(cy - height / 2), int(cx + width / 2), int(cy + height / 2))
    return photo.crop(box).resize(FRAME_SIZE, Image.LANCZOS)


def close_eyes(frame: Image.Image, landmarks: Landmarks, amount: float = 1.0) -> Image.Image:
    """Both eyes closed by `amount` (0 open, 1 shut): the band of skin above each eye is
    stretched down over it and the eye opening squeezed into the bottom of the eye box."""
    if not 0 <= amount <= 1:
        raise ValueError("amount is from 0 to 1")
    pixels = np.asarray(frame).astype(float)
    out = pixels.copy()
    height = pixels.shape[0]
    for eye_name in ("left_eye", "right_eye"):
        eye = np.asarray(landmarks[eye_name], dtype=float)
        x0, x1 = eye[:, 0].min(), eye[:, 0].max()
        eye_width = x1 - x0
        top, bottom = eye[[1, 2], 1].min(), eye[[4, 5], 1].max()
        eye_height = max(bottom - top, 3.0)
        top, bottom = top - 0.35 * eye_height, bottom + 0.15 * eye_height
        eye_height = bottom - top
        lid = 0.8 * eye_height  # skin above the eye that slides down
        line = bottom - eye_height * (1 - 0.9 * amount)
        xa, xb = int(x0 - 0.35 * eye_width), int(x1 + 0.35 * eye_width) + 1
        ya, yb = int(top - lid), int(np.ceil(bottom)) + 1
        rows = np.arange(ya, yb, dtype=float)
        source = rows.copy()
        above = rows < line
        source[above] = (top - lid) + (rows[above] - (top - lid)) * (lid / (line - (top - lid)))
        source[~above] = top + (rows[~above] - line) * ((bottom - top) / max(bottom - line, 1e-6))
        columns = np.arange(xa, xb)
        fade = np.clip(np.minimum((columns - xa) / (0.3 * (xb - xa)), (xb - 1 - columns) / (0.3 * (xb - xa))), 0, 1)
        s0 = np.floor(source).astype(int).clip(0, height - 1)
        s1 = (s0 + 1).clip(0, height - 1)
        weight = (source - s0)[:, None, None]
        patch = pixels[s0][:, columns] * (1 - weight) + pixels[s1][:, columns] * weight
        out[ya:yb, xa:xb] = patch * fade[None, :, None] + pixels[ya:yb, xa:xb] * (1 - fade[None, :, None])
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def turn_head(frame: Image.Image, landmarks: Landmarks, shift: float) -> Image.Image:
    """A head turn: the middle of the face (nose, mouth) moved sideways by `shift` face
    widths, fading out towards the jaw, ears and background, which stay put."""
    pixels = np.asarray(frame).astype(float)
    height, width = pixels.shape[:2]
    nose = np.asarray(list(landmarks["nose_tip"]) + list(landmarks["nose_bridge"]), dtype=float).mean(axis=0)
    chin = np.asarray(landmarks["chin"], dtype=float)
    face_width = chin[:, 0].max() - chin[:, 0].min()
    yy, xx = np.mgrid[0:height, 0:width]
    sigma = 0.22 * face_width
    displacement = shift * face_width * np.exp(-((xx - nose[0]) ** 2 + ((yy - nose[1]) * 0.8) ** 2) / (2 * sigma ** 2))
    source = (xx - displacement).clip(0, width - 1)
    x0 = np.floor(source).astype(int)
    x1 = np.minimum(x0 + 1, width - 1)
    weight = (source - x0)[..., None]
    out = pixels[yy, x0] * (1 - weight) + pixels[yy, x1] * weight
    return Image.fromarray(out.clip(0, 255).astype(np.uint8))


def still_burst(frame: Image.Image, count: int = 4) -> list[bytes]:
    """One photo replayed: the same frame `count` times."""
    return [jpeg(frame)] * count


def blink_burst(frame: Image.Image, landmarks: Landmarks) -> list[bytes]:
    """Open, half closed, closed, open."""
    return [jpeg(frame), jpeg(close_eyes(frame, landmarks, 0.6)), jpeg(close_eyes(frame, landmarks, 1.0)),
            jpeg(frame)]


def turn_burst(frame: Image.Image, landmarks: Landmarks) -> list[bytes]:
    """Facing the camera, turning, turned further, coming back."""
    return [jpeg(frame), jpeg(turn_head(frame, landmarks, 0.06)), jpeg(turn_head(frame, landmarks, 0.12)),
            jpeg(turn_head(frame, landmarks, 0.06))]


def moved_photo_burst(frame: Image.Image) -> list[bytes]:
    """A printed photo held up and moved: shifted, rotated and scaled, but flat."""
    def moved(angle: float, dx: int, dy: int, scale: float) -> Image.Image:
        turned = frame.rotate(angle, resample=Image.BICUBIC, translate=(dx, dy), fillcolor=(128, 128, 128))
        return turned.resize((round(frame.width * scale), round(frame.height * scale)))
    return [jpeg(frame), jpeg(moved(3, 10, 5, 1.0)), jpeg(moved(-4, -12, 8, 0.95)), jpeg(moved(2, 5, -6, 1.05))]


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    """Two frames in one image: two faces."""
    height = max(left.height, right.height)
    canvas = Image.new("RGB", (left.width + right.width, height), (128, 128, 128))
    canvas.paste(left, (0, 0))
    canvas.paste(right, (left.width, 0))
    return canvas


def faceless(size: tuple[int, int] = FRAME_SIZE) -> Image.Image:
    """A frame with no face: a smooth grey gradient."""
    ramp = np.linspace(60, 200, size[0], dtype=np.uint8)
    return Image.fromarray(np.tile(ramp, (size[1], 1))).convert("RGB")
