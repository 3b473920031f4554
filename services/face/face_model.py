"""The face model: decoding images (Pillow) and dlib's models through face_recognition.

The only module that imports face_recognition. It turns image bytes into a
`domain.FaceObservation` (landmarks and the 128-d descriptor) and refuses, each with its
own reason, what it cannot use: bytes that are not a JPEG or PNG (INVALID_IMAGE), images
too large in bytes or pixels (IMAGE_TOO_LARGE, checked from the header before any pixel
is decoded), and images with no face or several (FACE_NOT_FOUND, MULTIPLE_FACES).

Images are analysed at most `ANALYSIS_SIDE_MAX_PX` pixels on their longer side: a gate's
640-pixel frame as it is, a large enrolment photo scaled down (the descriptor of a face
over about 80 pixels wide hardly changes with scale, and detection cost grows with area).
dlib's descriptor network keeps state while it runs, so calls are serialised by a lock.
"""

from __future__ import annotations

import io
import threading
import warnings

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from libs import errors
from services.face.domain import FaceObservation

with warnings.catch_warnings():
    # face_recognition_models finds its model files through pkg_resources, which warns that
    # it is deprecated; setuptools is pinned to a release that still ships it.
    warnings.simplefilter("ignore")
    import face_recognition

# face_recognition switches Pillow to accept truncated images process-wide; a truncated
# upload must be refused instead, so switch it back.
ImageFile.LOAD_TRUNCATED_IMAGES = False

ANALYSIS_SIDE_MAX_PX = 640
FORMATS = ("JPEG", "PNG")


class FaceModel:
    """Face detection, landmarks and descriptors, with input limits from settings."""

    def __init__(self, *, image_bytes_max: int, image_pixels_max: int) -> None:
        if image_bytes_max <= 0 or image_pixels_max <= 0:
            raise ValueError("image limits must be positive")
        self.image_bytes_max = image_bytes_max
        self.image_pixels_max = image_pixels_max
        self._lock = threading.Lock()

    def _decode(self, data: bytes, meta: dict[str, str]) -> np.ndarray:
        if not data:
            raise errors.InvalidArgument("INVALID_IMAGE", "the image is empty", **meta)
        if len(data) > self.image_bytes_max:
            raise errors.InvalidArgument(
                "IMAGE_TOO_LARGE", f"the image has {len(data)} bytes; at most {self.image_bytes_max} are accepted",
                **meta)
        try:
            with Image.open(io.BytesIO(data)) as image:
                if image.format not in FORMATS:
                    raise errors.InvalidArgument("INVALID_IMAGE", f"the image is {image.format}, not JPEG or PNG",
                                                 **meta)
                width, height = image.size
                if width * height > self.image_pixels_max:
                    raise errors.InvalidArgument(
                        "IMAGE_TOO_LARGE",
                        f"the image is {width}x{height} pixels; at most {self.image_pixels_max} pixels are accepted",
                        **meta)
                image.draft("RGB", (ANALYSIS_SIDE_MAX_PX, ANALYSIS_SIDE_MAX_PX))  # JPEG: decode at reduced scale
                rgb = image.convert("RGB")
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
            if isinstance(exc, errors.CityTapError):
                raise
            raise errors.InvalidArgument("INVALID_IMAGE", "the image is not a JPEG or PNG that can be decoded",
                                         **meta) from None
        scale = ANALYSIS_SIDE_MAX_PX / max(rgb.size)
        if scale < 1:
            rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BILINEAR)
        return np.asarray(rgb)

    def observe(self, data: bytes, *, field: str = "image", index: int | None = None) -> FaceObservation:
        """The one face in an image, or a refusal naming what is wrong with it."""
        meta = {"field": field, **({"index": str(index)} if index is not None else {})}
        pixels = self._decode(data, meta)
        with self._lock:
            # A gate's frame shows a near face: look at native scale first, and upsample
            # once (finding faces down to about 40 pixels) only when nothing is found.
            boxes = face_recognition.face_locations(pixels, number_of_times_to_upsample=0)
            if not boxes:
                boxes = face_recognition.face_locations(pixels, number_of_times_to_upsample=1)
            if not boxes:
                raise errors.InvalidArgument("FACE_NOT_FOUND", "no face was found in the image", **meta)
            if len(boxes) > 1:
                raise errors.InvalidArgument("MULTIPLE_FACES", f"{len(boxes)} faces were found; one is needed", **meta)
            landmarks = face_recognition.face_landmarks(pixels, boxes, model="large")[0]
            encoding = face_recognition.face_encodings(pixels, boxes, num_jitters=1, model="small")[0]
        return FaceObservation(landmarks=landmarks, encoding=np.asarray(encoding, dtype=np.float32))
