import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import CELEBDF_ARGS, REPO

from shards.synth.celebdf import camera_frames, photo_paths, portrait, write_video
from shards.video import even_indices


def detect(path, checkpoint, *args):
    return subprocess.run([sys.executable, "-m", "pipeline.detect", str(path), "--checkpoint", str(checkpoint), *args],
                          cwd=REPO, capture_output=True, text=True, timeout=300)


def detect_here(capsys, path, checkpoint, *args) -> tuple[int, str]:
    """The same command line in this process, for refusals (no 3 s of start-up): its exit code and its stderr."""
    from pipeline.detect import main

    try:
        code = main([str(path), "--checkpoint", str(checkpoint), *map(str, args)])
    except SystemExit as e:  # argparse's refusals
        code = e.code
    return code, capsys.readouterr().err


def as_json(result):
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout)


def test_a_video_gets_per_frame_scores_and_a_verdict(uncalibrated_checkpoint, celebdf_root):
    smoke_checkpoint = uncalibrated_checkpoint  # an older checkpoint: 0.5 with a note
    video = sorted((celebdf_root / "Celeb-synthesis").glob("*.mp4"))[0]
    out = as_json(detect(video, smoke_checkpoint, "--json", "--frames", "5"))
    decoded = int(cv2.VideoCapture(str(video)).get(cv2.CAP_PROP_FRAME_COUNT))
    assert out["kind"] == "video" and [f["frame"] for f in out["frames"]] == even_indices(decoded, 5)
    assert out["frames_with_face"] == 5 and all(f["faces"] == 1 and 0 <= f["score"] <= 1 for f in out["frames"])
    assert out["score"] == pytest.approx(np.mean([f["score"] for f in out["frames"]]))
    assert out["threshold"] == 0.5 and out["threshold_calibrated"] is False
    assert out["verdict"] == ("fake" if out["score"] > 0.5 else "real")
    assert any("has no calibrated threshold" in n and "using 0.5" in n for n in out["notes"])
    text = detect(video, smoke_checkpoint, "--frames", "5")
    assert text.returncode == 0 and f"verdict: {out['verdict'].upper()}" in text.stdout
    assert "has no calibrated threshold" in text.stderr  # the warning, besides the report's note


def test_an_image_with_two_faces_counts_the_largest(smoke_checkpoint, tmp_path):
    # The shards keep a frame's largest face, so evaluation and calibration saw one such face a frame: the verdict
    # must rest on it, not on the most suspicious of several (which only ever raises a real video's score).
    from pipeline.detect import Detector

    det = Detector(smoke_checkpoint)
    photos = [cv2.imread(str(p)) for p in photo_paths()[:4]]
    for big, small in ((a, b) for a in photos for b in photos if a is not b):  # a pair whose smaller face scores higher
        small = cv2.resize(small, None, fx=0.7, fy=0.7)
        pad = np.zeros((big.shape[0] - small.shape[0], small.shape[1], 3), np.uint8)
        both = np.hstack([big, np.vstack([small, pad])])
        rgb = np.ascontiguousarray(both[:, :, ::-1])
        faces = det.faces.detect(rgb)
        scores = det.score_faces([det.crop(rgb, f).image for f in faces])
        if len(faces) == 2 and scores[1] > scores[0]:
            break
    else:
        pytest.fail("no pair of photos whose smaller face scores higher")
    cv2.imwrite(str(tmp_path / "two.png"), both)
    (tmp_path / "renamed.mp4").write_bytes((tmp_path / "two.png").read_bytes())  # the content decides, not the name
    for name in ("two.png", "renamed.mp4"):
        out = as_json(detect(tmp_path / name, smoke_checkpoint, "--json"))
        frame = out["frames"][0]
        assert out["kind"] == "image" and frame["faces"] == 2 and frame["box"] == list(faces[0].box)
        assert frame["score"] == pytest.approx(scores[0]) and frame["other_faces_max_score"] == pytest.approx(scores[1])
        assert any("largest face counts" in n for n in out["notes"])


def test_confident_scores_stay_apart(smoke_checkpoint):
    # In float32, sigmoid(-logit) is exactly 1 below a logit of -16.6: confident fakes would all tie.
    from pipeline.detect import Detector

    det = Detector(smoke_checkpoint)
    crops = []
    for path in photo_paths()[:4]:
        rgb = cv2.imread(str(path))[:, :, ::-1].copy()
        crops.append(det.crop(rgb, det.faces.detect(rgb)[0]).image)
    plain = det.score_faces(crops)
    det.D.register_forward_hook(lambda module, inputs, logits: logits - 25)  # every face called fake, confidently
    confident = det.score_faces(crops)
    assert max(confident) < 1 and np.argsort(confident).tolist() == np.argsort(plain).tolist()


def test_frames_without_a_face_are_counted_not_scored(smoke_checkpoint, tmp_path):
    person = portrait(0, 0)
    faces = camera_frames(person.image, person.box, seed=1, n_frames=20)
    noise = [np.random.default_rng(i).integers(0, 255, faces[0].shape, dtype=np.uint8) for i in range(20)]
    write_video(tmp_path / "half.mp4", faces + noise)
    out = as_json(detect(tmp_path / "half.mp4", smoke_checkpoint, "--json", "--frames", "8"))
    assert out["frames_looked_at"] == 8 and 0 < out["frames_without_face"] < 8
    assert all((f["score"] is None) == (f["faces"] == 0) for f in out["frames"])
    assert any("had no face" in n for n in out["notes"])


def test_large_frames_are_shrunk_as_they_decode_and_their_faces_still_found(smoke_checkpoint, tmp_path):
    # 32 frames of 8K video would hold 3.2 GB and cost dlib minutes a frame: frames over 1920 px on their long side
    # are shrunk as they decode, images too.
    from pipeline.detect import Detector, read_frames

    face = cv2.imread(str(photo_paths()[0]))  # Grace Hopper, 512 x 600
    big = cv2.resize(face, (2400, 2800), interpolation=cv2.INTER_CUBIC)  # 6.7 megapixels, 2800 px tall
    cv2.imwrite(str(tmp_path / "big.png"), big)
    wide = np.zeros((1440, 2560, 3), np.uint8)
    wide[:, 980:1580] = cv2.resize(face, (600, 1440))[:, :, :]
    writer = cv2.VideoWriter(str(tmp_path / "wide.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 10, (2560, 1440))
    for _ in range(3):
        writer.write(wide)
    writer.release()
    kind, frames = read_frames(tmp_path / "big.png", 1)
    assert kind == "image" and frames[0][1].shape == (1920, round(2400 * 1920 / 2800), 3)
    kind, frames = read_frames(tmp_path / "wide.avi", 2)
    assert kind == "video" and [f.shape for _, f in frames] == [(1080, 1920, 3)] * 2
    out, _ = Detector(smoke_checkpoint).detect(tmp_path / "big.png")
    assert out["frames_with_face"] == 1 and max(out["frames"][0]["box"]) <= 1920


def test_a_video_named_with_a_colon_is_read_from_a_relative_path(tmp_path, monkeypatch):
    # FFmpeg reads `take:2.mp4` as the URL of a protocol named "take": the user's own file name, from the CLI.
    from pipeline.detect import read_frames

    write_video(tmp_path / "take:2.mp4", [np.full((48, 64, 3), 90 + 10 * i, np.uint8) for i in range(6)])
    monkeypatch.chdir(tmp_path)
    kind, frames = read_frames(Path("take:2.mp4"), 3)
    assert kind == "video" and [i for i, _ in frames] == [0, 2, 5]


def test_a_video_whose_frames_do_not_convert_is_not_media(tmp_path, celebdf_root, monkeypatch):
    import shards.video
    from pipeline.detect import NotMediaError, read_frames

    capture = cv2.VideoCapture

    class NeverConverts:  # a fault no real file here produces: every frame decodes, none converts
        def __init__(self, path):
            self.cap = capture(path)

        def retrieve(self):
            return False, None

        def __getattr__(self, name):
            return getattr(self.cap, name)

    video = sorted((celebdf_root / "Celeb-real").glob("*.mp4"))[0]
    monkeypatch.setattr(shards.video.cv2, "VideoCapture", NeverConverts)
    with pytest.raises(NotMediaError, match="is neither an image nor a video that can be decoded"):
        read_frames(video, 4)


def _image_bytes(fmt: str) -> bytes:
    import io

    from PIL import Image

    rgb = cv2.imread(str(photo_paths()[0]))  # a real face: each of these decodes, and is still refused by name
    if fmt == "GIF":
        out = io.BytesIO()
        Image.fromarray(rgb[:, :, ::-1]).save(out, "GIF")
        return out.getvalue()
    if fmt in ("HEIC", "AVIF"):  # no encoder here: an ISO-BMFF file type box with the phone's brands, then junk
        brand = b"heic" if fmt == "HEIC" else b"avif"
        return b"\0\0\0\x1cftyp" + brand + b"\0\0\0\0mif1" + brand + b"\0" * 64
    return cv2.imencode({"WebP": ".webp", "BMP": ".bmp", "TIFF": ".tiff"}[fmt], rgb)[1].tobytes()


@pytest.mark.parametrize("fmt", ["HEIC", "AVIF", "WebP", "GIF", "BMP", "TIFF"])
def test_an_image_in_a_format_not_read_here_is_named_with_the_fix(tmp_path, fmt):
    from pipeline.detect import NotMediaError, read_frames

    path = tmp_path / "photo.jpg"  # the name says JPEG; the content decides
    path.write_bytes(_image_bytes(fmt))
    with pytest.raises(NotMediaError, match=rf"photo.jpg is a {fmt} image, which is not read here: save it as JPEG or PNG first\."):
        read_frames(path, 4)


def test_text_that_begins_as_a_bmp_would_is_not_called_one(tmp_path):
    from pipeline.detect import NotMediaError, read_frames

    path = tmp_path / "notes.jpg"
    path.write_bytes(b"BMW service notes: oil, brakes, tyres")  # "BM", but no zero reserved words after the size
    with pytest.raises(NotMediaError, match="notes.jpg is neither an image nor a video that can be decoded"):
        read_frames(path, 4)


@pytest.mark.parametrize("content, message", [
    (b"just text", "is neither an image nor a video"),
    (None, "no face was found"),
    ("folder", "is a folder: pass a video or an image file"),
])
def test_unusable_input_is_a_clear_error(smoke_checkpoint, tmp_path, capsys, content, message):
    path = tmp_path / "input.jpg"
    if content is None:
        cv2.imwrite(str(path), np.full((200, 200, 3), 127, np.uint8))
    elif content == "folder":
        path.mkdir()
    else:
        path.write_bytes(content)
    code, stderr = detect_here(capsys, path, smoke_checkpoint)
    assert code == 2 and message in stderr


def test_a_missing_input_is_named_before_the_checkpoint_is_loaded(tmp_path):
    result = detect(tmp_path / "clip.mp4", tmp_path / "no-such.pt")  # neither exists: the input is checked first
    assert result.returncode == 2 and "clip.mp4 does not exist: pass a video or an image file" in result.stderr


def test_a_device_that_is_not_here_is_refused(smoke_checkpoint, tmp_path, capsys):
    import torch

    image = tmp_path / "any.jpg"
    cv2.imwrite(str(image), np.full((64, 64, 3), 127, np.uint8))
    for device, message in (("gpu", "--device gpu is not a device"), ("cuda", "--device cuda: this machine has no CUDA device")):
        if device == "cuda" and torch.cuda.is_available():
            continue
        code, stderr = detect_here(capsys, image, smoke_checkpoint, "--device", device)
        assert code == 2 and message in stderr


def test_a_file_that_cannot_be_read_is_one_sentence(smoke_checkpoint):
    # A file there but not readable (tests run as root here, which reads past any mode: /proc/self/mem is a file
    # whose first bytes fail to read, EIO).
    result = detect("/proc/self/mem", smoke_checkpoint)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "/proc/self/mem cannot be read (Input/output error): check its permissions" in result.stderr


def test_the_size_limits_are_options_and_the_refusal_names_the_one_to_raise(smoke_checkpoint, tmp_path, celebdf_root, capsys):
    image = tmp_path / "wide.jpg"
    cv2.imwrite(str(image), np.full((300, 400, 3), 127, np.uint8))
    video = sorted((celebdf_root / "Celeb-real").glob("*.mp4"))[0]
    for path, option, value, message in ((image, "--max-pixels", "100000", "the limit of 0.1 megapixels a frame (at least 400x300)"),
                                         (video, "--max-video-frames", "3", "frames, more than the limit of 3: send a shorter")):
        code, stderr = detect_here(capsys, path, smoke_checkpoint, option, value)
        assert code == 2 and message in stderr, stderr[-2000:]
        assert f"To check it all the same, raise {option}." in stderr
    code, stderr = detect_here(capsys, image, smoke_checkpoint, "--max-pixels", "120000")  # within the limit: on to find no face
    assert code == 2 and "no face was found" in stderr


@pytest.mark.gpu
def test_a_face_gets_the_same_tensor_wherever_it_sits_in_a_gpu_batch():
    # The hardware JPEG decoder takes the first hw_decoder_load of a batch on an A100/H100, and its pixels differ from
    # the CUDA decoder's: detection decodes every face on the one (pipeline.data.dali.SCORING_HW_DECODER_LOAD).
    import torch

    from pipeline.data.preprocess import FacePreprocessor

    crop = np.random.default_rng(0).integers(0, 256, (256, 256, 3), dtype=np.uint8)  # any JPEG shows it
    out = FacePreprocessor(128, "cuda")([crop] * 64)
    assert torch.equal(out, out[:1].expand_as(out))


@pytest.mark.gpu
def test_a_cuda_device_this_machine_lacks_is_refused(tmp_path):
    import torch

    image = tmp_path / "any.jpg"
    cv2.imwrite(str(image), np.full((64, 64, 3), 127, np.uint8))
    count = torch.cuda.device_count()
    result = detect(image, tmp_path / "never-read.pt", "--device", f"cuda:{count}")  # the device is checked first
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert f"--device cuda:{count}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}" in result.stderr


@pytest.mark.parametrize("frames", ["0", "-1"])
def test_a_frame_count_below_one_is_refused(smoke_checkpoint, tmp_path, capsys, frames):
    code, stderr = detect_here(capsys, tmp_path / "any.mp4", smoke_checkpoint, "--frames", frames)
    assert code == 2 and "--frames: " in stderr and "is not a positive integer" in stderr


def test_the_calibrated_threshold_of_the_checkpoint_decides_the_verdict(sbi_checkpoint, celebdf_root):
    import torch

    threshold = torch.load(sbi_checkpoint, weights_only=True)["threshold"]
    assert 0 < threshold < 1
    video = sorted((celebdf_root / "Celeb-real").glob("*.mp4"))[0]
    out = as_json(detect(video, sbi_checkpoint, "--json", "--frames", "3"))
    assert out["threshold"] == pytest.approx(threshold) and not any("threshold" in n for n in out["notes"])
    assert out["verdict"] == ("fake" if out["score"] > threshold else "real")


def test_a_threshold_calibrated_at_an_earlier_step_is_used_with_a_note(sbi_checkpoint, tmp_path):
    # A checkpoint saved where validation did not run (a stop on a signal, another clock) carries the last one's.
    import torch

    from pipeline.detect import Detector

    state = torch.load(sbi_checkpoint, weights_only=True)
    assert state["calibration"]["step"] == state["step"]  # the run's last checkpoint: its own
    state["calibration"]["step"] = state["step"] - 1
    torch.save(state, tmp_path / "stale.pt")
    out, _ = Detector(tmp_path / "stale.pt").detect(photo_paths()[0])
    assert out["threshold"] == pytest.approx(state["threshold"]) and out["threshold_calibrated"] is True
    assert [n for n in out["notes"] if "threshold" in n] == [
        f"checkpoint {tmp_path / 'stale.pt'} is of step {state['step']}, but its threshold was calibrated on the weights of "
        f"step {state['step'] - 1}: verdicts near it may be wrong; the run's last checkpoint, or one saved at a validation "
        "step (train.val_every_steps), carries its own"]


def test_a_frame_gives_the_same_tensor_through_the_shards_and_through_detect(sbi_checkpoint, celebdf_root, celebdf_shards):
    """detect's input is the training input: the same crop, JPEG round trip, decode and resize, also where the
    shards were made at another crop size than the tool's default (the checkpoint records theirs)."""
    import torch

    from pipeline.data import DataConfig, build_loader
    from pipeline.detect import Detector
    from pipeline.faces import FACE_SIZE
    from shards.video import sample_frames

    assert celebdf_shards.manifest["faces"] == {"face_size": 128, "face_scale": 1.3, "upsample": 1} and FACE_SIZE == 256
    detector = Detector(sbi_checkpoint)  # trained on those shards
    cfg = DataConfig(shards=str(celebdf_shards.out_dir), split="test", batch_size=2, threads=1, flip=False, shuffle=False,
                     with_meta=True, drop_last=False, image_size=detector.image_size)
    with build_loader(cfg) as data:
        loaded = {k: img for b in data for k, img in zip(b.keys, b.images)}
    key = sorted(loaded)[0]  # test-000000.tar/<folder>_<video>_<frame>
    folder, rest = key.split("/")[1].split("_", 1)
    video, frame = rest.rsplit("_", 1)
    rgb = dict(sample_frames(str(celebdf_root / folder / f"{video}.mp4"), CELEBDF_ARGS["frames_per_video"]).frames)[int(frame)]
    detected = detector.preprocess([detector.crop(rgb, detector.faces.largest(rgb)).image])[0]
    assert torch.equal(detected, loaded[key])


def test_a_detection_past_its_deadline_stops_with_a_clear_error(smoke_checkpoint, celebdf_root, monkeypatch):
    import time

    from pipeline.detect import Detector, TooSlowError

    video = sorted((celebdf_root / "Celeb-real").glob("*.mp4"))[0]
    detector = Detector(smoke_checkpoint)
    # Past it already: the decoding itself stops (a long video would otherwise decode to its end first).
    with pytest.raises(TooSlowError, match=r"took too long to check: send a shorter or smaller video"):
        detector.detect(video, 4, deadline=time.monotonic() - 1)
    # Past it while the faces are looked at (a second a frame, on a slow machine): the work stops at the first frame
    # that ends past it, the second, not at the decoder's next look at the clock (every 16 frames: after the third).
    from shards.video import DEADLINE_EVERY_FRAMES, probe
    assert even_indices(probe(str(video))[0], 8)[2] < DEADLINE_EVERY_FRAMES
    look, looked = Detector._look, []

    def slow(self, rgb):
        looked.append(1)
        time.sleep(1)
        return look(self, rgb)

    monkeypatch.setattr(Detector, "_look", slow)
    with pytest.raises(TooSlowError, match=r"took too long to check: send a shorter or smaller video"):
        detector.detect(video, 8, deadline=time.monotonic() + 1.5)
    assert 1 <= len(looked) <= 2
    monkeypatch.undo()
    assert detector.detect(video, 4, deadline=time.monotonic() + 600)[0]["frames_looked_at"] == 4


def test_a_webm_or_mkv_whose_count_is_wrong_has_each_frame_looked_at_once(smoke_checkpoint, tmp_path):
    # Matroska holds no frame count: FFmpeg estimates one from the duration, and a cut file (an upload stopped short)
    # claims every frame its header's duration holds. Counted first, no face is looked at twice.
    from pipeline.detect import Detector

    person = portrait(0, 0)
    frames = camera_frames(person.image, person.box, seed=1, n_frames=40)
    writer = cv2.VideoWriter(str(tmp_path / "whole.mkv"), cv2.VideoWriter_fourcc(*"MJPG"), 25, frames[0].shape[1::-1])
    for frame in frames:
        writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
    writer.release()
    whole = (tmp_path / "whole.mkv").read_bytes()
    (tmp_path / "cut.mkv").write_bytes(whole[:len(whole) * 3 // 5])
    capture = cv2.VideoCapture(str(tmp_path / "cut.mkv"))
    claimed, decoded = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)), 0
    while capture.grab():
        decoded += 1
    capture.release()
    assert claimed == 40 and 0 < decoded < 40
    detector, looked = Detector(smoke_checkpoint), []
    look = detector._look

    def counted(rgb):
        looked.append(1)
        return look(rgb)

    detector._look = counted
    out, _ = detector.detect(tmp_path / "cut.mkv", 8)
    assert [f["frame"] for f in out["frames"]] == even_indices(decoded, 8) and len(looked) == 8


def test_a_long_video_is_looked_at_one_frame_at_a_time(smoke_checkpoint, tmp_path):
    # `--frames` as high as a video is long must not hold every sampled frame at once (60 frames of 4K video
    # shrunk to 1920 px would be 370 MB): each frame is looked at as it decodes, and only its face crop is kept.
    import tracemalloc

    from pipeline.detect import Detector

    person = portrait(0, 0)
    frames = camera_frames(person.image, person.box, seed=1, n_frames=20, size=(640, 360))
    write_video(tmp_path / "long.mp4", frames)
    frame_bytes = frames[0].nbytes  # 0.7 MB
    del frames
    detector = Detector(smoke_checkpoint)
    tracemalloc.start()
    try:
        result, crops = detector.detect(tmp_path / "long.mp4", 20)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert result["frames_looked_at"] == 20 and result["frames_with_face"] > 10 and len(crops) == result["frames_with_face"]
    # Beside the crops kept (the report's thumbnails): a frame decoded, its conversion, dlib's copy. Not 20 frames.
    held = peak - sum(c.nbytes for c in crops)
    assert held < 8 * frame_bytes, f"{held / 2**20:.1f} MB held besides the crops for {20 * frame_bytes / 2**20:.0f} MB of frames"
    # The command line keeps no crop at all (it prints the report only): the same report, no 192 KB a frame.
    assert detector.detect(tmp_path / "long.mp4", 20, keep_crops=False) == (result, [])
