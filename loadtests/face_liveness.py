"""Liveness figures on the test photos: what the check measures on live and replayed bursts.

    bash scripts/fetch_test_data.sh && python -m loadtests.face_liveness

For each of the four test photos, a 640x480 gate frame is built and turned into bursts by
loadtests/face_bursts.py: a blink, a head turn, a photo moved in front of the camera
(shifted, rotated, scaled), the same frame saved at four JPEG qualities (camera noise on a
still scene), and one frame replayed. For each burst it prints the two signals the liveness
rule uses (the lowest over the highest eye aspect ratio, and the span of the nose's position
across the face), the score and the verdict, with the configured thresholds. These are the
figures services/face/README.md quotes when it explains how the thresholds were chosen.
"""

from __future__ import annotations

import sys

from loadtests import face_bursts
from services.face.domain import LivenessConfig, liveness
from services.face.face_model import FaceModel

PHOTOS = ("obama", "obama2", "obama3", "biden")


def main() -> int:
    config = LivenessConfig()
    model = FaceModel(image_bytes_max=4_000_000, image_pixels_max=25_000_000)
    print(f"blink: EAR ratio <= {config.blink_ear_ratio_max}; head turn: nose span >= {config.head_turn_min}")
    print(f"{'photo':<8} {'burst':<8} {'EAR ratio':>9} {'nose span':>9} {'score':>6}  verdict")
    for name in PHOTOS:
        raw = face_bursts.photo_bytes(name)
        photo = face_bursts.decode(raw)
        scale = 640 / max(photo.size)
        found = model.observe(raw).landmarks
        frame = face_bursts.gate_frame(photo, {k: [(x / scale, y / scale) for x, y in v] for k, v in found.items()})
        landmarks = model.observe(face_bursts.jpeg(frame)).landmarks
        bursts = {
            "blink": face_bursts.blink_burst(frame, landmarks),
            "turn": face_bursts.turn_burst(frame, landmarks),
            "moved": face_bursts.moved_photo_burst(frame),
            "jpeg": [face_bursts.jpeg(frame, q) for q in (90, 70, 50, 95)],
            "still": face_bursts.still_burst(frame),
        }
        for kind, frames in bursts.items():
            verdict = liveness([model.observe(f) for f in frames], config)
            print(f"{name:<8} {kind:<8} {verdict.blink_ear_ratio:>9.3f} {verdict.head_turn:>9.3f} "
                  f"{verdict.score:>6.2f}  {'live' if verdict.live else 'refused'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
