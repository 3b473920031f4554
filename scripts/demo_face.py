"""The demo's face rider: consent first, enrolment, then matched from a live burst of frames.

`run(env)` runs against the running face service (`make demo` can call it from
scripts/demo.py; on its own: `source infra/env.sh && python scripts/demo_face.py`):

1. the rider's consent to pay transit fares by face is recorded (an enrolment before it is
   refused with CONSENT_REQUIRED, which the demo shows);
2. the rider enrols with one photo (obama.jpg); the service keeps only an encrypted
   template;
3. at a gate camera, a burst of four 640x480 frames of the rider blinking (built from
   another photo, obama3.jpg, by loadtests/face_bursts.py) is matched to the rider;
4. the rider pays by face at the metro gates: a wallet account under the same id, funded as
   a top-up would, taps in and out with the live burst through the real fare gate (which
   asks the face service to check liveness and match), and the fare is charged;
5. the same burst with one frame replayed four times (a photo held up to the camera) is
   refused by the liveness check;
6. unless `keep_enrolled`, the rider's face is deleted and no longer matches.

The photos come from scripts/fetch_test_data.sh, which this runs first. It raises
RuntimeError with the reason when something does not go as shown.
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from pathlib import Path

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from citytap.common.v1 import credential_pb2
from citytap.face.v1 import face_pb2, face_pb2_grpc
from libs.grpc_client import connect, error_reason

ROOT = Path(__file__).resolve().parents[1]

TRANSIT = face_pb2.CONSENT_PURPOSE_TRANSIT_FARES


def _gate_bursts() -> tuple[list[bytes], list[bytes]]:
    """A live burst (a blink) and a still replay of obama3.jpg as 640x480 gate frames."""
    from loadtests import face_bursts
    from services.face.face_model import FaceModel

    model = FaceModel(image_bytes_max=4_000_000, image_pixels_max=25_000_000)
    raw = face_bursts.photo_bytes("obama3")
    photo = face_bursts.decode(raw)
    scale = 640 / max(photo.size)
    found = model.observe(raw).landmarks
    frame = face_bursts.gate_frame(photo, {k: [(x / scale, y / scale) for x, y in v] for k, v in found.items()})
    landmarks = model.observe(face_bursts.jpeg(frame)).landmarks
    return face_bursts.blink_burst(frame, landmarks), face_bursts.still_burst(frame)


def run(env: Mapping[str, str], *, account_id: str | None = None, keep_enrolled: bool = False) -> None:
    print("\n== a face rider: consent, enrolment, and a match at the gate camera", flush=True)
    subprocess.run(["bash", "scripts/fetch_test_data.sh"], cwd=ROOT, check=True, timeout=300)
    from loadtests import face_bursts

    rider = account_id or f"demo-face-{uuid.uuid4().hex[:8]}"
    channel = connect(env["CITYTAP_FACE_ADDRESS"], default_timeout_s=20)
    face = face_pb2_grpc.FaceServiceStub(channel)
    try:
        try:
            face.Enroll(face_pb2.EnrollRequest(account_id=rider, image=face_bursts.photo_bytes("obama")))
            raise RuntimeError("an enrolment without consent was accepted")
        except grpc.RpcError as refused:
            if error_reason(refused) != "CONSENT_REQUIRED":
                raise RuntimeError(f"enrolment without consent failed oddly: {refused}") from None
        print(f"  enrol {rider} before consent        refused: CONSENT_REQUIRED")
        given = Timestamp()
        given.GetCurrentTime()
        face.RecordConsent(face_pb2.RecordConsentRequest(
            consent_id=f"{rider}-consent", account_id=rider, purpose=TRANSIT, retention_days=1095,
            channel=face_pb2.CONSENT_CHANNEL_KIOSK, notice_version="face-notice-1", given_at=given))
        enrolled = face.Enroll(face_pb2.EnrollRequest(account_id=rider, image=face_bursts.photo_bytes("obama")))
        print(f"  consent recorded, enrolled from obama.jpg; template kept until "
              f"{enrolled.retain_until.ToDatetime():%Y-%m-%d} unless used again")

        live, still = _gate_bursts()
        started = time.perf_counter()
        matched = face.Match(face_pb2.MatchRequest(frames=credential_pb2.FaceFrames(frames=live), purpose=TRANSIT,
                                                   reference_id=f"{rider}-tap-1"))
        took_ms = (time.perf_counter() - started) * 1000
        if (matched.outcome, matched.account_id) != (face_pb2.MATCH_OUTCOME_MATCHED, rider):
            raise RuntimeError(f"the live burst did not match the rider: {matched}")
        margin = "no other rider enrolled" if matched.margin >= 2 else f"margin {matched.margin:.3f}"
        print(f"  4 gate frames (a blink, from obama3.jpg)  MATCHED {rider}: distance {matched.distance:.3f}, "
              f"{margin}, {took_ms:.0f} ms")
        _pay_at_the_gates(env, rider, live)
        replay = face.Match(face_pb2.MatchRequest(frames=credential_pb2.FaceFrames(frames=still), purpose=TRANSIT,
                                                  reference_id=f"{rider}-tap-2"))
        if replay.outcome != face_pb2.MATCH_OUTCOME_LIVENESS_FAILED:
            raise RuntimeError(f"a still replay was not refused: {replay}")
        print("  one frame replayed 4 times (a photo)      LIVENESS_FAILED")
        if not keep_enrolled:
            face.Delete(face_pb2.DeleteRequest(account_id=rider, reason=face_pb2.DELETION_REASON_RIDER_REQUEST))
            after = face.Match(face_pb2.MatchRequest(frames=credential_pb2.FaceFrames(frames=live), purpose=TRANSIT,
                                                     reference_id=f"{rider}-tap-3"))
            if after.outcome != face_pb2.MATCH_OUTCOME_NO_MATCH:
                raise RuntimeError(f"a deleted face still matched: {after}")
            print("  face deleted on request; the same burst   NO_MATCH")
    finally:
        channel.close()


FUND_MINOR = 20_000  # NT$200
ENTRY_GATE, EXIT_GATE = "HBR-G1", "UNI-G2"  # Harbour to University, 8.0 km: NT$25


def _pay_at_the_gates(env: Mapping[str, str], rider: str, frames: list[bytes]) -> None:
    """The enrolled rider taps in and out by face; the fare gate matches each burst."""
    from citytap.fare_gate.v1 import fare_gate_pb2, fare_gate_pb2_grpc
    from citytap.wallet.v1 import wallet_pb2, wallet_pb2_grpc
    from loadtests.taps import LedgerFunder  # credits as a succeeded top-up does

    wallet_channel = connect(env["CITYTAP_WALLET_ADDRESS"], default_timeout_s=5)
    gate_channel = connect(env["CITYTAP_FARE_GATE_ADDRESS"], default_timeout_s=20)
    try:
        wallet = wallet_pb2_grpc.WalletServiceStub(wallet_channel)
        wallet.CreateAccount(wallet_pb2.CreateAccountRequest(account_id=rider))
        funder = LedgerFunder(dict(env), pool_size=1)
        try:
            funder(rider, FUND_MINOR, f"fund-{rider}")
        finally:
            funder.close()
        gate = fare_gate_pb2_grpc.FareGateServiceStub(gate_channel)
        now = datetime.now(timezone.utc)
        answers = []
        for gate_id, direction, at in ((ENTRY_GATE, fare_gate_pb2.TAP_DIRECTION_ENTRY, now - timedelta(minutes=20)),
                                       (EXIT_GATE, fare_gate_pb2.TAP_DIRECTION_EXIT, now)):
            request = fare_gate_pb2.TapRequest(tap_id=str(uuid.uuid4()), gate_id=gate_id, direction=direction,
                                               credential=credential_pb2.Credential(
                                                   face_frames=credential_pb2.FaceFrames(frames=frames)))
            request.tapped_at.FromDatetime(at)
            started = time.perf_counter()
            answer = gate.Tap(request)
            took_ms = (time.perf_counter() - started) * 1000
            answers.append(answer)
            what = (f"held TWD {answer.amount_held.amount_minor / 100:.2f}" if direction == fare_gate_pb2.TAP_DIRECTION_ENTRY
                    else f"fare TWD {answer.fare_charged.amount_minor / 100:.2f}")
            print(f"  face tap at {gate_id:<7} {fare_gate_pb2.TapDecision.Name(answer.decision).removeprefix('TAP_DECISION_'):<5}"
                  f" {what}  ({took_ms:.0f} ms: liveness and match of 4 frames, then the fare)")
        if any(a.decision != fare_gate_pb2.TAP_DECISION_OPEN for a in answers):
            raise RuntimeError(f"the face rider was refused at the gate: {answers}")
        balance = wallet.GetBalance(wallet_pb2.GetBalanceRequest(account_id=rider)).balance.amount_minor
        if balance != FUND_MINOR - answers[1].fare_charged.amount_minor:
            raise RuntimeError(f"the face rider's balance is {balance}, expected {FUND_MINOR} less the fare")
        print(f"  balance TWD {balance / 100:.2f} = TWD {FUND_MINOR / 100:.2f} funded - "
              f"TWD {answers[1].fare_charged.amount_minor / 100:.2f} fare, paid by face")
    finally:
        wallet_channel.close()
        gate_channel.close()


if __name__ == "__main__":
    run(os.environ)
