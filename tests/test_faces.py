import cv2
import numpy as np
import pytest

from pipeline.faces import Face, FaceDetector, box_from_five_points, crop_face, landmarks_model_path, square_around
from shards.synth.celebdf import photo_paths
from shards.video import sample_frames


@pytest.fixture(scope="module")
def detector():
    return FaceDetector(upsample=1, landmarks=True)


@pytest.fixture(scope="module")
def grace_hopper():
    return cv2.cvtColor(cv2.imread(str(photo_paths()[0])), cv2.COLOR_BGR2RGB)


def _inside(points, left, top, right, bottom):
    return (points[:, 0] >= left).all() and (points[:, 0] < right).all() and (points[:, 1] >= top).all() and (points[:, 1] < bottom).all()


def test_the_landmark_model_ships_in_its_wheel():
    assert landmarks_model_path().stat().st_size > 90_000_000


def test_dlib_finds_grace_hoppers_face_and_its_68_landmarks(detector, grace_hopper):
    faces = detector.detect(grace_hopper)
    assert len(faces) == 1
    left, top, right, bottom = faces[0].box
    assert 120 < right - left < 260 and 120 < bottom - top < 260  # her face is about 190 px of a 512 px photo
    assert faces[0].landmarks.shape == (68, 2)
    assert _inside(faces[0].landmarks[17:], left - 10, top - 30, right + 10, bottom + 10)


def test_the_crop_contains_the_face(detector, grace_hopper):
    face = detector.largest(grace_hopper)
    crop = crop_face(grace_hopper, face, size=256, scale=1.3)
    assert crop.image.shape == (256, 256, 3)
    assert _inside(crop.landmarks[17:], 0, 0, 256, 256)
    again = detector.largest(crop.image)  # the crop is a face picture in its own right
    assert again is not None and again.area > 0.3 * 256 * 256
    centre = np.array([(again.box[0] + again.box[2]) / 2, (again.box[1] + again.box[3]) / 2])
    assert np.abs(centre - 128).max() < 40


def test_faces_are_found_in_frames_of_a_synthetic_video(detector, celebdf_root):
    video = sorted((celebdf_root / "Celeb-synthesis").glob("*.mp4"))[0]
    sampled = sample_frames(str(video), 5)
    assert len(sampled.frames) == 5
    for _, frame in sampled.frames:
        assert len(detector.detect(frame)) == 1


def test_a_crop_past_the_frame_edge_is_padded_and_stays_square():
    frame = np.full((100, 100, 3), 200, np.uint8)
    crop = crop_face(frame, Face((60, 60, 100, 100), None), size=64, scale=1.3)
    assert crop.square == square_around((60, 60, 100, 100), 1.3) == (54, 54, 52)
    assert crop.image.shape == (64, 64, 3)
    assert crop.image[-1, -1].tolist() == [0, 0, 0] and crop.image[0, 0].tolist() == [200, 200, 200]


def test_a_frame_without_a_face_gives_none(detector):
    assert detector.largest(np.full((240, 320, 3), 127, np.uint8)) is None


def _iou(a, b):
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return w * h / (area(a) + area(b) - w * h)


@pytest.mark.parametrize("transform", ["as is", "mirrored", "smaller"])
def test_the_box_from_five_landmarks_matches_dlibs_box(detector, grace_hopper, transform):
    image = {"as is": grace_hopper, "mirrored": grace_hopper[:, ::-1],
             "smaller": cv2.resize(grace_hopper, None, fx=0.6, fy=0.6)}[transform]
    face = detector.largest(np.ascontiguousarray(image))
    L = face.landmarks
    five = {"lefteye": L[36:42].mean(0), "righteye": L[42:48].mean(0), "nose": L[30], "leftmouth": L[48], "rightmouth": L[54]}
    assert _iou(box_from_five_points(five), face.box) > 0.75
    again = detector.at(np.ascontiguousarray(image), box_from_five_points(five))  # the predictor in that box
    assert np.abs(again.landmarks - L).mean() < 0.05 * (face.box[2] - face.box[0])
